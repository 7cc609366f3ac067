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

    Each scene is a view, lettered in order of first appearance, that says how many
    times it was on screen (``1 time``, ``3 times``: one form, so a small model reads
    every count alike); its span runs from its first appearance to the end of its last.
    Where the memory keeps no runs, a view whose span is longer (by ``min_gap`` seconds)
    than its frames fill at ``fps`` says it "recurs". Views carry their ``captions`` (one per scene, in the
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


def _appearances(scene: SceneRuns, fps: float, min_gap: float) -> str:
    """What a scene note says of how often a view was on screen: ``"1 time"``, ``"3 times"``.
    Only the count: the times of each appearance would make a recurring view's line twice
    as long as the others, and the notes are read before every first token."""
    if scene.appearances is None:
        return "recurs" if scene.end - scene.start > scene.frames / fps + min_gap else ""
    return f"{scene.appearances} times" if scene.appearances > 1 else "1 time"


def describe_order(scenes: list[SceneRuns], captions: list[str]) -> tuple[float, float, str] | None:
    """A line saying in which order the views of different ``captions`` first came on
    screen (``In order: yellow first (0:00:06), then green (0:00:21).``), as ``(start,
    end, line)``; None for fewer than two captions. For the views a question names: a
    small model answers "which came first" from the order of the question's words, not
    from the times in the notes."""
    first: dict[str, float] = {}
    for scene, caption in sorted(zip(scenes, captions), key=lambda pair: pair[0].start):
        first.setdefault(caption, scene.start)
    if len(first) < 2:
        return None
    named = [f"{caption} {'first ' if i == 0 else ''}({clock(t, hours=True)})" for i, (caption, t) in
             enumerate(first.items())]
    return min(first.values()), max(first.values()), "In order: " + ", then ".join(named) + "."


def _letters(i: int) -> str:
    label = ""
    i += 1
    while i:
        i, rest = divmod(i - 1, 26)
        label = chr(ord("A") + rest) + label
    return label
