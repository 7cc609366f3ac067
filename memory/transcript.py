"""The transcript memory: timed transcript segments with a FAISS index over their embeddings.

A session keeps three, built alike: what was said (speech), what was written on screen
(OCR) and what the frame encoder recognised (its labels).

It answers "which lines were about X" (``search``), "what was said between t0 and t1"
(``between``) and "what was said last" (``recent``) over a stream of any length, in
bounded memory.

* **Rows.** Segment ``i`` (in order of arrival, starts non-decreasing) is row ``i`` of an
  embeddings array ``[rows, dim]`` float32 and of a ``[rows, 2]`` array of (start, end)
  seconds, and id ``i`` of the FAISS index (built from ``config.index``: ids are positions,
  no ``IndexIDMap``). The arrays double as they fill, up to ``max_segments + slack`` rows
  (``slack = max(1, max_segments // 8)``), and never grow past that: a short stream does not
  pay for the cap.
* **Eviction in blocks.** Past ``max_segments``, the oldest rows become *stale*: no longer
  in ``len``, ``segments``, ``between``, ``recent`` or search results (search asks the
  index for ``k + stale`` hits and drops the stale ones). When the arrays are full, the
  stale rows are dropped at once: the kept rows move to the front and the index is rebuilt
  (``reset`` + ``add``; a trained index keeps its training). That costs O(max_segments)
  once every ``slack`` adds, so ``add`` is O(1) amortised (about 8 row copies per segment),
  works for every FAISS index type (HNSW cannot ``remove_ids``), and the memory holds at
  most ``max_segments + slack`` rows.
* **Trained indexes** (``"IVF64,Flat"``, ``"PQ16"``, ``"SQ8"``): search is exact over the kept
  embeddings until ``min(train_size, max_segments)`` segments are held, then the index is
  trained on them.
* **Save/load** go through ``persist`` (atomic, every file's digest checked): ``segments.json``
  (times, text, words), ``embeddings.npy`` (float32, no pickle), ``index.faiss``; the config,
  width and counts in the manifest. Saving drops the stale rows first. Loading then checks
  the contents: counts agree, times finite and ordered, shapes, dims and the index.
* One lock makes every method safe to call from several threads.
"""

from __future__ import annotations

import math
import numbers
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from vstream.config import JsonConfig, check_choice, check_int
from vstream.errors import ConfigError, MemoryStateError
from vstream.memory.bank import read_array
from vstream.memory.index import METRICS, KeyIndex
from vstream.memory.persist import open_snapshot, read_json, save_snapshot, write_json
from vstream.types import TranscriptSegment, Word

KIND, VERSION = "transcript", 1
_SEGMENT_KEYS, _WORD_KEYS = {"start", "end", "text", "words"}, {"text", "start", "end", "probability"}


@dataclass
class TranscriptConfig(JsonConfig):
    """The transcript memory.

    Attributes:
        max_segments: segments kept (default 100,000: about 80 hours of speech); the oldest
            are evicted beyond it. RAM: about ``1.125 * max_segments * dim * 8`` bytes at
            most with a flat index (embeddings and the index's copy; 345 MB at 384 dims),
            plus the segments' text.
        index: FAISS index factory string (default ``"Flat"``: exact search). Trained
            indexes train once ``train_size`` segments are held. ``IDMap`` is refused: ids
            are the memory's own.
        index_params: FAISS parameter string applied to the index (e.g. ``"nprobe=8"``).
        metric: ``"ip"`` (default: inner product, larger is nearer; cosine for the
            normalised embeddings of ``TextEmbedder``) or ``"l2"`` (squared distance).
        train_size: segments held before a trained index is trained (default 1024; at most
            ``max_segments`` are ever waited for).
    """

    max_segments: int = 100_000
    index: str = "Flat"
    index_params: str = ""
    metric: str = "ip"
    train_size: int = 1024

    def __post_init__(self) -> None:
        check_int("TranscriptConfig", "max_segments", self.max_segments, 1)
        if not (isinstance(self.index, str) and self.index.strip()) or self.index.startswith("IDMap"):
            raise ConfigError(f"TranscriptConfig.index must be a FAISS factory string such as 'Flat' "
                              f"(not IDMap: the memory numbers segments itself), got {self.index!r}")
        if not isinstance(self.index_params, str):
            raise ConfigError(f"TranscriptConfig.index_params must be a string such as 'nprobe=8', "
                              f"got {self.index_params!r}")
        check_choice("TranscriptConfig", "metric", self.metric, tuple(METRICS))
        check_int("TranscriptConfig", "train_size", self.train_size, 1)


