"""vstream: ask questions about long video streams, live or recorded, with their audio."""

from vstream.errors import (
    ConfigError,
    DecodeError,
    EncoderError,
    KernelError,
    MemoryStateError,
    ModelLoadError,
    SourceError,
    VStreamError,
)
from vstream.ingest import FileSource, LiveSource, MediaInfo, Source, SourceConfig, SourceStats, open_source, probe
from vstream.types import AUDIO_SAMPLE_RATE, AudioChunk, Frame, TranscriptSegment, Word

__version__ = "0.1.0"

__all__ = [
    "AUDIO_SAMPLE_RATE",
    "AudioChunk",
    "ConfigError",
    "DecodeError",
    "EncoderError",
    "FileSource",
    "KernelError",
    "Frame",
    "LiveSource",
    "MediaInfo",
    "MemoryStateError",
    "ModelLoadError",
    "Source",
    "SourceConfig",
    "SourceError",
    "SourceStats",
    "TranscriptSegment",
    "VStreamError",
    "Word",
    "open_source",
    "probe",
]
