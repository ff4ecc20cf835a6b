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

:func:`download` talks to the Hub only through ``huggingface_hub`` (imported when called, never at import time):
its HTTP session (proxies, retries, ``HF_HUB_OFFLINE``), its auth headers (``build_hf_headers``: ``HF_TOKEN`` or
the token stored by ``hf auth login``) and ``hf_raise_for_status`` (gated, private, not found).  The listing is the
Hub's paged tree listing, each page read up to :data:`MAX_PAGE_BYTES`, at most :data:`MAX_ENTRIES` entries and
:data:`MAX_PAGES` pages, a next page only on the endpoint's own origin; each file is one
``GET <endpoint>/<repo>/resolve/<revision>/<path>`` (with ``Range`` to resume).  The token goes to the endpoint
only: the HTTP client drops it when the Hub redirects a file to its CDN or anywhere else.  ``HF_ENDPOINT`` is read
at call time.  Xet and hf_transfer are not used: plain HTTP with ``Range`` is what resumes into the staging folder.

Each transfer runs in a worker thread; the calling thread polls it every :data:`POLL_SECONDS`, calls
``progress(done, total)`` (an exception raised there, e.g. ComfyUI's cancel, stops the download at once, even while
a read is blocked) and stops a transfer that stalls (fewer than :data:`STALL_BYTES` in :data:`STALL_SECONDS`).
After a stop the worker never touches the partial file again.  It checks the free disk space first, resumes
interrupted files in ``<dest>/.uniar_download/``, never writes more than the listed size (a server sending more is
refused and its partial file deleted), puts each file in place only when complete and of the listed size, and with
``verify=True`` checks the Hub's hashes (sha256 of LFS files, git blob ids of small files).  Nothing is fetched
unless asked: the CLI ``download`` command and the *UniAR Download Model* node call it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import re
import shutil
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

from .errors import CheckpointError, InputError
from .jsonfile import parse_json

DEFAULT_ENDPOINT = "https://huggingface.co"
STAGING = ".uniar_download"
CHUNK = 1 << 20  # most bytes one read returns (reads return what has arrived, up to this)
HASH_CHUNK = 8 << 20
MARGIN = 1 << 30  # free space kept beyond the download
# Read at call time, so tests (and callers) can change them.
POLL_SECONDS = 0.1  # how often the calling thread checks a transfer and calls progress
STALL_SECONDS = 60.0  # a transfer that received fewer than STALL_BYTES in this many seconds is stopped
STALL_BYTES = 64 << 10
MAX_ENTRIES = 200_000  # a Hub listing longer than this is refused (an endless "Link: next" ends)
MAX_PAGES = 1_000  # ... or of more pages than this (the Hub sends up to 1000 entries a page)
MAX_PAGE_BYTES = 16 << 20  # ... or with a page larger than this (a page of 1000 entries is about 300 KB)

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


# ---------------------------------------------------------------------------------------------- Hub access
def endpoint() -> str:
    """The Hub endpoint: ``HF_ENDPOINT`` as set now, else the library's (``https://huggingface.co``)."""
    ep = os.environ.get("HF_ENDPOINT")
    if not ep:
        try:
            from huggingface_hub import constants
            ep = constants.ENDPOINT
        except ImportError:
            ep = DEFAULT_ENDPOINT
    return ep.rstrip("/")


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return True
    from huggingface_hub import constants  # what the library read at import time (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE)

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _check_repo(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}", repo_id) \
            or ".." in repo_id:
        raise InputError(f"not a Hugging Face repository id: {str(repo_id)[:100]!r} (expected owner/name)")
    return repo_id


def _unsafe(path: str) -> bool:
    parts = path.split("/")
    return path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts)


class _Job:
    """The state a worker thread shares with the calling thread.  ``stop()`` sets ``stopped`` under ``lock``; the
    worker does every file operation under ``lock`` and only while not stopped, so after ``stop()`` returns the
    worker never touches the partial file again (it may stay blocked in a read: it is a daemon thread)."""

    def __init__(self, pos: int = 0):
        self.lock = threading.Lock()
        self.stopped = False
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self.received = 0  # bytes received: what the stall deadline measures
        self.pos = pos  # bytes in the partial file
        self.fh = None

    def stop(self) -> None:
        # The HTTP response is not closed from here: it belongs to the library's shared, pooled client, and closing
        # it from another thread while the worker reads it breaks other requests on that client.  The worker leaves
        # at its next read (the next bytes, the end, or the library's read timeout, HF_HUB_DOWNLOAD_TIMEOUT).
        with self.lock:
            self.stopped = True
            if self.fh is not None:
                self.fh.close()
                self.fh = None


