"""``python -m uniar_backend batch``: many images from a JSONL of prompts, deterministic and resumable, in one
process or under ``torchrun`` / ``accelerate launch`` (no scheduler of our own: those engines start the processes,
this module only decides which process does what, from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``).

Input and output follow upstream's ``inference/generate_batch.py`` (so evaluation scripts read a run unchanged)::

    prompts.jsonl                     {"idx": int, "prompt": str, "meta": {...}}   (idx defaults to the line's rank)
    RUN/<idx:05d>/metadata.json       the record as given, plus "uniar": settings and each sample's seed
    RUN/<idx:05d>/samples/<k:04d>.png
    RUN/<idx:05d>/tokens/<k:04d>.safetensors   (the AR tokens: decode them again, elsewhere, or caption them)
    RUN/uniar_run.json                the run's manifest: settings, model fingerprint, prompts digest, pack version
    RUN/summary.json                  what this process did (summary-rank<r>.json under several processes)
    RUN/failures.json                 every sample that failed, with its error (from RUN/<idx>/failed/<k>.json)

Determinism (what upstream lacks: its AR draw is not seeded per sample and its decoder seed depends on the rank):

* every sample (idx, k) has its own seed, :func:`sample_seed` of ``--seed``, idx and k, used for its AR draw (its own
  stream, CFG row included: :func:`uniar_backend.sampling.sample` with one seed per prompt) and for its decoder
  noise (:meth:`UniARDecoder.decode` with one seed per image), exactly as ``t2i --seed <that seed>`` uses one seed;
* the samples are grouped into batches of ``--batch-size`` consecutive (idx, k) pairs *before* sharding, and a
  process takes whole batches (``batches[rank::world]``), so a batch is always computed with the same rows;
* a batch is skipped only when all its outputs exist, else recomputed whole; every file is written atomically.

So the files do not depend on the number of processes, on interruptions or on resumes; at batch size 1 each
sample equals ``t2i`` run alone with its seed (the metadata names it).  The batch size itself is a setting of the
run: rows computed together may differ from rows computed alone in the last bits of float arithmetic.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

from .errors import InputError

# upstream generate_batch.py's defaults (an evaluation run reproduces its setting)
DEFAULTS = {"height": 512, "width": 512, "cfg": 2.0, "temperature": 0.1, "samples_per_prompt": 4, "batch_size": 8,
            "steps": 28, "guidance": 1.5, "upsampling_ratio": 2.0, "seed": 0}
STAGES = ("ar", "decode")
MANIFEST = "uniar_run.json"
RUN_FORMAT = "uniar-batch-run"
RUN_VERSION = 1
MAX_PROMPTS_FILE = 256 << 20  # bytes
MAX_RECORDS = 1_000_000
MAX_SAMPLES = 10_000  # per prompt
MAX_IDX = 10**9
TEMP_TAG = ".uniar-partial."  # temporary files: <folder>/.<name>.uniar-partial.<random> (never matches *.png)


# ---------------------------------------------------------------------------------------------- seeds and jobs
def sample_seed(seed: int, idx: int, k: int) -> int:
    """The seed of sample ``k`` of prompt ``idx`` in a run seeded with ``seed``: the first 63 bits of
    SHA-256("uniar-batch/<seed>/<idx>/<k>") -- independent of the batch, the process and the order of work, and a
    valid seed everywhere (the CLI, ComfyUI's seed widgets, torch generators)."""
    digest = hashlib.sha256(f"uniar-batch/{seed}/{idx}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class Record:
    idx: int
    prompt: str
    data: dict  # the record as read (written back to metadata.json)
    line: int
    image: str | None = None  # edit mode: the input image's path


@dataclass
class Job:
    record: Record
    k: int
    seed: int

    @property
    def idx(self) -> int:
        return self.record.idx


@dataclass
class Batch:
    number: int
    jobs: list[Job] = field(default_factory=list)


def make_batches(records: list[Record], samples: int, batch_size: int, seed: int) -> list[Batch]:
    """All (idx, k) jobs in file order, cut into batches of ``batch_size`` consecutive jobs (before any sharding)."""
    batches: list[Batch] = []
    current = None
    for rec in records:
        for k in range(samples):
            if current is None or len(current.jobs) == batch_size:
                current = Batch(len(batches))
                batches.append(current)
            current.jobs.append(Job(rec, k, sample_seed(seed, rec.idx, k)))
    return batches


def shard(batches: list[Batch], rank: int, world: int) -> list[Batch]:
    return batches[rank::world]


# ---------------------------------------------------------------------------------------------- paths
def prompt_dir(run: str, idx: int) -> str:
    return os.path.join(run, f"{idx:05d}")


def image_path(run: str, idx: int, k: int) -> str:
    return os.path.join(prompt_dir(run, idx), "samples", f"{k:04d}.png")


def tokens_path(run: str, idx: int, k: int) -> str:
    return os.path.join(prompt_dir(run, idx), "tokens", f"{k:04d}.safetensors")


def failure_path(run: str, idx: int, k: int) -> str:
    return os.path.join(prompt_dir(run, idx), "failed", f"{k:04d}.json")


def outputs(run: str, job: Job, stages) -> list[str]:
    out = []
    if "ar" in stages:
        out.append(tokens_path(run, job.idx, job.k))
    if "decode" in stages:
        out.append(image_path(run, job.idx, job.k))
    return out


# ---------------------------------------------------------------------------------------------- atomic files
def write_atomic(path: str, write) -> None:
    """``write(tmp)`` through :func:`uniar_backend.fileio.atomic_path`, its temporary file named
    ``.<name>.uniar-partial.<random>``: a killed process leaves only such hidden files (never ``*.png``), which
    :func:`remove_partials` can tell apart and deletes before the batch is redone."""
    from .fileio import atomic_path

    with atomic_path(path, prefix="." + os.path.basename(path) + TEMP_TAG, suffix="") as tmp:
        write(tmp)


def write_json(path: str, data) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n"

    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, w)


def remove_partials(paths) -> None:
    """Leftovers of a killed writer of these files (only the owner of a batch writes its files); each folder is
    listed once."""
    by_folder: dict[str, set[str]] = {}
    for path in paths:
        folder, name = os.path.split(path)
        by_folder.setdefault(folder, set()).add("." + name + TEMP_TAG)
    for folder, prefixes in by_folder.items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for e in entries:
            if e.partition(TEMP_TAG)[0] + TEMP_TAG in prefixes:
                try:
                    os.unlink(os.path.join(folder, e))
                except OSError:
                    pass


# ---------------------------------------------------------------------------------------------- input
def read_prompts(path: str, image_root: str | None = None, image_key: str | None = None) -> list[Record]:
    """Upstream's JSONL, checked whole before anything loads: one error naming the line for malformed JSON, a
    record that is not an object, a missing / non-string prompt, a bad or duplicate idx, a missing edit image."""
    from .fileio import check_input_file
    from .jsonfile import parse_json
    from .prompting import check_prompt

    check_input_file(path, "prompts file")
    size = os.path.getsize(path)
    if size > MAX_PROMPTS_FILE:
        raise InputError(f"prompts file {path} is {size >> 20} MiB; at most {MAX_PROMPTS_FILE >> 20} MiB (split it "
                         "into several runs)")
    records: list[Record] = []
    seen: dict[int, int] = {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"prompts file {path}, line {n}"
            rec = parse_json(raw, where, error=InputError, want=dict)
            if len(records) >= MAX_RECORDS:
                raise InputError(f"prompts file {path} has more than {MAX_RECORDS} records; split it")
            idx = rec.get("idx", len(records))
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < MAX_IDX:
                raise InputError(f"{where}: idx must be an integer in 0..{MAX_IDX - 1}, got {idx!r}")
            if idx in seen:
                raise InputError(f"{where}: idx {idx} is used again (first on line {seen[idx]}); every record needs "
                                 "its own idx (its output folder)")
            seen[idx] = n
            if "prompt" not in rec:
                raise InputError(f"{where}: the record has no \"prompt\"")
            try:
                check_prompt(rec["prompt"])
            except InputError as e:
                raise InputError(f"{where}: {e}") from None
            r = Record(idx, rec["prompt"], rec, n)
            if image_root is not None:
                r.image = edit_image_path(rec, image_root, image_key, where)
            records.append(r)
    if not records:
        raise InputError(f"prompts file {path} has no records (one JSON object per line: "
                         '{"idx": 0, "prompt": "...", "meta": {}})')
    return records


def edit_image_path(rec: dict, root: str, key: str, where: str) -> str:
    """``<image_root>/<meta[key]>`` (a nested ``meta.meta`` first, then the record's top level), as upstream."""
    from .fileio import path_kind

    meta = rec.get("meta", {})
    if isinstance(meta, dict) and isinstance(meta.get("meta"), dict):
        meta = meta["meta"]
    rel = meta.get(key) if isinstance(meta, dict) else None
    if not rel:
        rel = rec.get(key)
    if not rel or not isinstance(rel, str):
        raise InputError(f"{where}: no edit image: the record has no \"{key}\" (looked in meta and at the top "
                         "level)")
    path = os.path.join(root, rel)
    kind = path_kind(path)
    if kind != "file":
        raise InputError(f"{where}: edit image {path} " + ("does not exist" if kind == "missing" else f"is not a "
                                                            f"readable file ({kind})"))
    return path


def prompts_digest(records: list[Record], image_root: str | None) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.idx, r.prompt, os.path.relpath(r.image, image_root) if r.image else None],
                            ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- engine
@dataclass
class Launch:
    rank: int = 0
    world: int = 1
    local_rank: int = 0


def launch_from_env(env=os.environ) -> Launch:
    """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as torchrun and accelerate set them (one process without)."""
    def num(name, default):
        v = env.get(name)
        if v is None or v == "":
            return default
        try:
            return int(v)
        except ValueError:
            raise InputError(f"environment variable {name}={v!r} is not an integer") from None

    world = num("WORLD_SIZE", 1)
    rank = num("RANK", 0)
    local = num("LOCAL_RANK", rank)  # a launcher that sets no LOCAL_RANK: one machine
    if world < 1 or not 0 <= rank < world or local < 0:
        raise InputError(f"RANK={rank} / WORLD_SIZE={world} / LOCAL_RANK={local} are inconsistent; start the "
                         "processes with torchrun or accelerate launch")
    return Launch(rank, world, local)


def process_device(device: str, launch: Launch) -> str:
    """Each process on its own GPU: ``cuda:LOCAL_RANK`` when CUDA is asked for or found (auto)."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if launch.local_rank >= n:
            raise InputError(f"LOCAL_RANK {launch.local_rank} but only {n} GPU(s) visible; start at most {n} "
                             "processes per machine")
        return f"cuda:{launch.local_rank}"
    return device


# ---------------------------------------------------------------------------------------------- settings
def parse_stages(text: str) -> tuple[str, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or any(p not in STAGES for p in parts) or len(set(parts)) != len(parts):
        raise InputError(f"--stages must be ar, decode or ar,decode; got {text!r}")
    return tuple(s for s in STAGES if s in parts)


def settings_of(args) -> dict:
    """What decides the run's files: a run folder keeps one set (no mixed runs)."""
    return {"height": args.height, "width": args.width, "cfg": args.cfg, "temperature": args.temperature,
            "seed": args.seed, "samples_per_prompt": args.samples_per_prompt, "batch_size": args.batch_size,
            "steps": args.steps, "guidance": args.guidance, "upsampling_ratio": args.upsampling_ratio,
            "edit": args.image_root is not None, "image_key": args.image_key, "sampler": "fast"}


def runtime_of(args, device: str) -> dict:
    """How a stage computes, which changes the last bits of its results: the device type, the dtype, the attention
    kernel, the weight format and, on the CPU, the intra-op thread count (BLAS and convolution reductions split by
    thread).  Each stage keeps one (``RUN/uniar_runtime-<stage>.json``), so all processes and all resumes of a
    stage compute alike; the decode stage may still run elsewhere than the AR stage."""
    from .runtime import resolve_attention, resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(args.dtype, dev)
    return {"device_type": dev.type, "dtype": str(dt).replace("torch.", ""),
            "attention": resolve_attention(args.attention, dev, dt), "weights": args.weights or "as stored",
            "cpu_threads": args.threads if dev.type == "cpu" else None}


def check_manifest(run: str, manifest: dict, name: str = MANIFEST) -> None:
    """Create ``RUN/<name>`` (exclusively: with several processes exactly one file wins, all compare against it),
    or check the existing one: other settings, another model, other prompts or another runtime are refused."""
    from .jsonfile import read_json_file

    path = os.path.join(run, name)
    os.makedirs(run, exist_ok=True)
    if not os.path.exists(path):
        tmp = path + TEMP_TAG + str(os.getpid())
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
            f.write("\n")
        try:
            os.link(tmp, path)  # fails if another process created it first
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: the same content, renamed
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    have = read_json_file(path, "remove it or choose another --out", InputError)
    if have.get("format") != manifest["format"]:
        raise InputError(f"{path} is not a UniAR batch-run manifest; choose another --out")
    diffs = []
    for part in [k for k in manifest if isinstance(manifest[k], dict)]:
        a, b = have.get(part) or {}, manifest[part]
        for key in sorted(set(a) | set(b)):
            if key in ("path", "file"):  # where things are may change (another machine), not what they are
                continue
            if a.get(key) != b.get(key):
                diffs.append(f"{part}.{key}: run has {a.get(key)!r}, this command {b.get(key)!r}")
    if diffs:
        raise InputError(f"{run} holds another run ({'; '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}); "
                         "resume it with the same settings, model, prompts and runtime (--device, --dtype, --attention, --weights, "
                         "--threads), or choose another --out")


def metadata_of(rec: Record, settings: dict, samples: int, seed: int) -> dict:
    out = dict(rec.data)
    out["uniar"] = {"settings": settings,
                    "samples": [{"sample": k, "seed": sample_seed(seed, rec.idx, k)} for k in range(samples)]}
    return out


# ---------------------------------------------------------------------------------------------- progress
class Progress:
    """A tqdm bar per process on a terminal (one line each: ``position`` = local rank), else a line per batch."""

    def __init__(self, total: int, launch: Launch):
        self.launch = launch
        self.total = total
        self.done = 0
        self.bar = None
        label = f"rank {launch.rank}/{launch.world}" if launch.world > 1 else "batch"
        if sys.stderr.isatty():
            from tqdm import tqdm

            from .cli_common import bar_size

            self.bar = tqdm(total=total, desc=label, unit="img", position=launch.local_rank, file=sys.stderr,
                            mininterval=0.5, **bar_size())
        self.label = label

    def update(self, n: int, note: str) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        else:
            print(f"[{self.label}] {self.done}/{self.total} images ({note})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------- the run
class Runner:
    def __init__(self, args, stages, ckpt, batches, launch, device, settings):
        self.args, self.stages, self.ckpt, self.launch = args, stages, ckpt, launch
        self.batches, self.device, self.settings = batches, device, settings
        self.run = args.out
        self.ar = None
        self.decoder = None
        self.failures: list[dict] = []
        self.images = 0
        self.skipped = 0

    # models, loaded once, only those the stages need
    def load(self) -> None:
        a = self.args
        if "ar" in self.stages:
            from .api import UniAR

            comps = ("llm", "gen_head") + (("vision",) if a.image_root is not None else ())
            self.ar = UniAR.load(self.ckpt, comps, device=self.device, dtype=a.dtype, attention=a.attention,
                                 weights=a.weights)
        if "decode" in self.stages:
            from .decoder import load_decoder

            self.decoder = load_decoder(self.ckpt, device=self.device, dtype=a.dtype, attention=a.attention,
                                        weights=a.weights)

    def complete(self, batch: Batch) -> bool:
        return all(os.path.isfile(p) for j in batch.jobs for p in outputs(self.run, j, self.stages))

    def fail(self, job: Job, stage: str, error: BaseException) -> None:
        msg = str(error).strip().splitlines()[0][:500] if str(error).strip() else type(error).__name__
        entry = {"idx": job.idx, "sample": job.k, "seed": job.seed, "stage": stage,
                 "error": f"{type(error).__name__}: {msg}", "rank": self.launch.rank}
        self.failures.append(entry)
        write_json(failure_path(self.run, job.idx, job.k), entry)

    def write_metadata(self, batch: Batch) -> None:
        """A prompt's metadata.json is written by the batch holding its first sample (one writer per file)."""
        a = self.args
        for j in batch.jobs:
            if j.k == 0:
                path = os.path.join(prompt_dir(self.run, j.idx), "metadata.json")
                remove_partials([path])
                write_json(path, metadata_of(j.record, self.settings, a.samples_per_prompt, a.seed))

    def ar_stage(self, jobs: list[Job]) -> list[tuple[Job, object]]:
        """Tokens for ``jobs`` (one AR batch); returns (job, tokens of one sample)."""
        a = self.args
        images = None
        if a.image_root is not None:
            from .preprocess import load_image

            kept, images = [], []
            for j in jobs:
                try:
                    images.append(load_image(j.record.image))
                    kept.append(j)
                except InputError as e:  # an unreadable edit image fails its samples, not the batch
                    self.fail(j, "ar", e)
            jobs = kept
            if not jobs:
                return []
        tokens = self.ar.generate([j.record.prompt for j in jobs], a.height, a.width, cfg=a.cfg,
                                  temperature=a.temperature, seed=[j.seed for j in jobs], edit_images=images)
        out = []
        for i, j in enumerate(jobs):
            t = tokens.select(i)
            t.extra["seed"] = str(j.seed)
            t.extra["idx"] = str(j.idx)
            t.extra["sample"] = str(j.k)
            write_atomic(tokens_path(self.run, j.idx, j.k), t.write)
            out.append((j, t))
        return out

    def read_tokens(self, jobs: list[Job]) -> list[tuple[Job, object]]:
        from .errors import UniARError
        from .tokens import VisualTokens

        out = []
        for j in jobs:
            try:
                out.append((j, VisualTokens.load(tokens_path(self.run, j.idx, j.k))))
            except UniARError as e:  # missing (its AR stage has not run or failed) or damaged: that sample fails
                self.fail(j, "decode", e)
        return out

    def decode_stage(self, items) -> int:
        from .decoder.images import to_uint8, write_image
        from .tokens import VisualTokens

        if not items:
            return 0
        a = self.args
        jobs = [j for j, _ in items]
        tokens = VisualTokens.cat([t for _, t in items])
        images = self.decoder.decode(tokens, steps=a.steps, guidance=a.guidance, upsampling_ratio=a.upsampling_ratio,
                                     seed=[j.seed for j in jobs])
        for j, pixels in zip(jobs, to_uint8(images).numpy()):
            meta = {"uniar": f"idx={j.idx} sample={j.k} seed={j.seed} cfg={a.cfg} temperature={a.temperature} "
                             f"steps={a.steps} guidance={a.guidance} upsampling_ratio={a.upsampling_ratio}"}
            write_atomic(image_path(self.run, j.idx, j.k),
                         lambda tmp, pixels=pixels, meta=meta: write_image(pixels, tmp, "PNG", meta))
        return len(jobs)

    def run_batch(self, batch: Batch) -> int:
        paths = [p for j in batch.jobs for p in outputs(self.run, j, self.stages)]
        remove_partials(paths + [failure_path(self.run, j.idx, j.k) for j in batch.jobs])
        self.write_metadata(batch)
        before = len(self.failures)

        def ok(job):  # not failed in this batch so far
            return all((f["idx"], f["sample"]) != (job.idx, job.k) for f in self.failures[before:])

        try:
            if "ar" in self.stages:
                items = self.ar_stage(batch.jobs)
            else:
                items = self.read_tokens(batch.jobs)
            done = self.decode_stage(items) if "decode" in self.stages else len(items)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # the batch fails; the run goes on with the next one
            from .errors import is_out_of_memory

            if is_out_of_memory(e):
                e = InputError(f"out of memory in a batch of {len(batch.jobs)}; lower --batch-size or the size")
            for j in [j for j in batch.jobs if ok(j)]:
                self.fail(j, "+".join(self.stages), e)
            return 0
        for j in batch.jobs:  # a sample that succeeds now drops its earlier failure record
            if ok(j):
                try:
                    os.unlink(failure_path(self.run, j.idx, j.k))
                except FileNotFoundError:
                    pass
        return done

    def __call__(self) -> dict:
        mine = shard(self.batches, self.launch.rank, self.launch.world)
        todo = [b for b in mine if not self.complete(b)]
        self.skipped = sum(len(b.jobs) for b in mine) - sum(len(b.jobs) for b in todo)
        start = time.perf_counter()
        if todo:
            self.load()
        loaded = time.perf_counter()
        progress = Progress(sum(len(b.jobs) for b in todo), self.launch)
        try:
            for b in todo:
                t0 = time.perf_counter()
                n = self.run_batch(b)
                self.images += n
                progress.update(len(b.jobs), f"batch {b.number}: {n} done in {time.perf_counter() - t0:.1f} s")
        finally:
            progress.close()
        end = time.perf_counter()
        work = end - loaded
        from .runtime import resolve_device

        return {"rank": self.launch.rank, "world_size": self.launch.world, "device": str(resolve_device(self.device)),
                "stages": list(self.stages), "batches": len(todo), "images": self.images,
                "skipped_complete": self.skipped, "failed": len(self.failures),
                "load_seconds": round(loaded - start, 3), "seconds": round(work, 3),
                "images_per_min": round(60 * self.images / work, 2) if work > 0 and self.images else 0.0,
                "failures": self.failures}


def run_state(run: str, batches: list[Batch], stages) -> dict:
    """The run as the files say: samples expected / present, and every recorded failure."""
    from .jsonfile import read_json_file

    expected = present = 0
    failures = []
    for b in batches:
        for j in b.jobs:
            expected += 1
            present += all(os.path.isfile(p) for p in outputs(run, j, stages))
            fp = failure_path(run, j.idx, j.k)
            if os.path.isfile(fp):
                try:
                    failures.append(read_json_file(fp, error=InputError))
                except InputError:
                    failures.append({"idx": j.idx, "sample": j.k, "error": "unreadable failure record"})
    return {"expected": expected, "complete": present, "missing": expected - present, "failures": failures}


# ---------------------------------------------------------------------------------------------- command
def register(subparsers, common: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p = subparsers.add_parser(
        "batch", parents=[common], help="many images from a JSONL of prompts (deterministic, resumable, torchrun)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate (and decode) images for every record of a JSONL file, several samples each, into\n"
                    "upstream's run layout (RUN/<idx:05d>/samples/<k:04d>.png, plus tokens/ and metadata.json).\n"
                    "Defaults are those of upstream's inference/generate_batch.py (cfg 2.0, temperature 0.1,\n"
                    "4 samples per prompt, 512x512, upsampling ratio 2.0, 28 decoder steps, guidance 1.5,\n"
                    "batch 8), so an evaluation run reproduces its setting.",
        epilog="Every sample has its own seed (derived from --seed, idx and sample; metadata.json names it), so\n"
               "the files are the same for any number of processes and after any interruption: rerun the same\n"
               "command to resume.\n\nSeveral GPUs / machines:\n"
               "  torchrun --nproc_per_node N -m uniar_backend batch ...\n"
               "  accelerate launch --multi_gpu --num_processes N -m uniar_backend batch ...\n"
               "Small GPU: --stages ar for all, then --stages decode for all (one model resident at a time).")
    p.add_argument("--model", required=True, help="UniAR checkpoint folder")
    p.add_argument("--prompts", required=True, help="JSONL: {\"idx\": int, \"prompt\": str, \"meta\": {...}} per line")
    p.add_argument("--out", required=True, help="run folder (created; an existing run with the same settings resumes)")
    p.add_argument("--samples-per-prompt", type=int, default=d["samples_per_prompt"],
                   help=f"images per record (default {d['samples_per_prompt']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help=f"samples per AR / decoder forward in each process (default {d['batch_size']})")
    p.add_argument("--height", type=int, default=d["height"], help=f"AR image height (default {d['height']})")
    p.add_argument("--width", type=int, default=d["width"], help=f"AR image width (default {d['width']})")
    p.add_argument("--cfg", type=float, default=d["cfg"], help=f"AR classifier-free guidance (default {d['cfg']})")
    p.add_argument("--temperature", type=float, default=d["temperature"],
                   help=f"AR sampling temperature (default {d['temperature']})")
    p.add_argument("--seed", type=int, default=d["seed"], help="run seed; each sample's seed derives from it")
    p.add_argument("--steps", type=int, default=d["steps"], help=f"decoder steps (default {d['steps']})")
    p.add_argument("--guidance", type=float, default=d["guidance"], help=f"decoder guidance (default {d['guidance']})")
    p.add_argument("--upsampling-ratio", type=float, default=d["upsampling_ratio"],
                   help=f"decoded size / AR size (default {d['upsampling_ratio']})")
    p.add_argument("--image-root", default=None, help="edit mode: folder of the input images (with --image-key)")
    p.add_argument("--image-key", default=None,
                   help="edit mode: the field of each record's meta (or the record) naming its input image")
    p.add_argument("--stages", default="ar,decode", help="ar, decode or ar,decode (default: both, per batch)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU only: intra-op threads per process (default 1, as torchrun sets; CPU results depend on "
                        "the count, so a run keeps the one it started with)")
    p.set_defaults(func=cmd_batch)


def check_args(args) -> tuple[str, ...]:
    """Every setting, as generate / decode check them, before anything is read or loaded."""
    from .api import check_generate_args
    from .decoder import check_decode_args, target_size

    stages = parse_stages(args.stages)
    if (args.image_root is None) != (args.image_key is None):
        raise InputError("--image-root and --image-key go together (edit mode)")
    if args.image_root is not None and not os.path.isdir(args.image_root):
        raise InputError(f"--image-root {args.image_root} is not a folder")
    if not 1 <= args.samples_per_prompt <= MAX_SAMPLES:
        raise InputError(f"--samples-per-prompt must be in 1..{MAX_SAMPLES}, got {args.samples_per_prompt}")
    if not 1 <= args.batch_size <= 64:
        raise InputError(f"--batch-size must be in 1..64, got {args.batch_size}")
    if not 1 <= args.threads <= 1024:
        raise InputError(f"--threads must be in 1..1024, got {args.threads}")
    edit = (args.height, args.width) if args.image_root is not None else None
    check_generate_args([""] * args.batch_size, args.height, args.width, args.cfg, args.temperature, args.seed,
                        "fast", edit)
    check_decode_args(args.steps, args.guidance, args.seed)
    target_size(args.height, args.width, args.upsampling_ratio)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out} is a file; give a run folder")
    return stages


def cmd_batch(args) -> int:
    from . import __version__
    from .loader import Checkpoint

    stages = check_args(args)
    launch = launch_from_env()
    records = read_prompts(args.prompts, args.image_root, args.image_key)
    ckpt = Checkpoint(args.model)
    tok = ckpt.tokenizer if "ar" in stages else None
    if tok is not None:
        from .prompting import check_prompt_tokens

        for r in records:
            try:
                check_prompt_tokens(tok, r.prompt)
            except InputError as e:
                raise InputError(f"prompts file {args.prompts}, line {r.line}: {e}") from None
    device = process_device(args.device, launch)
    settings = settings_of(args)
    runtime = runtime_of(args, device)
    manifest = {"format": RUN_FORMAT, "version": RUN_VERSION, "settings": settings,
                "model": {"fingerprint": ckpt.fingerprint, "path": os.path.abspath(args.model)},
                "prompts": {"sha256": prompts_digest(records, args.image_root), "count": len(records),
                            "file": os.path.abspath(args.prompts)},
                "pack_version": __version__}
    check_manifest(args.out, manifest)
    for stage in stages:
        check_manifest(args.out, {"format": RUN_FORMAT + "-runtime", "runtime": runtime},
                       f"uniar_runtime-{stage}.json")
    batches = make_batches(records, args.samples_per_prompt, args.batch_size, args.seed)
    import torch

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    threads = torch.get_num_threads()
    if runtime["cpu_threads"] is not None:
        torch.set_num_threads(runtime["cpu_threads"])
    try:
        summary = Runner(args, stages, ckpt, batches, launch, device, settings)()
    finally:
        torch.set_num_threads(threads)
    state = run_state(args.out, batches, stages)
    summary["run"] = {k: state[k] for k in ("expected", "complete", "missing")}
    name = "summary.json" if launch.world == 1 else f"summary-rank{launch.rank}.json"
    write_json(os.path.join(args.out, name), summary)
    write_json(os.path.join(args.out, "failures.json"), state["failures"])
    print(f"[{'rank ' + str(launch.rank) if launch.world > 1 else 'batch'}] {summary['images']} images in "
          f"{summary['seconds']:.1f} s ({summary['images_per_min']} images/min), {summary['skipped_complete']} already "
          f"done, {summary['failed']} failed; run: {state['complete']}/{state['expected']} complete"
          + (f", {len(state['failures'])} failures listed in {os.path.join(args.out, 'failures.json')}"
             if state["failures"] else ""))
    return 1 if summary["failed"] else 0
