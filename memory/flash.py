"""``FlashMemory``: the 2025 Flash-VStream memory, behind the same interface as STAR.

- context synopsis memory: up to ``synopsis_length`` weighted k-means centroids of all
  frames at ``synopsis_grid`` (half the base resolution by default), read out in the
  order of the mean time of their members. Every ``synopsis_chunk`` frames, the
  centroids (weighted by the frames they stand for) and the buffered frames are
  clustered together; a read between two re-clusterings clusters a copy, so the
  newest frames are always in the memory and the state does not depend on when it is
  read. Clustering runs in a ``cluster_dim``-wide seeded random projection of the
  features (Flash-VStream uses a PCA to 32 dims, which needs the data up front); the
  centroids themselves are weighted means of the full features.
- detail memory: for the ``detail_length`` heaviest clusters, the bank frame nearest to
  each centroid at ``detail_grid``, read out by time.
"""

from __future__ import annotations

import math

import torch

from vstream.memory.base import StreamMemory, register_memory
from vstream.memory.clustering import weighted_kmeans
from vstream.memory.config import FlashConfig
from vstream.memory.tokens import TokenList


@register_memory("flash")
class FlashMemory(StreamMemory):
    """The 2025 Flash-VStream memory (context synopsis + detail); see the module docstring."""

    config_class = FlashConfig

    def _grids(self) -> dict[str, int]:
        return {"synopsis": self.config.synopsis_grid}

    def _start(self, dim: int) -> None:
        c, device = self.config, self.device
        width = c.synopsis_grid**2 * dim
        f64 = {"dtype": torch.float64, "device": device}
        self.centroids = torch.zeros(c.synopsis_length, width, device=device)  # flattened [K, g*g*D]
        self.weights = torch.zeros(c.synopsis_length, **f64)     # frames per centroid
        self.time_start = torch.zeros(c.synopsis_length, **f64)  # seconds
        self.time_end = torch.zeros(c.synopsis_length, **f64)
        self.time_sum = torch.zeros(c.synopsis_length, **f64)
        self.centroid_count = 0
        self.pending = torch.zeros(c.synopsis_chunk, width, device=device)
        self.pending_times = torch.zeros(c.synopsis_chunk, **f64)
        self.pending_count = 0
        generator = torch.Generator().manual_seed(c.seed)
        size = min(width, c.cluster_dim)
        basis, _ = torch.linalg.qr(torch.randn(width, size, generator=generator))
        self.projection = basis.to(device)  # [g*g*D, cluster_dim], orthonormal columns

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = ("centroids", "weights", "time_start", "time_end", "time_sum", "pending", "pending_times")
        return {name: getattr(self, name) for name in names}

    def _counters(self) -> dict[str, int]:
        return {"centroid_count": self.config.synopsis_length, "pending_count": self.config.synopsis_chunk - 1}

    def _add_frame(self, parts: dict[str, torch.Tensor], t: float) -> None:
        self.pending[self.pending_count] = parts["synopsis"].reshape(-1)
        self.pending_times[self.pending_count] = t
        self.pending_count += 1
        if self.pending_count == self.config.synopsis_chunk:
            state = self._clustered()
            n = state[0].shape[0]
            for name, value in zip(("centroids", "weights", "time_start", "time_end", "time_sum"), state):
                getattr(self, name)[:n] = value
            self.centroid_count = n
            self.pending_count = 0

    def _clustered(self):
        """Centroids, weights, time start, end and sum of the centroids joined with the
        pending frames, re-clustered when together they exceed ``synopsis_length``."""
        k, p = self.centroid_count, self.pending_count
        points = torch.cat([self.centroids[:k], self.pending[:p]])
        ones = torch.ones(p, dtype=torch.float64, device=self.device)
        weights = torch.cat([self.weights[:k], ones])
        start = torch.cat([self.time_start[:k], self.pending_times[:p]])
        end = torch.cat([self.time_end[:k], self.pending_times[:p]])
        total = torch.cat([self.time_sum[:k], self.pending_times[:p]])
        c = self.config
        assign = weighted_kmeans(points @ self.projection, weights.float(), c.synopsis_length, c.kmeans_iters, c.seed)
        kept, assign = torch.unique(assign, return_inverse=True)  # drop clusters left empty
        n = kept.shape[0]
        mass = torch.zeros(n, dtype=torch.float64, device=self.device).index_add_(0, assign, weights)
        sums = torch.zeros(n, points.shape[1], device=self.device).index_add_(0, assign, points * weights.float()[:, None])
        new_start = torch.full((n,), math.inf, dtype=torch.float64, device=self.device).scatter_reduce_(
            0, assign, start, "amin")
        new_end = torch.full((n,), -math.inf, dtype=torch.float64, device=self.device).scatter_reduce_(
            0, assign, end, "amax")
        new_total = torch.zeros(n, dtype=torch.float64, device=self.device).index_add_(0, assign, total)
        return sums / mass.float()[:, None], mass, new_start, new_end, new_total

    def _tokens(self, out: TokenList) -> None:
        c, n = self.config, self.centroid_count
        clusters = self._clustered() if self.pending_count else (
            self.centroids[:n], self.weights[:n], self.time_start[:n], self.time_end[:n], self.time_sum[:n])
        self._read_clusters(out, ("synopsis", "detail"), clusters, c.synopsis_grid, c.detail_length, c.detail_grid)
