"""``QueueWorker``: a thread of its own that takes items from a bounded queue, what the
speech recogniser (``ASRWorker``) and the screen reader (``OCRWorker``) both run on.

``put`` never waits longer than a queue put: with ``drop=True`` (a live stream) a full
queue drops its oldest item and returns it, for the caller to count; with ``drop=False``
(a file, where every item counts) it waits for room. An error on the thread is raised by
the next ``put`` or ``close`` (and by the subclass's own reads, through ``_raise``).
``close()`` lets the thread finish the backlog, then calls ``_finish``;
``close(flush=False)`` drops the backlog instead.
"""

from __future__ import annotations

import threading
from itertools import count

from vstream.errors import EncoderError
from vstream.ingest.queue import Closed, ItemQueue

_END = object()
_ids = count(1)


class QueueWorker:
    """Subclasses set up their own state, then call ``super().__init__`` (it starts the
    thread), and implement ``_handle(item)`` (and ``_finish()`` for what is held at the end).

    Args:
        size: items the queue holds.
        drop: drop the oldest item when full (True) or make ``put`` wait (False).
        name: the thread's name before its number (``"vstream-asr"``).
    """

    def __init__(self, size: int, drop: bool, name: str):
        self._queue = ItemQueue(size, drop=drop)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-{next(_ids)}", daemon=True)
        self._thread.start()

    def _handle(self, item) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Called on the thread once the backlog of a flushing ``close`` is done."""

    def _put(self, item):
        """Queue ``item``; returns the item dropped to make room, or None."""
        self._raise()
        if self._closed:
            raise EncoderError(f"{type(self).__name__}.submit after close()")
        try:
            return self._queue.put(item)
        except Closed:
            self._raise()
            raise EncoderError(f"{type(self).__name__} stopped") from None

    def close(self, flush: bool = True, timeout: float | None = None) -> None:
        """Stop the thread: finish the backlog (``flush``), or drop it."""
        if not self._closed:
            self._closed = True
            if flush:
                self._queue.finish(_END)
            else:
                self._queue.close()
        self._thread.join(timeout)
        self._raise()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close(flush=exc_info[0] is None)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=0.5)
                except TimeoutError:
                    continue
                except Closed:
                    return
                if item is _END:
                    self._finish()
                    return
                self._handle(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's next call
            self._error = exc
            self._queue.close()
