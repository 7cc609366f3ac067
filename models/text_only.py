"""The text-only path: any causal LM with a chat template (the embedded default is
SmolLM2-135M-Instruct), reading the visual memory in words and the transcript lines.

A model that cannot read memory tokens still learns what the video shows from
``Context.scenes``: ``describe_scenes`` turns the temporal memory's clusters into lines
with their times: where each view is on screen, and which views come back.
"""

from __future__ import annotations

import torch

from .base import ChatModel
from .llm import load_pretrained, resolve


class TextOnlyModel(ChatModel):
    """A causal LM that reads text only."""

    @classmethod
    def from_pretrained(cls, name: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve(name)
        tokenizer = load_pretrained(AutoTokenizer, path, "tokenizer")
        lm = load_pretrained(AutoModelForCausalLM, path, "language model", dtype=dtype).to(device)
        return cls(lm, tokenizer, name or "embedded SmolLM2-135M-Instruct")


def describe_scenes(clusters: list[tuple[float, float, float]], fps: float, min_gap: float = 2.0,
                    captions: list[str] | None = None) -> list[tuple[float, float, str]]:
    """Lines about the visual memory from its clusters ``(start, end, frames)``.

    Each cluster is a view; a view whose span is longer (by ``min_gap`` seconds) than
    its frames fill at ``fps``, i.e. whose frames are spread out, is on screen more
    than once ("recurs"). Views are lettered in order of first appearance, and carry
    their ``captions`` (one per cluster, in the order given: what the frame encoder can
    say of them, such as a colour) when there are any. With captions, a view whose
    caption is empty (the encoder recognised nothing in it) is left out: a line that
    says only "view Q" is noise to a small model. The lines are short and alike on
    purpose: the prompt keeps about the same length however long the stream.
    """
    lines = []
    given = captions is not None
    captions = captions or [""] * len(clusters)
    ordered = sorted(zip(clusters, captions), key=lambda pair: pair[0])
    for i, ((start, end, frames), caption) in enumerate(ordered):
        if given and not caption:
            continue
        words = [f"view {_letters(i)}", caption, "recurs" if end - start > frames / fps + min_gap else ""]
        lines.append((start, end, ", ".join(word for word in words if word)))
    return lines


def _letters(i: int) -> str:
    label = ""
    i += 1
    while i:
        i, rest = divmod(i - 1, 26)
        label = chr(ord("A") + rest) + label
    return label
