"""Decoder-prompt embeddings: computed once per (text encoders, prompt, dtype), then read from a cache file.

UniAR's decoder always conditions the SD3.5 DiT on one constant prompt (:data:`DEFAULT_DECODER_PROMPT`, used as
prompt and as negative prompt).  Upstream keeps CLIP-L, CLIP-G and T5-XXL (about 5.6 B parameters) resident to
re-encode it for every image.  We encode it once exactly as diffusers' ``StableDiffusion3Pipeline.encode_prompt``
does (no ``clip_skip``, ``max_sequence_length`` 256), store the two tensors in a safetensors file and from then
on never open a text-encoder file for that prompt.

Layout (as ``encode_prompt``): ``prompt_embeds`` = [CLIP-L penultimate hidden states | CLIP-G penultimate hidden
states] on channels (77 tokens), zero-padded to the T5 width, followed on the sequence axis by the T5 last hidden
states (256 tokens); ``pooled`` = [CLIP-L text projection | CLIP-G text projection].

Cache file ``<cache>/sd3_prompt_<sha(prompt)>_<dtype>_<sha(encoders)>.safetensors``: the encoder hash covers
name, size and mtime of the weight files and the content of the small files (configs, tokenizers) of
``sd3_pipeline/text_encoder*/`` and ``tokenizer*/`` (so a changed or re-downloaded encoder is re-encoded once).
When those folders are gone (e.g. deleted to save disk after the cache was built), an entry for the same prompt
is used without that check.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, InputError
from .components import PIPELINE_DIR
from ..fileio import atomic_path

log = logging.getLogger(__name__)

DEFAULT_DECODER_PROMPT = "Please reconstruct this image and restore all the details."
MAX_SEQUENCE_LENGTH = 256  # T5 tokens, StableDiffusion3Pipeline's default (upstream does not change it)
CACHE_FORMAT = "uniar.decoder_prompt"
CACHE_VERSION = "1"
CACHE_DIRNAME = ".uniar_cache"

ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5-XXL roles
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
_SMALL_FILE = 16 * 1024 * 1024  # hashed by content below this size, by name/size/mtime above
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class PromptEmbeddings:
    """One decoder prompt's SD3 conditioning, batch 1, on the CPU."""

    prompt: str
    prompt_embeds: torch.Tensor  # [1, 77 + 256, joint_attention_dim]
    pooled: torch.Tensor  # [1, pooled_projection_dim]

    def to(self, device, dtype) -> "PromptEmbeddings":
        return PromptEmbeddings(self.prompt, self.prompt_embeds.to(device, dtype), self.pooled.to(device, dtype))


def check_prompt(prompt) -> str:
    if prompt is None:
        return DEFAULT_DECODER_PROMPT
    if not isinstance(prompt, str):
        raise InputError(f"decoder prompt must be a string, got {type(prompt).__name__}")
    if "\x00" in prompt:
        raise InputError("decoder prompt contains a NUL character")
    return prompt


# ---------------------------------------------------------------------------------------------- cache location
def _user_cache_base() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "uniar")


def _writable(folder: str) -> bool:
    """Writable for us, and not marked read-only (root may write anywhere: honour missing write bits too)."""
    try:
        mode = os.stat(folder).st_mode
    except OSError:
        return False
    return bool(mode & 0o222) and os.access(folder, os.W_OK)


def default_cache_dir(root: str) -> str:
    """``<checkpoint>/.uniar_cache`` when the checkpoint folder is writable, else
    ``~/.cache/uniar/<checkpoint name>-<hash of its path>`` (``$XDG_CACHE_HOME`` respected)."""
    here = os.path.join(root, CACHE_DIRNAME)
    if os.path.isdir(here) and _writable(here):
        return here
    if not os.path.exists(here) and _writable(root):
        return here
    tag = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:10]
    return os.path.join(_user_cache_base(), f"{os.path.basename(root.rstrip(os.sep)) or 'checkpoint'}-{tag}")


# ---------------------------------------------------------------------------------------------- identity
def _present_parts(root: str) -> tuple[list[str], list[str]]:
    parts = ENCODERS + TOKENIZERS
    present = [p for p in parts if os.path.isdir(os.path.join(root, PIPELINE_DIR, p))]
    missing = [p for p in parts if p not in present]
    return present, missing


def encoder_fingerprint(root: str) -> str | None:
    """Hash identifying the text encoders + tokenizers, or None when any of their folders is missing.

    Weight files count by name, size and mtime (no 10 GB read); small files (configs, vocabularies) by content.
    Only ``stat`` and the small files are read: no encoder weights are opened."""
    present, missing = _present_parts(root)
    if missing:
        return None
    h = hashlib.sha256(f"{CACHE_FORMAT}/{CACHE_VERSION}/seq{MAX_SEQUENCE_LENGTH}".encode())
    for part in present:
        folder = os.path.join(root, PIPELINE_DIR, part)
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                path = os.path.join(dirpath, fn)
                st = os.stat(path)
                h.update(os.path.relpath(path, root).encode() + b"\0")
                if st.st_size < _SMALL_FILE:
                    with open(path, "rb") as f:
                        h.update(hashlib.sha256(f.read()).digest())
                else:
                    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def cache_file_name(prompt: str, dtype: torch.dtype, fingerprint: str) -> str:
    return f"sd3_prompt_{_prompt_hash(prompt)}_{_DTYPE_NAMES[dtype]}_{fingerprint[:16]}.safetensors"


