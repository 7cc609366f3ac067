"""The batching encoder: many streams' frames through one forward, each caller getting its
own rows, one caller's bad frame or a failed forward never lost in silence."""

import threading
import time

import numpy as np
import pytest
import torch

from vstream.encoders import create_encoder
from vstream.encoders.batching import BatchingConfig, BatchingEncoder
from vstream.errors import ConfigError, EncoderError


class Recording:
    """A pixel encoder that records the size of every forward, and can be held or made to fail."""

    def __init__(self):
        self.inner = create_encoder("pixels")
        self.grid, self.dim, self.device = self.inner.grid, self.inner.dim, self.inner.device
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def encode(self, images):
        self.gate.wait(10)
        self.sizes.append(len(images))
        if self.fail:
            raise RuntimeError("the tower ran out of memory")
        return self.inner.encode(images)

    def describe(self, means):
        return ["described"] * len(means)


def frame(colour: int) -> np.ndarray:
    image = np.zeros((32, 48, 3), np.uint8)
    image[..., colour % 3] = 40 + 10 * colour
    return image


def in_threads(work, count: int) -> list:
    results, threads = [None] * count, []

    def run(i):
        try:
            results[i] = work(i)
        except Exception as exc:  # noqa: BLE001 - the test looks at what each caller got
            results[i] = exc

    for i in range(count):
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
    for thread in threads:
        thread.join(10)
    return results


def test_concurrent_callers_share_forwards_and_each_gets_its_own_rows():
    inner = Recording()
    with BatchingEncoder(inner, BatchingConfig(max_frames=32, wait_ms=200)) as encoder:
        results = in_threads(lambda i: encoder.encode([frame(i), frame(i + 10)]), 8)
        assert len(inner.sizes) < 8 and sum(inner.sizes) == 16
        assert encoder.forwards == len(inner.sizes) and encoder.frames == 16
    reference = create_encoder("pixels")
    for i, features in enumerate(results):
        assert torch.equal(features, reference.encode([frame(i), frame(i + 10)])), f"caller {i} got other rows"


def test_no_forward_is_larger_than_max_frames_unless_one_request_is():
    inner = Recording()
    with BatchingEncoder(inner, BatchingConfig(max_frames=4, wait_ms=100)) as encoder:
        results = in_threads(lambda i: encoder.encode([frame(i)] * 3), 6)
        assert all(isinstance(r, torch.Tensor) and r.shape[0] == 3 for r in results)
        assert max(inner.sizes) <= 4 and sum(inner.sizes) == 18
        big = encoder.encode([frame(1)] * 9)
        assert big.shape[0] == 9 and inner.sizes[-1] == 9


def test_a_bad_frame_fails_only_its_caller():
    inner = Recording()
    with BatchingEncoder(inner, BatchingConfig(wait_ms=100)) as encoder:
        def work(i):
            return encoder.encode([frame(i), np.zeros((4, 4), np.uint8)] if i == 2 else [frame(i)])

        results = in_threads(work, 4)
    assert isinstance(results[2], EncoderError) and "image 1" in str(results[2])
    assert all(isinstance(results[i], torch.Tensor) and results[i].shape[0] == 1 for i in (0, 1, 3))


def test_a_failed_forward_reaches_every_caller_in_it_and_the_encoder_goes_on():
    inner = Recording()
    with BatchingEncoder(inner, BatchingConfig(wait_ms=100)) as encoder:
        inner.fail = True
        results = in_threads(lambda i: encoder.encode([frame(i)]), 3)
        assert all(isinstance(r, RuntimeError) and "out of memory" in str(r) for r in results)
        inner.fail = False
        assert encoder.encode([frame(0)]).shape == (1, inner.grid * inner.grid, inner.dim)


def test_close_answers_what_was_handed_in_then_refuses():
    inner = Recording()
    encoder = BatchingEncoder(inner, BatchingConfig(wait_ms=0))
    inner.gate.clear()  # the forward is held until the closer is waiting on it
    results = []
    pending = threading.Thread(target=lambda: results.append(encoder.encode([frame(1)])))
    pending.start()
    time.sleep(0.2)
    closer = threading.Thread(target=encoder.close)
    closer.start()
    time.sleep(0.1)
    assert closer.is_alive(), "close returned before the frame handed in was encoded"
    inner.gate.set()
    pending.join(10)
    closer.join(10)
    assert len(results) == 1 and results[0].shape[0] == 1
    assert not encoder._worker.is_alive()
    with pytest.raises(EncoderError, match="closed"):
        encoder.encode([frame(2)])
    encoder.close()  # again: nothing happens


def test_the_wrapped_encoders_other_methods_and_shape_show_through():
    inner = Recording()
    with BatchingEncoder(inner) as encoder:
        assert (encoder.grid, encoder.dim, encoder.device) == (inner.grid, inner.dim, inner.device)
        assert encoder.describe(torch.zeros(2, inner.dim)) == ["described", "described"]
        assert encoder.encode([]).shape == (0, inner.grid * inner.grid, inner.dim)


@pytest.mark.parametrize("fields, message", [({"max_frames": 0}, "max_frames"), ({"wait_ms": -1}, "wait_ms")])
def test_bad_settings_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        BatchingConfig(**fields)
