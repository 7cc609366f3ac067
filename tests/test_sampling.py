"""Frame sampling by presentation time, and audio chunking, on known timestamps."""

import numpy as np
import pytest

from vstream.ingest.sampling import AudioChunker, FrameSampler
from vstream.types import AUDIO_SAMPLE_RATE

from helpers import first_at_or_after


@pytest.mark.parametrize("fps", [0.5, 1.0, 2.0, 7.0])
def test_constant_rate_picks_every_nth_frame(fps):
    times = np.arange(300) / 30.0
    picked = FrameSampler(fps).select(times)
    assert picked.tolist() == first_at_or_after(times, fps)
    if 30 % fps == 0:
        assert picked.tolist() == list(range(0, 300, int(30 / fps)))


def test_variable_rate_matches_brute_force_and_never_repeats():
    rng = np.random.default_rng(3)
    times = np.cumsum(rng.choice([1 / 60, 1 / 30, 0.25, 1.3], size=400))
    for fps in (0.5, 1.0, 2.0, 10.0):
        picked = FrameSampler(fps).select(times)
        assert picked.tolist() == first_at_or_after(times, fps)
        assert len(set(picked.tolist())) == len(picked)


def test_millisecond_rounded_times_still_hit_every_instant():
    times = np.round(np.arange(90) / 30.0, 3)  # Matroska/WebM timestamps: 0.033, 0.067, ...
    assert len(FrameSampler(30.0).select(times)) == 90
    assert FrameSampler(1.0).select(times).tolist() == [0, 30, 60]


def test_no_fps_keeps_everything():
    sampler = FrameSampler(None)
    assert all(sampler.keep(t) for t in [0.0, 0.0, 0.01, 5.0])


def test_streaming_keep_agrees_with_select():
    times = np.sort(np.random.default_rng(0).uniform(0, 60, 2000))
    sampler = FrameSampler(2.0)
    assert [i for i, t in enumerate(times) if sampler.keep(t)] == FrameSampler(2.0).select(times).tolist()


def test_chunker_cuts_fixed_chunks_without_drift():
    chunker = AudioChunker(chunk_seconds=0.5)
    chunks, t = [], 10.0
    for n in [100, 3000, 7, 16000, 5000, 1]:  # ragged input sizes, contiguous in time
        chunks += chunker.push(np.zeros(n, np.float32), t)
        t += n / AUDIO_SAMPLE_RATE
    chunks += chunker.flush()
    assert sum(len(c.samples) for c in chunks) == 24108
    assert all(len(c.samples) == 8000 for c in chunks[:-1])
    for a, b in zip(chunks, chunks[1:]):
        assert b.start == pytest.approx(a.end, abs=1e-9)
    assert chunks[0].start == 10.0


def test_chunker_restarts_at_a_timestamp_jump():
    chunker = AudioChunker(chunk_seconds=1.0)
    assert chunker.push(np.zeros(4000, np.float32), 0.0) == []
    closed = chunker.push(np.zeros(4000, np.float32), 30.0)  # 30 s later: a gap
    assert len(closed) == 1 and closed[0].start == 0.0 and closed[0].end == 0.25
    (rest,) = chunker.flush()
    assert rest.start == 30.0
