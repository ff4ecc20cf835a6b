"""Opening a UniAR checkpoint folder and loading its components (device / dtype / attention are decided by
:mod:`uniar_backend.runtime`; its functions are importable from here too)."""

from __future__ import annotations

import os
from functools import cached_property

from .checkpoint import WeightFiles, build_on_meta, load_module_weights
from .config import UniARConfig, read_json
from .errors import CheckpointError, InputError
from .modeling.uniar import COMPONENTS, UniARModel
from .runtime import resolve_attention, resolve_device, resolve_dtype  # noqa: F401  (also the public names here)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def how_to_get(path: str) -> str:
    """One line on how to fill a missing checkpoint folder (the download command and its size)."""
    repo = "ShareLab-SII/UniAR-RL" if "rl" in os.path.basename(path.rstrip(os.sep)).lower() else \
        "ShareLab-SII/UniAR-SFT"
    return (f"download it (about 26 GB of the files this pack reads) with `python -m uniar_backend download --repo "
            f"{repo} --out {path}` (--dry-run lists them first)")


class Checkpoint:
    """A UniAR checkpoint folder.  Opening it reads only ``config.json``; weights are read per component."""

    def __init__(self, path: str | os.PathLike):
        path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint folder not found: {path}; {how_to_get(path)}")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(
                f"{path} is not a UniAR checkpoint: config.json is missing (expected the folder of "
                "ShareLab-SII/UniAR-SFT or UniAR-RL, with config.json, model*.safetensors, bsq_encoder/, sd3_*/)"
            )
        self.path = path
        self.config = UniARConfig.from_file(cfg_path)

    def __repr__(self):
        return f"Checkpoint({self.path!r})"

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip(os.sep))

    @cached_property
    def weights(self) -> WeightFiles:
        return WeightFiles(self.path, "model")

    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def require(self, *relpaths: str, what: str) -> None:
        missing = [p for p in relpaths if not os.path.exists(self.file(p))]
        if missing:
            raise CheckpointError(f"{self.path}: {what} needs {', '.join(missing)}, which is missing")

    @cached_property
    def processor_config(self):
        from .preprocess import ProcessorConfig

        self.require("preprocessor_config.json", what="image preprocessing")
        return ProcessorConfig.from_file(self.file("preprocessor_config.json"))

    @cached_property
    def generation_config(self) -> dict:
        p = self.file("generation_config.json")
        return read_json(p) if os.path.isfile(p) else {}

    @cached_property
    def tokenizer(self):
        from .prompting import load_tokenizer

        return load_tokenizer(self)

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the visual codebook: hash of the BSQ output-projection weights of the AR model."""
        files = self.weights
        return files.fingerprint(
            lambda k: k.startswith("model.visual.bsq_output_proj") and (".norm." in k or "linear_fc1.weight" in k),
            strip="model.visual.",
        )

    def eos_token_ids(self) -> list[int]:
        eos = self.generation_config.get("eos_token_id")
        if eos is None:
            tok = self.tokenizer
            eos = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        return [int(e) for e in (eos if isinstance(eos, list) else [eos])]

    # ------------------------------------------------------------------ components
    @cached_property
    def weight_format(self) -> str | None:
        """The format the AR weights are stored in (``int8`` / ``fp8`` / ``int4``), None for float weights."""
        from .quant.files import stored_format

        return stored_format(self.config.raw, self.file("config.json"))

    def load_ar(self, components=COMPONENTS, device="auto", dtype="auto", attention="auto", ops=None,
                compute_device=None, reuse: UniARModel | None = None, weights: str | None = None) -> UniARModel:
        """Load the AR model (only the ``components`` asked for: ``llm``, ``vision``, ``lm_head``, ``gen_head``).

        ``device`` is where the weights are placed; ``compute_device`` (default: ``device``) is where they will
        run, which decides the attention backend (a host may load onto an offload device and move the model
        later).  ``reuse``: an already loaded model of this checkpoint whose tensors are taken over instead of
        being read again (to add components to it); it must not be used afterwards.  ``weights``: quantise a
        float checkpoint to ``int8`` / ``fp8`` / ``int4`` while loading (None: as stored)."""
        from .quant import check_format
        from .quant.files import resolve, view
        from .quant.formats import check_device
        from .quant.layers import AR_TARGETS, quantize_modules

        components = tuple(components)
        if weights is not None:
            check_format(weights)
        if reuse is not None:
            components = tuple(dict.fromkeys(tuple(reuse.components) + components))
            weights = reuse.weight_format
        unknown = [c for c in components if c not in COMPONENTS]
        if unknown:
            raise InputError(f"unknown component(s) {unknown}; choose from {COMPONENTS}")
        cfg = self.config
        if "gen_head" in components and not cfg.can_generate:
            raise CheckpointError(
                f"{self.file('config.json')}: this checkpoint cannot generate images (vistok_pred / "
                "visual_transformer_decoder are off); it can only answer questions about images"
            )
        dev = resolve_device(device)
        cdev = resolve_device(compute_device) if compute_device is not None else dev
        dt = resolve_dtype(dtype, cdev) if reuse is None else reuse.dtype
        backend = resolve_attention(attention, cdev, dt)
        files = self.weights
        if "gen_head" in components:
            self._check_head_variant(files)

        fmt, stored = resolve(files, cfg.raw, self.file("config.json"), weights)
        quantized: list[str] = []
        if fmt is not None:
            check_device(fmt, cdev)

        def quantize(m, twin):  # on the module and its plain twin: the same layer names
            quantized[:] = quantize_modules(m, AR_TARGETS, fmt, dt, like=twin)

        model, layout = build_on_meta(lambda o: UniARModel(cfg, components, ops=o, dtype=dt), ops,
                                      post=quantize if fmt is not None else None)
        files = view(files, fmt, stored, quantized, loads={model.checkpoint_key(k) for k in layout})
        preloaded = dict(reuse.state_dict()) if reuse is not None else None
        load_module_weights(model, files, model.checkpoint_key, dt, dev, what="AR model", preloaded=preloaded,
                            layout=layout)
        model.attention = backend
        model.weight_format = fmt.name if fmt is not None else None
        model.eval().requires_grad_(False)
        model.fingerprint = self.fingerprint
        model.checkpoint_path = self.path
        return model

    def _check_head_variant(self, files: WeightFiles) -> None:
        keys = {k for k in files.keys() if k.startswith("output_layer_vistok.")}
        found = ("mlp" if "output_layer_vistok.3.weight" in keys else
                 "layernorm" if "output_layer_vistok.1.weight" in keys else
                 "linear" if "output_layer_vistok.weight" in keys else None)
        cfg = self.config
        want = "mlp" if cfg.vistok_pred_use_mlp else ("layernorm" if cfg.vistok_pred_layernorm else "linear")
        if found is None:
            raise CheckpointError(f"{self.path}: no output_layer_vistok weights: the checkpoint cannot generate images")
        if found != want:
            raise CheckpointError(
                f"{self.path}: config.json describes a '{want}' vistok head but the weights hold a '{found}' head "
                f"(keys {sorted(keys)}); fix vistok_pred_layernorm / vistok_pred_use_mlp in config.json"
            )
