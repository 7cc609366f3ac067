"""The prompt: time markers, grouping of memory tokens, evidence ranking, scene notes."""

from __future__ import annotations

import pytest
import torch

from vstream.errors import ConfigError
from vstream.memory import MemoryTokens, SceneRuns
from vstream.models import GenerationConfig, describe_order, describe_scenes
from vstream.models.prompt import Context, Piece, clock, memory_pieces, rank_evidence, user_pieces
from vstream.types import TranscriptSegment


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (5.4, "0:05"), (59.6, "1:00"), (61, "1:01"),
                                           (3599, "59:59"), (3600, "1:00:00"), (36_061, "10:01:01"), (-3, "0:00")])
def test_clock(seconds, text):
    assert clock(seconds) == text
    assert clock(seconds, hours=True) == (text if text.count(":") == 2 else f"0:{int(text.split(':')[0]):02d}:{text[-2:]}")


def test_memory_tokens_are_grouped_by_kind_and_span_behind_a_time_marker():
    memory = MemoryTokens(torch.arange(7.0).reshape(7, 1),
                          ["abstract", "abstract", "temporal", "temporal", "temporal", "spatial", "spatial"],
                          [(0, 90), (0, 90), (3, 9), (3, 9), (12, 20), (95, 95), (95, 95)])
    pieces = memory_pieces(memory)
    assert [p.text for p in pieces[::2]] == [" <abstract 0:00:00-0:01:30>", " <temporal 0:00:03-0:00:09>",
                                             " <temporal 0:00:12-0:00:20>", " <spatial 0:01:35-0:01:35>"]
    assert [p.features.flatten().tolist() for p in pieces[1::2]] == [[0, 1], [2, 3], [4], [5, 6]]
    assert [p.evidence for p in pieces[1::2]] == [(0, 90, "frame"), (3, 9, "frame"), (12, 20, "frame"),
                                                  (95, 95, "frame")]


def test_an_untimed_memory_is_one_block_of_tokens_in_the_memorys_order():
    """Flash-VStream-7b's layout: no text inside the memory, the tokens contiguous, each run
    still its own piece so the answer's evidence keeps its times."""
    memory = MemoryTokens(torch.arange(7.0).reshape(7, 1),
                          ["abstract", "abstract", "temporal", "temporal", "temporal", "spatial", "spatial"],
                          [(0, 90), (0, 90), (3, 9), (3, 9), (12, 20), (95, 95), (95, 95)])
    pieces = memory_pieces(memory, timed=False)
    assert all(not p.text and p.features is not None for p in pieces)
    assert torch.cat([p.features for p in pieces]).flatten().tolist() == list(range(7))
    assert [p.evidence for p in pieces] == [(0, 90, "frame"), (3, 9, "frame"), (12, 20, "frame"), (95, 95, "frame")]
    turn = user_pieces(Context(memory=memory, duration=95.0), "What?", visual=True, timed=False)
    block = [i for i, p in enumerate(turn) if p.features is not None]
    assert block == list(range(block[0], block[-1] + 1))  # nothing between the memory's tokens
    after = "".join(p.text for p in turn[block[-1] + 1:])  # the times, in words, after the block
    assert after == ("\nMemory times: abstract 0:00:00-0:01:30; temporal 0:00:03-0:00:09, 0:00:12-0:00:20; "
                     "spatial 0:01:35\nQuestion: What?")
    timed = user_pieces(Context(memory=memory, duration=95.0), "What?", visual=True)
    assert "Memory times" not in "".join(p.text for p in timed)  # the markers say it there


def test_user_turn_layout():
    transcript = [(TranscriptSegment(9.0, 11.0, "later line"), 0.2), (TranscriptSegment(1.0, 3.5, "first line"), 0.9)]
    context = Context(scenes=[(0.0, 30.0, "view A")], transcript=transcript, duration=30.0)
    text = "".join(p.text for p in user_pieces(context, "What?", visual=False))
    assert text == ('What the video shows:\n[0:00:00-0:00:30] view A\nTranscript:\n'
                    '[0:00:01-0:00:04] "first line"\n[0:00:09-0:00:11] "later line"\nQuestion: What?')
    empty = "".join(p.text for p in user_pieces(Context(), "What?", visual=True))
    assert empty == "Nothing has been seen or heard yet.\nQuestion: What?"


