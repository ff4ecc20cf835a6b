"""``python -m uniar_backend batch``: per-sample seeds, determinism across process counts / interruptions / stages,
upstream's layout, the manifest, failures and bad input (tiny fixtures, CPU)."""

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TEST_IMAGE, ckpt_path, load_model, run_cli

MODEL = ckpt_path("uniar-tiny")
PROMPTS = [
    {"idx": 0, "prompt": "A red cube on a blue table.", "meta": {"tag": "single_object", "include": [1]}},
    {"idx": 1, "prompt": "A cat"},
    {"idx": 7, "prompt": "two dogs running on the beach at sunset", "meta": {}},
]
SMALL = ["--height", "64", "--width", "64", "--steps", "2"]


def write_prompts(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def batch(out, prompts, *extra, check=True):
    return run_cli("batch", "--model", MODEL, "--prompts", prompts, "--out", out, *SMALL, *extra, check=check)


def run_files(run):
    """Every file of a run but the per-process summaries: relative path -> bytes."""
    out = {}
    for dirpath, _, files in os.walk(run):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), run)
            if not rel.startswith("summary"):
                with open(os.path.join(dirpath, f), "rb") as fh:
                    out[rel] = fh.read()
    return out


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---------------------------------------------------------------------------------------------- the seeds
@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_one_seed_per_prompt_draws_what_each_prompt_draws_alone(mode):
    from uniar_backend.api import _generate

    ck, m = load_model("uniar-tiny", ("llm", "gen_head"))
    prompts = [r["prompt"] for r in PROMPTS] + [""]
    seeds = [11, 2**63 + 5, 33, 0]
    one = _generate(m, ck, prompts[:1], 64, 64, cfg=1.5, seed=1234, mode=mode).indices
    assert torch.equal(one, _generate(m, ck, prompts[:1], 64, 64, cfg=1.5, seed=[1234], mode=mode).indices)
    for cfg in (2.0, 1.0):
        logits_b: list = []
        together = _generate(m, ck, prompts, 64, 64, cfg=cfg, temperature=0.1, seed=seeds, mode=mode,
                             logits_out=logits_b).indices
        for i, (p, s) in enumerate(zip(prompts, seeds)):
            logits_a: list = []
            alone = _generate(m, ck, [p], 64, 64, cfg=cfg, temperature=0.1, seed=s, mode=mode,
                              logits_out=logits_a).indices
            assert torch.equal(together[i], alone[0]), (cfg, i)
            rows = len(prompts)
            for la, lb in zip(logits_a, logits_b):  # the step logits of this prompt's rows agree
                torch.testing.assert_close(lb[i], la[0], rtol=1e-4, atol=1e-4)
                if cfg > 1:
                    torch.testing.assert_close(lb[rows + i], la[1], rtol=1e-4, atol=1e-4)
        # a different seed for one prompt changes that prompt only
        other = _generate(m, ck, prompts, 64, 64, cfg=cfg, temperature=0.1, seed=[11, 99, 33, 0], mode=mode).indices
        assert torch.equal(other[0], together[0]) and torch.equal(other[2:], together[2:])
        assert not torch.equal(other[1], together[1])


def test_seed_lists_are_checked():
    from uniar_backend.api import _generate
    from uniar_backend.errors import InputError

    ck, m = load_model("uniar-tiny", ("llm", "gen_head"))
    with pytest.raises(InputError, match="2 seeds for 3 prompt"):
        _generate(m, ck, ["a", "b", "c"], 64, 64, seed=[1, 2])
    with pytest.raises(InputError, match="seed must be"):
        _generate(m, ck, ["a", "b"], 64, 64, seed=[1, -2])


