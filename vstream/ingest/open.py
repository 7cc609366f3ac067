"""``open_source``: the one entry point for every kind of source."""

from __future__ import annotations

import os
from dataclasses import replace

from vstream.ingest.config import SourceConfig
from vstream.ingest.container import SourceKind, source_kind
from vstream.ingest.file import FileSource
from vstream.ingest.live import LiveSource
from vstream.ingest.source import Source


def open_source(uri: str | os.PathLike, config: SourceConfig | None = None, **settings) -> Source:
    """Open any source for reading frames and audio.

    Args:
        uri: a file path (mp4, mkv, webm, mov, avi, ts, ...), a URL (rtsp, rtmp,
            http(s) incl. HLS, udp, srt), a camera (``/dev/video0``, ``camera:0``),
            or ``-`` for stdin.
        config: a ``SourceConfig``; ``settings`` override its fields, e.g.
            ``open_source(path, fps=2.0, audio=False, realtime=True)``.

    Returns:
        A ``FileSource`` for files, a ``LiveSource`` otherwise; both iterate
        ``Frame`` and ``AudioChunk`` items in time order and expose ``stats``.

    Raises:
        SourceError: the file is missing, the URL unreachable, the camera absent.
        DecodeError: the file is not media, is truncated before its index, or has no
            video and no audio stream.
    """
    config = replace(config, **settings) if config is not None else SourceConfig(**settings)
    uri = os.fspath(uri)
    if source_kind(uri) is SourceKind.FILE:
        return FileSource(uri, config)
    return LiveSource(uri, config)
