"""The text-only path: any causal LM with a chat template (the embedded default is
SmolLM2-135M-Instruct), reading the visual memory in words and the transcript lines.

A model that cannot read memory tokens still learns what the video shows from
``Context.scenes``: ``describe_scenes`` turns the temporal memory's clusters on the
timeline into lines with their times: where each view is on screen, and how many times
and when it came back.
"""

from __future__ import annotations

import torch

from vstream.memory import SceneRuns

from .base import ChatModel
from .llm import load_pretrained, resolve
from .prompt import clock


class TextOnlyModel(ChatModel):
    """A causal LM that reads text only."""

    @classmethod
    def from_pretrained(cls, name: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve(name)
        tokenizer = load_pretrained(AutoTokenizer, path, "tokenizer")
        lm = load_pretrained(AutoModelForCausalLM, path, "language model", dtype=dtype).to(device)
        return cls(lm, tokenizer, name or "embedded SmolLM2-135M-Instruct")


def describe_scenes(scenes: list[SceneRuns], fps: float, min_gap: float = 2.0,
                    captions: list[str] | None = None) -> list[tuple[float, float, str]]:
    """Lines about the visual memory from its clusters on the timeline (``SceneRuns``,
    ``StreamMemory.timeline()``), as ``(start, end, line)``.

    Each scene is a view, lettered in order of first appearance. A view on screen more
    than once says how many times and when (``3 times: 0:00:22, 0:00:35, 0:00:48``;
    past ``LISTED_RUNS`` times, the first and last). Where the memory keeps
    no runs, a view whose span is longer (by ``min_gap`` seconds) than its frames fill
    at ``fps`` says it "recurs". Views carry their ``captions`` (one per scene, in the
    order given: what the frame encoder can say of them, such as a colour) when there
    are any; with captions, a view whose caption is empty (the encoder recognised
    nothing in it) is left out: a line that says only "view Q" is noise to a small
    model. The lines are short and alike on purpose: the prompt keeps about the same
    length however long the stream.
    """
    lines = []
    given = captions is not None
    captions = captions or [""] * len(scenes)
    ordered = sorted(zip(scenes, captions), key=lambda pair: (pair[0].start, pair[0].end))
    for i, (scene, caption) in enumerate(ordered):
        if given and not caption:
            continue
        lines.append((scene.start, scene.end, ", ".join(
            word for word in (f"view {_letters(i)}", caption, _appearances(scene, fps, min_gap)) if word)))
    return lines


LISTED_RUNS = 3
"""Appearances of a view listed one by one in its scene note; past this, the first and
last (the notes stay short: a prompt of 25 views is read before every first token)."""


def _appearances(scene: SceneRuns, fps: float, min_gap: float) -> str:
    """What a scene note says of how often a view was on screen: ``""`` for once."""
    if scene.appearances is None:
        return "recurs" if scene.end - scene.start > scene.frames / fps + min_gap else ""
    if scene.appearances < 2:
        return ""
    starts = [clock(start, hours=True) for start, _ in scene.runs]
    if scene.appearances <= LISTED_RUNS and len(starts) == scene.appearances:
        return f"{scene.appearances} times: {', '.join(starts)}"
    return f"{scene.appearances} times: {starts[0]} first, {starts[-1]} last"


def _letters(i: int) -> str:
    label = ""
    i += 1
    while i:
        i, rest = divmod(i - 1, 26)
        label = chr(ord("A") + rest) + label
    return label
