"""Tokenizer, UniAR prompt formats and Qwen3-VL mRoPE position ids (computed here, not by transformers)."""

from __future__ import annotations

import os

import torch

from .errors import CheckpointError, InputError

# UniAR's own generation template (not the checkpoint's chat template): pieces concatenated, no separator.
GEN_PROMPT = "<|im_start|>user\n{prompt}{image}<image_gen> generate image {rows} {cols}<|im_end|>\n<|im_start|>assistant\n<|vision_start|>"
IMAGE_BLOCK = "<|vision_start|>{pads}<|vision_end|>"
MAX_PROMPT_TOKENS = 8192  # a prompt / question's own tokens (UniAR's prompts are a few dozen)
MAX_PROMPT_CHARS = 64 * MAX_PROMPT_TOKENS  # refused before tokenizing (no token is longer than 64 characters)
RESERVED = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>")


def load_tokenizer(ckpt):
    """The checkpoint's fast tokenizer through transformers (works with transformers 4.57 and 5.x)."""
    missing = [f for f in ("tokenizer.json",) if not os.path.isfile(ckpt.file(f))]
    if missing:
        raise CheckpointError(f"{ckpt.path}: tokenizer file(s) {', '.join(missing)} missing")
    import logging

    from transformers import PreTrainedTokenizerFast

    # Loading tokenizer.json directly needs no trust_remote_code and no network.
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(ckpt.path, local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{ckpt.path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    return tok


def check_prompt(prompt: str, what: str = "prompt") -> str:
    """A prompt or question: a string without the chat template's reserved tokens, not absurdly long (the
    tokenized length is checked by :func:`check_prompt_tokens`)."""
    if not isinstance(prompt, str):
        raise InputError(f"{what} must be a string, got {type(prompt).__name__}")
    for t in RESERVED:
        if t in prompt:
            raise InputError(f"{what} contains the reserved token {t}; remove it (images are passed separately)")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"{what} is {len(prompt)} characters long; at most {MAX_PROMPT_TOKENS} tokens "
                         f"(about {MAX_PROMPT_TOKENS * 4} characters of English) are accepted")
    return prompt


def check_prompt_tokens(tok, prompt: str, what: str = "prompt") -> None:
    """The prompt's own token count against :data:`MAX_PROMPT_TOKENS` (before any model work: the prefill's
    attention memory grows with the square of the prompt length)."""
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    if n > MAX_PROMPT_TOKENS:
        raise InputError(f"{what} is {n} tokens long; at most {MAX_PROMPT_TOKENS} are accepted (shorten it)")


def generation_prompt(prompt: str, rows: int, cols: int, image_tokens: int | None) -> str:
    image = "" if image_tokens is None else IMAGE_BLOCK.format(pads="<|image_pad|>" * image_tokens)
    return GEN_PROMPT.format(prompt=prompt, image=image, rows=rows, cols=cols)


def chat_prompt(ckpt, question: str, image_tokens: int) -> str:
    """The checkpoint's chat template (Qwen3-VL-Instruct) for one user turn [image, text] + generation prompt,
    with ``<|image_pad|>`` already expanded."""
    tok = ckpt.tokenizer
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    template = _chat_template(ckpt)
    try:
        text = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    except Exception as e:
        raise CheckpointError(f"{ckpt.path}: cannot render the chat template ({type(e).__name__}: {e})") from None
    if text.count("<|image_pad|>") != 1:
        raise CheckpointError(f"{ckpt.path}: the chat template did not place exactly one image")
    return text.replace("<|image_pad|>", "<|image_pad|>" * image_tokens)


def _chat_template(ckpt) -> str | None:
    """``chat_template.jinja`` (transformers >= 4.43 layout), else a processor ``chat_template.json``, else None
    (the tokenizer's own ``chat_template`` from tokenizer_config.json is then used)."""
    path = ckpt.file("chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = ckpt.file("chat_template.json")
    if os.path.isfile(path):
        from .jsonfile import read_json_file

        template = read_json_file(path, "re-download it").get("chat_template")
        if not isinstance(template, str):
            raise CheckpointError(f"{path}: not a valid chat template file (no 'chat_template' string)")
        return template
    return None


def tokenize_left_padded(tok, texts: list[str], pad_id: int):
    """-> input_ids (R, L) int64 and attention_mask (R, L) int64, left padded."""
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    L = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), L), dtype=torch.long)
    for i, x in enumerate(ids):
        if x:
            input_ids[i, L - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, L - len(x):] = 1
    return input_ids, mask


def rope_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, grids: list[list[tuple[int, int, int]]],
               image_token_id: int, vision_start_id: int, merge: int) -> torch.Tensor:
    """Qwen3-VL ``get_rope_index`` for images: (3, R, L) positions over the non-padded tokens (padding gets 1).

    ``grids[r]`` lists the (t, h, w) patch grids of the images of row r in order."""
    R, L = input_ids.shape
    pos = torch.ones(3, R, L, dtype=torch.long)
    for r in range(R):
        valid = attention_mask[r] == 1
        toks = input_ids[r][valid].tolist()
        row_grids = list(grids[r]) if grids else []
        parts = []
        st = 0
        nimg = sum(1 for i, t in enumerate(toks[:-1]) if t == vision_start_id and toks[i + 1] == image_token_id)
        for k in range(nimg):
            ed = toks.index(image_token_id, st)
            t, h, w = row_grids[k]
            gh, gw = h // merge, w // merge
            text_len = ed - st
            st_idx = int(parts[-1].max()) + 1 if parts else 0
            parts.append(torch.arange(text_len).view(1, -1).expand(3, -1) + st_idx)
            ti = torch.arange(t).view(-1, 1).expand(-1, gh * gw).flatten()
            hi = torch.arange(gh).view(1, -1, 1).expand(t, -1, gw).flatten()
            wi = torch.arange(gw).view(1, 1, -1).expand(t, gh, -1).flatten()
            parts.append(torch.stack([ti, hi, wi]) + text_len + st_idx)
            st = ed + t * gh * gw
        if st < len(toks):
            st_idx = int(parts[-1].max()) + 1 if parts else 0
            parts.append(torch.arange(len(toks) - st).view(1, -1).expand(3, -1) + st_idx)
        pos[:, r, valid] = torch.cat(parts, dim=1)
    return pos
