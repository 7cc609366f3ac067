"""``extract_features``: each record's video through ingestion, the frame encoder and
the memory once, its memory tokens and timeline stored (``vstream.data.features``), so
that training never decodes a video twice. What ``vstream extract`` runs.

The model is loaded once (its frame encoder and memory settings decide the features);
each video gets a fresh session that reads the whole file. Besides the memory's tokens,
every frame at the abstract grid is kept in order (``AbstractInputs``): what rebuilds the
abstract memory when its attention trains. The memory keeps them as it takes them
(``StarMemory.abstract_inputs``), so the rebuilt memory equals the session's. Records already extracted are skipped, so a run that stopped resumes
where it was; a record that fails (a missing or broken video) is reported and listed in
``failed.jsonl`` in the output folder, and the others go on.

An interleaved document file (OmniCorpus: Parquet, or JSON whose records have ``texts``
and ``images``) is extracted the same way, one file per document: its images through the
frame encoder, pooled to the finest grid the multi-granular head reads (16×16, or the
encoder's grid when coarser), for ``vstream train``'s ``multigranular`` part.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from vstream.data import (
    AbstractInputs,
    DocumentFeatures,
    RecordFeatures,
    extracted,
    read_conversations,
    read_interleaved,
    write_document_features,
    write_features,
)
from vstream.data.interleaved import image_path, is_interleaved
from vstream.errors import VStreamError
from vstream.kernels import pool_grid
from vstream.memory import StarMemory
from vstream.models.heads.multigranular import FINEST_GRID
from vstream.session import Session, SessionConfig, model_and_encoder

log = logging.getLogger(__name__)


@dataclass
class ExtractReport:
    """What a run did: records ``extracted``, ``skipped`` (already there), ``without_video``
    (text or image records: nothing to extract), ``without_images`` (documents with no
    image), ``failed`` ``(id, error)`` pairs, and whether the file held ``documents``."""

    extracted: int = 0
    skipped: int = 0
    without_video: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    without_images: int = 0
    documents: bool = False


def extract_features(data, out, model=None, config: SessionConfig | None = None, media_root=None,
                     progress: bool = True) -> ExtractReport:
    """Extract the features of every video record of the conversation file ``data`` (or
    of every document of an interleaved file) into the folder ``out``.

    Args:
        data: a LLaVA-style conversation file (JSON array or JSON Lines), or interleaved
            image-text documents (OmniCorpus Parquet or JSON Lines).
        out: the features folder (made if missing).
        model: a ``ChatModel`` or a model name (None: the embedded default), whose frame
            encoder and memory settings the features follow.
        config: the sessions' settings (default: no speech recognition, no OCR; the
            features are the visual memory's).
        media_root: the folder the records' video (or the documents' image) paths are
            relative to (default: the data file's).
        progress: a progress bar over the records.
    """
    config = config or SessionConfig(asr=False, ocr=False)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    chat, encoder = model_and_encoder(model, config)
    report = ExtractReport(documents=is_interleaved(data))
    if report.documents:
        root = Path(media_root) if media_root is not None else Path(data).parent
        items = ((document.id, document.images and (lambda d=document: extract_document(d, encoder, root, config)),
                  write_document_features) for document in read_interleaved(data))
    else:
        items = ((record.id, record.media == "video" and (lambda r=record: extract_record(r, chat, encoder, config)),
                  write_features) for record in read_conversations(data, media_root))
    with tqdm(items, unit=" records", desc="extracting", disable=not progress) as bar:
        for item_id, extract, write in bar:
            if not extract:
                report.without_images += report.documents
                report.without_video += not report.documents
            elif extracted(folder, item_id):
                report.skipped += 1
            else:
                try:
                    write(folder, extract())
                    report.extracted += 1
                except VStreamError as exc:  # a broken video or image stops only its record
                    log.warning("record %r: %s", item_id, exc)
                    report.failed.append((item_id, str(exc)))
            bar.set_postfix_str(f"{report.extracted} new, {report.skipped} there, {len(report.failed)} failed")
    failed = folder / "failed.jsonl"
    if report.failed:
        failed.write_text("".join(json.dumps({"id": i, "error": e}) + "\n" for i, e in report.failed),
                          encoding="utf-8")
    elif failed.exists():
        os.remove(failed)
    return report


def abstract_inputs(memory, dim: int) -> AbstractInputs | None:
    """The abstract memory's inputs a ``StarMemory`` kept (``abstract_inputs``), with its
    update's settings; None for a memory that keeps no abstract slots (or another policy)."""
    if getattr(memory, "abstract_inputs", None) is None:
        return None
    c = memory.config
    kept = memory.abstract_inputs
    frames = torch.cat(kept) if kept else torch.zeros(0, c.abstract_grid**2, dim)
    return AbstractInputs(frames, c.abstract_length, c.abstract_chunk, c.abstract_alpha)


def extract_record(record, chat, encoder, config: SessionConfig) -> RecordFeatures:
    """One video record's features: its video read whole by a fresh session on ``chat``
    and ``encoder`` (``model_and_encoder``); ``VStreamError`` when the video is missing
    or cannot be read."""
    video = record.paths[0]
    if not video.is_file():
        raise VStreamError(f"{video}: no such video file (record {record.id!r})")
    with Session(chat, config, encoder) as session:
        memory = session.memory
        if isinstance(memory, StarMemory) and memory.config.abstract_length:
            memory.abstract_inputs = []  # each frame's abstract input, as the memory took it
        session.ingest(str(video), progress=False)
        return RecordFeatures(record.id, memory.tokens(), memory.timeline(), str(video),
                              abstract_inputs(memory, encoder.dim))


def extract_document(document, encoder, root: Path, config: SessionConfig) -> DocumentFeatures:
    """One interleaved document's features: each image entry (a file under ``root``)
    through ``encoder``, ``config.batch_frames`` at a time, pooled to the finest grid the
    multi-granular head reads; ``VStreamError`` naming the image that cannot be read."""
    paths = [image_path(value, root) for value in document.images]
    grid = FINEST_GRID if encoder.grid >= FINEST_GRID else 1 << (encoder.grid.bit_length() - 1)
    pooled = []
    for start in range(0, len(paths), config.batch_frames):
        images = []
        for path in paths[start : start + config.batch_frames]:
            try:
                with Image.open(path) as image:
                    images.append(np.asarray(image.convert("RGB")))
            except (OSError, UnidentifiedImageError) as exc:
                raise VStreamError(f"{path}: cannot read this image of document {document.id!r} ({exc})") from None
        pooled.append(pool_grid(encoder.encode(images), grid).float().cpu())
    return DocumentFeatures(document.id, torch.cat(pooled), tuple(str(p) for p in paths))
