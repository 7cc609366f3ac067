"""One encoder forward for the frames of many streams.

A server holds one frame encoder for all its streams, and each stream's writer thread
calls ``encode`` with what its own queue holds: at 1 fps that is one frame. One forward
per frame leaves a GPU (and, less so, a CPU) mostly idle. ``BatchingEncoder`` wraps the
shared encoder and runs the frames that several writers hand it at about the same time
as one batch.

Batch policy: a worker thread takes the oldest waiting request, then every other request
waiting, up to ``max_frames`` frames in all; when that is fewer than ``max_frames`` it waits
up to ``wait_ms`` for more, then runs one forward over all of them and hands each caller
its own rows. While a forward runs, new requests queue, so a busy encoder batches by itself;
``wait_ms`` only helps when it is idle. A request larger than ``max_frames`` runs as one
batch of its own (the wrapped encoder cuts it into its own ``batch_size`` pieces). Each
caller's images are checked before they join a batch, so one stream's bad frame is that
stream's error, never its neighbours'.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vstream.config import JsonConfig, check_int, check_number
from vstream.encoders.registry import FrameEncoder, check_images
from vstream.errors import EncoderError

if TYPE_CHECKING:
    import torch


@dataclass
class BatchingConfig(JsonConfig):
    """Settings of a ``BatchingEncoder``.

    Attributes:
        max_frames: most frames in one forward (default 32).
        wait_ms: how long an idle encoder waits for more frames before running what it
            has (default 2.0; 0 runs at once).
    """

    max_frames: int = 32
    wait_ms: float = 2.0

    def __post_init__(self) -> None:
        check_int("BatchingConfig", "max_frames", self.max_frames, 1)
        check_number("BatchingConfig", "wait_ms", self.wait_ms, 0.0, include_low=True)


_STOP = object()  # put by close: the worker stops after the requests before it


class _Request:
    """One caller's images, and the rows (or the error) it gets back."""

    def __init__(self, images: list[np.ndarray]):
        self.images = images
        self.done = threading.Event()
        self.features: torch.Tensor | None = None
        self.error: BaseException | None = None


class BatchingEncoder:
    """A ``FrameEncoder`` that runs the frames of concurrent ``encode`` calls as one batch
    through ``encoder``. Everything else (``grid``, ``dim``, ``device``, ``labels``,
    ``describe``...) is the wrapped encoder's, looked up on it.

    Attributes:
        encoder: the wrapped encoder.
        forwards, frames: forward passes run and frames encoded so far (their ratio is
            the mean batch).

    Args:
        encoder: any ``FrameEncoder``; it must not be used directly while wrapped.
        config: the batch policy.
    """

    def __init__(self, encoder: FrameEncoder, config: BatchingConfig | None = None):
        self.encoder = encoder
        self.config = config or BatchingConfig()
        self.forwards = self.frames = 0
        self._requests: queue.SimpleQueue = queue.SimpleQueue()  # _Request, or _STOP
        self._closed = False
        self._closing = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="vstream-encoder-batcher", daemon=True)
        self._worker.start()

    def __repr__(self) -> str:
        return f"BatchingEncoder({self.encoder!r}, max_frames={self.config.max_frames}, wait_ms={self.config.wait_ms})"

    def __getattr__(self, name: str):  # only for what this class does not set itself
        if name == "encoder":  # not set (a half-built object): no recursion
            raise AttributeError(name)
        return getattr(self.encoder, name)

    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``images``: ``B`` frames ``[H, W, 3]`` uint8 RGB -> ``[B, grid * grid, dim]``, as the
        wrapped encoder gives them, run together with other callers' frames.

        Raises:
            EncoderError: a bad image (named by its index in ``images``), a closed
                encoder, or the wrapped encoder's own error for the batch.
        """
        request = _Request(check_images(images))
        if not request.images:
            return self.encoder.encode([])
        with self._closing:  # nothing joins the queue behind the stop mark
            if self._closed:
                raise EncoderError("the batching encoder is closed")
            self._requests.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.features

    def close(self) -> None:
        """Finish the requests already handed in, then stop the worker."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._requests.put(_STOP)
        self._worker.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        carried = None  # a request that would have overflowed the last batch: it starts the next
        while True:
            first = carried or self._requests.get()
            if first is _STOP:
                break
            batch, size, carried = [first], len(first.images), None
            deadline = time.monotonic() + self.config.wait_ms / 1000
            while size < self.config.max_frames:
                try:
                    waiting = self._requests.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if waiting is _STOP or size + len(waiting.images) > self.config.max_frames:
                    carried = waiting
                    break
                batch.append(waiting)
                size += len(waiting.images)
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Request]) -> None:
        wanted = sum(len(request.images) for request in batch)
        try:
            features = self.encoder.encode([image for request in batch for image in request.images])
            if len(features) != wanted:
                raise EncoderError(f"{self.encoder!r} gave {len(features)} rows for {wanted} frames")
        except Exception as exc:  # noqa: BLE001 - every caller in the batch gets it; the worker goes on
            for request in batch:
                request.error = exc
                request.done.set()
            return
        self.forwards += 1
        self.frames += wanted
        start = 0
        for request in batch:
            request.features = features[start : start + len(request.images)]
            start += len(request.images)
            request.done.set()