def test_decoder_seed_per_image_is_that_image_alone():
    from uniar_backend.api import _generate
    from uniar_backend.decoder import load_decoder
    from uniar_backend.errors import InputError

    ck, m = load_model("uniar-tiny", ("llm", "gen_head"))
    tokens = _generate(m, ck, ["a", "b"], 64, 64, seed=[5, 6])
    dec = load_decoder(MODEL, device="cpu", dtype="float32")
    trace: dict = {}
    both = dec.decode(tokens, steps=2, upsampling_ratio=2.0, seed=[5, 6], trace=trace)
    for i, s in enumerate([5, 6]):
        t1: dict = {}
        alone = dec.decode(tokens.select(i), steps=2, upsampling_ratio=2.0, seed=s, trace=t1)
        assert torch.equal(trace["initial_latents"][i], t1["initial_latents"][0])
        torch.testing.assert_close(both[i], alone[0], rtol=0, atol=2e-5)
    with pytest.raises(InputError, match="3 seeds for 2"):
        dec.decode(tokens, steps=2, seed=[1, 2, 3])


def test_sample_seeds_are_fixed_and_distinct():
    from uniar_backend.batch import sample_seed

    # the derivation is part of the run format: changing it changes every image of every run
    assert sample_seed(0, 0, 0) == 2458654920038632950
    seeds = {sample_seed(s, i, k) for s in range(3) for i in range(20) for k in range(8)}
    assert len(seeds) == 3 * 20 * 8 and all(0 <= x < 2**63 for x in seeds)


def test_batches_are_cut_before_sharding():
    from uniar_backend.batch import Record, make_batches, shard

    recs = [Record(i * 3, "p", {}, i + 1) for i in range(5)]
    batches = make_batches(recs, 3, 4, 0)
    assert [[(j.idx, j.k) for j in b.jobs] for b in batches][:2] == [[(0, 0), (0, 1), (0, 2), (3, 0)],
                                                                     [(3, 1), (3, 2), (6, 0), (6, 1)]]
    assert sum(len(b.jobs) for b in batches) == 15 and len(batches) == 4
    for world in (1, 2, 3, 5):
        got = sorted(b.number for r in range(world) for b in shard(batches, r, world))
        assert got == list(range(4))


# ---------------------------------------------------------------------------------------------- the run
def test_layout_metadata_and_batch_size_one_equals_t2i(tmp_path):
    from uniar_backend.batch import sample_seed
    from uniar_backend.tokens import VisualTokens

    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:1] + ['{"prompt": "no idx: the line\'s rank"}'])
    run = str(tmp_path / "run")
    proc = batch(run, prompts, "--samples-per-prompt", "2", "--batch-size", "1")
    assert "4 images" in proc.stdout
    meta = json.load(open(os.path.join(run, "00000", "metadata.json")))
    assert {k: meta[k] for k in PROMPTS[0]} == PROMPTS[0]  # the record as given (evaluation scripts read it)
    assert meta["uniar"]["settings"]["cfg"] == 2.0 and meta["uniar"]["settings"]["batch_size"] == 1
    assert [s["seed"] for s in meta["uniar"]["samples"]] == [sample_seed(0, 0, k) for k in range(2)]
    assert json.load(open(os.path.join(run, "00001", "metadata.json")))["prompt"] == "no idx: the line's rank"
    manifest = json.load(open(os.path.join(run, "uniar_run.json")))
    assert manifest["model"]["fingerprint"] and manifest["prompts"]["count"] == 2
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["images"] == 4 and summary["run"] == {"expected": 4, "complete": 4, "missing": 0}
    assert json.load(open(os.path.join(run, "failures.json"))) == []

    # sample 1 of idx 0 equals t2i alone with its seed (same thread count as the run: one)
    seed = sample_seed(0, 0, 1)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_cli("t2i", "--model", MODEL, "--prompt", PROMPTS[0]["prompt"], "--height", "64", "--width", "64",
                "--cfg", "2.0", "--temperature", "0.1", "--seed", str(seed), "--steps", "2", "--upsampling-ratio",
                "2.0", "--out", str(tmp_path / "alone.png"), "--save-tokens", str(tmp_path / "alone.safetensors"))
    finally:
        torch.set_num_threads(torch_threads)
    mine = VisualTokens.load(os.path.join(run, "00000", "tokens", "0001.safetensors"))
    assert torch.equal(mine.indices, VisualTokens.load(str(tmp_path / "alone.safetensors")).indices)
    assert mine.extra["seed"] == str(seed)
    a = np.asarray(Image.open(os.path.join(run, "00000", "samples", "0001.png")))
    b = np.asarray(Image.open(tmp_path / "alone.png"))
    assert a.shape == (128, 128, 3) and np.array_equal(a, b)