class TranscriptHit(NamedTuple):
    """One segment found by ``TranscriptMemory.search`` and its score (inner product for
    metric ``"ip"``, larger is better; squared distance for ``"l2"``, smaller is better)."""

    segment: TranscriptSegment
    score: float


class TranscriptMemory:
    """Transcript segments of one stream with an embedding ``[dim]`` each (see the module
    docstring). Times are seconds on the stream clock."""

    def __init__(self, dim: int, config: TranscriptConfig | None = None):
        if not (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1):
            raise ConfigError(f"TranscriptMemory dim must be an int >= 1 (the embedding width), got {dim!r}")
        self.config = TranscriptConfig() if config is None else config
        if not isinstance(self.config, TranscriptConfig):
            raise ConfigError(f"TranscriptMemory takes a TranscriptConfig, got {type(self.config).__name__}")
        self.dim = dim
        cap = self.config.max_segments
        self._limit = cap + max(1, cap // 8)
        # ids are row numbers (stale rows included until compaction); a trained index
        # never waits for more segments than are kept
        self._keys = KeyIndex(dim, self.config.index, self.config.metric, self.config.index_params,
                              min(self.config.train_size, cap), owner="TranscriptConfig")
        self._emb = np.empty((min(self._limit, 256), dim), np.float32)
        self._spans = np.empty((len(self._emb), 2), np.float64)  # (start, end) seconds per row
        self._segments: list[TranscriptSegment] = []
        self._first = 0  # rows [0, _first) are stale, [_first, len(_segments)) kept
        self._lock = threading.RLock()

    # -- writing ------------------------------------------------------------------------

    def add(self, segment: TranscriptSegment, embedding: torch.Tensor) -> None:
        """Add one segment with its ``[dim]`` embedding. Its start must not be earlier than
        the previous segment's."""
        if not (isinstance(embedding, torch.Tensor) and embedding.ndim == 1):
            raise MemoryStateError(f"add: embedding must be a float Tensor [{self.dim}], got {_describe(embedding)}")
        self.extend([segment], embedding.unsqueeze(0))

    def extend(self, segments: list[TranscriptSegment], embeddings: torch.Tensor) -> None:
        """Add segments (a list or tuple, starts non-decreasing) with their ``[n, dim]``
        embeddings. All are checked before any is added."""
        segments = list(segments) if isinstance(segments, (list, tuple)) else segments
        if not isinstance(segments, list):
            raise MemoryStateError(f"extend: segments must be a list of TranscriptSegment, got {_describe(segments)}")
        if not (isinstance(embeddings, torch.Tensor) and embeddings.is_floating_point()
                and tuple(embeddings.shape) == (len(segments), self.dim)):
            raise MemoryStateError(f"extend: embeddings must be a float Tensor [{len(segments)}, {self.dim}] "
                                   f"(one row per segment), got {_describe(embeddings)}")
        rows = embeddings.detach().to("cpu", torch.float32).numpy()
        if not np.isfinite(rows).all():
            raise MemoryStateError("extend: embeddings hold NaN or infinite values")
        for i, segment in enumerate(segments):
            _check_segment(segment, f"segments[{i}]")
        with self._lock:
            previous = self._segments[-1].start if self._segments else -math.inf
            for segment in segments:
                if segment.start < previous:
                    raise MemoryStateError(f"segment starting at {segment.start} s comes after one starting at "
                                           f"{previous} s: starts must not decrease")
                previous = segment.start
            keep = self.config.max_segments
            segments, rows = segments[-keep:], rows[-keep:]  # older ones would be evicted at once
            step = self._limit - keep
            for first in range(0, len(segments), step):
                self._append(segments[first : first + step], rows[first : first + step])

    def _append(self, segments: list[TranscriptSegment], rows: np.ndarray) -> None:
        """Append at most ``slack`` checked rows; nothing changes if training the index fails."""
        n, b = len(self._segments), len(segments)
        if n + b > len(self._emb):
            if self._first:
                self._compact()
                n = len(self._segments)
            if n + b > len(self._emb):
                self._grow(min(self._limit, max(2 * len(self._emb), n + b)))
        self._emb[n : n + b] = rows
        self._spans[n : n + b] = _spans_of(segments)
        first = max(self._first, n + b - self.config.max_segments)
        self._keys.add(rows)
        self._segments.extend(segments)
        self._first = first

    def _compact(self) -> None:
        """Drop the stale rows: move the kept ones to the front and rebuild the index."""
        first, n = self._first, len(self._segments)
        for array in (self._emb, self._spans):
            array[: n - first] = array[first:n]
        del self._segments[:first]
        self._first = 0
        self._keys.reset()
        self._keys.add(self._emb[: n - first])

    def _grow(self, rows: int) -> None:
        n = len(self._segments)
        for name in ("_emb", "_spans"):
            old = getattr(self, name)
            new = np.empty((rows, *old.shape[1:]), old.dtype)
            new[:n] = old[:n]
            setattr(self, name, new)

    def stretch_last(self, end: float) -> None:
        """Move the newest segment's end to ``end`` seconds (never earlier than it is): a
        text still on screen, or a line still being spoken, lasts longer than first known."""
        if not (isinstance(end, numbers.Real) and math.isfinite(end)):
            raise MemoryStateError(f"stretch_last: end must be finite seconds, got {end!r}")
        with self._lock:
            if len(self._segments) == self._first:
                raise MemoryStateError("stretch_last: the memory holds no segment")
            last = self._segments[-1]
            if end > last.end:
                self._segments[-1] = replace(last, end=float(end))
                self._spans[len(self._segments) - 1, 1] = end

    # -- reading ------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._segments) - self._first

    @property
    def segments(self) -> list[TranscriptSegment]:
        """The kept segments, oldest first (a new list)."""
        with self._lock:
            return self._segments[self._first :]

    def recent(self, n: int) -> list[TranscriptSegment]:
        """The newest ``n`` kept segments, oldest first."""
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
            raise MemoryStateError(f"recent: n must be an int >= 0, got {n!r}")
        with self._lock:
            return self._segments[max(self._first, len(self._segments) - n) :]

    def between(self, start: float, end: float) -> list[TranscriptSegment]:
        """Kept segments overlapping ``[start, end]`` seconds (touching counts; ``end`` may be
        ``math.inf``: up to now), oldest first."""
        if not (isinstance(start, numbers.Real) and isinstance(end, numbers.Real)
                and math.isfinite(start) and not math.isnan(end) and start <= end):
            raise MemoryStateError(f"between: needs seconds start <= end (start finite), got {start!r}, {end!r}")
        with self._lock:
            first, n = self._first, len(self._segments)
            spans = self._spans[first:n]
            rows = np.flatnonzero((spans[:, 0] <= end) & (spans[:, 1] >= start))
            return [self._segments[first + i] for i in rows.tolist()]

    def search(self, query: torch.Tensor, k: int = 5) -> list[TranscriptHit]:
        """The ``k`` kept segments nearest to ``query`` (``[dim]``), best first; fewer when
        fewer are kept (or an approximate index finds fewer)."""
        if not (isinstance(query, torch.Tensor) and query.is_floating_point() and tuple(query.shape) == (self.dim,)):
            raise MemoryStateError(f"search: query must be a float Tensor [{self.dim}], got {_describe(query)}")
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 0):
            raise MemoryStateError(f"search: k must be an int >= 0, got {k!r}")
        q = query.detach().to("cpu", torch.float32).reshape(1, -1).numpy()
        if not np.isfinite(q).all():
            raise MemoryStateError("search: query holds NaN or infinite values")
        with self._lock:
            first, n = self._first, len(self._segments)
            if k == 0 or n == first:
                return []
            scores, ids = self._keys.search(q, min(k + first, n))
            hits = [(i, s) for i, s in zip(ids[0].tolist(), scores[0].tolist()) if i >= first]
            return [TranscriptHit(self._segments[i], s) for i, s in hits[:k]]

    def ram_bytes(self) -> int:
        """Bytes of the embedding and time arrays and the index's codes (not the segments' text)."""
        with self._lock:
            return self._emb.nbytes + self._spans.nbytes + self._keys.nbytes()

    def __repr__(self) -> str:
        return (f"TranscriptMemory(segments={len(self)}, dim={self.dim}, max_segments={self.config.max_segments}, "
                f"index={self.config.index!r}, metric={self.config.metric!r})")

    # -- save and load ------------------------------------------------------------------

    def save(self, path) -> None:
        """Save into the folder ``path``, atomically (see ``vstream.memory.persist``)."""
        with self._lock:
            if self._first:
                self._compact()
            save_snapshot(path, self._write)

    def _write(self, folder: Path) -> dict:
        n = len(self._segments)
        write_json(folder / "segments.json", {"segments": [asdict(s) for s in self._segments]})
        np.save(folder / "embeddings.npy", self._emb[:n], allow_pickle=False)
        with open(folder / "index.faiss", "wb") as f:
            self._keys.write(f)
        return {"kind": KIND, "version": VERSION, "config": self.config.to_dict(), "dim": self.dim,
                "count": n, "trained": self._keys.trained}

    @classmethod
    def load(cls, path) -> TranscriptMemory:
        """Load a memory written by ``save``. Raises ``MemoryStateError`` naming the file and
        the cause if the save is missing, damaged, truncated, of another version or kind, or
        its contents disagree."""
        folder, description = open_snapshot(path)
        manifest = folder / "manifest.json"
        if (description.get("kind"), description.get("version")) != (KIND, VERSION):
            raise MemoryStateError(f"{manifest}: holds a {description.get('kind')!r} memory of version "
                                   f"{description.get('version')!r}; expected {KIND!r} version {VERSION}")
        try:
            memory = cls(description.get("dim"), TranscriptConfig.from_dict(description.get("config")))
        except (ConfigError, TypeError) as exc:
            raise MemoryStateError(f"{manifest}: bad width or config ({exc})") from None
        count, trained = description.get("count"), description.get("trained")
        if not (isinstance(count, int) and 0 <= count <= memory.config.max_segments and isinstance(trained, bool)):
            raise MemoryStateError(f"{manifest}: bad segment count {count!r} (at most "
                                   f"{memory.config.max_segments}) or trained flag {trained!r}")
        segments = _read_segments(folder / "segments.json", count)
        rows = read_array(folder / "embeddings.npy", np.float32, (count, memory.dim))
        pending = np.empty((0, memory.dim), np.float32) if trained else rows
        memory._keys.restore(folder / "index.faiss", pending, trained, count if trained else 0)
        memory._grow(max(len(memory._emb), count))
        memory._emb[:count] = rows
        memory._spans[:count] = _spans_of(segments)
        memory._segments = segments
        return memory


