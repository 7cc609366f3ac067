"""``ItemQueue``: the bounded hand-off between a decoder thread and its consumer."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from vstream.types import AudioChunk


class Closed(Exception):
    """The queue was closed: a waiting ``put`` or ``get`` gives up."""


class ItemQueue:
    """A bounded FIFO of frames and audio chunks with two policies when it is full.

    ``drop=True`` (live sources): ``put`` never waits; it evicts the oldest queued frame
    (the oldest audio chunk if no frame is queued) and returns it so the caller can
    count it. ``drop=False`` (files): ``put`` waits for room, so the decoder runs at the
    consumer's pace. ``finish`` appends the end marker, which is never dropped.
    """

    def __init__(self, maxsize: int, drop: bool):
        self.maxsize = maxsize
        self.drop = drop
        self._items: deque[Any] = deque()
        self._markers: list[Any] = []  # end markers queued by finish: never evicted
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: Any, wait: bool | None = None) -> Any | None:
        """Queue ``item``; return the item evicted to make room, if any. ``wait``
        overrides the queue's policy for this item: True waits for room, False evicts."""
        with self._cond:
            evicted = None
            if (not wait) if wait is not None else self.drop:
                if len(self._items) >= self.maxsize:
                    evicted = self._evict()
            else:
                while len(self._items) >= self.maxsize and not self._closed:
                    self._cond.wait()
            if self._closed:
                raise Closed()
            self._items.append(item)
            self._cond.notify_all()
            return evicted

    def offer(self, item: Any) -> bool:
        """Queue ``item`` if there is room and return True; never waits, never evicts."""
        with self._cond:
            if self._closed:
                raise Closed()
            if len(self._items) >= self.maxsize:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def finish(self, marker: Any) -> None:
        """Append the end marker past the size bound, so ending never waits."""
        with self._cond:
            self._items.append(marker)
            self._markers.append(marker)
            self._cond.notify_all()

    def get(self, timeout: float) -> Any:
        """The oldest item; raises ``TimeoutError`` after ``timeout`` seconds of nothing,
        ``Closed`` once the queue is closed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._closed, timeout):
                raise TimeoutError
            if self._closed:
                raise Closed()
            item = self._items.popleft()
            self._markers = [m for m in self._markers if m is not item]
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """Wake and refuse any waiting ``put`` or ``get``; drop what is queued."""
        with self._cond:
            self._closed = True
            self._items.clear()
            self._markers.clear()
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._items)

    def _evict(self) -> Any:
        for i, item in enumerate(self._items):
            # a frame, decoded or still in the decoder's buffer; never an end marker
            if not isinstance(item, AudioChunk) and not any(item is m for m in self._markers):
                del self._items[i]
                return item
        return self._items.popleft()