def _watch(job: _Job, tick: Callable[[], None] | None, stall_seconds: float, stall_min: int,
           stalled: Callable[[], str]) -> None:
    """Wait for ``job`` in the calling thread: ``tick()`` every POLL_SECONDS (an exception there stops the job and
    propagates), and a CheckpointError when fewer than ``stall_min`` units arrived in the last ``stall_seconds``."""
    start = time.monotonic()
    samples = collections.deque([(start, 0)])
    try:
        while True:
            finished = job.finished.wait(POLL_SECONDS)
            if tick is not None:
                tick()
            if finished:
                return
            now, got = time.monotonic(), job.received
            samples.append((now, got))
            while len(samples) > 1 and samples[1][0] <= now - stall_seconds:
                samples.popleft()
            if now - start >= stall_seconds and got - samples[0][1] < stall_min:
                raise CheckpointError(stalled())
    except BaseException:
        job.stop()
        raise


def _explain(e: BaseException, repo_id: str, what: str) -> CheckpointError:
    """One clear error for a failed Hub request (``what``: "list <repo>" or "download <repo>/<path>")."""
    if isinstance(e, CheckpointError):
        return e
    from huggingface_hub import errors

    ep = endpoint()
    if isinstance(e, errors.OfflineModeIsEnabled):
        return CheckpointError(f"cannot {what}: HF_HUB_OFFLINE is set (offline mode)")
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        login = (f"if it is gated, accept its terms on {ep}/{repo_id} first; if it is private or gated, set HF_TOKEN "
                 "or run `hf auth login`")
        if isinstance(e, errors.GatedRepoError) or status == 403:
            return CheckpointError(f"cannot {what}: access refused (HTTP {status}, gated or private repository; "
                                   f"{login})")
        if isinstance(e, errors.RepositoryNotFoundError) or status == 401:
            return CheckpointError(f"cannot {what}: {repo_id} was not found on {ep}, or it needs a login (HTTP "
                                   f"{status}; check the name; {login})")
        if isinstance(e, errors.RevisionNotFoundError):
            return CheckpointError(f"cannot {what}: no such revision on {ep} (HTTP {status})")
        if status == 404:
            return CheckpointError(f"cannot {what}: not found on {ep} (HTTP 404)")
        return CheckpointError(f"cannot {what}: the Hub answered HTTP {status}; run it again later (it resumes)")
    if isinstance(e, ValueError):  # a listing page that is not JSON
        return CheckpointError(f"cannot {what}: unexpected answer from {ep} ({type(e).__name__})")
    reason = str(e).strip()[:200] or type(e).__name__
    if isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("requests", "urllib3", "httpx", "httpx2",
                                                                        "httpcore", "h11", "h2", "ssl", "socket"):
        return CheckpointError(f"cannot {what}: no connection to {ep} or the host it redirects to ({reason}); is "
                               "this machine offline? Run it again to resume")
    return CheckpointError(f"cannot {what}: {type(e).__name__}: {reason}; run it again")


# ---------------------------------------------------------------------------------------------- listing
def list_files(repo_id: str, revision: str = "main") -> list[RemoteFile]:
    """Every file of the repository at ``revision`` with its size and hashes: the Hub's tree listing
    (``/api/models/<repo>/tree/<revision>?recursive=true``), all pages, through the library's HTTP session and auth.

    The pages are followed here rather than by ``HfApi.list_repo_tree``, which sends the token to whatever host a
    ``Link: next`` names and reads each page whole: a next page on another origin than the endpoint is refused, a
    page is read up to MAX_PAGE_BYTES, and the listing stops past MAX_ENTRIES entries or MAX_PAGES pages or when a
    page names itself again."""
    repo_id = _check_repo(repo_id)
    if _offline():
        raise CheckpointError(f"HF_HUB_OFFLINE is set, so {repo_id} is not listed")
    out: list[RemoteFile] = []
    job = _Job()
    threading.Thread(target=_list_worker, args=(job, repo_id, revision, out), daemon=True, name="uniar-list").start()
    stall_seconds, stall_bytes = STALL_SECONDS, STALL_BYTES
    _watch(job, None, stall_seconds, stall_bytes,
           lambda: (f"the listing of {repo_id} on {endpoint()} stalled (less than {stall_bytes // 1024} KiB in "
                    f"{stall_seconds:g} s); run it again"))
    if isinstance(job.error, _Broken):
        job.error = job.error.error
    if job.error is not None:
        raise _explain(job.error, repo_id, f"list {repo_id}") from None
    return out