# ---------------------------------------------------------------------------------------------- cache I/O
def read_cache(path: str, prompt: str) -> PromptEmbeddings | None:
    """Embeddings from a cache file, or None (with a warning) when it is unreadable or not for ``prompt``."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
                raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}")
            if meta.get("prompt") != prompt:
                return None  # hash collision of the name: not ours
            emb = PromptEmbeddings(prompt, f.get_tensor("prompt_embeds"), f.get_tensor("pooled"))
    except Exception as e:  # corrupt / truncated / foreign file: ignore it
        warnings.warn(f"ignoring unreadable decoder-prompt cache file {path} ({type(e).__name__}: {e})",
                      stacklevel=2)
        return None
    if emb.prompt_embeds.dim() != 3 or emb.pooled.dim() != 2:
        warnings.warn(f"ignoring decoder-prompt cache file {path}: unexpected tensor shapes", stacklevel=2)
        return None
    return emb


def write_cache(path: str, emb: PromptEmbeddings, dtype: torch.dtype, fingerprint: str, root: str = "") -> bool:
    """Write atomically (temporary file in the same folder + ``os.replace``).  Failure is only a warning."""
    from safetensors.torch import save_file

    try:
        with atomic_path(path, prefix=".uniar_prompt_") as tmp:
            save_file({"prompt_embeds": emb.prompt_embeds.contiguous().cpu(), "pooled": emb.pooled.contiguous().cpu()},
                      tmp, metadata={"format": CACHE_FORMAT, "version": CACHE_VERSION, "prompt": emb.prompt,
                                     "dtype": _DTYPE_NAMES[dtype], "encoder_fingerprint": fingerprint,
                                     "checkpoint": os.path.realpath(root) if root else "",
                                     "max_sequence_length": str(MAX_SEQUENCE_LENGTH)})
        return True
    except OSError as e:
        warnings.warn(f"could not write the decoder-prompt cache {path} ({e}); the prompt will be encoded again "
                      "next time (choose a writable cache_dir)", stacklevel=2)
        return False


def _fallback_entry(root: str, cache_dir: str, prompt: str,
                    dtype: torch.dtype) -> tuple[PromptEmbeddings, str] | None:
    """Text encoders absent: the newest cache entry for ``prompt`` (this dtype preferred, else another one)."""
    if not os.path.isdir(cache_dir):
        return None
    stem = f"sd3_prompt_{_prompt_hash(prompt)}_"
    want = f"{stem}{_DTYPE_NAMES[dtype]}_"
    names = [n for n in os.listdir(cache_dir) if n.startswith(stem) and n.endswith(".safetensors")]
    # Prefer entries written for this checkpoint folder, then this dtype, then the newest.
    names.sort(key=lambda n: (_cache_checkpoint(os.path.join(cache_dir, n)) == os.path.realpath(root),
                              n.startswith(want), os.path.getmtime(os.path.join(cache_dir, n))), reverse=True)
    for n in names:
        emb = read_cache(os.path.join(cache_dir, n), prompt)
        if emb is not None:
            return emb, n
    return None


def _cache_checkpoint(path: str) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("checkpoint")
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------- encoding
def _load_model(cls, folder: str, dtype: torch.dtype, device: torch.device, attn_implementation: str):
    """transformers ``from_pretrained``: local folder, safetensors only, no remote code (4.57 and 5.x)."""
    import transformers
    from transformers.utils import logging as hf_logging

    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if major_minor >= (4, 56) else "torch_dtype"
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers 5 draws a bar per load
    try:
        model = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                    attn_implementation=attn_implementation, **{dtype_kw: dtype})
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: could not load {cls.__name__} ({type(e).__name__}: {e})") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def _load_tokenizer(cls, folder: str):
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{folder}: could not load {cls.__name__} ({type(e).__name__}: {e})") from None


def _check_encoder_files(root: str) -> None:
    from ..checkpoint import WeightFiles

    _, missing = _present_parts(root)
    if missing:
        raise CheckpointError(
            f"{os.path.join(root, PIPELINE_DIR)}: the decoder prompt must be encoded once but "
            f"{', '.join(m + '/' for m in missing)} is missing (and no cached embeddings exist for this prompt)"
        )
    for part in ENCODERS:
        folder = os.path.join(root, PIPELINE_DIR, part)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise CheckpointError(f"{folder}: config.json is missing")
        WeightFiles(folder, "model")  # safetensors present, headers valid, not truncated (no pickle fallback)


def _release() -> None:
    """Return freed encoder memory to the system / device (call after dropping the last reference)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        mps.empty_cache()