def _spans_of(segments: list[TranscriptSegment]) -> np.ndarray:
    return np.array([(s.start, s.end) for s in segments], np.float64).reshape(-1, 2)


def _check_segment(segment: object, name: str) -> None:
    """A ``TranscriptSegment`` whose words are ``Word``s with finite numbers (so it saves as JSON)."""
    if not isinstance(segment, TranscriptSegment):
        raise MemoryStateError(f"{name} must be a TranscriptSegment, got {type(segment).__name__}")
    for j, word in enumerate(segment.words):
        if not (isinstance(word, Word) and isinstance(word.text, str) and all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in (word.start, word.end, word.probability))):
            raise MemoryStateError(f"{name}.words[{j}] must be a Word with text and finite start, end and "
                                   f"probability, got {word!r}")


def _read_segments(path: Path, count: int) -> list[TranscriptSegment]:
    items = read_json(path).get("segments")
    if not (isinstance(items, list) and len(items) == count):
        raise MemoryStateError(f"{path}: expected a list of {count} segments, got "
                               f"{len(items) if isinstance(items, list) else type(items).__name__}")
    segments, previous = [], -math.inf
    for i, item in enumerate(items):
        try:
            if not (isinstance(item, dict) and set(item) == _SEGMENT_KEYS and isinstance(item["words"], list)
                    and all(isinstance(w, dict) and set(w) == _WORD_KEYS for w in item["words"])
                    and all(isinstance(item[key], (int, float)) for key in ("start", "end"))):
                raise ValueError(f"expected keys {sorted(_SEGMENT_KEYS)}, numbers as times, and words with keys "
                                 f"{sorted(_WORD_KEYS)}")
            segment = TranscriptSegment(float(item["start"]), float(item["end"]), item["text"],
                                        tuple(Word(**w) for w in item["words"]))
            _check_segment(segment, "segment")
        except (ValueError, TypeError, MemoryStateError) as exc:
            raise MemoryStateError(f"{path}: segment {i} is invalid ({exc})") from None
        if segment.start < previous:
            raise MemoryStateError(f"{path}: segment {i} starts at {segment.start} s, before the previous one "
                                   f"({previous} s)")
        previous = segment.start
        segments.append(segment)
    return segments


def _describe(value: object) -> str:
    is_tensor = isinstance(value, torch.Tensor)
    return f"a {value.dtype} Tensor of shape {list(value.shape)}" if is_tensor else f"a {type(value).__name__}"
