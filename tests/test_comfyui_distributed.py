"""UniAR under ComfyUI-Distributed (https://github.com/robertvoy/ComfyUI-Distributed): a master ComfyUI fans the
text-to-image template out to a worker ComfyUI and collects both pictures (CPU, loopback only).

Runs only when ``COMFYUI_PATH`` (a ComfyUI source tree) and ``COMFYUI_DISTRIBUTED_PATH`` (a ComfyUI-Distributed
tree, e.g. ``git archive HEAD`` of the repository) are set; ``COMFYUI_PYTHON`` as for the other live tests.
docs/distributed.md has the set-up and the command::

    COMFYUI_PATH=~/ComfyUI COMFYUI_PYTHON=~/ComfyUI/venv/bin/python COMFYUI_DISTRIBUTED_PATH=~/ComfyUI-Distributed \\
        python -m pytest -q tests/test_comfyui_distributed.py

Two servers, each with its own temporary base folder and its own copy of both packs (ComfyUI-Distributed keeps its
settings, gpu_config.json, inside its own folder): a worker (started by hand, as the project's guide starts a
remote worker: ``--listen --enable-cors-header``) and a master, whose worker list is set over its HTTP API
(``/distributed/config/update_worker``).  The template "UniAR - Text to image" is converted to API form (from
/object_info), made fixture-sized, and its two seeds (Generate's and Decode's) are wired from one DistributedSeed;
Decode's IMAGE goes through DistributedCollector into the template's SaveImage.  Queued with
``POST /distributed/queue``, the master must save two pictures: its own at the seed and the worker's at seed + 1,
each equal (within one 8-bit level: the worker's picture travels as an 8-bit PNG) to a plain run of the template at
that seed.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfyui_server import FIXTURES, ROOT, ComfyServer, execution_error  # noqa: E402

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
DISTRIBUTED_PATH = os.environ.get("COMFYUI_DISTRIBUTED_PATH")

pytestmark = pytest.mark.skipif(
    not (COMFYUI_PATH and DISTRIBUTED_PATH),
    reason="the ComfyUI-Distributed live test needs COMFYUI_PATH=<ComfyUI source tree> and "
           "COMFYUI_DISTRIBUTED_PATH=<ComfyUI-Distributed tree> (and COMFYUI_PYTHON=<ComfyUI's interpreter>)",
)

TEMPLATE = os.path.join(ROOT, "example_workflows", "UniAR - Text to image.json")
TEMPLATE_CKPT = "UniAR-SFT"       # the name the template's loader uses: linked to a fixture below
FIXTURE_FOR_TEMPLATE = "uniar-tiny-bsq64"
SEED = 1234
SIZE = 64                         # fixture-sized: 2x2 visual tokens (the template says 512x512)
DECODE_STEPS = 4                  # (the template says 28)
WORKER_ID = "cpu-worker-1"        # the id of the worker in the master's config
RUN_TIMEOUT = 600                 # seconds, per queued workflow
SEED_ID, COLLECTOR_ID = "100", "101"


def _start(srv: ComfyServer) -> ComfyServer:
    os.makedirs(os.path.join(srv.base, "uniar_models"), exist_ok=True)
    link = os.path.join(srv.base, "uniar_models", TEMPLATE_CKPT)
    if not os.path.lexists(link):
        os.symlink(os.path.join(FIXTURES, FIXTURE_FOR_TEMPLATE), link, target_is_directory=True)
    return srv.start(timeout=240)


@pytest.fixture(scope="module")
def pair():
    """(master, worker): two CPU ComfyUIs with UniAR + ComfyUI-Distributed, each in its own temporary base folder;
    both always stopped and their folders removed."""
    for path, what in ((COMFYUI_PATH, "main.py"), (DISTRIBUTED_PATH, "distributed.py")):
        if not os.path.isfile(os.path.join(path, what)):
            pytest.fail(f"{path} has no {what}")
    dist = os.path.abspath(DISTRIBUTED_PATH)
    worker = ComfyServer(COMFYUI_PATH, COMFYUI_PYTHON, extra_custom_node_dirs=[dist],
                         extra_args=["--enable-cors-header"], extra_env={"COMFYUI_IS_WORKER": "1"})
    master = ComfyServer(COMFYUI_PATH, COMFYUI_PYTHON, extra_custom_node_dirs=[dist])
    try:
        _start(worker)
        _start(master)
        yield master, worker
    finally:
        logs = {"master": master.log_text(), "worker": worker.log_text()}
        for srv in (master, worker):
            srv.cleanup()
        if os.environ.get("UNIAR_SHOW_COMFY_LOG"):
            for name, log in logs.items():
                if "Traceback" in log:
                    print(f"----- {name} log -----\n{log}")


# ------------------------------------------------------------------------------------------------ workflows
def template_to_api(ui: dict, object_info: dict) -> dict:
    """The UI-format template as an API prompt: links become [node, slot], widget values are matched to the widget
    inputs in order (skipping the frontend's control_after_generate value); notes and muted nodes are left out."""
    links = {lk[0]: (str(lk[1]), lk[2]) for lk in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        ct = node["type"]
        if ct not in object_info or node.get("mode", 0) in (2, 4):
            continue
        spec = {**object_info[ct]["input"].get("required", {}), **object_info[ct]["input"].get("optional", {})}
        values = list(node.get("widgets_values") or [])
        inputs, i = {}, 0
        for inp in node.get("inputs", []):
            name = inp["name"]
            if "widget" in inp:
                inputs[name] = values[i]
                i += 1
                opts = spec[name][1] if len(spec.get(name, ())) > 1 else {}
                if opts.get("control_after_generate"):
                    i += 1
            if inp.get("link") is not None:
                inputs[name] = list(links[inp["link"]])
        assert i == len(values), f"{ct}: {len(values)} widget values, {i} matched"
        prompt[str(node["id"])] = {"class_type": ct, "inputs": inputs}
    return prompt


def node_of(prompt: dict, class_type: str) -> str:
    (nid,) = [k for k, v in prompt.items() if v["class_type"] == class_type]
    return nid


def fixture_sized(api: dict) -> dict:
    wf = copy.deepcopy(api)
    gen = wf[node_of(wf, "UniARGenerate")]["inputs"]
    assert gen["aspect_ratio"].startswith("custom"), gen
    gen.update(width=SIZE, height=SIZE)
    wf[node_of(wf, "UniARDecode")]["inputs"]["steps"] = DECODE_STEPS
    return wf


def plain(api: dict, seed: int, prefix: str) -> dict:
    wf = copy.deepcopy(api)
    wf[node_of(wf, "UniARGenerate")]["inputs"]["seed"] = seed
    wf[node_of(wf, "UniARDecode")]["inputs"]["seed"] = seed
    wf[node_of(wf, "SaveImage")]["inputs"]["filename_prefix"] = prefix
    return wf


def distributed(api: dict, seed: int) -> dict:
    """Both seeds from one DistributedSeed, Decode -> DistributedCollector -> the template's SaveImage."""
    wf = copy.deepcopy(api)
    assert SEED_ID not in wf and COLLECTOR_ID not in wf
    dec = node_of(wf, "UniARDecode")
    wf[SEED_ID] = {"class_type": "DistributedSeed", "inputs": {"seed": seed}}
    wf[node_of(wf, "UniARGenerate")]["inputs"]["seed"] = [SEED_ID, 0]
    wf[dec]["inputs"]["seed"] = [SEED_ID, 0]
    wf[COLLECTOR_ID] = {"class_type": "DistributedCollector", "inputs": {"images": [dec, 0], "load_balance": False}}
    save = wf[node_of(wf, "SaveImage")]["inputs"]
    save["images"] = [COLLECTOR_ID, 0]
    save["filename_prefix"] = "uniar/distributed"
    return wf


def assert_success(srv: ComfyServer, entry: dict) -> None:
    assert entry.get("status", {}).get("status_str") == "success", \
        f"workflow failed: {execution_error(entry)}\n{srv.log_tail()}"


def saved_images(srv: ComfyServer, entry: dict, node_id: str):
    import numpy as np
    from PIL import Image

    items = entry["outputs"][node_id]["images"]
    arrays = []
    for it in items:
        with Image.open(srv.output_path(it)) as im:
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.int16))
    return items, arrays