ENGINES = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    # accelerate's multi-process launcher (torchrun underneath); on a machine without GPUs each process uses the CPU
    "accelerate": ["-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_processes_give_the_same_files(tmp_path, engine):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    one = str(tmp_path / "one")
    batch(one, prompts, "--samples-per-prompt", "3", "--batch-size", "2")
    two = str(tmp_path / "two")
    cmd = [sys.executable, *ENGINES[engine], "-m", "uniar_backend", "batch", "--model", MODEL, "--prompts", prompts,
           "--out", two, *SMALL, "--samples-per-prompt", "3", "--batch-size", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank 0]" in proc.stdout + proc.stderr and "[rank 1]" in proc.stdout + proc.stderr
    files = run_files(one)
    assert len([f for f in files if f.endswith(".png")]) == 9
    assert files == run_files(two)
    ranks = [json.load(open(os.path.join(two, f"summary-rank{r}.json"))) for r in (0, 1)]
    assert sorted(r["images"] for r in ranks) == [4, 5]  # 5 batches of 2, 2, 2, 2, 1: rank 0 takes 0, 2, 4


KILL_ARGS = ["--samples-per-prompt", "2", "--batch-size", "2", "--height", "96", "--width", "96", "--steps", "4"]


def started_run(tmp_path, launcher, text=False):
    """An uninterrupted reference run of 8 prompts x 2 samples (``ref``), and the same run started under
    ``launcher`` (``-m uniar_backend`` or a torchrun prefix) into ``run``, returned once its first image exists:
    (prompts, ref, run, the running process)."""
    prompts = write_prompts(tmp_path / "p.jsonl", [{"idx": i, "prompt": f"prompt number {i}"} for i in range(8)])
    ref = str(tmp_path / "ref")
    run_cli("batch", "--model", MODEL, "--prompts", prompts, "--out", ref, *KILL_ARGS)
    run = str(tmp_path / "run")
    cmd = [sys.executable, *launcher, "-m", "uniar_backend", "batch", "--model", MODEL, "--prompts", prompts,
           "--out", run, *KILL_ARGS]
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=text)
    first = os.path.join(run, "00000", "samples", "0000.png")
    deadline = time.time() + 120
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return prompts, ref, run, proc


def test_sigkill_then_the_same_command_completes_identically(tmp_path):
    prompts, ref, run, proc = started_run(tmp_path, [])
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = len([1 for d, _, fs in os.walk(run) for f in fs if f.endswith(".png")])
    assert 0 < done < 16, "the kill did not land mid-run"
    # what a killed writer leaves: hidden partial files, removed when their batch is redone
    stale = os.path.join(run, "00007", "samples", ".0001.png.uniar-partial.abc123")
    os.makedirs(os.path.dirname(stale), exist_ok=True)
    open(stale, "wb").write(b"half a png")
    proc = run_cli("batch", "--model", MODEL, "--prompts", prompts, "--out", run, *KILL_ARGS)
    assert "16/16 complete" in proc.stdout
    assert not os.path.exists(stale)
    assert run_files(ref) == run_files(run)
    # and once complete, the same command does nothing
    assert "0 images" in run_cli("batch", "--model", MODEL, "--prompts", prompts, "--out", run, *KILL_ARGS).stdout


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker processes through /proc")
def test_torchrun_max_restarts_finishes_a_run_after_a_killed_worker(tmp_path):
    _, ref, run, proc = started_run(tmp_path, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                               "--max-restarts", "1"], text=True)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)  # one worker dies mid-run; torchrun restarts the group once
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "exitcode: -9" in err, err[-3000:]  # torchrun saw the killed worker (and started the group again)
    assert "16/16 complete" in out + err
    assert run_files(ref) == run_files(run)