def _origin(url: str) -> tuple:
    u = urllib.parse.urlsplit(url)
    return u.scheme.lower(), (u.hostname or "").lower(), u.port or {"http": 80, "https": 443}.get(u.scheme.lower())


def _list_worker(job: _Job, repo_id: str, revision: str, out: list) -> None:
    try:
        from huggingface_hub.utils import hf_raise_for_status

        ep = endpoint()
        url = f"{ep}/api/models/{repo_id}/tree/{urllib.parse.quote(revision, safe='')}?recursive=true&expand=false"
        headers, timeout = _headers()  # the token they carry is for the endpoint only (see below)
        max_entries, max_pages, max_bytes = MAX_ENTRIES, MAX_PAGES, MAX_PAGE_BYTES
        seen, entries = set(), 0
        while url:
            if len(seen) >= max_pages:
                raise CheckpointError(f"the listing of {repo_id} on {ep} runs past {max_pages:,} pages; refused")
            seen.add(url)
            body = bytearray()
            with _stream(url, headers, timeout) as (r, chunks):
                hf_raise_for_status(r)
                for block in _arrivals(chunks):
                    with job.lock:
                        if job.stopped:
                            return
                        job.received += len(block)
                    body += block
                    if len(body) > max_bytes:
                        raise CheckpointError(f"a page of the listing of {repo_id} on {ep} is larger than "
                                              f"{max_bytes >> 20} MiB; refused")
                nxt = (r.links.get("next") or {}).get("url")
            page = parse_json(bytes(body), f"a page of the listing of {repo_id} on {ep}", max_bytes=max_bytes,
                              want=list)
            for e in page:
                entries += 1
                if entries > max_entries:
                    raise CheckpointError(f"the listing of {repo_id} on {ep} has more than {max_entries:,} entries; "
                                          "refused (a UniAR repository holds a few dozen files)")
                if not isinstance(e, dict):
                    raise CheckpointError(f"{repo_id}: unexpected answer from the Hub listing on {ep}")
                if e.get("type") != "file":
                    continue
                path, size = e.get("path"), e.get("size")
                if not isinstance(path, str) or isinstance(size, bool) or not isinstance(size, int) or size < 0 \
                        or _unsafe(path):
                    raise CheckpointError(f"{repo_id}: the Hub listing names an unusable file {str(path)[:100]!r}")
                lfs = e.get("lfs") if isinstance(e.get("lfs"), dict) else None
                sha, oid = (lfs or {}).get("oid"), e.get("oid")
                out.append(RemoteFile(path, size, sha256=sha if isinstance(sha, str) else None,
                                      git_oid=oid if lfs is None and isinstance(oid, str) else None))
            if nxt is None:
                return
            url = urllib.parse.urljoin(url, nxt)
            if _origin(url) != _origin(ep):  # the token is for the endpoint: never follow a page elsewhere
                raise CheckpointError(f"the listing of {repo_id} on {ep} names its next page on another host "
                                      f"({_origin(url)[0]}://{_origin(url)[1]}:{_origin(url)[2]}); refused")
            if url in seen:
                raise CheckpointError(f"the listing of {repo_id} on {ep} names a page it already gave (a loop); "
                                      "refused")
    except BaseException as e:  # noqa: BLE001 - handed to the calling thread
        job.error = e
    finally:
        job.finished.set()


# ---------------------------------------------------------------------------------------------- download
def _hash_ok(path: str, f: RemoteFile, tick: Callable[[], None] | None = None) -> bool:
    if f.sha256:
        h = hashlib.sha256()
    elif f.git_oid:
        h = hashlib.sha1(f"blob {f.size}\0".encode())
    else:
        return True
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(HASH_CHUNK), b""):
            h.update(block)
            if tick is not None:
                tick()  # progress is called while hashing too, so a cancel is seen
    return h.hexdigest() == (f.sha256 or f.git_oid)


def _have(path: str, f: RemoteFile) -> bool:
    return os.path.isfile(path) and os.path.getsize(path) == f.size