# ------------------------------------------------------------------------------------------------ tests
def test_both_servers_have_both_packs(pair):
    for srv in pair:
        log = srv.log_text()
        assert "IMPORT FAILED" not in log, log
        code, info = srv.get("/object_info")
        assert code == 200
        for ct in ("UniARModelLoader", "UniARGenerate", "UniARDecode", "DistributedSeed", "DistributedCollector"):
            assert ct in info, f"{ct} missing on {srv.url}"
        assert TEMPLATE_CKPT in info["UniARModelLoader"]["input"]["required"]["ckpt_name"][1]["options"]


def test_t2i_template_fans_out_and_matches_plain_runs(pair):
    import numpy as np

    master, worker = pair
    # the master's worker list, over its HTTP API (what the Distributed panel does): one worker started by hand
    code, resp = master.post("/distributed/config", {"debug": True, "worker_timeout_seconds": RUN_TIMEOUT})
    assert code == 200, resp
    code, resp = master.post("/distributed/config/update_worker", {
        "worker_id": WORKER_ID, "name": "CPU worker", "host": "127.0.0.1", "port": worker.port,
        "cuda_device": None, "enabled": True, "type": "remote", "extra_args": ""})
    assert code == 200, resp
    code, cfg = master.get("/distributed/config")
    assert code == 200
    (w,) = [w for w in cfg["workers"] if w["id"] == WORKER_ID]
    assert w["enabled"] and w["port"] == worker.port and w["host"] == "127.0.0.1", w

    code, info = master.get("/object_info")
    assert code == 200
    with open(TEMPLATE, encoding="utf-8") as f:
        api = fixture_sized(template_to_api(json.load(f), info))
    assert api[node_of(api, "UniARModelLoader")]["inputs"]["ckpt_name"] == TEMPLATE_CKPT
    save_id = node_of(api, "SaveImage")

    # fan out: the master queues its prompt and sends the worker its own copy (seed + 1)
    code, resp = master.post("/distributed/queue", {
        "prompt": distributed(api, SEED), "client_id": str(uuid.uuid4()),
        "enabled_worker_ids": [WORKER_ID], "delegate_master": False}, timeout=120)
    assert code == 200, resp
    assert resp.get("worker_count") == 1, f"the worker was not dispatched to: {resp}\n{master.log_tail()}"
    entry = master.wait(resp["prompt_id"], timeout=RUN_TIMEOUT)
    assert_success(master, entry)
    items, got = saved_images(master, entry, save_id)
    assert len(got) == 2, f"expected the master's and the worker's picture, got {items}"

    mprompt = entry["prompt"][2]  # what the master ran: its own role, the worker list in the collector
    assert mprompt[SEED_ID]["inputs"]["is_worker"] is False
    assert json.loads(mprompt[COLLECTOR_ID]["inputs"]["enabled_worker_ids"]) == [WORKER_ID]

    # what the worker ran: the pruned prompt with its role filled in, ending in an auto-added preview
    code, hist = worker.get("/history")
    assert code == 200 and len(hist) == 1, hist
    (wentry,) = hist.values()
    assert_success(worker, wentry)
    wprompt = wentry["prompt"][2]
    assert wprompt[SEED_ID]["inputs"]["is_worker"] is True and wprompt[SEED_ID]["inputs"]["worker_id"] == "worker_0"
    coll = wprompt[COLLECTOR_ID]["inputs"]
    assert coll["is_worker"] is True and coll["worker_id"] == WORKER_ID
    assert coll["master_url"] == master.url, coll
    assert save_id not in wprompt, "the worker ran the master's SaveImage"

    # the same template, plain, at each participant's seed (on the master)
    refs = {}
    for seed in (SEED, SEED + 1):
        e = master.run(plain(api, seed, f"uniar/plain_{seed}"), timeout=RUN_TIMEOUT)
        assert_success(master, e)
        (ref,) = saved_images(master, e, save_id)[1]
        refs[seed] = ref

    diffs = {}
    for name, img, seed in (("master", got[0], SEED), ("worker", got[1], SEED + 1)):
        assert img.shape == refs[seed].shape == (SIZE, SIZE, 3), (img.shape, refs[seed].shape)
        diffs[name] = int(np.abs(img - refs[seed]).max())
    print(f"\nseeds master={SEED} worker={SEED + 1}; max |distributed - plain| in 8-bit levels: {diffs}; "
          f"max |seed {SEED} - seed {SEED + 1}|: {int(np.abs(refs[SEED] - refs[SEED + 1]).max())}")
    assert diffs["master"] <= 1 and diffs["worker"] <= 1, diffs
    assert np.abs(refs[SEED] - refs[SEED + 1]).max() > 8, "seed and seed + 1 gave the same picture"
