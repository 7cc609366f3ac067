"""Ingest: any source to time-stamped ``Frame``s and 16 kHz mono ``AudioChunk``s."""

from vstream.ingest.config import SourceConfig
from vstream.ingest.container import AudioInfo, MediaInfo, VideoInfo, probe
from vstream.ingest.file import FileSource
from vstream.ingest.live import LiveSource
from vstream.ingest.open import open_source
from vstream.ingest.source import Source, SourceStats

__all__ = [
    "AudioInfo",
    "FileSource",
    "LiveSource",
    "MediaInfo",
    "Source",
    "SourceConfig",
    "SourceStats",
    "VideoInfo",
    "open_source",
    "probe",
]
