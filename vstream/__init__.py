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
from vstream.types import AUDIO_SAMPLE_RATE, AudioChunk, Frame, TranscriptSegment, Word

__version__ = "0.1.0"

# Loaded on first use: ingest pulls in PyAV and decord, the answer stage torch and
# transformers, and `import vstream.memory` (or any stage) runs this file first.
_LAZY = {
    **dict.fromkeys(("FileSource", "LiveSource", "MediaInfo", "Source", "SourceConfig", "SourceStats", "open_source",
                     "probe"), "vstream.ingest"),
    **dict.fromkeys(("Session", "SessionConfig", "SessionStats"), "vstream.session"),
    "Dialogue": "vstream.dialogue",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vstream' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