def download(repo_id: str, dest: str, revision: str = "main", verify: bool = False,
             progress: Callable[[int, int], None] | None = None, files: list[RemoteFile] | None = None) -> dict:
    """Fetch the files of :func:`plan` into ``dest``; returns a summary (files, bytes, fetched, skipped).

    ``progress(done_bytes, total_bytes)`` is called from the calling thread about every POLL_SECONDS while data
    arrives; an exception raised in it stops the download at once (the partial file stays in the staging folder and
    the next call resumes it)."""
    if _offline():
        raise CheckpointError(f"HF_HUB_OFFLINE is set, so {repo_id} is not downloaded; put the checkpoint folder at "
                              f"{dest} yourself")
    wanted = plan(files if files is not None else list_files(repo_id, revision))
    if not any(f.path == "config.json" for f in wanted):
        raise CheckpointError(f"{repo_id} has no config.json: not a UniAR checkpoint repository")
    dest = os.path.abspath(dest)
    staging = os.path.join(dest, STAGING)
    total = sum(f.size for f in wanted)
    todo = [f for f in wanted if not _have(os.path.join(dest, f.path), f)]
    partial = sum(min(os.path.getsize(p), f.size) for f in todo
                  if os.path.isfile(p := os.path.join(staging, f.path + ".part")))
    need = sum(f.size for f in todo) - partial
    _check_space(dest, need)
    done = total - sum(f.size for f in todo)
    report = _Reporter(progress, total)
    report(done)
    for f in wanted:
        target = os.path.join(dest, f.path)
        if f not in todo:
            if verify and not _hash_ok(target, f, lambda: report(done)):
                raise CheckpointError(f"{target} does not match the Hub's hash; delete it and download again")
            continue
        _fetch(repo_id, revision, f, target, os.path.join(staging, f.path + ".part"), verify, done, report)
        done += f.size
        report(done)
    shutil.rmtree(staging, ignore_errors=True)
    return {"files": len(wanted), "bytes": total, "fetched": len(todo), "skipped": len(wanted) - len(todo)}


class _Reporter:
    """Calls ``progress(done, total)``; (total, total) at most once in a row (the CLI ends its line there)."""

    def __init__(self, progress, total: int):
        self.progress, self.total, self.last = progress, total, None

    def __call__(self, done: int) -> None:
        if self.progress is None or (done == self.total and self.last == done):
            return
        self.last = done
        self.progress(done, self.total)


def _fetch(repo_id: str, revision: str, f: RemoteFile, target: str, part: str, verify: bool, done: int,
           report: _Reporter) -> None:
    os.makedirs(os.path.dirname(part), exist_ok=True)
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    if have > f.size:
        os.unlink(part)
        have = 0
    name = f"{repo_id}/{f.path}"
    if have < f.size:
        job = _Job(pos=have)
        threading.Thread(target=_transfer, args=(job, _resolve_url(repo_id, revision, f.path), part, have, f.size),
                         daemon=True, name="uniar-download").start()
        stall_seconds, stall_bytes = STALL_SECONDS, STALL_BYTES
        _watch(job, lambda: report(done + job.pos), stall_seconds, stall_bytes,
               lambda: (f"download of {name} stalled: the server sent less than {stall_bytes // 1024} KiB in the last "
                        f"{stall_seconds:g} s ({job.pos} of {f.size} bytes here); run it again to resume"))
        if isinstance(job.error, _TooMuch):
            raise CheckpointError(f"{name}: the server sent more than the {f.size} bytes the Hub lists; refused, "
                                  "the partial file was deleted; run it again") from None
        if isinstance(job.error, _Refused):
            raise CheckpointError(f"{name}: {job.error}; run it again") from None
        if isinstance(job.error, _Broken):
            reason = str(job.error.error).strip()[:200] or type(job.error.error).__name__
            raise CheckpointError(f"download of {name} broke off after {job.pos} of {f.size} bytes ({reason}); run "
                                  "it again to resume") from None
        if have and getattr(getattr(job.error, "response", None), "status_code", None) == 416:
            with contextlib.suppress(FileNotFoundError):  # the Hub's file is not what the partial file began
                os.unlink(part)  # (the worker has ended)
            raise CheckpointError(f"{name}: the partial download does not fit the Hub's file (HTTP 416); it was "
                                  "deleted, run it again") from None
        if job.error is not None:
            raise _explain(job.error, repo_id, f"download {name}") from None
    size = os.path.getsize(part) if os.path.isfile(part) else 0
    if size > f.size:  # cannot happen (nothing beyond the listed size is written); kept as a last guard
        os.unlink(part)
        raise CheckpointError(f"{name}: got {size} bytes, the Hub lists {f.size}; run it again")
    if size < f.size:  # the connection ended early: keep what arrived, the next run resumes
        raise CheckpointError(f"{name}: got {size} of the {f.size} bytes the Hub lists; run it again to resume")
    if verify and not _hash_ok(part, f, lambda: report(done + f.size)):
        os.unlink(part)
        raise CheckpointError(f"{name} does not match the Hub's hash; run it again")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(part, target)


