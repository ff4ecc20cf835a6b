"""Downloading a UniAR checkpoint from the Hugging Face Hub: only the files this pack reads.

The Hub repository (``ShareLab-SII/UniAR-SFT``, ``UniAR-RL``) holds about 74 GB, much of it copies of the SD3 text
encoders in formats nothing here opens (half-precision variants, pickles, other frameworks).  :func:`plan` picks
the files the loaders read:

* top level: configs, tokenizer files, chat template, ``model.safetensors`` or its index and shards;
* ``bsq_encoder/``, ``sd3_transformer/``, ``sd3_pipeline/vae/`` and every ``sd3_pipeline/text_encoder*/``: the
  config and one set of weights, ``<base>.safetensors`` or ``<base>.safetensors.index.json`` with its shards
  (what ``safetensors``-only loading opens; variants such as ``model.fp16.safetensors`` and pickles are left);
* ``sd3_pipeline/``: ``model_index.json``, the scheduler config and the tokenizer folders;
* ``README.md`` and ``LICENSE*`` (the weights' terms travel with them).

:func:`download` fetches the plan with plain HTTP (the Hub's ``/api/models/<repo>/tree`` listing and
``/<repo>/resolve/<revision>/<path>`` files; ``HF_ENDPOINT`` and ``HF_TOKEN`` are honoured as by the Hub's own
client): it checks the free disk space first, resumes interrupted files (``Range`` requests into
``<dest>/.uniar_download/``), puts each file in place only when complete and of the listed size, and with
``verify=True`` checks the Hub's hashes (sha256 of LFS files, git blob ids of small files).  Nothing is fetched
unless asked: the CLI ``download`` command and the *UniAR Download Model* node call it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable

from .errors import CheckpointError, InputError

DEFAULT_ENDPOINT = "https://huggingface.co"
STAGING = ".uniar_download"
CHUNK = 8 << 20
MARGIN = 1 << 30  # free space kept beyond the download

TOP_FILES = {
    "config.json", "generation_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
    "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "README.md",
}
# folder -> weight-file base name; each holds config.json and one set of safetensors weights
WEIGHT_FOLDERS = {"": "model", "bsq_encoder": "model", "sd3_transformer": "diffusion_pytorch_model",
                  "sd3_pipeline/vae": "diffusion_pytorch_model"}
TEXT_ENCODER = re.compile(r"^sd3_pipeline/text_encoder(_\d+)?$")
TOKENIZER = re.compile(r"^sd3_pipeline/tokenizer(_\d+)?/[^/]+$")
SMALL_FILES = {"sd3_pipeline/model_index.json", "sd3_pipeline/scheduler/scheduler_config.json"}


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None  # LFS files
    git_oid: str | None = None  # small files: the git blob id


def _weight_set(folder: str, base: str, names: set[str]) -> set[str]:
    """One set of weights: ``base.safetensors``, else its index and the shards of the standard naming."""
    single = f"{base}.safetensors"
    if single in names:
        return {single}
    index = f"{base}.safetensors.index.json"
    if index in names:
        shard = re.compile(rf"^{re.escape(base)}-\d{{5}}-of-\d{{5}}\.safetensors$")
        return {index, *(n for n in names if shard.match(n))}
    return set()


def plan(files: list[RemoteFile]) -> list[RemoteFile]:
    """The files of a Hub listing that this pack reads (see the module doc)."""
    by_folder: dict[str, set[str]] = {}
    for f in files:
        folder, _, name = f.path.rpartition("/")
        by_folder.setdefault(folder, set()).add(name)
    keep: set[str] = set()
    for folder, names in by_folder.items():
        prefix = folder + "/" if folder else ""
        base = WEIGHT_FOLDERS.get(folder) or ("model" if TEXT_ENCODER.match(folder) else None)
        if base is not None:
            keep |= {prefix + n for n in _weight_set(folder, base, names)}
            if "config.json" in names:
                keep.add(prefix + "config.json")
        if folder == "":
            keep |= {n for n in names if n in TOP_FILES or n.startswith("LICENSE")}
    keep |= {f.path for f in files if f.path in SMALL_FILES or TOKENIZER.match(f.path)}
    return sorted((f for f in files if f.path in keep), key=lambda f: f.path)


# ---------------------------------------------------------------------------------------------- HTTP
def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def _request(url: str, headers: dict | None = None, timeout: float = 60):
    h = {"User-Agent": "uniar-nodes"}
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers or {})
    return urllib.request.urlopen(urllib.request.Request(url, headers=h), timeout=timeout)


def _check_repo(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}", repo_id) \
            or ".." in repo_id:
        raise InputError(f"not a Hugging Face repository id: {str(repo_id)[:100]!r} (expected owner/name)")
    return repo_id


def list_files(repo_id: str, revision: str = "main") -> list[RemoteFile]:
    """Every file of the repository at ``revision`` with its size and hashes (the Hub's tree listing, all pages)."""
    repo_id = _check_repo(repo_id)
    url = (f"{endpoint()}/api/models/{repo_id}/tree/{urllib.parse.quote(revision, safe='')}"
           "?recursive=true&expand=false")
    out = []
    while url:
        try:
            with _request(url) as r:
                entries = json.load(r)
                link = r.headers.get("Link", "")
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot list {repo_id} on {endpoint()} ({_reason(e)}); is this machine offline? "
                                  "Download the folder by hand instead") from None
        if not isinstance(entries, list):
            raise CheckpointError(f"{repo_id}: unexpected answer from the Hub listing")
        for e in entries:
            if not isinstance(e, dict) or e.get("type") != "file":
                continue
            path, size = e.get("path"), e.get("size")
            if not isinstance(path, str) or not isinstance(size, int) or size < 0 or _unsafe(path):
                raise CheckpointError(f"{repo_id}: the Hub listing names an unusable file {str(path)[:100]!r}")
            lfs = e.get("lfs") if isinstance(e.get("lfs"), dict) else None
            out.append(RemoteFile(path, size, sha256=lfs.get("oid") if lfs else None,
                                  git_oid=None if lfs else e.get("oid")))
        m = re.search(r'<([^>]+)>;\s*rel="next"', link)
        url = urllib.parse.urljoin(url, m.group(1)) if m else None
    return out


