"""Extracted features: one safetensors file per record, what training reads instead of
decoding its video again.

A file holds the record's memory tokens (``tokens`` ``[N, D]``, float32) and, as
safetensors metadata (JSON strings), each token's ``kinds`` and ``spans``, the memory's
``timeline`` (each scene's runs, appearances and frame count), the ``id`` and the
``source`` file. Files are written to a temporary name and renamed, so a file that is
there is whole: an interrupted extraction resumes by skipping the records it finds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vstream.errors import DataError
from vstream.memory import MemoryTokens, SceneRuns


@dataclass(frozen=True)
class RecordFeatures:
    """A record's extracted features: its ``memory`` tokens, the memory's ``timeline``,
    and the ``source`` file they came from."""

    id: str
    memory: MemoryTokens
    timeline: list[SceneRuns]
    source: str


def feature_path(folder, record_id: str) -> Path:
    """Where the features of ``record_id`` live in ``folder``: the id made safe for a file
    name, with a short digest so that two ids that read alike stay apart."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", record_id)[:80]
    digest = hashlib.sha1(record_id.encode("utf-8")).hexdigest()[:8]
    return Path(folder) / f"{safe}-{digest}.safetensors"


def write_features(folder, features: RecordFeatures) -> Path:
    """Write ``features`` into ``folder`` (made if missing) atomically; returns the file."""
    path = feature_path(folder, features.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    timeline = [{"runs": scene.runs, "appearances": scene.appearances, "frames": scene.frames}
                for scene in features.timeline]
    metadata = {"id": features.id, "source": features.source, "kinds": json.dumps(features.memory.kinds),
                "spans": json.dumps(features.memory.spans), "timeline": json.dumps(timeline)}
    partial = path.with_name(path.name + ".partial")
    save_file({"tokens": features.memory.tokens.detach().float().cpu().contiguous()}, str(partial), metadata)
    os.replace(partial, path)
    return path


def read_features(folder, record_id: str) -> RecordFeatures:
    """The features of ``record_id`` from ``folder``; ``DataError`` naming the file when
    they are missing or damaged."""
    path = feature_path(folder, record_id)
    try:
        with safe_open(str(path), framework="pt") as file:
            tokens, metadata = file.get_tensor("tokens"), file.metadata() or {}
        timeline = [SceneRuns(tuple(tuple(run) for run in scene["runs"]), scene["appearances"], scene["frames"])
                    for scene in json.loads(metadata["timeline"])]
        memory = MemoryTokens(tokens, json.loads(metadata["kinds"]),
                              [tuple(span) for span in json.loads(metadata["spans"])])
        if metadata["id"] != record_id:
            raise DataError(f"{path}: holds the features of {metadata['id']!r}, not {record_id!r}")
        return RecordFeatures(record_id, memory, timeline, metadata["source"])
    except FileNotFoundError:
        raise DataError(f"{path}: no features for record {record_id!r} (not extracted yet?)") from None
    except (OSError, SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: damaged features file ({type(exc).__name__}: {exc})") from None


def extracted(folder, record_id: str) -> bool:
    """Whether ``folder`` holds the features of ``record_id`` (a whole file)."""
    return feature_path(folder, record_id).is_file()

