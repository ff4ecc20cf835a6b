"""Downloading only what the pack reads, against a local stand-in of the Hub (loopback HTTP, stdlib only).

The stand-in serves a fixture checkpoint plus the kinds of files the real repository also holds and nothing here
opens (half-precision and pickle copies of the text encoders, other frameworks), through the two Hub routes the
downloader uses: the paged tree listing and ``resolve`` with ``Range`` support."""

import hashlib
import http.server
import json
import os
import shutil
import threading
import urllib.parse

import pytest
from conftest import ckpt_path, run_cli

from uniar_backend import download as dl
from uniar_backend.errors import CheckpointError

REPO = "ShareLab-SII/UniAR-SFT"
EXTRA = {  # files the real repository holds that the pack never opens
    "sd3_pipeline/text_encoder_3/model.fp16.safetensors": 5000,
    "sd3_pipeline/text_encoder_3/pytorch_model.bin": 3000,
    "sd3_pipeline/text_encoder_2/model.fp16.safetensors": 2000,
    "sd3_pipeline/text_encoder/flax_model.msgpack": 1000,
    "sd3_transformer/diffusion_pytorch_model.fp16.safetensors": 4000,
    "onnx/model.onnx": 1500,
    "pytorch_model.bin": 2500,
}


class FakeHub(http.server.ThreadingHTTPServer):
    def __init__(self, root):
        super().__init__(("127.0.0.1", 0), Handler)
        self.root = root
        self.ranges = []  # Range headers seen
        self.cut = {}  # path -> serve only this many bytes (a broken connection)
        self.lie = {}  # path -> serve these bytes instead
        self.page = 7  # entries per listing page

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):  # noqa: N802
        srv = self.server
        u = urllib.parse.urlparse(self.path)
        tree = f"/api/models/{REPO}/tree/main"
        if u.path == tree:
            files = []
            for dirpath, _, names in os.walk(srv.root):
                for n in sorted(names):
                    p = os.path.join(dirpath, n)
                    rel = os.path.relpath(p, srv.root).replace(os.sep, "/")
                    data = open(p, "rb").read()
                    e = {"type": "file", "path": rel, "size": len(data)}
                    if n.endswith((".safetensors", ".bin", ".msgpack", ".onnx")):
                        e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}
                    else:
                        e["oid"] = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
                    files.append(e)
            files.sort(key=lambda e: e["path"])
            start = int(urllib.parse.parse_qs(u.query).get("cursor", ["0"])[0])
            body = json.dumps(files[start:start + srv.page]).encode()
            self.send_response(200)
            if start + srv.page < len(files):
                self.send_header("Link", f'<{tree}?recursive=true&cursor={start + srv.page}>; rel="next"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        prefix = f"/{REPO}/resolve/main/"
        if not u.path.startswith(prefix):
            self.send_error(404)
            return
        rel = urllib.parse.unquote(u.path[len(prefix):])
        p = os.path.join(srv.root, rel)
        if not os.path.isfile(p):
            self.send_error(404)
            return
        data = srv.lie.get(rel) or open(p, "rb").read()
        start = 0
        rng = self.headers.get("Range")
        if rng:
            srv.ranges.append((rel, rng))
            start = int(rng.split("=")[1].split("-")[0])
        body = data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if rel in srv.cut:  # the connection drops part way: fewer bytes than announced
            self.wfile.write(body[: srv.cut.pop(rel)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    shutil.copytree(ckpt_path("uniar-tiny"), root)
    for rel, n in EXTRA.items():
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        (root / rel).write_bytes(os.urandom(n))
    srv = FakeHub(str(root))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield srv
    srv.shutdown()
    srv.server_close()


def test_plan_takes_only_what_the_pack_reads(hub):
    files = dl.list_files(REPO)  # several pages
    assert len(files) > hub.page
    chosen = {f.path for f in dl.plan(files)}
    assert not chosen & set(EXTRA)
    every = {os.path.relpath(os.path.join(d, n), hub.root).replace(os.sep, "/")
             for d, _, ns in os.walk(hub.root) for n in ns}
    assert chosen == every - set(EXTRA)  # the fixture holds exactly the files the pack reads


def test_download_loads_and_runs(hub, tmp_path):
    from uniar_backend.decoder.components import check_parts
    from uniar_backend.loader import Checkpoint

    out = tmp_path / "models" / "UniAR-SFT"
    seen = []
    s = dl.download(REPO, str(out), verify=True, progress=lambda d, t: seen.append((d, t)))
    assert s["fetched"] == s["files"] and s["skipped"] == 0
    assert seen[-1][0] == seen[-1][1] == s["bytes"]
    assert not os.path.exists(out / dl.STAGING)
    for rel in EXTRA:
        assert not os.path.exists(out / rel)
    Checkpoint(str(out)).load_ar(components=("llm", "lm_head"), device="cpu", dtype="float32")
    check_parts(str(out))
    again = dl.download(REPO, str(out))
    assert again["fetched"] == 0 and again["skipped"] == s["files"]


def test_interrupted_download_resumes(hub, tmp_path):
    out = tmp_path / "ckpt"
    big = "model.safetensors"
    size = os.path.getsize(os.path.join(hub.root, big))
    hub.cut[big] = size // 3  # the connection drops a third of the way
    with pytest.raises(CheckpointError, match="run it again"):
        dl.download(REPO, str(out))
    assert not os.path.exists(out / big)  # nothing half-written in place
    assert os.path.getsize(out / dl.STAGING / (big + ".part")) == size // 3
    dl.download(REPO, str(out), verify=True)
    assert (big, f"bytes={size // 3}-") in hub.ranges
    assert open(out / big, "rb").read() == open(os.path.join(hub.root, big), "rb").read()


def test_wrong_size_and_wrong_hash_are_refused(hub, tmp_path):
    rel = "sd3_pipeline/vae/diffusion_pytorch_model.safetensors"
    data = open(os.path.join(hub.root, rel), "rb").read()
    hub.lie[rel] = data[:-10]
    with pytest.raises(CheckpointError, match="the Hub lists"):
        dl.download(REPO, str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a" / rel)
    hub.lie[rel] = bytes(reversed(data))  # right size, wrong content
    dl.download(REPO, str(tmp_path / "b"))  # sizes only: accepted
    with pytest.raises(CheckpointError, match="hash"):
        dl.download(REPO, str(tmp_path / "c"), verify=True)
    assert not os.path.exists(tmp_path / "c" / rel)


def test_free_space_is_checked_first(hub, tmp_path, monkeypatch):
    import collections

    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: collections.namedtuple("u", "total used free")(1, 1, 1000))
    with pytest.raises(CheckpointError, match="not enough disk space"):
        dl.download(REPO, str(tmp_path / "x"))
    assert not hub.ranges and not os.path.exists(tmp_path / "x" / "config.json")


def test_offline_and_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        dl.download(REPO, str(tmp_path / "x"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(CheckpointError, match="offline"):
        dl.download(REPO, str(tmp_path / "x"))
    with pytest.raises(Exception, match="not a Hugging Face repository id"):
        dl.list_files("../../etc")


def test_cli_download_and_dry_run(hub, tmp_path):
    r = run_cli("download", "--repo", REPO, "--out", tmp_path / "m", "--dry-run")
    assert "pytorch_model.bin" not in r.stdout and "model.safetensors" in r.stdout and " files, " in r.stdout
    assert not os.path.exists(tmp_path / "m")
    r = run_cli("download", "--repo", REPO, "--out", tmp_path / "m", "--verify")
    assert "fetched" in r.stdout and os.path.isfile(tmp_path / "m" / "config.json")
    (tmp_path / "f").write_text("x")
    r = run_cli("download", "--repo", REPO, "--out", tmp_path / "f", check=False)
    assert r.returncode == 2 and "is a file" in r.stderr
