"""The feature bank: every frame's pooled features with its time, and a FAISS index over them.

It serves the STAR memory (the bank frame nearest to each temporal centroid) and
query-time retrieval (a vector to the top-k frames with their times), for a 10-hour
stream at 1 fps in a fixed RAM budget and at a per-frame cost that does not grow.

* **Write-through spill.** Every frame's features ``[G*G, D]`` (as ``config.dtype``) are
  written with ``os.pwrite`` into a slot of a spill file (``slot * bytes_per_frame``);
  with no disk cap, frame ``i`` takes slot ``i`` and the file is the whole history.
* **Disk cap and thinning.** ``config.disk_gb`` bounds the spill files: they hold at most
  ``disk_frames`` slots. When they are full, a round frees ``disk_frames // 64`` slots
  (or as many as a batch needs): the frames whose loss leaves the smallest gap for their
  age (``(t_next - t_prev) / (now - t)`` over the frames still kept), never two
  neighbours in one round, never the first or newest frame, and never a frame the
  memory pins (``keep``: the frames its reads show, each scene's representative and the
  start of each run on its timeline). Kept frames then thin out with age, gap ∝ age:
  at ``r`` frames a second over a stream of ``A`` seconds, every frame of the last
  ``a0`` seconds is kept where ``disk_frames ≈ r·a0·(1 + ln(A/a0))``, and a frame of age
  ``a`` is about ``a/(r·a0)`` seconds from the next kept one: never a ring that forgets
  whole hours. Times, index keys and ids of thinned frames stay; their features and
  thumbnails are gone (``kept``; ``features`` refuses them, ``thumbnails`` gives None).
* **RAM ring.** The newest ``ram_frames`` frames (as many as fit in ``config.ram_mb`` MiB)
  also sit in a ring buffer allocated once, at full size: frame ``i`` in slot
  ``i % ram_frames``. Older frames are read back from the file.
* **pread, not memmap.** Touched pages of a mapped file count toward the process's RSS,
  and a map over a growing file must be remade. ``os.pread`` copies just the frames asked
  for; the file stays in the kernel's page cache, outside RSS, which the kernel can drop.
* **Thumbnails.** A frame may come with its image; the bank keeps it as a small JPEG
  (``config.thumbnail_*``) in the same slot of a second spill file (slots of
  ``thumbnail_slot_bytes``; a JPEG too big for one is encoded again at a lower quality),
  and the newest ``thumbnail_ram_frames`` of them in a RAM ring of their own. A frame
  without an image has zero bytes. Thumbnails are thinned with their frames.
* **Index.** One key per frame (by default the mean of its tokens, float32 ``[D]``) in a
  ``KeyIndex`` (``vstream.memory.index``) from ``config.index``; its ids are frame ids. An
  index that needs training searches the keys exactly until ``train_size`` frames have
  arrived, then trains on them.

Per frame, ``add`` costs a pwrite, a ring-slot copy and an index add (and a JPEG
encode and a pwrite when it has an image); the per-frame arrays (times, slots,
thumbnail sizes) double when full (amortised O(1), as FAISS's own storage), and a
thinning round, once per ``disk_frames // 64`` frames, is O(frames kept). A lock makes
``add``, ``search``, ``features`` and ``save`` safe to call from several threads; a save
holds it while it copies the kept frames (slots are reused once thinned).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vstream.errors import ConfigError, MemoryStateError
from vstream.memory.config import BankConfig
from vstream.memory.index import KeyIndex

logger = logging.getLogger(__name__)

FORMAT, VERSION = "vstream.feature_bank", 2  # 2: kept.npy, only the kept frames in features.bin
MIN_DISK_FRAMES = 16
"""Fewest frames a disk cap may hold: thinning needs room for a batch and the pinned frames."""
THINNING_ROUNDS = 64
"""A full spill frees ``disk_frames // THINNING_ROUNDS`` slots at once: the cost of a round
is spread over that many frames."""
_CHUNK_BYTES = 8 << 20  # bytes per read and write when features.bin is streamed in or out
_META_FIELDS = {"format": str, "version": int, "n": int, "kept": int, "dim": int, "grid": int, "dtype": str,
                "trained": bool, "pending": int, "config": dict}


def _remove_spill(files: list[tuple[int, str]], temp_dir: str | None) -> None:
    """Close and delete the spill files ``(fd, path)``, and the temporary folder made for them."""
    for fd, path in files:
        os.close(fd)
        if temp_dir is None and os.path.exists(path):
            os.unlink(path)
    if temp_dir is not None:
        shutil.rmtree(temp_dir, ignore_errors=True)


def encode_thumbnails(images, config: BankConfig) -> list[bytes]:
    """The JPEG bytes a bank with ``config`` keeps for each of ``images`` (``[H, W, 3]``
    uint8 arrays or PIL images; bytes pass through; ``b""`` for None, and for every image
    when the bank keeps no thumbnails). A caller may make them before taking a lock."""
    if not config.thumbnails:
        return [b""] * len(images)
    return [b"" if image is None else image if isinstance(image, bytes)
            else encode_thumbnail(image, config.thumbnail_size, config.thumbnail_quality) for image in images]


def encode_thumbnail(image, size: int, quality: int) -> bytes:
    """JPEG bytes of ``image`` (``[H, W, 3]`` uint8 array or PIL image) shrunk so its
    longest side is at most ``size`` pixels."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise MemoryStateError(f"a thumbnail image must be a uint8 [H, W, 3] array, got {image.dtype} "
                                   f"{list(image.shape)}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise MemoryStateError(f"a thumbnail must be a uint8 [H, W, 3] array or a PIL image, got "
                               f"{type(image).__name__}")
    scale = size / max(image.size)
    if scale < 1:  # reducing_gap: a cheap integer reduce first, then a bilinear resize
        shape = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(shape, Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def thumbnail_slot_bytes(config: BankConfig) -> int:
    """Bytes of disk a thumbnail slot takes: half the raw RGB of a square thumbnail (a JPEG
    rarely takes a sixth of it); 0 when the bank keeps no thumbnails."""
    return max(4096, config.thumbnail_size**2 * 3 // 2) if config.thumbnails else 0


def fit_thumbnail(data: bytes, limit: int) -> bytes:
    """JPEG ``data`` within ``limit`` bytes: encoded again at lower qualities if needed
    (b"" if even quality 10 does not fit)."""
    if len(data) <= limit:
        return data
    image = decode_thumbnail(data)
    for quality in (50, 25, 10):
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", quality=quality)
        if out.tell() <= limit:
            return out.getvalue()
    logger.warning("a thumbnail of %d bytes does not fit a slot of %d even at JPEG quality 10; dropped",
                   len(data), limit)
    return b""


def decode_thumbnail(data: bytes) -> Image.Image | None:
    """The image of JPEG bytes written by ``encode_thumbnail``; None for no bytes."""
    if not data:
        return None
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _write_synced(path: Path, write) -> None:
    """Create ``path``, let ``write(file)`` fill it, and fsync it."""
    with open(path, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


class FeatureBank:
    """Every frame's features ``[G*G, D]`` with its time in seconds, and a FAISS index over
    one key ``[D]`` per frame; ids 0, 1, 2, ... in order of arrival. The newest frames are in
    RAM, the kept ones in a spill file (``config.spill_dir``, or a temporary folder).

    Args:
        dim: feature width ``D``.
        config: ``BankConfig``.
        keep: called with the times of all frames (``[n]`` seconds) when the spill must be
            thinned; returns the ids that must stay (the frames its owner reads), the most
            needed first: past half the cap, the rest may be thinned. It must not call the
            bank.
    """

    def __init__(self, dim: int, config: BankConfig | None = None, keep=None):
        if not (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1):
            raise ConfigError(f"FeatureBank dim must be an int >= 1 (the feature width D), got {dim!r}")
        config = BankConfig() if config is None else config
        if not isinstance(config, BankConfig):
            raise ConfigError(f"FeatureBank config must be a BankConfig or None, got {type(config).__name__}")
        self.config, self.dim, self.tokens = config, dim, config.grid**2
        self._dtype = np.dtype(config.dtype)
        self.bytes_per_frame = self.tokens * dim * self._dtype.itemsize
        self.thumbnail_slot_bytes = thumbnail_slot_bytes(config)
        self.disk_frames = (None if not config.disk_gb or math.isinf(config.disk_gb) else
                            int(config.disk_gb * 2**30 // (self.bytes_per_frame + self.thumbnail_slot_bytes)))
        if self.disk_frames is not None and self.disk_frames < MIN_DISK_FRAMES:
            raise ConfigError(f"BankConfig.disk_gb {config.disk_gb} holds {self.disk_frames} frames of "
                              f"{self.bytes_per_frame + self.thumbnail_slot_bytes} bytes; at least "
                              f"{MIN_DISK_FRAMES} must fit")
        self._keep = keep
        self._capacity = max(1, int(config.ram_mb * 2**20 // self.bytes_per_frame))
        self._keys = KeyIndex(dim, config.index, config.metric, config.index_params, config.train_size,
                              config.device, owner="BankConfig")
        logger.debug("feature bank index on %s (device=%r)", "cuda" if self._keys.on_gpu else "cpu", config.device)
        self._ring = np.empty((self._capacity, self.tokens, dim), self._dtype)
        self._thumbnail_ring = [b""] * config.thumbnail_ram_frames  # frame i's JPEG in slot i % len
        self._times = np.empty(1024, np.float64)
        self._slots = np.empty(1024, np.int64)  # frame i's slot in the spill files; -1 once thinned
        self._thumbnail_sizes = np.zeros(1024, np.int64)  # bytes of frame i's JPEG in its slot
        self._free: list[int] = []  # slots of thinned frames, reused first
        self._used = 0  # slots ever used: the spill files' length in slots
        self._n, self._closed, self._lock = 0, False, threading.Lock()
        temp_dir = tempfile.mkdtemp(prefix="vstream-bank-") if config.spill_dir is None else None
        files = []
        try:
            os.makedirs(temp_dir or config.spill_dir, exist_ok=True)
            for suffix in (".spill", ".thumbs"):
                files.append(tempfile.mkstemp(prefix="bank-", suffix=suffix, dir=temp_dir or config.spill_dir))
        except OSError as exc:
            _remove_spill(files, temp_dir)
            raise ConfigError(f"BankConfig.spill_dir {config.spill_dir!r} cannot hold the spill file: {exc}") from None
        (self._fd, path), (self._thumbnail_fd, thumbnail_path) = files
        self.spill_path, self.thumbnail_path = Path(path), Path(thumbnail_path)
        self._finalizer = weakref.finalize(self, _remove_spill, files, temp_dir)

    def _batch(self, value, name: str, item: tuple[int, ...], rows: int | str, dtype) -> torch.Tensor:
        """``value`` [rows, *item] or [*item] (one row) as a finite CPU tensor of ``dtype``;
        ``rows`` is a count, or a letter when any count will do."""
        dims = ", ".join(map(str, item))
        want = f"[{rows}, {dims}]" + (f" or [{dims}]" if rows in ("B", "n", 1) else "")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            got = f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
            raise MemoryStateError(f"{name} must be a float torch.Tensor {want}, got a {got}")
        x = value.unsqueeze(0) if value.dim() == len(item) else value
        if x.dim() != len(item) + 1 or tuple(x.shape[1:]) != item or rows not in ("B", "n", x.shape[0]):
            raise MemoryStateError(f"{name} must have shape {want}, got {list(value.shape)}")
        x = x.detach().to(device="cpu", dtype=dtype).contiguous()
        if not all_finite(x):
            raise MemoryStateError(f"{name} must be finite (and in the range of {dtype}), got non-finite values")
        return x

    def _check_times(self, times, count: int) -> np.ndarray:
        try:
            t = np.asarray(times.detach().cpu().double() if isinstance(times, torch.Tensor) else times, np.float64)
        except (TypeError, ValueError, RuntimeError):
            raise MemoryStateError(f"times must be seconds, a float or [{count}], got {type(times).__name__}") from None
        t = t.reshape(1) if t.ndim == 0 else t
        if t.shape != (count,) or not np.isfinite(t).all():
            raise MemoryStateError(f"times must be [{count}] finite seconds, one per frame, got {t.tolist()}")
        back = np.flatnonzero(np.diff(t) < 0)
        if len(back):
            raise MemoryStateError(f"times must not decrease: {t[back[0] + 1]} s comes after {t[back[0]]} s")
        return t

    def _check_open(self) -> None:
        if self._closed:
            raise MemoryStateError("the feature bank is closed")

    def add(self, features, times, keys=None, thumbnails=None) -> range:
        """Append frames; returns the ids given to them.

        Args:
            features: ``[B, G*G, D]`` or ``[G*G, D]``, any float dtype, stored as ``config.dtype``.
            times: seconds, a float or ``[B]``; finite, and never earlier than the bank's last time.
            keys: ``[B, D]`` index keys, or None for the mean over each frame's tokens (float32).
            thumbnails: None, or ``B`` images (``[H, W, 3]`` uint8 arrays, PIL images, JPEG bytes
                from ``encode_thumbnail``, or None for a frame without one), kept as JPEG
                thumbnails when ``config.thumbnails``.
        """
        x = self._batch(features, "features", (self.tokens, self.dim), "B", getattr(torch, self.config.dtype))
        b = x.shape[0]
        t = self._check_times(times, b)
        k = x.float().mean(dim=1) if keys is None else self._batch(keys, "keys", (self.dim,), b, torch.float32)
        rows = x.numpy()
        jpegs = [fit_thumbnail(jpeg, self.thumbnail_slot_bytes) for jpeg in self._encode(thumbnails, b)]
        with self._lock:
            self._check_open()
            n = self._n
            if b and n and t[0] < self._times[n - 1]:
                raise MemoryStateError(f"times must not decrease: {t[0]} s comes after the bank's last time "
                                       f"{self._times[n - 1]} s")
            if b == 0:
                return range(n, n)
            slots = self._take_slots(b)  # free or past the end: nothing refers to them
            done = 0
            for first, count in _runs(np.asarray(slots)):  # one write per run of consecutive slots
                self._write_spill(rows[done : done + count], first)
                done += count
            for jpeg, slot in zip(jpegs, slots):
                _pwrite_all(self._thumbnail_fd, jpeg, slot * self.thumbnail_slot_bytes)
            self._keys.add(k.numpy())
            keep = max(0, b - self._capacity)  # a batch larger than the ring keeps its newest rows
            self._ring[np.arange(n + keep, n + b) % self._capacity] = rows[keep:]
            self._grow(n + b)
            self._times[n : n + b] = t
            self._slots[n : n + b] = slots
            self._thumbnail_sizes[n : n + b] = [len(j) for j in jpegs]
            self._ring_thumbnails(jpegs, n)
            self._n = n + b
        return range(n, n + b)

    def _grow(self, size: int) -> None:
        """Room in the per-frame arrays for ``size`` frames (doubling)."""
        if size > len(self._times):
            n, size = self._n, max(2 * len(self._times), size)
            self._times = np.concatenate([self._times[:n], np.empty(size - n, np.float64)])
            self._slots = np.concatenate([self._slots[:n], np.empty(size - n, np.int64)])
            self._thumbnail_sizes = np.concatenate([self._thumbnail_sizes[:n], np.zeros(size - n, np.int64)])

    def _take_slots(self, count: int) -> list[int]:
        """Slots for ``count`` new frames: freed ones first, then new ones up to the disk cap;
        when full, a thinning round frees more."""
        fresh = count - len(self._free)
        room = fresh if self.disk_frames is None else min(fresh, self.disk_frames - self._used)
        if fresh > 0 and room < fresh:
            self._thin(max(fresh - max(room, 0), self.disk_frames // THINNING_ROUNDS))
        taken = [self._free.pop() for _ in range(min(count, len(self._free)))]
        new = count - len(taken)
        taken += range(self._used, self._used + new)
        self._used += new
        return taken

    def _thin(self, count: int) -> None:
        """Free the slots of ``count`` kept frames (see the module docstring: the smallest
        gap for their age first, no two neighbours in a round, never the first, the newest
        or a pinned frame)."""
        n = self._n
        wanted = [] if self._keep is None else [int(i) for i in self._keep(self._times[:n])]
        pinned = set(wanted[: self.disk_frames // 2])  # the most needed first; room left to thin
        freed: list[int] = []
        while len(freed) < count:
            kept = self._kept()
            t = self._times[kept]
            gaps = np.full(len(kept), np.inf)
            gaps[1:-1] = t[2:] - t[:-2]
            with np.errstate(divide="ignore", invalid="ignore"):
                score = np.where(np.isfinite(gaps), gaps / np.maximum(t[-1] - t, 1e-9), np.inf) if len(kept) else gaps
            score[np.isin(kept, np.fromiter(pinned, np.int64, len(pinned)))] = np.inf
            taken = np.zeros(len(kept) + 1, bool)  # one past the end: taken[j + 1] is always valid
            round_freed = 0
            for j in np.argsort(score, kind="stable").tolist():
                if len(freed) == count or not np.isfinite(score[j]):
                    break
                if taken[j - 1] or taken[j + 1]:
                    continue
                taken[j] = True
                i = int(kept[j])
                freed.append(int(self._slots[i]))
                self._slots[i], self._thumbnail_sizes[i] = -1, 0
                round_freed += 1
            if not round_freed:
                raise MemoryStateError(f"the bank cannot stay under BankConfig.disk_gb {self.config.disk_gb}: its "
                                       f"{len(kept)} kept frames are all pinned or at the ends")
        self._free.extend(sorted(freed, reverse=True))  # lowest slots reused first
        logger.debug("feature bank thinned %d frames; %d of %d kept", len(freed), len(self._kept()), n)

    def _encode(self, thumbnails, count: int) -> list[bytes]:
        """JPEG bytes of each of ``count`` frames' images (``b""`` for none)."""
        if thumbnails is None or not self.config.thumbnails:
            return [b""] * count
        if isinstance(thumbnails, (np.ndarray, Image.Image)) or len(thumbnails) != count:
            got = type(thumbnails).__name__ if isinstance(thumbnails, (np.ndarray, Image.Image)) else len(thumbnails)
            raise MemoryStateError(f"thumbnails must be a sequence of {count} images (or None), one per frame, "
                                   f"got {got}")
        return encode_thumbnails(thumbnails, self.config)

    def _ring_thumbnails(self, jpegs: list[bytes], first: int) -> None:
        """Put the JPEGs of frames ``first``, ``first + 1``, ... in the thumbnail ring (the newest that fit)."""
        slots = len(self._thumbnail_ring)
        for i in range(max(0, len(jpegs) - slots), len(jpegs)):
            self._thumbnail_ring[(first + i) % slots] = jpegs[i]

    def _write_spill(self, rows: np.ndarray, slot: int) -> None:
        """Write ``rows`` (one frame ``[G*G, D]``, or consecutive frames) from ``slot`` on."""
        _pwrite_all(self._fd, np.ascontiguousarray(rows).reshape(-1).view(np.uint8), slot * self.bytes_per_frame)

    def _read_frame(self, i: int) -> np.ndarray:
        data = os.pread(self._fd, self.bytes_per_frame, int(self._slots[i]) * self.bytes_per_frame)
        if len(data) != self.bytes_per_frame:
            raise MemoryStateError(f"spill file {self.spill_path} ends before frame {i}: was it truncated?")
        return np.frombuffer(data, self._dtype).reshape(self.tokens, self.dim)

    def kept_ids(self) -> np.ndarray:
        """``[k]`` int64 ids of the frames whose features and thumbnails are kept (all of
        them until the disk cap thins the spill), ascending."""
        with self._lock:
            return self._kept()

    def kept(self, ids) -> np.ndarray:
        """``[len(ids)]`` bool: whether each frame of ``ids`` (valid ids) is kept."""
        with self._lock:
            return self._slots[np.asarray(ids, np.int64)] >= 0

    def _kept(self) -> np.ndarray:
        """``kept_ids`` with the lock held."""
        return np.flatnonzero(self._slots[: self._n] >= 0)

    def disk_bytes(self) -> int:
        """Bytes the spill files span (slots used, features and thumbnail slots): at most
        ``config.disk_gb`` GiB."""
        return self._used * (self.bytes_per_frame + self.thumbnail_slot_bytes)

    def __len__(self) -> int:
        return self._n

    @property
    def times(self) -> np.ndarray:
        """``[n]`` float64 seconds of every frame, a read-only view."""
        with self._lock:
            view = self._times[: self._n]
        view.flags.writeable = False
        return view

    def thumbnails(self, ids) -> list[Image.Image | None]:
        """The thumbnails of the frames ``ids`` (ints), None where a frame was added without
        an image or was thinned."""
        return [decode_thumbnail(jpeg) for jpeg in self.thumbnail_jpegs(ids)]

    def thumbnail_jpegs(self, ids) -> list[bytes]:
        """The JPEG files of the frames ``ids``' thumbnails, as stored; ``b""`` where a frame
        was added without an image or was thinned."""
        ids = [int(i) for i in ids]
        with self._lock:
            self._check_open()
            bad = [i for i in ids if not 0 <= i < self._n]
            if bad:
                raise MemoryStateError(f"frame id {bad[0]} is out of range: the bank holds ids 0..{self._n - 1}")
            slots = len(self._thumbnail_ring)
            first_in_ram = self._n - min(self._n, slots)
            return [b"" if self._slots[i] < 0 else self._thumbnail_ring[i % slots] if i >= first_in_ram
                    else self._read_thumbnail(i) for i in ids]

    def _read_thumbnail(self, i: int) -> bytes:
        size = int(self._thumbnail_sizes[i])
        data = os.pread(self._thumbnail_fd, size, int(self._slots[i]) * self.thumbnail_slot_bytes)
        if len(data) != size:
            raise MemoryStateError(f"thumbnail spill file {self.thumbnail_path} ends before frame {i}: was it "
                                   "truncated?")
        return data

    @property
    def ram_frames(self) -> int:
        """Capacity of the RAM ring, in frames."""
        return self._capacity

    def ram_bytes(self) -> int:
        """Bytes of the RAM ring, the thumbnails in RAM, the pending keys of an untrained index
        and the index's codes (estimated as ``ntotal * code_size``); 0 once closed."""
        if self._closed:
            return 0
        return self._ring.nbytes + sum(map(len, self._thumbnail_ring)) + self._keys.nbytes()

    def features(self, ids) -> torch.Tensor:
        """``[len(ids), G*G, D]`` float32 features of the frames ``ids`` (a 1-D int sequence
        or tensor), each kept (``kept_ids``)."""
        try:
            idx = np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids)
            ok = idx.ndim == 1 and (idx.dtype.kind in "iu" or idx.size == 0)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise MemoryStateError(f"ids must be a 1-D sequence of int frame ids, got {ids!r:.100}")
        with self._lock:
            self._check_open()
            bad = idx[(idx < 0) | (idx >= self._n)]
            if len(bad):
                raise MemoryStateError(f"frame id {bad[0]} is out of range: the bank holds ids 0..{self._n - 1}")
            thinned = idx[self._slots[idx.astype(np.int64)] < 0]
            if len(thinned):
                i = int(thinned[0])
                raise MemoryStateError(f"frame {i} ({self._times[i]:.1f} s) was thinned to keep the spill under "
                                       f"BankConfig.disk_gb {self.config.disk_gb}; see kept_ids()")
            out = np.empty((len(idx), self.tokens, self.dim), np.float32)
            first_in_ram = self._n - min(self._n, self._capacity)
            for row, i in enumerate(idx.tolist()):
                out[row] = self._ring[i % self._capacity] if i >= first_in_ram else self._read_frame(i)
        return torch.from_numpy(out)

    def search(self, keys, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` frames nearest to each of ``keys`` (``[n, D]`` or ``[D]``).

        Returns ``ids`` int64 and ``scores`` float32, both ``[n, min(k, len(self))]``, best first:
        squared L2 distances (metric ``"l2"``, ascending) or inner products (``"ip"``,
        descending). Where an approximate index finds fewer, the id is -1 and the score
        inf (l2) or -inf (ip).
        """
        q = self._batch(keys, "keys", (self.dim,), "n", torch.float32).numpy()
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 0):
            raise MemoryStateError(f"k must be an int >= 0, got {k!r}")
        with self._lock:
            self._check_open()
            kk = min(k, self._n)
            if kk == 0 or len(q) == 0:
                return torch.empty((len(q), kk), dtype=torch.int64), torch.empty((len(q), kk))
            scores, ids = self._keys.search(q, kk)
        scores[ids < 0] = np.inf if self.config.metric == "l2" else -np.inf
        return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(scores)

    def save(self, directory) -> None:
        """Write times.npy, kept.npy (the ids of the kept frames), features.bin (their
        features, in id order), thumbnails.npy (where each kept frame's JPEG ends in
        thumbnails.bin), thumbnails.bin, pending.npy, index.faiss and bank.json into the
        existing empty ``directory``, each fsynced. Adds wait until the frames are copied."""
        folder = Path(directory)
        if not folder.is_dir() or any(folder.iterdir()):
            raise MemoryStateError(f"save: {folder} must be an existing empty directory")
        with self._lock:
            self._check_open()
            n, trained, pending = self._n, self._keys.trained, self._keys.pending
            kept = self._kept()
            _write_synced(folder / "times.npy", lambda f: np.save(f, self._times[:n], allow_pickle=False))
            _write_synced(folder / "kept.npy", lambda f: np.save(f, kept, allow_pickle=False))
            ends = np.cumsum(self._thumbnail_sizes[kept], dtype=np.int64)
            _write_synced(folder / "thumbnails.npy", lambda f: np.save(f, ends, allow_pickle=False))
            _write_synced(folder / "pending.npy", lambda f: np.save(f, pending, allow_pickle=False))
            _write_synced(folder / "index.faiss", self._keys.write)
            _write_synced(folder / "features.bin", lambda f: self._copy_frames(kept, f))
            _write_synced(folder / "thumbnails.bin", lambda f: self._copy_thumbnails(kept, f))
        meta = {"format": FORMAT, "version": VERSION, "n": n, "kept": len(kept), "dim": self.dim,
                "grid": self.config.grid, "dtype": self.config.dtype, "trained": trained, "pending": len(pending),
                "config": self.config.to_dict()}
        _write_synced(folder / "bank.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))

    def _copy_frames(self, ids: np.ndarray, f) -> None:
        """Write the features of the kept frames ``ids`` to the open file ``f``, in order;
        runs of consecutive slots in one read."""
        per_chunk = self._frames_per_chunk
        for first, count in _runs(self._slots[ids]):
            for start in range(0, count, per_chunk):
                size = min(count - start, per_chunk) * self.bytes_per_frame
                f.write(_pread_all(self._fd, size, (first + start) * self.bytes_per_frame, self.spill_path))

    @property
    def _frames_per_chunk(self) -> int:
        """Frames per read or write when features.bin is streamed in or out."""
        return max(1, _CHUNK_BYTES // self.bytes_per_frame)

    def _copy_thumbnails(self, ids: np.ndarray, f) -> None:
        """Write the JPEGs of the kept frames ``ids`` to the open file ``f``, back to back."""
        for i in ids.tolist():
            if self._thumbnail_sizes[i]:
                f.write(self._read_thumbnail(i))

    @classmethod
    def load(cls, directory, config: BankConfig | None = None, keep=None) -> FeatureBank:
        """Load a bank written by ``save``; ``config`` None takes the saved one. A given config
        must agree with the saved grid, dtype, index and metric; the rest (RAM, spill folder,
        disk cap, device, index_params, train_size) may differ. Ids continue at the saved
        ``n``; ``keep`` as in the constructor."""
        folder = Path(directory)
        meta, saved = _read_meta(folder / "bank.json")
        config = saved if config is None else config
        for name in ("grid", "dtype", "index", "metric"):
            if getattr(config, name, None) != getattr(saved, name):
                raise MemoryStateError(f"{folder / 'bank.json'}: saved with {name} {getattr(saved, name)!r}, "
                                       f"the given config has {getattr(config, name, None)!r}")
        n, dim = meta["n"], meta["dim"]
        times = read_array(folder / "times.npy", np.float64, (n,))
        if np.any(np.diff(times) < 0):
            raise MemoryStateError(f"{folder / 'times.npy'}: times decrease")
        kept = (np.arange(n) if meta["version"] == 1  # version 1 kept every frame
                else read_array(folder / "kept.npy", np.int64, (meta["kept"],)))
        if len(kept) and (kept[0] < 0 or kept[-1] >= n or np.any(np.diff(kept) <= 0)):
            raise MemoryStateError(f"{folder / 'kept.npy'}: ids must be in [0, {n}) and increase")
        pending = read_array(folder / "pending.npy", np.float32, (meta["pending"], dim))
        bank = cls(dim, config, keep)
        try:
            if bank.disk_frames is not None and len(kept) > bank.disk_frames:
                raise MemoryStateError(f"{folder}: holds {len(kept)} frames; BankConfig.disk_gb "
                                       f"{bank.config.disk_gb} holds {bank.disk_frames}: load it with a larger cap")
            bank._keys.restore(folder / "index.faiss", pending, meta["trained"], n if meta["trained"] else 0)
            bank._restore(folder / "features.bin", times, kept)
            bank._restore_thumbnails(folder, kept)
        except BaseException:
            bank.close()
            raise
        return bank

    def _restore(self, path: Path, times: np.ndarray, kept: np.ndarray) -> None:
        """Stream ``path`` (the ``kept`` frames' rows, checked) into slots 0, 1, ... of this
        bank's spill file and its ring; take ``times``."""
        n, k, per_chunk = len(times), len(kept), self._frames_per_chunk
        first_in_ram = n - min(n, self._capacity)
        try:
            size = os.stat(path).st_size
            if size != k * self.bytes_per_frame:
                raise MemoryStateError(f"{path}: {size} bytes, expected {k * self.bytes_per_frame} "
                                       f"({k} frames of {self.bytes_per_frame} bytes)")
            with open(path, "rb") as f:
                for start in range(0, k, per_chunk):
                    count = min(per_chunk, k - start)
                    data = f.read(count * self.bytes_per_frame)
                    if len(data) != count * self.bytes_per_frame:
                        raise MemoryStateError(f"{path}: ends inside frames {start}..{start + count - 1}")
                    rows = np.frombuffer(data, self._dtype).reshape(count, self.tokens, self.dim)
                    if not all_finite(rows):
                        raise MemoryStateError(f"{path}: non-finite values in frames {start}..{start + count - 1}")
                    self._write_spill(rows, start)
                    ids = kept[start : start + count]
                    in_ram = ids >= first_in_ram
                    self._ring[ids[in_ram] % self._capacity] = rows[in_ram]
        except OSError as exc:
            raise MemoryStateError(f"{path}: cannot be read ({exc})") from None
        self._n, self._used = 0, k
        self._grow(n)
        self._times[:n] = times
        self._slots[:n] = -1
        self._slots[kept] = np.arange(k)
        self._n = n

    def _restore_thumbnails(self, folder: Path, kept: np.ndarray) -> None:
        """Take thumbnails.npy and stream thumbnails.bin into the ``kept`` frames' slots of
        this bank's thumbnail spill and its ring."""
        index_path, data_path = folder / "thumbnails.npy", folder / "thumbnails.bin"
        if not (index_path.exists() or data_path.exists()):  # saved before thumbnails existed
            return
        ends = read_array(index_path, np.int64, kept.shape)
        sizes = np.diff(ends, prepend=0)
        if len(sizes) and (sizes.min() < 0 or sizes.max() > self.thumbnail_slot_bytes):
            raise MemoryStateError(f"{index_path}: thumbnail ends must not decrease, each thumbnail within "
                                   f"{self.thumbnail_slot_bytes} bytes")
        size = int(ends[-1]) if len(ends) else 0
        try:
            if os.stat(data_path).st_size != size:
                raise MemoryStateError(f"{data_path}: {os.stat(data_path).st_size} bytes, thumbnails.npy says {size}")
            with open(data_path, "rb") as f:
                for slot, length in enumerate(sizes.tolist()):
                    _pwrite_all(self._thumbnail_fd, f.read(length), slot * self.thumbnail_slot_bytes)
        except OSError as exc:
            raise MemoryStateError(f"{data_path}: cannot be read ({exc})") from None
        self._thumbnail_sizes[kept] = sizes
        n = self._n
        first = max(0, n - len(self._thumbnail_ring))
        self._ring_thumbnails([self._read_thumbnail(i) if self._slots[i] >= 0 else b"" for i in range(first, n)], first)

    def close(self) -> None:
        """Delete the spill file (and the temporary folder made for it) and free the RAM ring
        and the index. Idempotent; also done when the bank is garbage-collected."""
        with self._lock:
            self._closed = True
            self._finalizer()
            self._ring, self._keys = self._ring[:0], None
            self._thumbnail_ring = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"FeatureBank(n={self._n}, dim={self.dim}, grid={self.config.grid}, dtype={self.config.dtype}, "
                f"ram_frames={self._capacity}, index={self.config.index!r}, closed={self._closed})")


def _pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` (bytes-like) at ``offset`` of ``fd``."""
    data, done = memoryview(data), 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _pread_all(fd: int, size: int, offset: int, path: Path) -> bytes:
    """``size`` bytes at ``offset`` of the spill file ``fd`` (at ``path``)."""
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise MemoryStateError(f"spill file {path} ends before byte {offset + size}: was it truncated?")
    return data


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """``(first, count)`` of each run of consecutive integers in ``values``, in order."""
    if not len(values):
        return []
    breaks = np.flatnonzero(np.diff(values) != 1) + 1
    starts = np.concatenate([[0], breaks])
    counts = np.diff(np.concatenate([starts, [len(values)]]))
    return list(zip(values[starts].tolist(), counts.tolist()))


def _read_meta(path: Path) -> tuple[dict, BankConfig]:
    """bank.json, checked field by field, and the config saved in it."""
    try:
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise MemoryStateError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(meta, dict):
        raise MemoryStateError(f"{path}: must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") == FORMAT and meta.get("version") == 1 and isinstance(meta.get("n"), int):
        meta.setdefault("kept", meta["n"])  # version 1 kept every frame
    for key, kind in _META_FIELDS.items():
        if key not in meta:
            raise MemoryStateError(f"{path}: missing field {key!r}")
        if not isinstance(meta[key], kind) or (kind is int and isinstance(meta[key], bool)):
            raise MemoryStateError(f"{path}: field {key!r} must be {kind.__name__}, got {meta[key]!r}")
    if (meta["format"], meta["version"]) not in ((FORMAT, 1), (FORMAT, VERSION)):
        raise MemoryStateError(f"{path}: format {meta['format']!r} version {meta['version']}; "
                               f"this vstream reads {FORMAT!r} versions 1 and {VERSION}")
    if (meta["n"] < 0 or not 0 <= meta["kept"] <= meta["n"] or meta["dim"] < 1
            or meta["pending"] != (0 if meta["trained"] else meta["n"])):
        raise MemoryStateError(f"{path}: inconsistent n={meta['n']}, dim={meta['dim']}, "
                               f"trained={meta['trained']}, pending={meta['pending']}")
    try:
        saved = BankConfig.from_dict(meta["config"])
    except (ConfigError, TypeError) as exc:
        raise MemoryStateError(f"{path}: bad config ({exc})") from None
    if (saved.grid, saved.dtype) != (meta["grid"], meta["dtype"]):
        raise MemoryStateError(f"{path}: grid/dtype {meta['grid']}/{meta['dtype']} disagree with its "
                               f"config's {saved.grid}/{saved.dtype}")
    return meta, saved


_EXPONENT_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000),
                  np.dtype(np.float64): (np.uint64, 0x7FF0000000000000)}


def all_finite(values: np.ndarray | torch.Tensor) -> bool:
    """Whether every value is finite. A float16/32/64 array (or CPU tensor) is tested by its
    exponent bits (all ones: inf or NaN), an integer test 10-20 times faster than
    ``isfinite`` on the CPU; other tensors go through ``torch.isfinite`` where they are."""
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu" or values.dtype not in (torch.float16, torch.float32, torch.float64):
            return bool(torch.isfinite(values).all())
        values = values.detach().numpy()
    bits, exponent = _EXPONENT_BITS[values.dtype]
    return not ((np.ascontiguousarray(values).view(bits) & exponent) == exponent).any()


def read_array(path: Path, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """A finite ``dtype`` array of exactly ``shape`` from a .npy file, never unpickled."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise MemoryStateError(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != shape:
        raise MemoryStateError(f"{path}: expected {np.dtype(dtype).name} {list(shape)}, got "
                               f"{getattr(array, 'dtype', type(array).__name__)} {getattr(array, 'shape', '')}")
    if not np.isfinite(array).all():
        raise MemoryStateError(f"{path}: holds non-finite values")
    return array
