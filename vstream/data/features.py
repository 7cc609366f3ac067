"""Extracted features: one safetensors file per record, what training reads instead of
decoding its video again.

A file holds the record's memory tokens (``tokens`` ``[N, D]``, float32) and, as
safetensors metadata (JSON strings), each token's ``kinds`` and ``spans``, the memory's
``timeline`` (each scene's runs, appearances and frame count), the ``id`` and the
``source`` file. Files are written to a temporary name and renamed, so a file that is
there is whole: an interrupted extraction resumes by skipping the records it finds.

Since the abstract attention trains (``vstream train``'s ``memory_attention``), a file
may also hold what rebuilds the abstract memory: every frame at the abstract grid, in
order (``abstract_frames`` ``[F, g*g, D]``), with the update's sizes (metadata
``abstract_update``). Files written before have neither and still read
(``RecordFeatures.abstract`` None).

An interleaved document's features (``DocumentFeatures``) are its images through the
frame encoder, pooled to the finest grid the multi-granular head reads (``images``
``[I, P, D]``), one file per document in the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vstream.errors import DataError
from vstream.memory import MemoryTokens, SceneRuns


@dataclass(frozen=True)
class AbstractInputs:
    """What rebuilds a stream's abstract memory (``vstream.memory.replay_abstract``):
    ``frames`` ``[F, g*g, D]``, every frame at the abstract grid in order, and the
    update's ``length`` (slots), ``chunk`` (frames per update) and ``alpha``."""

    frames: torch.Tensor
    length: int
    chunk: int
    alpha: float


@dataclass(frozen=True)
class RecordFeatures:
    """A record's extracted features: its ``memory`` tokens, the memory's ``timeline``,
    the ``source`` file they came from and, when extracted with them, the ``abstract``
    memory's inputs."""

    id: str
    memory: MemoryTokens
    timeline: list[SceneRuns]
    source: str
    abstract: AbstractInputs | None = None


@dataclass(frozen=True)
class DocumentFeatures:
    """An interleaved document's extracted features: ``images`` ``[I, P, D]``, each image
    entry's frame-encoder features in the document's order, and their ``sources``."""

    id: str
    images: torch.Tensor
    sources: tuple[str, ...]


def feature_path(folder, record_id: str) -> Path:
    """Where the features of ``record_id`` live in ``folder``: the id made safe for a file
    name, with a short digest so that two ids that read alike stay apart."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", record_id)[:80]
    digest = hashlib.sha1(record_id.encode("utf-8")).hexdigest()[:8]
    return Path(folder) / f"{safe}-{digest}.safetensors"


def write_features(folder, features: RecordFeatures) -> Path:
    """Write ``features`` into ``folder`` (made if missing) atomically; returns the file."""
    timeline = [{"runs": scene.runs, "appearances": scene.appearances, "frames": scene.frames}
                for scene in features.timeline]
    metadata = {"id": features.id, "source": features.source, "kinds": json.dumps(features.memory.kinds),
                "spans": json.dumps(features.memory.spans), "timeline": json.dumps(timeline)}
    tensors = {"tokens": features.memory.tokens}
    if features.abstract is not None:
        tensors["abstract_frames"] = features.abstract.frames
        metadata["abstract_update"] = json.dumps({"length": features.abstract.length, "chunk": features.abstract.chunk,
                                                  "alpha": features.abstract.alpha})
    return _write(folder, features.id, tensors, metadata)


def read_features(folder, record_id: str) -> RecordFeatures:
    """The features of ``record_id`` from ``folder``; ``DataError`` naming the file when
    they are missing or damaged."""
    path, tensors, metadata = _read(folder, record_id)
    try:
        timeline = [SceneRuns(tuple(tuple(run) for run in scene["runs"]), scene["appearances"], scene["frames"])
                    for scene in json.loads(metadata["timeline"])]
        memory = MemoryTokens(tensors["tokens"], json.loads(metadata["kinds"]),
                              [tuple(span) for span in json.loads(metadata["spans"])])
        abstract = None
        if "abstract_update" in metadata:
            update = json.loads(metadata["abstract_update"])
            abstract = AbstractInputs(tensors["abstract_frames"], int(update["length"]), int(update["chunk"]),
                                      float(update["alpha"]))
        return RecordFeatures(record_id, memory, timeline, metadata["source"], abstract)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: damaged features file ({type(exc).__name__}: {exc})") from None


def write_document_features(folder, features: DocumentFeatures) -> Path:
    """Write a document's ``features`` into ``folder`` (made if missing) atomically."""
    return _write(folder, features.id, {"images": features.images},
                  {"id": features.id, "sources": json.dumps(list(features.sources))})


def read_document_features(folder, document_id: str) -> DocumentFeatures:
    """The features of the document ``document_id`` from ``folder``; ``DataError`` naming
    the file when they are missing or damaged."""
    path, tensors, metadata = _read(folder, document_id)
    try:
        return DocumentFeatures(document_id, tensors["images"], tuple(json.loads(metadata["sources"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: damaged features file, or not a document's ({type(exc).__name__}: {exc})") from None


def _write(folder, item_id: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    path = feature_path(folder, item_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}, str(partial), metadata)
    os.replace(partial, path)
    return path


def _read(folder, item_id: str) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    path = feature_path(folder, item_id)
    try:
        with safe_open(str(path), framework="pt") as file:
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 - safe_open is no dict
            metadata = file.metadata() or {}
    except FileNotFoundError:
        raise DataError(f"{path}: no features for record {item_id!r} (not extracted yet?)") from None
    except (OSError, SafetensorError) as exc:
        raise DataError(f"{path}: damaged features file ({type(exc).__name__}: {exc})") from None
    if metadata.get("id") != item_id:
        raise DataError(f"{path}: holds the features of {metadata.get('id')!r}, not {item_id!r}")
    return path, tensors, metadata


def extracted(folder, record_id: str) -> bool:
    """Whether ``folder`` holds the features of ``record_id`` (a whole file)."""
    return feature_path(folder, record_id).is_file()

