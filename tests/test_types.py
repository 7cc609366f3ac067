"""Frame, AudioChunk and SourceConfig check themselves."""

import numpy as np
import pytest

from vstream import AudioChunk, ConfigError, Frame, SourceConfig
from vstream.types import evidence_line, evidence_lines


def test_frame_accepts_rgb_uint8_and_refuses_the_rest():
    frame = Frame(np.zeros((4, 6, 3), np.uint8), t=1.5, index=3)
    assert (frame.width, frame.height) == (6, 4)
    with pytest.raises(ValueError, match="uint8"):
        Frame(np.zeros((4, 6, 3), np.float32), t=0.0, index=0)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        Frame(np.zeros((4, 6), np.uint8), t=0.0, index=0)
    with pytest.raises(ValueError, match="finite"):
        Frame(np.zeros((4, 6, 3), np.uint8), t=float("nan"), index=0)


def test_audio_chunk_checks_its_span():
    chunk = AudioChunk(np.zeros(16000, np.float32), start=2.0, end=3.0)
    assert chunk.duration == 1.0
    with pytest.raises(ValueError, match="holds 16000 samples"):
        AudioChunk(np.zeros(16000, np.float32), start=2.0, end=4.0)
    with pytest.raises(ValueError, match="float32"):
        AudioChunk(np.zeros(10, np.float64), start=0.0, end=10 / 16000)


def test_source_config_round_trips_and_refuses_bad_values():
    config = SourceConfig(fps=2.0, size=(320, 240), chunk_seconds=0.5)
    assert SourceConfig.from_json(config.to_json()) == config
    assert config.output_size(1920, 1080) == (320, 240)
    assert SourceConfig(size=224).output_size(1920, 1080) == (398, 224)
    for bad in [dict(fps=0), dict(fps=-1.0), dict(size=1), dict(size=(10, 0)), dict(chunk_seconds=0),
                dict(queue_size=0), dict(video=False, audio=False), dict(reconnect_tries=-1)]:
        with pytest.raises(ConfigError):
            SourceConfig(**bad)


def test_evidence_lines_share_one_clock_per_answer():
    """``m:ss`` while every time is under an hour; ``h:mm:ss`` for every time of the answer
    once any reaches one (rounded to the second, as it prints); the JSON form in, so the
    local and the server paths format the same thing."""
    short = [{"start": 1.2, "end": 3.4, "kind": "transcript", "score": 0.666},
             {"start": 62.0, "end": 65.0, "kind": "frame", "score": 0.25, "source": "video 1"}]
    assert evidence_lines(short) == ["0:01-0:03  transcript 0.67", "1:02-1:05  frame      0.25  video 1"]
    long = [*short, {"start": 3599.4, "end": 3599.6, "kind": "screen", "score": 0.1}]
    assert evidence_lines(long) == ["0:00:01-0:00:03  transcript 0.67", "0:01:02-0:01:05  frame      0.25  video 1",
                                    "0:59:59-1:00:00  screen     0.10"]
    assert evidence_line(3590.0, 3605.0, "frame", 0.5) == "0:59:50-1:00:05  frame      0.50"  # one line, one clock
    assert evidence_line(1.0, 2.0, "frame", 0.5) == "0:01-0:02  frame      0.50"
    assert evidence_lines([]) == []