def test_stages_ar_then_decode_equal_both_at_once(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    both = str(tmp_path / "both")
    batch(both, prompts, "--samples-per-prompt", "2", "--batch-size", "3")
    split = str(tmp_path / "split")
    batch(split, prompts, "--samples-per-prompt", "2", "--batch-size", "3", "--stages", "ar")
    assert not any(f.endswith(".png") for f in run_files(split))
    batch(split, prompts, "--samples-per-prompt", "2", "--batch-size", "3", "--stages", "decode")
    assert run_files(both).keys() - {"uniar_runtime-ar.json", "uniar_runtime-decode.json"} == \
        run_files(split).keys() - {"uniar_runtime-ar.json", "uniar_runtime-decode.json"}
    assert run_files(both) == run_files(split)


def test_another_run_in_the_folder_is_refused(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:1])
    run = str(tmp_path / "run")
    batch(run, prompts, "--samples-per-prompt", "1")
    before = run_files(run)
    cases = [
        (["--cfg", "3.0"], "settings.cfg"),
        (["--samples-per-prompt", "2"], "settings.samples_per_prompt"),
        (["--threads", "2"], "runtime.cpu_threads"),
    ]
    for extra, what in cases:
        proc = batch(run, prompts, *(["--samples-per-prompt", "1"] + extra), check=False)
        assert proc.returncode == 2 and what in proc.stderr, proc.stderr
    other = write_prompts(tmp_path / "q.jsonl", [dict(PROMPTS[0], prompt="another prompt")])
    proc = batch(run, other, "--samples-per-prompt", "1", check=False)
    assert proc.returncode == 2 and "prompts.sha256" in proc.stderr
    proc = run_cli("batch", "--model", ckpt_path("uniar-tiny-bsq64"), "--prompts", prompts, "--out", run, *SMALL,
                   "--samples-per-prompt", "1", check=False)
    assert proc.returncode == 2 and "model.fingerprint" in proc.stderr
    assert run_files(run) == before