@torch.no_grad()
def encode_prompt(ckpt_or_path, prompt: str | None = None, device="auto", dtype="auto") -> PromptEmbeddings:
    """Encode ``prompt`` with the checkpoint's CLIP-L, CLIP-G and T5 (no cache).

    The encoders are loaded one at a time (safetensors only, local files only), run on ``device`` in ``dtype``
    (upstream runs them in the pipeline dtype) and released right after use."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from ..runtime import resolve_device, resolve_dtype
    from .components import checkpoint_root

    root = checkpoint_root(ckpt_or_path)
    prompt = check_prompt(prompt)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    _check_encoder_files(root)
    pipe = os.path.join(root, PIPELINE_DIR)

    tok_l = _load_tokenizer(CLIPTokenizer, os.path.join(pipe, "tokenizer"))
    tok_g = _load_tokenizer(CLIPTokenizer, os.path.join(pipe, "tokenizer_2"))
    tok_t5 = _load_tokenizer(T5TokenizerFast, os.path.join(pipe, "tokenizer_3"))
    clip_len = tok_l.model_max_length  # diffusers: self.tokenizer_max_length, used for both CLIP tokenizers

    def tokenize(tok, max_length):
        ids = tok(prompt, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                  return_tensors="pt").input_ids
        if len(tok(prompt, add_special_tokens=True).input_ids) > max_length:
            warnings.warn(f"the decoder prompt is longer than {max_length} tokens for {type(tok).__name__}; "
                          "the rest is cut off (as upstream)", stacklevel=2)
        return ids

    # One encoder resident at a time; each is dropped before the next one is loaded.
    clip_states, pooled = [], []
    for part, tok in (("text_encoder", tok_l), ("text_encoder_2", tok_g)):
        model = _load_model(CLIPTextModelWithProjection, os.path.join(pipe, part), dt, dev, "sdpa")
        try:
            out = model(tokenize(tok, clip_len).to(dev), output_hidden_states=True)
            clip_states.append(out.hidden_states[-2].to(model.dtype))  # penultimate layer (clip_skip None)
            pooled.append(out.text_embeds.to(model.dtype))
            del out
        finally:
            del model
            _release()
    # Quirk: transformers 4.57 (upstream's version) runs T5 with eager attention; 5.x defaults to sdpa, which
    # changes bf16 results by an ulp here and there.  Eager reproduces upstream exactly.
    model = _load_model(T5EncoderModel, os.path.join(pipe, "text_encoder_3"), dt, dev, "eager")
    try:
        t5 = model(tokenize(tok_t5, MAX_SEQUENCE_LENGTH).to(dev))[0].to(model.dtype)
    finally:
        del model
        _release()

    clip = torch.cat(clip_states, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    embeds = torch.cat([clip, t5], dim=-2)
    return PromptEmbeddings(prompt, embeds.cpu(), torch.cat(pooled, dim=-1).cpu())


def prompt_embeddings(ckpt_or_path, prompt: str | None = None, device="auto", dtype="auto", cache_dir=None,
                      refresh: bool = False) -> PromptEmbeddings:
    """Decoder-prompt embeddings from the cache, encoding (and caching) them when needed.

    ``cache_dir`` defaults to :func:`default_cache_dir`.  ``refresh`` re-encodes even when cached."""
    from ..runtime import resolve_device, resolve_dtype
    from .components import checkpoint_root

    root = checkpoint_root(ckpt_or_path)
    prompt = check_prompt(prompt)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cache_dir = os.path.abspath(os.fspath(cache_dir)) if cache_dir is not None else default_cache_dir(root)
    fp = encoder_fingerprint(root)
    if fp is None:
        found = None if refresh else _fallback_entry(root, cache_dir, prompt, dt)
        if found is None:
            _check_encoder_files(root)  # raises with the list of missing folders
        emb, name = found
        if not name.startswith(f"sd3_prompt_{_prompt_hash(prompt)}_{_DTYPE_NAMES[dt]}_"):
            warnings.warn(f"decoder-prompt embeddings cached in another dtype ({name}) are used for {dt}",
                          stacklevel=2)
        log.info("text encoders absent: using cached decoder-prompt embeddings %s", name)
        return PromptEmbeddings(prompt, emb.prompt_embeds.to(dt), emb.pooled.to(dt))
    path = os.path.join(cache_dir, cache_file_name(prompt, dt, fp))
    if not refresh and os.path.isfile(path):
        emb = read_cache(path, prompt)
        if emb is not None:
            return emb
    emb = encode_prompt(root, prompt, dev, dt)
    write_cache(path, emb, dt, fp, root)
    return emb