def _unsafe(path: str) -> bool:
    parts = path.split("/")
    return path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts)


# ---------------------------------------------------------------------------------------------- download
def _hash_ok(path: str, f: RemoteFile) -> bool:
    if f.sha256:
        h = hashlib.sha256()
    elif f.git_oid:
        h = hashlib.sha1(f"blob {f.size}\0".encode())
    else:
        return True
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest() == (f.sha256 or f.git_oid)


def _have(path: str, f: RemoteFile) -> bool:
    return os.path.isfile(path) and os.path.getsize(path) == f.size


def download(repo_id: str, dest: str, revision: str = "main", verify: bool = False,
             progress: Callable[[int, int], None] | None = None, files: list[RemoteFile] | None = None) -> dict:
    """Fetch the files of :func:`plan` into ``dest``; returns a summary (files, bytes, fetched, skipped).

    ``progress(done_bytes, total_bytes)`` is called as data arrives; an exception raised in it stops the download
    (the partial file stays in the staging folder and the next call resumes it)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise CheckpointError(f"HF_HUB_OFFLINE is set, so {repo_id} is not downloaded; put the checkpoint folder at "
                              f"{dest} yourself")
    wanted = plan(files if files is not None else list_files(repo_id, revision))
    if not any(f.path == "config.json" for f in wanted):
        raise CheckpointError(f"{repo_id} has no config.json: not a UniAR checkpoint repository")
    dest = os.path.abspath(dest)
    staging = os.path.join(dest, STAGING)
    total = sum(f.size for f in wanted)
    todo = [f for f in wanted if not _have(os.path.join(dest, f.path), f)]
    partial = sum(os.path.getsize(p) for f in todo if os.path.isfile(p := os.path.join(staging, f.path + ".part")))
    need = sum(f.size for f in todo) - partial
    _check_space(dest, need)
    done = total - sum(f.size for f in todo)
    if progress is not None:
        progress(done, total)
    for f in wanted:
        target = os.path.join(dest, f.path)
        if f not in todo:
            if verify and not _hash_ok(target, f):
                raise CheckpointError(f"{target} does not match the Hub's hash; delete it and download again")
            continue
        done = _fetch(repo_id, revision, f, target, os.path.join(staging, f.path + ".part"), verify, done, total,
                      progress)
    shutil.rmtree(staging, ignore_errors=True)
    return {"files": len(wanted), "bytes": total, "fetched": len(todo), "skipped": len(wanted) - len(todo)}


def _fetch(repo_id, revision, f: RemoteFile, target: str, part: str, verify: bool, done: int, total: int,
           progress) -> int:
    os.makedirs(os.path.dirname(part), exist_ok=True)
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    if have > f.size:
        os.unlink(part)
        have = 0
    url = f"{endpoint()}/{repo_id}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(f.path)}"
    done += have
    if have < f.size:
        try:
            with _request(url, {"Range": f"bytes={have}-"} if have else None, timeout=120) as r:
                mode = "ab" if have and r.status == 206 else "wb"
                if mode == "wb":
                    done -= have
                with open(part, mode) as out:
                    for block in iter(lambda: r.read(CHUNK), b""):
                        out.write(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, total)
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            raise CheckpointError(f"download of {repo_id}/{f.path} failed ({_reason(e)}); run it again to resume") \
                from None
    size = os.path.getsize(part)
    if size > f.size:
        os.unlink(part)
        raise CheckpointError(f"{repo_id}/{f.path}: got {size} bytes, the Hub lists {f.size}; run it again")
    if size < f.size:  # the connection ended early: keep what arrived, the next run resumes
        raise CheckpointError(f"{repo_id}/{f.path}: got {size} of the {f.size} bytes the Hub lists; run it again to "
                              "resume")
    if verify and not _hash_ok(part, f):
        os.unlink(part)
        raise CheckpointError(f"{repo_id}/{f.path} does not match the Hub's hash; run it again")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(part, target)
    return done


def _check_space(dest: str, need: int) -> None:
    probe = dest
    while not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if need + MARGIN > free:
        raise CheckpointError(f"not enough disk space in {probe}: the download needs {_gb(need)} GB (plus 1 GB to "
                              f"spare), {_gb(free)} GB are free")


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f}"


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}{' (gated or private: set HF_TOKEN)' if e.code in (401, 403) else ''}"
    return str(getattr(e, "reason", None) or e)[:200]
