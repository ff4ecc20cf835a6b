"""The AR model as one object, :class:`UniAR`: tokenize an image, generate / edit image tokens, caption / answer
questions (the counterpart of the decoder's :class:`~uniar_backend.decoder.UniARDecoder`).

Every operation validates its inputs before any heavy work and runs on the model's compute device, so a host
(e.g. ComfyUI's model management) may move the model between devices between calls.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from . import prompting
from .errors import InputError
from .preprocess import prepare_edit_image, processor_patches
from .sampling import Prefix, generate_text, image_sampler, sample, text_sampler
from .limits import TOKEN_PIXELS, check_generation, check_sampling, check_seed, check_size, seed_list  # noqa: F401
from .tokens import VisualTokens


Callback = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------- validation
def _need(model, *components):
    missing = [c for c in components if c not in model.components]
    if missing:
        raise InputError(f"this operation needs the model component(s) {missing}; load them with "
                         f"Checkpoint.load_ar(components=...)")


def _seed_value(seed: int) -> int:
    # torch.Generator.manual_seed takes 0..2**64-1 (values >= 2**63 are passed as their int64 wrap).
    return seed - 2**64 if seed >= 2**63 else seed


def _as_image_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            return [images]
        if images.dim() == 4:
            return list(images)
        raise InputError(f"image tensor must be [H, W, 3] or [B, H, W, 3], got {list(images.shape)}")
    if isinstance(images, (list, tuple)):
        out = []
        for im in images:
            out.extend(_as_image_list(im) if isinstance(im, torch.Tensor) else [im])
        return out
    return [images]


# ---------------------------------------------------------------------------------------------- argument checks
# The checks each operation runs first; hosts (the CLI, the ComfyUI nodes) call them too before loading weights,
# so a bad value fails in a second.
def check_generate_args(prompts, height: int, width: int, cfg: float, temperature: float, seed: int,
                        mode: str = "fast", edit_side: tuple[int, int] | None = None) -> list[str]:
    """Prompts (str or list), size, sampling values, the sampler name and the cache the generation will hold
    (``edit_side``: the edit input's size, when known).  Returns the prompts as a list."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise InputError("no prompt given (an empty string is fine: it gives an unconditional sample)")
    prompts = [prompting.check_prompt(p) for p in prompts]
    check_size(height, width)
    check_sampling(cfg, temperature, seed)
    image_sampler(mode)  # a registered sampler
    check_generation(len(prompts), height, width, cfg, edit_side)
    return prompts


def check_caption_args(question: str, max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0,
                       top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> None:
    prompting.check_prompt(question, "question")
    if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 32768:
        raise InputError(f"max_new_tokens must be in 1..32768, got {max_new_tokens!r}")
    if do_sample:
        if not (math.isfinite(temperature) and temperature > 0):
            raise InputError(f"temperature must be > 0, got {temperature!r}")
        if not (0 < top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
        if top_k < 0:
            raise InputError(f"top_k must be >= 0, got {top_k!r}")
    check_seed(seed)


# ---------------------------------------------------------------------------------------------- encoding
@torch.inference_mode()
def _encode_image(model, ckpt, image) -> VisualTokens:
    """Image(s) -> visual tokens, through the Qwen3-VL fast-processor path (what understanding uses).

    ``image``: a PIL image, a float tensor [H, W, 3] / [B, H, W, 3] in 0..1, or a list of those (all must
    resize to the same token grid)."""
    _need(model, "vision")
    items = _as_image_list(image)
    if not items:
        raise InputError("no image given to encode")
    pcfg = ckpt.processor_config
    prepared = [processor_patches(im, pcfg) for im in items]
    sizes = {p[2] for p in prepared}
    if len(sizes) > 1:
        raise InputError(f"images resize to different token grids {sorted(sizes)}; encode them separately")
    rh, rw = prepared[0][2]
    bits = []
    for pv, grid, _ in prepared:
        b = model.visual.encode_bits(pv.to(model.device), [grid], model.attention)
        bits.append(b.cpu())
    bits = torch.stack(bits)  # (B, N, levels, unit, d)
    return VisualTokens.from_bits(bits, rh, rw, fingerprint=model.fingerprint)


# ---------------------------------------------------------------------------------------------- generation
def _edit_inputs(model, ckpt, B, edit_images, edit_tokens):
    """-> list per prompt of (bits (n, levels, unit, d), grid (t, h, w)) for the edit input, or None."""
    if edit_images is not None and edit_tokens is not None:
        raise InputError("give the edit input either as an image or as tokens, not both")
    if edit_tokens is not None:
        v = model.cfg.vision
        for w in edit_tokens.check_compatible(v.bsq_dim, v.levels, v.merge_unit, model.fingerprint, "this UniAR model"):
            import warnings

            warnings.warn(w)
        if edit_tokens.batch_size not in (1, B):
            raise InputError(f"edit tokens hold {edit_tokens.batch_size} images for {B} prompt(s); give "
                             f"{'1' if B == 1 else f'1 or {B}'}")
        bits = edit_tokens.bits()
        grid = (1, edit_tokens.ar_height // 16, edit_tokens.ar_width // 16)
        return [(bits[i if edit_tokens.batch_size > 1 else 0], grid) for i in range(B)]
    return None


def _edit_image_inputs(model, ckpt, B, edit_images, height, width):
    items = _as_image_list(edit_images)
    if len(items) == 1 and B > 1:
        items = items * B
    if len(items) != B:
        raise InputError(f"{len(items)} edit images for {B} prompt(s); give {'1' if B == 1 else f'1 or {B}'}")
    _need(model, "vision")
    pcfg = ckpt.processor_config
    out = []
    for im in items:
        pil = prepare_edit_image(im, height, width)
        pv, grid, _ = processor_patches(pil, pcfg)
        bits = model.visual.encode_bits(pv.to(model.device), [grid], model.attention)
        out.append((bits, grid))
    return out


def _build_prefix(model, ckpt, prompts: Sequence[str], height: int, width: int, cfg: float,
                 edit: list | None = None, max_context: int | None = None) -> tuple[Prefix, dict]:
    """Prompt rows (conditional, then unconditional when cfg > 1), left padding, mRoPE ids, embeddings."""
    mc = model.cfg
    tok = ckpt.tokenizer
    for p in dict.fromkeys(prompts):
        prompting.check_prompt_tokens(tok, p)
    rows, cols = height // TOKEN_PIXELS, width // TOKEN_PIXELS
    N = rows * cols
    use_cfg = cfg > 1.0
    row_prompts = list(prompts) + ([""] * len(prompts) if use_cfg else [])
    row_edit = (edit + edit if use_cfg else edit) if edit is not None else None
    texts = []
    for r, p in enumerate(row_prompts):
        n_img = None if row_edit is None else int(row_edit[r][0].shape[0])
        texts.append(prompting.generation_prompt(p, rows, cols, n_img))
    pad_id = ckpt.generation_config.get("pad_token_id")
    if pad_id is None:
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids, attn = prompting.tokenize_left_padded(tok, texts, int(pad_id))
    R, L = input_ids.shape
    check_generation(len(prompts), height, width, cfg, prompt_tokens=L)  # prompts and edit images included in L
    limit = max_context or mc.text.max_position_embeddings
    if L + N > limit:
        raise InputError(f"prompt ({L} tokens) + image ({N} tokens) exceed the model's context of {limit} tokens; "
                         "shorten the prompt or lower the resolution")
    out_grid = (1, height // 16, width // 16)
    grids = [([row_edit[r][1]] if row_edit is not None else []) + [out_grid] for r in range(R)]
    all_ids = torch.cat([input_ids, torch.full((R, N), mc.image_token_id, dtype=torch.long)], dim=1)
    all_mask = torch.cat([attn, torch.ones(R, N, dtype=torch.long)], dim=1)
    positions = prompting.rope_index(all_ids, all_mask, grids, mc.image_token_id, mc.vision_start_token_id,
                                     mc.vision.spatial_merge_size)
    dev = model.device
    ids = input_ids.to(dev)
    embeds = model.language_model.embed_tokens(ids)
    deepstack = visual_mask = None
    if row_edit is not None:
        bits = torch.cat([b for b, _ in row_edit]).to(dev)
        main, deep = model.visual.bits_to_features(bits)
        visual_mask = ids == mc.image_token_id
        if int(visual_mask.sum()) != main.shape[0]:
            raise InputError("the tokenizer did not keep the image placeholders; check the checkpoint's tokenizer")
        embeds = embeds.clone()
        embeds[visual_mask] = main.to(embeds.dtype)
        deepstack = deep
    prefix = Prefix(embeds=embeds, mask=attn.bool(), positions=positions, num_tokens=N, deepstack=deepstack,
                    visual_mask=visual_mask)
    return prefix, {"input_ids": input_ids, "attention_mask": attn, "positions": positions, "texts": texts}


@torch.inference_mode()
def _generate(model, ckpt, prompts, height: int, width: int, cfg: float = 1.5, temperature: float = 1.0,
             seed: int = 0, edit_images=None, edit_tokens: VisualTokens | None = None, mode: str = "fast",
             callback: Callback | None = None, logits_out: list | None = None,
             info: dict | None = None, preview=None) -> VisualTokens:
    """Generate image tokens for each prompt (text-to-image, or edit when an image / tokens are given).

    With ``cfg > 1`` every prompt also gets an empty-prompt row and the logits are mixed as the reference does.
    Deviation: with ``cfg <= 1`` the reference still generates (and returns) the empty-prompt rows; we compute
    and return only the conditional rows, so such tokens differ from the reference (half the work).

    ``seed``: one seed for the batch (the reference's single stream), or a list of one per prompt: each prompt then
    draws from its own stream exactly what it draws alone with that seed (batch runs: :mod:`uniar_backend.batch`).

    ``preview``: see :func:`uniar_backend.sampling.sample` (the bits drawn so far, every ``preview.every`` steps)."""
    prompts = check_generate_args(prompts, height, width, cfg, temperature, seed, mode)
    _need(model, "llm", "gen_head")
    B = len(prompts)
    seeds = seed_list(seed, B, "prompt(s)")
    edit = _edit_inputs(model, ckpt, B, edit_images, edit_tokens)
    if edit is None and edit_images is not None:
        edit = _edit_image_inputs(model, ckpt, B, edit_images, height, width)
    prefix, meta = _build_prefix(model, ckpt, prompts, height, width, cfg, edit)
    if info is not None:
        info.update(meta)
    bits = sample(model, prefix, float(cfg), float(temperature),
                  [_seed_value(s) for s in seeds] if seeds is not None else _seed_value(seed), mode, callback,
                  logits_out, preview)
    bits = bits[:B].cpu()
    return VisualTokens.from_bits(bits, height, width, fingerprint=model.fingerprint)


# ---------------------------------------------------------------------------------------------- understanding
@torch.inference_mode()
def _caption(model, ckpt, question: str, image=None, tokens: VisualTokens | None = None, max_new_tokens: int = 256,
            do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
            callback: Callback | None = None, info: dict | None = None) -> list[str]:
    """Answer ``question`` about each image (or each row of ``tokens``): the Qwen3-VL chat flow of the
    reference (checkpoint chat template, BSQ-quantised vision features, final norm + lm_head), greedy by default,
    stopping at the checkpoint's eos tokens.  Returns one answer per image."""
    check_caption_args(question, max_new_tokens, do_sample, temperature, top_p, top_k, seed)
    if (image is None) == (tokens is None):
        raise InputError("give either an image or visual tokens to caption")
    _need(model, "llm", "lm_head")
    pick = text_sampler("sampling" if do_sample else "greedy")
    pick_options = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    mc = model.cfg
    items = []  # (bits, grid)
    if tokens is not None:
        v = mc.vision
        tokens.check_compatible(v.bsq_dim, v.levels, v.merge_unit, model.fingerprint, "this UniAR model")
        grid = (1, tokens.ar_height // 16, tokens.ar_width // 16)
        bits = tokens.bits()
        items = [(bits[i], grid) for i in range(tokens.batch_size)]
    else:
        _need(model, "vision")
        for im in _as_image_list(image):
            pv, grid, _ = processor_patches(im, ckpt.processor_config)
            items.append((model.visual.encode_bits(pv.to(model.device), [grid], model.attention), grid))
    tok = ckpt.tokenizer
    prompting.check_prompt_tokens(tok, question, "question")
    eos = set(ckpt.eos_token_ids())
    dev = model.device
    lm = model.language_model
    answers = []
    total_steps = len(items) * max_new_tokens  # an answer that stops early at eos skips the rest of its share
    for item, (bits, grid) in enumerate(items):
        n_img = int(bits.shape[0])
        text = prompting.chat_prompt(ckpt, question, n_img)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
        L = ids.shape[1]
        if L + max_new_tokens > mc.text.max_position_embeddings:
            raise InputError(f"question + image ({L} tokens) + max_new_tokens exceed the model's context")
        pos = prompting.rope_index(ids, torch.ones_like(ids), [[grid]], mc.image_token_id, mc.vision_start_token_id,
                                   mc.vision.spatial_merge_size)
        next_pos = int(pos.max()) + 1
        ids_d = ids.to(dev)
        x = lm.embed_tokens(ids_d)
        vmask = ids_d == mc.image_token_id
        main, deep = model.visual.bits_to_features(bits.to(dev))
        x = x.clone()
        x[vmask] = main.to(x.dtype)
        gen = torch.Generator(device=dev)
        gen.manual_seed(_seed_value(seed))
        scores = [] if info is not None else None
        done = item * max_new_tokens
        out_ids = generate_text(model, x, pos, next_pos, max_new_tokens, eos, pick, gen, pick_options, deep, vmask,
                                callback=(lambda k, d=done: callback(d + k, total_steps)) if callback else None,
                                scores=scores)
        if info is not None:  # what the parity tests compare with the reference
            info.setdefault("scores", []).append(torch.cat(scores))
            info.setdefault("input_ids", []).append(ids)
            info.setdefault("positions", []).append(pos)
            info.setdefault("output_ids", []).append(out_ids)
        answers.append(tok.decode(out_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return answers


# ---------------------------------------------------------------------------------------------- the AR object
class UniAR:
    """A loaded UniAR AR model with what it needs from its checkpoint (tokenizer, processor and generation
    configs, eos ids): ``encode``, ``generate``, ``caption``.

    ``UniAR.load(path_or_checkpoint, components=..., device=..., dtype=..., attention=..., ops=...)`` reads only
    the components asked for; ``add(components)`` returns a model with more components, taking the loaded tensors
    over.  ``model`` is the :class:`~uniar_backend.modeling.uniar.UniARModel` (modules), ``checkpoint`` the
    :class:`~uniar_backend.loader.Checkpoint`."""

    def __init__(self, checkpoint, model):
        self.checkpoint = checkpoint
        self.model = model

    @classmethod
    def load(cls, checkpoint, components=None, **options) -> "UniAR":
        from .loader import Checkpoint
        from .modeling.uniar import COMPONENTS

        ck = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        return cls(ck, ck.load_ar(components=components or COMPONENTS, **options))

    def add(self, components, **options) -> "UniAR":
        """This model with ``components`` added (the loaded tensors are taken over; this object must not be used
        afterwards)."""
        return UniAR(self.checkpoint, self.checkpoint.load_ar(components=components, reuse=self.model, **options))

    def __repr__(self):
        return f"UniAR({self.checkpoint.name}, {list(self.model.components)}, {self.device}, {self.dtype})"

    # what the model owns from its checkpoint
    @property
    def tokenizer(self):
        return self.checkpoint.tokenizer

    @property
    def processor_config(self):
        return self.checkpoint.processor_config

    @property
    def eos_token_ids(self) -> list[int]:
        return self.checkpoint.eos_token_ids()

    @property
    def components(self) -> tuple:
        return tuple(self.model.components)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    # operations
    def encode(self, image) -> VisualTokens:
        """Image(s) -> visual tokens (see :func:`_encode_image`)."""
        return _encode_image(self.model, self.checkpoint, image)

    def generate(self, prompts, height: int, width: int, **options) -> VisualTokens:
        """Image tokens for each prompt: text-to-image, or an edit with ``edit_images`` / ``edit_tokens`` (options
        of :func:`_generate`: cfg, temperature, seed, mode, callback, preview, ...)."""
        return _generate(self.model, self.checkpoint, prompts, height, width, **options)

    def caption(self, question: str, image=None, tokens: VisualTokens | None = None, **options) -> list[str]:
        """Answer ``question`` about each image or token row (options of :func:`_caption`)."""
        return _caption(self.model, self.checkpoint, question, image=image, tokens=tokens, **options)

    def prefix(self, prompts, height: int, width: int, cfg: float, edit=None) -> tuple:
        """The sampler's input rows for ``prompts`` (parity tests and benchmarks)."""
        return _build_prefix(self.model, self.checkpoint, prompts, height, width, cfg, edit)