def _resolve_url(repo_id: str, revision: str, path: str) -> str:
    # The format of huggingface_hub.hf_hub_url, built on endpoint() (hf_hub_url swaps in a custom endpoint only when
    # its import-time template matches the import-time constants.ENDPOINT).
    return f"{endpoint()}/{repo_id}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(path)}"


class _TooMuch(Exception):
    """The server sends more than the listed size."""


class _Refused(Exception):
    """An answer that cannot be the requested bytes."""


class _Broken(Exception):
    """The connection failed while the body was read (wrapped so that the library's retry loop does not see it)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def _stream(url: str, headers: dict, timeout: float):
    """A streamed GET through huggingface_hub's own session and retries: yields (response, chunk iterator)."""
    from huggingface_hub import utils as hfu

    if hasattr(hfu, "http_stream_backoff"):  # huggingface_hub >= 1.0 (httpx)
        with hfu.http_stream_backoff("GET", url, headers=headers, timeout=timeout) as r:
            yield r, r.iter_bytes()
    else:  # huggingface_hub < 1.0 (requests)
        r = hfu.http_backoff("GET", url, headers=headers, stream=True, timeout=timeout)
        try:
            yield r, _raw_chunks(r.raw)
        finally:
            r.close()


def _arrivals(chunks):
    """The non-empty blocks of a response's chunk iterator; a failure while reading becomes :class:`_Broken`
    (so the library's retry loop around the request does not see it).  No lock is held between blocks."""
    while True:
        try:
            block = next(chunks, b"")
        except Exception as e:  # noqa: BLE001
            raise _Broken(e) from e
        if not block:
            return
        yield block


def _raw_chunks(raw):
    read1 = getattr(raw, "read1", None)  # urllib3 >= 2: returns what has arrived
    while True:
        block = read1(CHUNK, decode_content=True) if read1 is not None else raw.read(16 << 10, decode_content=True)
        if not block:
            return
        yield block


def _range_start(value: str | None) -> int | None:
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    return int(m.group(1)) if m else None


def _headers() -> tuple[dict, float]:
    """The library's headers (its auth: HF_TOKEN or the stored ``hf auth login`` token, user agent) and timeout."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"  # the file's own bytes: sizes and Range offsets are byte offsets
    return headers, float(getattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 10) or 10)


def _transfer(job: _Job, url: str, part: str, offset: int, size: int) -> None:
    """Worker thread: fetch bytes ``offset..size`` of one file into ``part``; never more than ``size`` in all."""
    try:
        from huggingface_hub.utils import hf_raise_for_status

        headers, timeout = _headers()
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with _stream(url, headers, timeout) as (r, chunks):
            hf_raise_for_status(r)
            if r.status_code == 206:
                start = _range_start(r.headers.get("Content-Range"))
                if start != offset:
                    raise _Refused(f"asked for bytes {offset}- and got {r.headers.get('Content-Range')!r}")
            elif r.status_code == 200:
                offset = 0  # the whole file: start again
            else:
                raise _Refused(f"unexpected answer HTTP {r.status_code}")
            length = r.headers.get("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > size - offset:
                raise _TooMuch()
            with job.lock:
                if job.stopped:
                    return
                job.fh = open(part, "r+b" if os.path.exists(part) else "wb", buffering=0)
                job.fh.seek(offset)
                job.fh.truncate()
                job.pos = offset
            for block in _arrivals(chunks):
                with job.lock:  # checked and written under the lock: nothing is written after stop()
                    if job.stopped:
                        return
                    job.received += len(block)
                    if len(block) > size - job.pos:
                        raise _TooMuch()
                    view = memoryview(block)
                    while view:
                        view = view[job.fh.write(view):]
                    job.pos += len(block)
    except BaseException as e:  # noqa: BLE001 - handed to the calling thread
        job.error = e
    finally:
        with job.lock:
            if job.fh is not None:
                job.fh.close()
                job.fh = None
            if isinstance(job.error, _TooMuch) and not job.stopped and os.path.exists(part):
                os.unlink(part)
        job.finished.set()


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
