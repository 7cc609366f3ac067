"""Encoders stage (``vstream.encoders``): frames to patch features, audio to timed
transcript segments, text to vectors.

- ``create_encoder("pixels" | "vision" | hub id | folder)``, ``list_encoders()``: frame
  encoders (``FrameEncoder``: ``grid``, ``dim``, ``encode(images) -> [B, grid*grid, D]``):
  ``PixelEncoder`` (no weights), ``VisionEncoder`` (CLIP, SigLIP, or a VLM's tower) and
  ``ImageNetEncoder`` (MobileNetV2 with ImageNet labels, offline).
- ``WhisperASR`` / ``ASRWorker``: speech to ``TranscriptSegment``s, beside the frame path.
- ``ScreenReader`` / ``OCRWorker``: the text on screen (PP-OCRv4), read where the picture changed.
- ``TextEmbedder``: sentence embeddings (all-MiniLM-L6-v2 by default).

The classes load on first use, so importing this package does not import torch.
"""

from importlib import import_module

from vstream.encoders.registry import FrameEncoder, create_encoder, list_encoders, register_encoder

_LAZY = {
    "PixelConfig": "pixels", "PixelEncoder": "pixels",
    "VisionConfig": "vision", "VisionEncoder": "vision",
    "ASRConfig": "asr", "ASRWorker": "asr", "WhisperASR": "asr",
    "TextConfig": "text", "TextEmbedder": "text",
    "BigLittleConfig": "biglittle", "BigLittleEncoder": "biglittle",
    "ImageNetConfig": "imagenet", "ImageNetEncoder": "imagenet",
    "OCRConfig": "ocr", "OCRWorker": "ocr", "ScreenReader": "ocr",
}

__all__ = [  # noqa: PLE0604 - the lazy names are strings too
    "FrameEncoder", "create_encoder", "list_encoders", "register_encoder", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"vstream.encoders.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'vstream.encoders' has no attribute {name!r}")
