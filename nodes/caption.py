"""Captioning / visual question answering on an IMAGE or on UNIAR_TOKENS -> STRING (shown on the node)."""

from __future__ import annotations

from ..uniar_backend.limits import MAX_SEED
from .compat import UniARModel, UniARTokens, io, ui

DEFAULT_QUESTION = "Describe this image in detail."


class UniARCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UniARCaption",
            display_name="UniAR Caption / VQA",
            category="UniAR/understand",
            description=("Answers a question about an image, or about visual tokens (e.g. the tokens a Generate "
                         "node just made: no re-encoding). Loads the language model and its text head (+ the "
                         "vision tower for images); never the image decoder. The answer is shown on the node."),
            inputs=[
                UniARModel.Input("model", tooltip="The UniAR model from the UniAR Model Loader."),
                io.String.Input("question", multiline=True, default=DEFAULT_QUESTION,
                                tooltip="Instruction or question about the image (e.g. 'What color is the car?')."),
                io.Image.Input("image", optional=True,
                               tooltip="Image(s) to describe; one answer per image. Connect this or tokens."),
                UniARTokens.Input("tokens", optional=True,
                                  tooltip="Visual tokens to describe instead of an image (one answer per row)."),
                io.Int.Input("max_new_tokens", default=256, min=1, max=8192,
                             tooltip="Longest answer, in text tokens. Generation stops earlier at end-of-answer."),
                io.Boolean.Input("do_sample", default=False,
                                 tooltip="Off: greedy (deterministic) answers. On: sample with the settings below."),
                io.Float.Input("temperature", default=1.0, min=0.01, max=5.0, step=0.05, round=0.01,
                               tooltip="Sampling temperature (only with do_sample)."),
                io.Float.Input("top_p", default=1.0, min=0.01, max=1.0, step=0.01, round=0.01,
                               tooltip="Nucleus sampling: keep the smallest set of tokens with this probability "
                                       "mass; 1 = off (only with do_sample)."),
                io.Int.Input("top_k", default=0, min=0, max=1000,
                             tooltip="Keep only the k most likely tokens; 0 = off (only with do_sample)."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Seed for sampling (ignored by greedy decoding)."),
            ],
            outputs=[io.String.Output(display_name="text",
                                      tooltip="The answer (several images: numbered answers, one per image).")],
            is_output_node=True,  # runs (and shows its answer) even when nothing consumes the text
        )

    @classmethod
    def execute(cls, model, question, max_new_tokens, do_sample, temperature, top_p, top_k, seed,
                image=None, tokens=None) -> io.NodeOutput:
        from ..uniar_backend.errors import InputError
        from . import model_management as mgmt
        from .images import rgb_list

        if (image is None) == (tokens is None):
            raise InputError("UniAR Caption needs exactly one input: connect an image or visual tokens")
        from ..uniar_backend.api import check_caption_args

        check_caption_args(question, int(max_new_tokens), bool(do_sample), float(temperature), float(top_p),
                           int(top_k), int(seed))  # before anything loads
        images = rgb_list(image) if image is not None else None
        components = ("llm", "lm_head") + (("vision",) if images is not None else ())
        ar = mgmt.ar_model(model, components)
        rows = len(images) if images is not None else tokens.batch_size
        cb = mgmt.progress_callback(rows * int(max_new_tokens))
        kw = dict(max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample), temperature=float(temperature),
                  top_p=float(top_p), top_k=int(top_k), seed=int(seed))
        if images is not None:
            answers = []
            for i, im in enumerate(images):  # one call per image: images of a batch may differ in token count
                done = i * int(max_new_tokens)
                answers += ar.caption(question, image=im, callback=lambda s, n, d=done: cb(d + s, rows * n),
                                       **kw)
        else:
            answers = ar.caption(question, tokens=tokens, callback=cb, **kw)
        text = join_answers(answers)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


def join_answers(answers: list[str]) -> str:
    """One STRING for a batch of answers: the answer itself for one image, numbered paragraphs for several."""
    if len(answers) == 1:
        return answers[0]
    return "\n\n".join(f"[{i}] {a}" for i, a in enumerate(answers))