def test_a_failing_sample_is_listed_and_the_rest_go_on(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(TEST_IMAGE, images / "good.png")
    (images / "bad.png").write_bytes(b"not an image")
    recs = [{"idx": 0, "prompt": "Make the sky purple.", "meta": {"meta": {"source": "good.png"}}},
            {"idx": 1, "prompt": "Make it night.", "source": "bad.png"}]
    prompts = write_prompts(tmp_path / "p.jsonl", recs)
    run = str(tmp_path / "run")
    extra = ["--image-root", str(images), "--image-key", "source", "--samples-per-prompt", "2", "--batch-size", "4"]
    proc = batch(run, prompts, *extra, check=False)
    assert proc.returncode == 1, proc.stderr
    failures = json.load(open(os.path.join(run, "failures.json")))
    assert [(f["idx"], f["sample"]) for f in failures] == [(1, 0), (1, 1)]
    assert "cannot read image" in failures[0]["error"]
    assert os.path.isfile(os.path.join(run, "00000", "samples", "0001.png"))
    shutil.copy(TEST_IMAGE, images / "bad.png")  # fixed: the batch is recomputed whole, the failures go
    proc = batch(run, prompts, *extra)
    assert json.load(open(os.path.join(run, "failures.json"))) == []
    fresh = str(tmp_path / "fresh")
    batch(fresh, prompts, *extra)
    assert run_files(fresh) == run_files(run)


@pytest.mark.parametrize("lines, extra, message", [
    (['{"idx": 0, "prompt": "a"}', '{"idx": 1, "prompt": "b"'], [], "line 2: not valid JSON"),
    (['{"idx": 0, "prompt": "a"}', '{"idx": 1, "text": "b"}'], [], "line 2: the record has no \"prompt\""),
    (['{"idx": 3, "prompt": "a"}', '', '{"idx": 3, "prompt": "b"}'], [], "line 3: idx 3 is used again (first on line 1)"),
    (['{"idx": -1, "prompt": "a"}'], [], "idx must be an integer"),
    (['[1, 2]'], [], "expected a JSON object"),
    (['{"prompt": 5}'], [], "prompt must be a string"),
    ([], [], "has no records"),
    (['{"prompt": "a", "src": "missing.png"}'], ["--image-root", ".", "--image-key", "src"], "does not exist"),
    (['{"prompt": "a"}'], ["--image-root", "."], "go together"),
    (['{"prompt": "a"}'], ["--height", "50"], "multiple of 32"),
    (['{"prompt": "a"}'], ["--stages", "decode,tokens"], "--stages must be"),
    (['{"prompt": "a"}'], ["--batch-size", "0"], "--batch-size must be"),
    (['{"prompt": "a"}'], ["--steps", "0"], "steps must be"),
    (['{"prompt": "a"}'], ["--upsampling-ratio", "7"], "ratio"),
])
def test_bad_input_fails_before_any_model_loads(tmp_path, monkeypatch, lines, extra, message):
    from uniar_backend import api, decoder

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(api.UniAR, "load", boom)
    monkeypatch.setattr(decoder, "load_decoder", boom)
    monkeypatch.chdir(tmp_path)
    prompts = write_prompts(tmp_path / "p.jsonl", lines)
    run = str(tmp_path / "run")
    proc = run_cli("batch", "--model", MODEL, "--prompts", prompts, "--out", run, *extra, check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr and proc.stderr.count("\n") == 1
    assert not os.path.exists(run)


def test_launch_from_env():
    from uniar_backend.batch import launch_from_env
    from uniar_backend.errors import InputError

    assert launch_from_env({}) == launch_from_env({"WORLD_SIZE": "1"})
    got = launch_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (got.rank, got.world, got.local_rank) == (3, 4, 1)
    for env in ({"RANK": "4", "WORLD_SIZE": "4"}, {"WORLD_SIZE": "x"}, {"RANK": "0", "WORLD_SIZE": "0"}):
        with pytest.raises(InputError):
            launch_from_env(env)


def test_help_names_upstreams_defaults():
    proc = run_cli("batch", "--help", check=False)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "Defaults are those of upstream's inference/generate_batch.py (cfg 2.0, temperature 0.1, 4 samples" in text
    assert "torchrun --nproc_per_node N -m uniar_backend batch" in text
    from uniar_backend.batch import DEFAULTS

    assert DEFAULTS == {"height": 512, "width": 512, "cfg": 2.0, "temperature": 0.1, "samples_per_prompt": 4,
                        "batch_size": 8, "steps": 28, "guidance": 1.5, "upsampling_ratio": 2.0, "seed": 0}


def test_progress_bar_per_process_on_a_terminal(tmp_path):
    from conftest import run_cli_stderr

    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    args = ["batch", "--model", MODEL, "--prompts", prompts, *SMALL, "--samples-per-prompt", "1", "--batch-size", "2"]
    rc, err = run_cli_stderr(args + ["--out", str(tmp_path / "a")], tty=True)
    assert rc == 0, err
    assert "batch: 100%" in err and "3/3" in err and ("img/s" in err or "s/img" in err), err
    rc, err = run_cli_stderr(args + ["--out", str(tmp_path / "b")], tty=False)
    assert rc == 0 and "%" not in err and "[batch] 3/3 images" in err, err
