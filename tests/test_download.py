"""Downloading only what the pack reads, against a local stand-in of the Hub (loopback HTTP, stdlib only).

The stand-in serves a fixture checkpoint plus the kinds of files the real repository also holds and nothing here
opens (half-precision and pickle copies of the text encoders, other frameworks), through the Hub routes the
downloader requests over ``huggingface_hub``'s HTTP session: the paged tree listing (``Link: next``, absolute URLs
as the Hub sends them) and ``resolve`` with ``Range`` support, optionally redirecting LFS files to a second loopback
server (a "CDN", as the Hub does).  Every request's ``Authorization`` header is recorded, so the tests see where a
token goes.  The library's own request to the endpoint (``/api/agent-harnesses`` in 2.x) gets a 404.

Each test runs with the installed huggingface_hub (2.x, httpx) and, in the suite's second pass, with 0.36
(requests)."""

import hashlib
import http.server
import json
import os
import shutil
import threading
import time
import types
import urllib.parse

import pytest
from conftest import ckpt_path, run_cli

from uniar_backend import download as dl
from uniar_backend.errors import CheckpointError

REPO = "ShareLab-SII/UniAR-SFT"
TOKEN = "hf_uniarTestToken0123456789"
EXTRA = {  # files the real repository holds that the pack never opens
    "sd3_pipeline/text_encoder_3/model.fp16.safetensors": 5000,
    "sd3_pipeline/text_encoder_3/pytorch_model.bin": 3000,
    "sd3_pipeline/text_encoder_2/model.fp16.safetensors": 2000,
    "sd3_pipeline/text_encoder/flax_model.msgpack": 1000,
    "sd3_transformer/diffusion_pytorch_model.fp16.safetensors": 4000,
    "onnx/model.onnx": 1500,
    "pytorch_model.bin": 2500,
}
LFS = (".safetensors", ".bin", ".msgpack", ".onnx")
TREE = f"/api/models/{REPO}/tree/main"
RESOLVE = f"/{REPO}/resolve/main/"


