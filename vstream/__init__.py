"""vstream: ask questions about long video streams, live or recorded, with their audio."""

from vstream.errors import (
    ConfigError,
    DecodeError,
    EncoderError,
    KernelError,
    MemoryStateError,
    ModelLoadError,
    ProtocolError,
    ServerBusy,
    ServerError,
    ServerTimeout,
    SourceError,
    VStreamError,
)
from vstream.ingest import FileSource, LiveSource, MediaInfo, Source, SourceConfig, SourceStats, open_source, probe
from vstream.types import AUDIO_SAMPLE_RATE, AudioChunk, Frame, TranscriptSegment, Word

__version__ = "0.1.0"


def __getattr__(name: str):
    # the answer stage pulls in torch and transformers: load it on first use only
    if name in ("Session", "SessionConfig", "SessionStats"):
        from vstream import session

        return getattr(session, name)
    if name == "Dialogue":
        from vstream import dialogue

        return dialogue.Dialogue
    raise AttributeError(f"module 'vstream' has no attribute {name!r}")

__all__ = [
    "AUDIO_SAMPLE_RATE",
    "AudioChunk",
    "ConfigError",
    "DecodeError",
    "Dialogue",
    "EncoderError",
    "FileSource",
    "Frame",
    "KernelError",
    "LiveSource",
    "MediaInfo",
    "MemoryStateError",
    "ModelLoadError",
    "ProtocolError",
    "ServerBusy",
    "ServerError",
    "ServerTimeout",
    "Session",
    "SessionConfig",
    "SessionStats",
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
