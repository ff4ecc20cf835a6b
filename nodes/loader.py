"""Loader nodes: pick a UniAR checkpoint folder (or download one from the Hub) -> ``UNIAR_MODEL``.

Neither node loads weights: the ``UNIAR_MODEL`` they output is a light handle, and each consuming node loads
only the parts it needs (see ``model_management.py``)."""

from __future__ import annotations

import logging
import os

import folder_paths

from ..uniar_backend.quant import FORMATS, check_format, check_requested
from . import checkpoints
from .compat import UniARModel, advanced, io

log = logging.getLogger("UniAR")

MODEL_FOLDER = "uniar"

DTYPE_TIP = ("Weights and compute precision. auto: float32 on the CPU, bfloat16 on GPUs that support it "
             "(else float16). bfloat16 halves the memory of float32; results differ slightly from float32.")
ATTENTION_TIP = ("Attention kernel. auto: flash_attention_2 when the flash-attn package is installed and a CUDA "
                 "GPU computes in half precision, else PyTorch sdpa. eager is the slow reference.")
WEIGHTS = ("as stored",) + FORMATS
WEIGHTS_TIP = ("Weight format of the language model, the generation head and the DiT. 'as stored': as the folder "
               "holds them (a folder converted with `python -m uniar_backend quantize` loads quantised). int8 / "
               "fp8 / int4 quantise a bf16 folder while loading: int8 (about 9 GB for t2i at 1024x1024, for 12 GB "
               "cards) is the closest to bf16, int4 (about 6 GB, for 8 GB cards) the smallest.")
MODEL_OUT_TIP = ("The UniAR model (a light handle: the nodes that use it load only the parts they need, through "
                 "ComfyUI's model management).")


def uniar_folders() -> list[str]:
    try:
        return folder_paths.get_folder_paths(MODEL_FOLDER)
    except KeyError:
        return []


def _runtime_inputs() -> list:
    """The dtype / attention inputs both loader nodes share."""
    return [
        io.Combo.Input("dtype", options=list(checkpoints.DTYPES), default="auto", tooltip=DTYPE_TIP),
        advanced(io.Combo.Input, "attention", options=list(checkpoints.ATTENTIONS), default="auto", tooltip=ATTENTION_TIP),
        io.Combo.Input("weights", options=list(WEIGHTS), default="as stored", tooltip=WEIGHTS_TIP, optional=True),
    ]


def _handle(path: str, dtype: str, attention: str, weights: str = "as stored"):
    from .model_management import UniARHandle, get_checkpoint

    ck = get_checkpoint(path)  # cheap: reads config.json, raises a clear CheckpointError for a wrong folder
    fmt = None if weights in (None, "as stored") else check_format(weights)
    check_requested(ck.weight_format, fmt, ck.name)  # before any node loads weights
    return UniARHandle(path=os.path.abspath(path), dtype=dtype, attention=attention, weights=fmt)


class UniARModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        names = checkpoints.list_checkpoints(uniar_folders())
        return io.Schema(
            node_id="UniARModelLoader",
            display_name="UniAR Model Loader",
            category="UniAR/loaders",
            description=("Selects a UniAR checkpoint folder (Hugging Face layout, e.g. UniAR-SFT) from "
                         "models/uniar or any 'uniar' path of extra_model_paths.yaml. Nothing is loaded here: "
                         "each node loads only the parts it needs (captioning never loads the image decoder, "
                         "decoding never loads the language model)."),
            inputs=[
                io.Combo.Input("ckpt_name", options=names, default=names[0] if names else None,
                               tooltip=("Checkpoint folder inside models/uniar (or an extra 'uniar' path). "
                                        "Download ShareLab-SII/UniAR-SFT or UniAR-RL from Hugging Face into "
                                        "models/uniar/<name>, or use the 'UniAR Download Model' node.")),
                *_runtime_inputs(),
            ],
            outputs=[UniARModel.Output(display_name="model", tooltip=MODEL_OUT_TIP)],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name=None):
        if ckpt_name is None:
            return True
        if checkpoints.find_checkpoint(ckpt_name, uniar_folders()) is None:
            return (f"UniAR checkpoint '{ckpt_name}' not found in the 'uniar' model folders "
                    f"({', '.join(uniar_folders()) or 'none registered'}). Put the checkpoint folder there "
                    "(or use the 'UniAR Download Model' node).")
        return True

    @classmethod
    def execute(cls, ckpt_name, dtype="auto", attention="auto", weights="as stored") -> io.NodeOutput:
        path = checkpoints.find_checkpoint(ckpt_name, uniar_folders())
        if path is None:
            raise FileNotFoundError(f"UniAR checkpoint '{ckpt_name}' not found in {uniar_folders()}")
        return io.NodeOutput(_handle(path, dtype, attention, weights))


class UniARDownloadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniARDownloadModel",
            display_name="UniAR Download Model",
            category="UniAR/loaders",
            description=("Downloads a UniAR checkpoint from the Hugging Face Hub into the first 'uniar' model "
                         "folder: only the files this pack reads, after checking the free disk space, resuming "
                         "interrupted files (only when the node runs; skipped when the folder is already complete, "
                         "so it also works offline afterwards), then acts like the loader."),
            inputs=[
                io.Combo.Input("repo_id", options=list(checkpoints.HUB_REPOS), default=checkpoints.HUB_REPOS[0],
                               tooltip=("Hugging Face repository. UniAR-SFT: the supervised model; UniAR-RL: "
                                        "the RL-tuned one. Only the files the pack reads are fetched (see the "
                                        "README: about a third of the repository's 74 GB), resuming where an "
                                        "interrupted download stopped.")),
                *_runtime_inputs(),
            ],
            outputs=[UniARModel.Output(display_name="model", tooltip=MODEL_OUT_TIP)],
        )

    @classmethod
    def execute(cls, repo_id, dtype="auto", attention="auto", weights="as stored") -> io.NodeOutput:
        folders = uniar_folders()
        if not folders:
            raise RuntimeError("no 'uniar' model folder is registered (the UniAR pack registers models/uniar)")
        local = checkpoints.hub_local_dir(repo_id, folders)
        if not checkpoints.checkpoint_looks_complete(local):
            _download(repo_id, local)
        return io.NodeOutput(_handle(local, dtype, attention, weights))


def _download(repo_id: str, local: str) -> None:
    """Only the files the pack reads (see uniar_backend/download.py), resumable, with byte progress and cancel."""
    import comfy.utils

    from ..uniar_backend.download import download
    from ..uniar_backend.errors import CheckpointError
    from .model_management import check_interrupt

    manual = (f"Download it manually (e.g. `python -m uniar_backend download --repo {repo_id} --out \"{local}\"` "
              f"or from https://huggingface.co/{repo_id}) and put the folder at {local}, then use the UniAR Model "
              "Loader.")
    pbar = comfy.utils.ProgressBar(100)
    shown = [-1]

    def progress(done: int, total: int) -> None:
        # called about every 0.1 s while a file arrives (even when no byte does), so a cancel stops the download
        # within about 0.1 s; the next run resumes it
        check_interrupt()
        percent = int(done * 100 // max(1, total))
        if percent != shown[0]:  # the bar (a message to the browser) only when it moves
            shown[0] = percent
            pbar.update_absolute(percent, 100)

    log.info("UniAR: downloading %s into %s (only the files this pack reads)", repo_id, local)
    try:
        summary = download(repo_id, local, progress=progress)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. {manual}") from None
    log.info("UniAR: %s: %d files, %.1f GB (%d fetched)", repo_id, summary["files"], summary["bytes"] / 1e9,
             summary["fetched"])
    if not checkpoints.checkpoint_looks_complete(local):
        raise CheckpointError(f"the download of {repo_id} into {local} is incomplete. {manual}")