class FakeHub(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root, cdn=False):
        super().__init__(("127.0.0.1", 0), Handler)
        self.root = root
        self.is_cdn = cdn  # serves /cdn/<path> only
        self.requests = []  # (path, Range header, Authorization header) of every request
        self.ranges = []  # (file, Range) of file requests with a Range header
        self.cut = {}  # file -> serve only this many bytes (a broken connection)
        self.lie = {}  # file -> serve these bytes instead
        self.no_length = set()  # files served without Content-Length (the body ends when the connection closes)
        self.trickle = False  # True: every file, "tree": the listing, 1 byte every 0.5 s
        self.redirect_to = None  # a FakeHub(cdn=True): LFS files are answered with a 302 to it
        self.page = 7  # entries per listing page
        self.loop = None  # "self": a page whose Link next is itself; "endless": the first page again and again
        # under ever new cursors; "empty": [] + Link next, forever; a FakeHub: Link next on that other server
        self.extra_entries = []  # added to the listing as they are
        self.fail = {}  # "tree" / file -> (status, X-Error-Code)
        self.closing = threading.Event()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that stops reading (refused answers)
            super().handle_error(request, client_address)

    def auth_seen(self):
        return [a for _, _, a in self.requests if a]

    def listing(self):
        files = []
        for dirpath, _, names in os.walk(self.root):
            for n in sorted(names):
                p = os.path.join(dirpath, n)
                rel = os.path.relpath(p, self.root).replace(os.sep, "/")
                data = open(p, "rb").read()
                blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
                e = {"type": "file", "path": rel, "size": len(data), "oid": blob}
                if n.endswith(LFS):
                    e["oid"] = hashlib.sha1(b"pointer " + rel.encode()).hexdigest()  # the pointer's blob id
                    e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                files.append(e)
        files.sort(key=lambda e: e["path"])
        return files + self.extra_entries


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):  # noqa: N802
        srv = self.server
        u = urllib.parse.urlparse(self.path)
        srv.requests.append((u.path, self.headers.get("Range"), self.headers.get("Authorization")))
        if srv.is_cdn:
            if u.path.startswith("/cdn/"):
                return self.serve_file(urllib.parse.unquote(u.path[len("/cdn/"):]))
            return self.send_error(404)
        if u.path == TREE:
            return self.serve_tree(u)
        if u.path.startswith(RESOLVE):
            rel = urllib.parse.unquote(u.path[len(RESOLVE):])
            if rel in srv.fail:
                return self.fail(*srv.fail[rel])
            if srv.redirect_to is not None and rel.endswith(LFS):
                self.send_response(302)
                self.send_header("Location", f"{srv.redirect_to.url}/cdn/{urllib.parse.quote(rel)}?sig=x")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            return self.serve_file(rel)
        self.fail(404, "RepoNotFound")

    def fail(self, status, code=None):
        body = json.dumps({"error": f"stand-in error {status}"}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def serve_tree(self, u):
        srv = self.server
        if "tree" in srv.fail:
            return self.fail(*srv.fail["tree"])
        files = srv.listing()
        start = int(urllib.parse.parse_qs(u.query).get("cursor", ["0"])[0])
        loop = srv.loop
        if loop == "endless":
            files = (files[:srv.page] * (start // srv.page + 2))
        entries = [] if loop == "empty" else files[start:start + srv.page]
        body = json.dumps(entries).encode()
        self.send_response(200)
        nxt = start if loop == "self" else start + srv.page
        if loop or nxt < len(files):
            where = loop.url if isinstance(loop, FakeHub) else srv.url
            self.send_header("Link", f'<{where}{TREE}?recursive=true&expand=false&cursor={nxt}>; rel="next"')
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.trickle == "tree":
            return self.trickle(body)
        self.wfile.write(body)

    def trickle(self, body):
        """1 byte every 0.5 s, until the test ends."""
        for i in range(len(body)):
            if self.server.closing.wait(0.5):
                return
            self.wfile.write(body[i:i + 1])
            self.wfile.flush()

    def serve_file(self, rel):
        srv = self.server
        p = os.path.join(srv.root, rel)
        if not os.path.isfile(p):
            return self.fail(404, "EntryNotFound")
        data = srv.lie.get(rel) or open(p, "rb").read()
        start = 0
        rng = self.headers.get("Range")
        if rng:
            srv.ranges.append((rel, rng))
            start = int(rng.split("=")[1].split("-")[0])
        if start >= len(data) > 0:
            return self.fail(416)
        body = data[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if rel not in srv.no_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.trickle is True:
            return self.trickle(body)
        if rel in srv.cut:  # the connection drops part way: fewer bytes than announced
            self.wfile.write(body[: srv.cut.pop(rel)])
            self.wfile.flush()
            self.close_connection = True
            return
        if rel in srv.no_length:  # the first bytes, a pause, then the rest: they arrive as separate reads
            self.wfile.write(body[:10])
            self.wfile.flush()
            time.sleep(0.3)
            self.wfile.write(body[10:])
            return
        self.wfile.write(body)


def _serve(srv):
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _close(srv):
    srv.closing.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc

    root = tmp_path / "hub"
    shutil.copytree(ckpt_path("uniar-tiny"), root)
    for rel, n in EXTRA.items():
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        (root / rel).write_bytes(os.urandom(n))
    srv = _serve(FakeHub(str(root)))
    # the library reads HF_ENDPOINT at import time; the downloader reads it at call time and passes it on
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.setattr(hfc, "ENDPOINT", srv.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hfc, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))  # this machine's login stays out
    # huggingface_hub >= 1.x caches a registry fetched from the endpoint in HF_HOME: not from the stand-in
    monkeypatch.setattr(hfc, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"), raising=False)
    yield srv
    _close(srv)


@pytest.fixture()
def cdn(hub):
    c = _serve(FakeHub(hub.root, cdn=True))
    hub.redirect_to = c
    yield c
    _close(c)


def _no_retry_wait(monkeypatch):
    """The library retries unreachable hosts with growing sleeps (about 23 s): no sleeping in tests."""
    import time as _time

    import huggingface_hub.utils._http as h

    shim = types.SimpleNamespace(**{k: getattr(_time, k) for k in dir(_time) if not k.startswith("__")})
    shim.sleep = lambda s: None
    monkeypatch.setattr(h, "time", shim)


def test_plan_takes_only_what_the_pack_reads(hub):
    files = dl.list_files(REPO)  # several pages
    assert len(files) > hub.page
    chosen = {f.path for f in dl.plan(files)}
    assert not chosen & set(EXTRA)
    every = {os.path.relpath(os.path.join(d, n), hub.root).replace(os.sep, "/")
             for d, _, ns in os.walk(hub.root) for n in ns}
    assert chosen == every - set(EXTRA)  # the fixture holds exactly the files the pack reads
    f = {f.path: f for f in files}
    assert f["model.safetensors"].sha256 and not f["model.safetensors"].git_oid
    assert f["config.json"].git_oid and not f["config.json"].sha256


def test_download_loads_and_runs(hub, tmp_path):
    from uniar_backend.decoder.components import check_parts
    from uniar_backend.loader import Checkpoint

    out = tmp_path / "models" / "UniAR-SFT"
    seen = []
    s = dl.download(REPO, str(out), verify=True, progress=lambda d, t: seen.append((d, t)))
    assert s["fetched"] == s["files"] and s["skipped"] == 0
    assert seen[-1][0] == seen[-1][1] == s["bytes"]
    assert sum(1 for d, t in seen if d == t) == 1  # the end is reported once (the CLI ends its line there)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
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


def test_a_partial_file_that_no_longer_fits_is_dropped(hub, tmp_path):
    big = "model.safetensors"
    data = open(os.path.join(hub.root, big), "rb").read()
    part = tmp_path / "ckpt" / dl.STAGING / (big + ".part")
    os.makedirs(part.parent)
    part.write_bytes(data[:1000])
    hub.lie[big] = data[:100]  # the Hub now serves a shorter file: the Range is not satisfiable
    with pytest.raises(CheckpointError, match="does not fit.*run it again"):
        dl.download(REPO, str(tmp_path / "ckpt"))
    assert not part.exists()
    del hub.lie[big]
    dl.download(REPO, str(tmp_path / "ckpt"), verify=True)


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


@pytest.mark.parametrize("length", ["announced", "not announced"])
def test_more_bytes_than_listed_never_reach_the_disk(hub, tmp_path, length):
    """A file listed at 10 bytes whose server sends 5 MB: refused, and no file under the folder ever holds more than
    10 bytes (with Content-Length it is refused before anything is written; without, at the first read past 10)."""
    (open(os.path.join(hub.root, "README.md"), "wb")).write(b"0123456789")
    hub.lie["README.md"] = b"0123456789" + os.urandom(5 << 20)
    if length == "not announced":
        hub.no_length.add("README.md")
    out = tmp_path / "m"
    biggest, stop = {}, threading.Event()

    def watch():
        while not stop.is_set():
            for d, _, names in os.walk(out):
                for n in names:
                    if n.startswith("README.md"):
                        try:
                            biggest[n] = max(biggest.get(n, 0), os.path.getsize(os.path.join(d, n)))
                        except OSError:
                            pass
            time.sleep(0.001)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    try:
        with pytest.raises(CheckpointError, match="more than the 10 bytes the Hub lists"):
            dl.download(REPO, str(out))
    finally:
        stop.set()
        w.join()
    assert all(v <= 10 for v in biggest.values()), biggest
    assert not os.path.exists(out / "README.md")
    assert not os.path.exists(out / dl.STAGING / "README.md.part")  # the partial file is deleted


def test_the_token_goes_to_the_hub_never_to_the_cdn(hub, cdn, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "m"
    dl.download(REPO, str(out), verify=True)
    assert open(out / "model.safetensors", "rb").read() == open(os.path.join(hub.root, "model.safetensors"),
                                                                "rb").read()
    lfs_files = [p for p, _, _ in cdn.requests if p.startswith("/cdn/")]
    assert "/cdn/model.safetensors" in lfs_files  # the LFS files came from the "CDN"
    assert cdn.auth_seen() == []  # ... which never saw the token
    hub_paths = [p for p, _, a in hub.requests if a == f"Bearer {TOKEN}"]
    assert TREE in hub_paths and RESOLVE + "model.safetensors" in hub_paths and RESOLVE + "config.json" in hub_paths


def test_the_library_finds_the_token(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc

    dl.list_files(REPO)
    assert hub.auth_seen() == []  # no token anywhere: nothing sent
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    dl.list_files(REPO)
    assert hub.auth_seen()[-1] == f"Bearer {TOKEN}"
    monkeypatch.delenv("HF_TOKEN")
    stored = tmp_path / "token"
    stored.write_text("hf_storedLoginToken0123456789")  # what `hf auth login` writes
    monkeypatch.setattr(hfc, "HF_TOKEN_PATH", str(stored))
    dl.download(REPO, str(tmp_path / "m"))
    assert hub.auth_seen()[-1] == "Bearer hf_storedLoginToken0123456789"
    assert hub.requests[-1][0].startswith(RESOLVE)


def test_an_endless_listing_ends(hub, monkeypatch):
    hub.loop = "self"  # a page that names itself as the next one
    with pytest.raises(CheckpointError, match="already gave"):
        dl.list_files(REPO)
    assert sum(1 for p, _, _ in hub.requests if p == TREE) == 2
    monkeypatch.setattr(dl, "MAX_ENTRIES", 300)
    hub.loop, hub.requests[:] = "endless", []  # the same entries under ever new cursors
    with pytest.raises(CheckpointError, match="more than 300 entries"):
        dl.list_files(REPO)
    assert len(hub.requests) == 300 // hub.page + 1
    monkeypatch.setattr(dl, "MAX_PAGES", 50)
    hub.loop, hub.requests[:] = "empty", []  # empty pages, forever
    with pytest.raises(CheckpointError, match="past 50 pages"):
        dl.list_files(REPO)
    time.sleep(0.3)
    assert len(hub.requests) == 50  # and nothing goes on paging in the background


def test_a_listing_page_is_bounded(hub, monkeypatch):
    monkeypatch.setattr(dl, "MAX_PAGE_BYTES", 1000)
    with pytest.raises(CheckpointError, match="larger than"):
        dl.list_files(REPO)


def test_the_token_never_follows_a_next_page_elsewhere(hub, tmp_path, monkeypatch):
    other = _serve(FakeHub(hub.root))
    try:
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        hub.loop = other  # the first page names its next page on another server
        with pytest.raises(CheckpointError, match="another host"):
            dl.list_files(REPO)
        assert other.requests == [] and hub.auth_seen() == [f"Bearer {TOKEN}"]
    finally:
        _close(other)


def test_cancel_is_seen_while_a_read_is_blocked(hub, tmp_path):
    """A server sending 1 byte every 0.5 s: a progress callback that raises after 1 s stops download() at once,
    and the partial file does not change afterwards."""
    hub.trickle = True
    out = tmp_path / "m"
    t0 = []

    class Cancelled(Exception):
        pass

    def progress(done, total):
        t0.append(time.monotonic()) if not t0 else None
        if time.monotonic() - t0[0] > 1.0:
            raise Cancelled

    with pytest.raises(Cancelled):
        dl.download(REPO, str(out), progress=progress)
    assert time.monotonic() - t0[0] < 1.5
    parts = [os.path.join(d, n) for d, _, ns in os.walk(out / dl.STAGING) for n in ns]
    sizes = {p: os.path.getsize(p) for p in parts}
    assert len(parts) == 1 and list(sizes.values())[0] <= 3
    time.sleep(1.2)  # the server keeps sending: nothing more is written
    assert {p: os.path.getsize(p) for p in parts} == sizes


def test_a_stalled_server_is_stopped(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "STALL_SECONDS", 1.0)
    hub.trickle = True
    t = time.monotonic()
    with pytest.raises(CheckpointError, match="stalled.*run it again to resume"):
        dl.download(REPO, str(tmp_path / "m"))
    assert time.monotonic() - t < 3
    hub.trickle = "tree"  # the listing too
    t = time.monotonic()
    with pytest.raises(CheckpointError, match="listing.*stalled"):
        dl.list_files(REPO)
    assert time.monotonic() - t < 3


def test_free_space_is_checked_first(hub, tmp_path, monkeypatch):
    import collections

    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: collections.namedtuple("u", "total used free")(1, 1, 1000))
    with pytest.raises(CheckpointError, match="not enough disk space"):
        dl.download(REPO, str(tmp_path / "x"))
    assert not [p for p, _, _ in hub.requests if p.startswith(RESOLVE)]
    assert not os.path.exists(tmp_path / "x" / "config.json")


def test_offline_and_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        dl.download(REPO, str(tmp_path / "x"))
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        dl.list_files(REPO)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    _no_retry_wait(monkeypatch)
    import huggingface_hub.constants as hfc

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(hfc, "ENDPOINT", "http://127.0.0.1:9")  # (the library's own requests too)
    with pytest.raises(CheckpointError, match="offline"):
        dl.download(REPO, str(tmp_path / "x"))
    with pytest.raises(Exception, match="not a Hugging Face repository id"):
        dl.list_files("../../etc")


def test_hub_refusals_say_what_to_do(hub, tmp_path):
    hub.fail["tree"] = (401, "GatedRepo")
    with pytest.raises(CheckpointError, match="gated.*(HF_TOKEN|hf auth login)"):
        dl.download(REPO, str(tmp_path / "a"))
    hub.fail["tree"] = (404, "RepoNotFound")
    with pytest.raises(CheckpointError, match="not found.*HF_TOKEN"):
        dl.list_files(REPO)
    del hub.fail["tree"]
    hub.fail["config.json"] = (403, None)
    with pytest.raises(CheckpointError, match="config.json.*refused.*hf auth login"):
        dl.download(REPO, str(tmp_path / "b"))
    hub.fail["config.json"] = (404, "EntryNotFound")
    with pytest.raises(CheckpointError, match="config.json.*not found"):
        dl.download(REPO, str(tmp_path / "c"))


@pytest.mark.parametrize("bad", ["../evil.json", "/etc/passwd", "a\\b.json", "sd3_pipeline//x.json"])
def test_unsafe_listed_paths_are_refused(hub, bad):
    hub.extra_entries = [{"type": "file", "path": bad, "size": 3, "oid": "0" * 40}]
    with pytest.raises(CheckpointError, match="unusable file"):
        dl.list_files(REPO)


def test_cli_download_and_dry_run(hub, tmp_path):
    r = run_cli("download", "--repo", REPO, "--out", tmp_path / "m", "--dry-run")
    assert "pytorch_model.bin" not in r.stdout and "model.safetensors" in r.stdout and " files, " in r.stdout
    assert not os.path.exists(tmp_path / "m")
    r = run_cli("download", "--repo", REPO, "--out", tmp_path / "m", "--verify")
    assert "fetched" in r.stdout and os.path.isfile(tmp_path / "m" / "config.json")
    (tmp_path / "f").write_text("x")
    r = run_cli("download", "--repo", REPO, "--out", tmp_path / "f", check=False)
    assert r.returncode == 2 and "is a file" in r.stderr


def test_node_download_shows_progress_and_cancels_at_once(hub, tmp_path, monkeypatch):
    """The Download node's _download against stubs of ComfyUI's progress bar and interrupt flag: the bar ends at
    100 without repeating itself, and a cancel pressed while the server sends 1 byte every 0.5 s ends it at once."""
    import importlib
    import sys

    from comfy_stub import PACK, stubbed_pack

    class Interrupted(Exception):
        pass

    cancel, bar = threading.Event(), []
    comfy = types.ModuleType("comfy")
    comfy.model_management = types.ModuleType("comfy.model_management")
    comfy.model_management.throw_exception_if_processing_interrupted = \
        lambda: (_ for _ in ()).throw(Interrupted()) if cancel.is_set() else None
    comfy.utils = types.ModuleType("comfy.utils")
    comfy.utils.ProgressBar = lambda n: types.SimpleNamespace(update_absolute=lambda v, n: bar.append(v))
    comfy.model_patcher, comfy.ops = types.ModuleType("comfy.model_patcher"), types.ModuleType("comfy.ops")
    for name in ("model_management", "utils", "model_patcher", "ops"):
        monkeypatch.setitem(sys.modules, f"comfy.{name}", getattr(comfy, name))
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    os.makedirs(tmp_path / "comfy" / "input")
    with stubbed_pack(str(tmp_path / "comfy")):
        loader = importlib.import_module(PACK + ".nodes.loader")
        loader._download(REPO, str(tmp_path / "a"))
        assert bar[-1] == 100 and bar == sorted(set(bar))
        hub.trickle = True
        threading.Timer(1.0, cancel.set).start()
        t = time.monotonic()
        with pytest.raises(Interrupted):
            loader._download(REPO, str(tmp_path / "b"))
        assert time.monotonic() - t < 1.6
