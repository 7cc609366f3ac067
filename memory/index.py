"""``KeyIndex``: a FAISS index named by one factory string, exact until it is trained.

The feature bank (one key per frame) and the transcript memory (one key per segment)
both search their keys through it. Keys are numbered by insertion from 0 (after a
``reset``, from 0 again), and a search returns those numbers.

An index that needs training (``"IVF64,Flat"``, ``"PQ16"``, ``"SQ8"``) cannot search
before it has seen data, so until ``train_size`` keys have arrived it holds them in a
pending buffer and searches them exactly; then it trains on them and takes them all.
``params`` is a FAISS parameter string (``"nprobe=8"``). On ``device`` ``"cuda"`` the
index runs through faiss-gpu (``"auto"``: when faiss-gpu sees a GPU and torch does too);
an index that cannot move to the GPU stays on the CPU under ``"auto"``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import faiss
import numpy as np
import torch

from vstream.errors import ConfigError, MemoryStateError

logger = logging.getLogger(__name__)

METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}


def faiss_message(exc: Exception) -> str:
    """FAISS's message without its ``Error in <signature> at <file>:<line>:`` prefix."""
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", str(exc)).strip()


class KeyIndex:
    """Keys ``[n, dim]`` float32 searched by the FAISS index ``factory`` (see the module
    docstring). ``owner`` names the config in messages (``"BankConfig"``)."""

    def __init__(self, dim: int, factory: str, metric: str = "l2", params: str = "", train_size: int = 1024,
                 device: str = "cpu", owner: str = "index"):
        self.dim, self.factory, self.metric, self.params = dim, factory, metric, params
        self.train_size, self.device, self.owner = train_size, device, owner
        gpu_faiss = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if device == "cuda" and not gpu_faiss:
            raise ConfigError(f"{owner}.device is 'cuda' but this faiss build has no GPU support or sees no GPU; "
                              "install faiss-gpu or use device 'cpu'")
        self._gpu = device == "cuda" or (device == "auto" and gpu_faiss and torch.cuda.is_available())
        self._gpu_res = None
        self._install(self._new(), np.empty((0, dim), np.float32))

    def _new(self):
        try:
            return faiss.index_factory(self.dim, self.factory, METRICS[self.metric])
        except RuntimeError as exc:
            raise ConfigError(f"{self.owner}.index {self.factory!r} is not a FAISS factory string for width "
                              f"{self.dim}: {faiss_message(exc)}") from None

    def _install(self, index, pending: np.ndarray) -> None:
        """Use the CPU ``index`` (moved to the GPU when chosen, ``params`` applied) and,
        while it is untrained, the keys ``pending`` ``[n, dim]`` so far."""
        if self._gpu:
            self._gpu_res = self._gpu_res or faiss.StandardGpuResources()
            try:
                index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
            except RuntimeError as exc:
                if self.device == "cuda":
                    raise ConfigError(f"{self.owner}.index {self.factory!r} cannot run on the GPU: "
                                      f"{faiss_message(exc)}") from None
                logger.warning("index %r stays on the CPU: %s", self.factory, faiss_message(exc))
                self._gpu = False
        if self.params:
            space = faiss.GpuParameterSpace() if self._gpu else faiss.ParameterSpace()
            try:
                space.set_index_parameters(index, self.params)
            except RuntimeError as exc:
                raise ConfigError(f"{self.owner}.index_params {self.params!r} do not apply to index "
                                  f"{self.factory!r}: {faiss_message(exc)}") from None
        self._index, self._pending, self._count = index, None, len(pending)
        if not index.is_trained:
            self._pending = np.empty((max(self.train_size, len(pending)), self.dim), np.float32)
            self._pending[: len(pending)] = pending

    @property
    def on_gpu(self) -> bool:
        return self._gpu

    @property
    def trained(self) -> bool:
        return self._pending is None

    def __len__(self) -> int:
        """Keys held, pending ones included."""
        return self._index.ntotal if self.trained else self._count

    @property
    def pending(self) -> np.ndarray:
        """The keys waiting for training, ``[n, dim]`` (empty once trained)."""
        return np.empty((0, self.dim), np.float32) if self.trained else self._pending[: self._count]

    def add(self, keys: np.ndarray) -> None:
        """Add ``keys`` ``[b, dim]`` float32, training the index once ``train_size`` have
        arrived (nothing changes if training fails)."""
        if self.trained:
            self._index.add(keys)
            return
        n = self._count
        if n + len(keys) < self.train_size:
            self._pending[n : n + len(keys)] = keys
            self._count += len(keys)
            return
        sample = np.concatenate([self._pending[:n], keys])
        try:
            self._index.train(sample)
        except RuntimeError as exc:
            raise ConfigError(f"training index {self.factory!r} on {len(sample)} keys failed (raise "
                              f"{self.owner}.train_size, now {self.train_size}): {faiss_message(exc)}") from None
        self._index.add(sample)
        self._pending, self._count = None, 0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)``, each ``[len(queries), k]``, best first: squared L2 distances
        (ascending) or inner products (descending); an approximate index that finds fewer
        pads with id -1. ``k`` must not exceed ``len(self)``."""
        if self.trained:
            return self._index.search(queries, k)
        return faiss.knn(queries, self._pending[: self._count], k, metric=METRICS[self.metric])

    def reset(self) -> None:
        """Drop every key (a trained index stays trained)."""
        if self.trained:
            self._index.reset()
        else:
            self._count = 0

    def nbytes(self) -> int:
        """Bytes of the index's codes and the pending buffer."""
        code_size = getattr(self._index, "code_size", 0) or 4 * self.dim
        pending = 0 if self._pending is None else self._pending.nbytes
        return pending + self._index.ntotal * code_size

    def write(self, f) -> None:
        """Write the index (a CPU copy) to the binary file object ``f``; the pending keys
        are the caller's to save (``pending``)."""
        index = faiss.index_gpu_to_cpu(self._index) if self._gpu else self._index
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))

    def restore(self, path: Path, pending: np.ndarray, trained: bool, ntotal: int) -> None:
        """Replace the index with the one ``write`` saved in ``path`` and its ``pending``
        keys, checked against this one (width, metric, kind) and against what its saver
        recorded: ``trained``, and ``ntotal`` keys in the index (0 while untrained)."""
        try:
            index = faiss.read_index(str(path))
        except (RuntimeError, MemoryError, ValueError) as exc:
            raise MemoryStateError(f"{path}: not a readable FAISS index ({faiss_message(exc)})") from None
        kind = type(self._new())
        expected = (self.dim, METRICS[self.metric], kind.__name__, trained, ntotal)
        found = (index.d, index.metric_type, type(index).__name__, bool(index.is_trained), index.ntotal)
        if found[:2] + found[3:] != expected[:2] + expected[3:] or not isinstance(index, kind):
            raise MemoryStateError(f"{path}: index has (width, metric, kind, trained, size) = {found}; "
                                   f"expected {expected}")
        if trained and len(pending):
            raise MemoryStateError(f"{path}: a trained index, yet {len(pending)} keys are saved as pending")
        self._install(index, pending)
