"""``extract_features``: each record's video through ingestion, the frame encoder and
the memory once, its memory tokens and timeline stored (``vstream.data.features``), so
that training never decodes a video twice. What ``vstream extract`` runs.

The model is loaded once (its frame encoder and memory settings decide the features);
each video gets a fresh session that reads the whole file. Records already extracted
are skipped, so a run that stopped resumes where it was; a record that fails (a missing
or broken video) is reported and listed in ``failed.jsonl`` in the output folder, and
the others go on.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from vstream.data import RecordFeatures, extracted, read_conversations, write_features
from vstream.errors import VStreamError
from vstream.session import Session, SessionConfig, model_and_encoder

log = logging.getLogger(__name__)


@dataclass
class ExtractReport:
    """What a run did: records ``extracted``, ``skipped`` (already there), ``without_video``
    (text or image records: nothing to extract), and ``failed`` ``(id, error)`` pairs."""

    extracted: int = 0
    skipped: int = 0
    without_video: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def extract_features(data, out, model=None, config: SessionConfig | None = None, media_root=None,
                     progress: bool = True) -> ExtractReport:
    """Extract the features of every video record of the conversation file ``data`` into
    the folder ``out``.

    Args:
        data: a LLaVA-style conversation file (JSON array or JSON Lines).
        out: the features folder (made if missing).
        model: a ``ChatModel`` or a model name (None: the embedded default), whose frame
            encoder and memory settings the features follow.
        config: the sessions' settings (default: no speech recognition, no OCR; the
            features are the visual memory's).
        media_root: the folder the records' video paths are relative to (default: the
            data file's).
        progress: a progress bar over the records.
    """
    config = config or SessionConfig(asr=False, ocr=False)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    chat, encoder = model_and_encoder(model, config)
    report = ExtractReport()
    with tqdm(read_conversations(data, media_root), unit=" records", desc="extracting", disable=not progress) as bar:
        for record in bar:
            if record.media != "video":
                report.without_video += 1
            elif extracted(folder, record.id):
                report.skipped += 1
            else:
                try:
                    write_features(folder, extract_record(record, chat, encoder, config))
                    report.extracted += 1
                except VStreamError as exc:  # a broken video stops only its record
                    log.warning("record %r: %s", record.id, exc)
                    report.failed.append((record.id, str(exc)))
            bar.set_postfix_str(f"{report.extracted} new, {report.skipped} there, {len(report.failed)} failed")
    failed = folder / "failed.jsonl"
    if report.failed:
        failed.write_text("".join(json.dumps({"id": i, "error": e}) + "\n" for i, e in report.failed),
                          encoding="utf-8")
    elif failed.exists():
        os.remove(failed)
    return report


def extract_record(record, chat, encoder, config: SessionConfig) -> RecordFeatures:
    """One video record's features: its video read whole by a fresh session on ``chat``
    and ``encoder`` (``model_and_encoder``); ``VStreamError`` when the video is missing
    or cannot be read."""
    video = record.paths[0]
    if not video.is_file():
        raise VStreamError(f"{video}: no such video file (record {record.id!r})")
    with Session(chat, config, encoder) as session:
        session.ingest(str(video), progress=False)
        memory = session.memory
        return RecordFeatures(record.id, memory.tokens(), memory.timeline(), str(video))