def test_evidence_is_ranked_by_attention_or_else_by_retrieval_score():
    pieces = [Piece(text="a", evidence=(1.0, 2.0, "transcript"), prior=0.2),
              Piece(text="b"),
              Piece(text="c", evidence=(5.0, 6.0, "frame"), prior=0.0),
              Piece(text="d", evidence=(1.0, 2.0, "transcript"), prior=0.5)]
    by_attention = rank_evidence(pieces, [0.1, 0.6, 0.3])
    assert [(e.start, e.kind) for e in by_attention] == [(5.0, "frame"), (1.0, "transcript")]
    assert by_attention[1].score == pytest.approx(0.4)
    by_prior = rank_evidence(pieces, None)
    assert [(e.start, e.score) for e in by_prior] == [(1.0, pytest.approx(0.7)), (5.0, 0.0)]


def spans(*rows) -> list[SceneRuns]:
    """Scenes without runs (a policy that keeps none): ``(start, end, frames)`` rows."""
    return [SceneRuns(((start, end),), None, frames) for start, end, frames in rows]


def test_scene_notes_say_when_a_view_comes_back():
    lines = describe_scenes(spans((40.0, 60.0, 21.0), (0.0, 100.0, 30.0), (61.0, 80.0, 20.0)), fps=1.0)
    assert lines == [(0.0, 100.0, "view A, recurs"), (40.0, 60.0, "view B"), (61.0, 80.0, "view C")]
    captioned = describe_scenes(spans((40.0, 60.0, 21.0), (0.0, 100.0, 30.0)), fps=1.0, captions=["red", "grey"])
    assert captioned == [(0.0, 100.0, "view A, grey, recurs"), (40.0, 60.0, "view B, red")]  # captions follow
    # a view the encoder recognised nothing in is left out; the others keep their letters
    some = describe_scenes(spans((40.0, 60.0, 21.0), (0.0, 100.0, 30.0)), fps=1.0, captions=["espresso", ""])
    assert some == [(40.0, 60.0, "view B, espresso")]


def test_scene_notes_count_the_appearances_on_the_timeline():
    red = SceneRuns(((22.0, 26.0), (35.0, 39.0), (3600.0, 3604.0)), 3, 15.0)
    grey = SceneRuns(((0.0, 21.0),), 1, 22.0)
    often = SceneRuns(((100.0, 101.0), (200.0, 201.0), (300.0, 301.0), (400.0, 401.0), (500.0, 501.0)), 9, 10.0)
    lines = describe_scenes([red, grey, often], fps=1.0, captions=["red", "grey", "blue"])
    assert lines == [(0.0, 21.0, "view A, grey, 1 time"),
                     (22.0, 3604.0, "view B, red, 3 times"),
                     (100.0, 501.0, "view C, blue, 9 times")]


def test_the_order_line_names_each_caption_at_its_first_appearance():
    red = SceneRuns(((22.0, 26.0), (35.0, 39.0)), 2, 10.0)
    green = SceneRuns(((5.0, 9.0),), 1, 5.0)
    dark_red = SceneRuns(((50.0, 52.0),), 1, 3.0)
    assert describe_order([red, green, dark_red], ["red", "green", "red"]) == (
        5.0, 22.0, "In order: green first (0:00:05), then red (0:00:22).")
    assert describe_order([red, dark_red], ["red", "red"]) is None  # one caption: nothing to order


@pytest.mark.parametrize("fields, message", [({"max_new_tokens": 0}, "max_new_tokens"),
                                             ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p")])
def test_generation_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        GenerationConfig(**fields)
