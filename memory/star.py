"""``StarMemory``: the STAR memory of Flash-VStream (spatial, temporal, abstract,
retrieved), bounded and O(1) per frame.

Per frame (``[P, D]`` patch features pooled to ``base_grid`` first):

- spatial: the newest ``spatial_length`` frames at ``spatial_grid``;
- temporal: ``temporal_length`` weighted centroids of all frames at ``temporal_grid``.
  Once full, each new frame makes 26 weighted points for 25 clusters. The optimal
  weighted k-means of N points into N−1 clusters joins the one pair whose join costs
  least, and joining clusters a and b raises the within-cluster sum of squares by
  Ward's cost ``w_a·w_b/(w_a+w_b)·‖c_a−c_b‖²``. So the update joins the cheapest pair
  (the new frame with a centroid, or two centroids, the frame then taking the freed
  slot): exact, deterministic, and O(K·d) with a kept matrix of pair costs. Weights
  (frames per centroid) carry over, and every centroid knows its time span;
- abstract: ``abstract_length`` slots at ``abstract_grid``, filled by the first frames,
  then updated by ``SemanticAttention`` once per ``abstract_chunk`` buffered frames;
- retrieved: for the ``retrieved_length`` heaviest centroids, each one's representative
  frame, read from the bank at ``retrieved_grid``. A centroid's representative is its
  member frame nearest to it, kept up to date as it changes: when a frame joins, the
  nearer of the frame and the old representative (to the moved centroid) stays; when
  two centroids join, the nearer of their two. So a read costs the same at frame 100
  and frame 100,000 (no index search over the bank), and the frame shown for a
  cluster is always one of its own.

``tokens()`` reads out abstract, temporal (by mean member time), retrieved (by time),
spatial (oldest first): 681 tokens with the defaults.
"""

from __future__ import annotations

import numpy as np
import torch

from vstream.errors import MemoryStateError
from vstream.kernels import temporal_merge, update_pair_costs
from vstream.memory.abstract import SemanticAttention
from vstream.memory.base import StreamMemory, register_memory
from vstream.memory.config import StarConfig
from vstream.memory.timeline import Timeline, scene_groups
from vstream.memory.tokens import TokenList


@register_memory("star")
class StarMemory(StreamMemory):
    """The STAR memory. ``StarMemory(StarConfig())`` is the Flash-VStream-7b layout.

    Args:
        config: sizes and settings (``StarConfig``).
        attention: the abstract memory's q/k projections, e.g. loaded from a
            checkpoint; ``None`` makes the seeded similarity projection once the
            feature width is known.
    """

    config_class = StarConfig

    def __init__(self, config: StarConfig | None = None, attention: SemanticAttention | None = None):
        super().__init__(config)
        self.attention = attention
        # set to a list to keep every frame's abstract input, in order ([T, g*g, D] a batch,
        # on the CPU): what rebuilds the abstract memory with other weights (vstream extract)
        self.abstract_inputs: list[torch.Tensor] | None = None

    def _grids(self) -> dict[str, int]:
        c = self.config
        return {"spatial": c.spatial_grid, "temporal": c.temporal_grid, "abstract": c.abstract_grid}

    def _start(self, dim: int) -> None:
        c, device = self.config, self.device
        f32 = {"dtype": torch.float32, "device": device}
        f64 = {"dtype": torch.float64, "device": device}
        # Features and what the kernels read live on the device; times and bank ids are
        # bookkeeping, kept on the host (numpy) where the per-frame decisions are applied.
        self.spatial = torch.zeros(c.spatial_length, c.spatial_grid**2, dim, **f32)
        self.spatial_times = np.zeros(c.spatial_length)
        self.spatial_count = 0
        k = c.temporal_length
        self.centroids = torch.zeros(k, c.temporal_grid**2 * dim, **f32)  # flattened [K, g*g*D]
        self.weights = torch.zeros(k, **f64)        # frames per centroid
        self.time_start = np.zeros(k)               # seconds
        self.time_end = np.zeros(k)
        self.time_sum = np.zeros(k)                 # sum of member times, for the mean
        self.pair_costs = torch.full((k, k), torch.inf, **f64)  # Ward cost of joining i and j
        self.centroid_count = 0
        self.representatives = np.zeros(k, np.int64)  # bank id of each one's nearest member
        self.representative_features = torch.zeros(k, c.temporal_grid**2 * dim, **f32)  # its features, flattened
        self.runs = Timeline(k, c.timeline_runs, c.temporal_grid**2 * dim, c.cut_ratio, c.cut_floor,
                             device)  # when each centroid's frames were on screen
        self.slots = torch.zeros(c.abstract_length, c.abstract_grid**2, dim, **f32)
        self.slot_start = np.zeros(c.abstract_length)
        self.slot_end = np.zeros(c.abstract_length)
        self.slot_count = 0
        self.pending = torch.zeros(c.abstract_chunk, c.abstract_grid**2, dim, **f32)
        self.pending_times = np.zeros(c.abstract_chunk)
        self.pending_count = 0
        if self.attention is None:
            self.attention = SemanticAttention(dim, c.abstract_hidden, c.seed)
        elif (self.attention.dim, self.attention.hidden) != (dim, c.abstract_hidden):
            raise MemoryStateError(f"the attention module maps {self.attention.dim} -> {self.attention.hidden}; "
                                   f"this memory needs {dim} -> {c.abstract_hidden}")
        self.attention.to(device)

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = ("spatial", "spatial_times", "centroids", "weights", "time_start", "time_end", "time_sum",
                 "pair_costs", "representatives", "representative_features", "slots", "slot_start", "slot_end",
                 "pending", "pending_times")
        tensors = {name: _tensor(getattr(self, name)) for name in names}
        tensors.update({f"attention.{k}": v for k, v in self.attention.state_dict().items()})
        tensors.update(self.runs.tensors())
        return tensors

    def _counters(self) -> dict[str, int]:
        c = self.config
        return {"spatial_count": c.spatial_length, "centroid_count": c.temporal_length,
                "slot_count": c.abstract_length, "pending_count": c.abstract_chunk - 1}

    def _pinned_frames(self, times: np.ndarray) -> list[int]:
        """The frames thinning must keep: each centroid's representative (the retrieved
        memory reads them) and the first frame of each run on the timeline (so every
        appearance of every scene keeps a frame to show)."""
        n = self.centroid_count
        runs = self.runs.runs[:n]
        held = np.arange(runs.shape[1])[None, :] < self.runs.run_count[:n, None]
        starts = np.searchsorted(times, runs[..., 0][held])
        return self.representatives[:n].tolist() + np.minimum(starts, len(times) - 1).tolist()

    # -- update ---------------------------------------------------------------------------

    def _add_frames(self, parts: dict[str, torch.Tensor], times: list[float]) -> None:
        c, first = self.config, self.frames_seen
        # the temporal update's tensor work is queued first: on a GPU its kernel runs while
        # the other memories' copies are queued, and its decisions are read back last
        queued = self._queue_temporal(parts["temporal"].reshape(len(times), -1)) if c.temporal_length else None
        if c.spatial_length:
            self._add_spatial(parts["spatial"], times)
        if c.abstract_length:
            self._add_abstract(parts["abstract"], times)
        if queued is not None:
            self._apply_temporal(*queued, times, first)
        self.frames_seen += len(times)
        self.last_t = times[-1]

    def _add_spatial(self, frames: torch.Tensor, times: list[float]) -> None:
        """The newest ``spatial_length`` of the batch ``frames`` ``[T, g*g, D]`` join the
        window, the oldest ones shifting out."""
        length = self.config.spatial_length
        new = min(len(times), length)
        drop = max(self.spatial_count + new - length, 0)
        kept = self.spatial_count - drop
        if drop:
            self.spatial[:kept] = self.spatial[drop : self.spatial_count].clone()
            self.spatial_times[:kept] = self.spatial_times[drop : self.spatial_count].copy()
        self.spatial[kept : kept + new] = frames[-new:]
        self.spatial_times[kept : kept + new] = times[-new:]
        self.spatial_count = kept + new

    def _queue_temporal(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """The tensor work of the batch ``frames`` ``[T, g*g*D]`` in the temporal memory, on
        its device, nothing read back: the frames placed alone while it has free slots, then
        ``temporal_merge`` for the rest. Returns what ``_apply_temporal`` reads: the
        timeline's Gram matrix, the merge's decisions (None if every frame was placed) and
        how many frames were placed."""
        filling = min(self.config.temporal_length - self.centroid_count, len(frames))
        gram = self.runs.gram(frames)
        for i in range(filling):
            slot = self.centroid_count + i
            self.centroids[slot] = self.representative_features[slot] = frames[i]
            self.weights[slot] = 1.0
            update_pair_costs(self.centroids, self.weights, self.pair_costs, slot, slot + 1)
        merged = frames[filling:]
        decisions = (temporal_merge(self.centroids, self.weights, self.pair_costs, self.representative_features,
                                    merged.contiguous()) if len(merged) else None)
        return gram, decisions, filling

    def _apply_temporal(self, gram: torch.Tensor, decisions: torch.Tensor | None, filling: int,
                        times: list[float], first: int) -> None:
        """Read back what ``_queue_temporal`` queued (one wait for the device) and follow it
        on the host, frame by frame (the bank's frames ``first`` on): the timeline's cuts
        and runs, the clusters' times and their representatives' bank ids."""
        decisions = [] if decisions is None else decisions.tolist()
        for i, (change, t) in enumerate(zip(self.runs.changes(gram.tolist()), times)):
            self.runs.observe(*change)
            if i < filling:
                self._place(self.centroid_count, t, first + i)
                self.centroid_count += 1
                continue
            slot, freed, replaced = decisions[i - filling]
            if freed < 0:  # the frame joined slot
                self.time_start[slot] = min(self.time_start[slot], t)
                self.time_end[slot] = max(self.time_end[slot], t)
                self.time_sum[slot] += t
                self.runs.extend(slot, t)
                if replaced:
                    self.representatives[slot] = first + i
            else:  # freed joined slot, the frame took freed's place
                self.time_start[slot] = min(self.time_start[slot], self.time_start[freed])
                self.time_end[slot] = max(self.time_end[slot], self.time_end[freed])
                self.time_sum[slot] += self.time_sum[freed]
                self.runs.join(slot, freed)
                if replaced:
                    self.representatives[slot] = self.representatives[freed]
                self._place(freed, t, first + i)

    def _place(self, slot: int, t: float, frame: int) -> None:
        """Slot ``slot`` now holds the bank's frame ``frame``, at ``t`` seconds, alone: its
        times, representative and runs (its features are already there)."""
        self.time_start[slot] = self.time_end[slot] = self.time_sum[slot] = t
        self.representatives[slot] = frame
        self.runs.place(slot, t)

    def _add_abstract(self, tokens: torch.Tensor, times: list[float]) -> None:
        """The batch ``tokens`` ``[T, g*g, D]`` into the abstract memory: the first frames
        fill its slots; later ones gather in chunks of ``abstract_chunk``, each full chunk
        updating the slots by semantic attention. Copies go a run of frames at a time."""
        c, done = self.config, 0
        if self.abstract_inputs is not None:
            self.abstract_inputs.append(tokens.cpu())
        while done < len(times):
            if self.slot_count < c.abstract_length:
                count = min(c.abstract_length - self.slot_count, len(times) - done)
                placed = slice(self.slot_count, self.slot_count + count)
                self.slots[placed] = tokens[done : done + count]
                self.slot_start[placed] = self.slot_end[placed] = times[done : done + count]
                self.slot_count += count
            else:
                count = min(c.abstract_chunk - self.pending_count, len(times) - done)
                placed = slice(self.pending_count, self.pending_count + count)
                self.pending[placed] = tokens[done : done + count]
                self.pending_times[placed] = times[done : done + count]
                self.pending_count += count
                if self.pending_count == c.abstract_chunk:
                    updated = self.attention(self.slots.reshape(-1, self.dim), self.pending.reshape(-1, self.dim),
                                             c.abstract_alpha)
                    self.slots.copy_(updated.reshape(self.slots.shape))
                    self.slot_end.fill(times[done + count - 1])
                    self.pending_count = 0
            done += count

    # -- read -----------------------------------------------------------------------------

    def _scene_groups(self) -> list[list[int]]:
        """The temporal clusters grouped into scenes (``scene_groups`` at the present cut
        bar), from the kept Ward costs: ``‖c_a−c_b‖² = cost·(w_a+w_b)/(w_a·w_b)``, so no
        distance over the features is computed at read time."""
        n = self.centroid_count
        weights = self.weights[:n]
        distances = self.pair_costs[:n, :n] * (weights[:, None] + weights[None, :]) / (weights[:, None] * weights[None, :])
        norms = self.centroids[:n].double().square().sum(dim=1)
        return scene_groups(distances, norms, self.runs.bar())

    def _scenes(self):
        """Clusters grouped into scenes (``_scene_groups``), each with its members' runs merged."""
        scenes = []
        for members in self._scene_groups():
            runs, appearances = self.runs.merged(members)
            scenes.append((members, tuple((start, end) for start, end, _, _ in runs), appearances))
        return scenes

    def token_count(self) -> int:
        """How many tokens ``tokens()`` gives now, counted without building them."""
        c = self.config
        with self._lock:
            if self.dim is None:
                return 0
            return (self.slot_count * c.abstract_grid**2 + self.centroid_count * c.temporal_grid**2
                    + min(c.retrieved_length, self.centroid_count) * c.retrieved_grid**2
                    + self.spatial_count * c.spatial_grid**2)

    def _tokens(self, out: TokenList) -> None:
        c = self.config
        n = self.slot_count
        out.add("abstract", self.slots[:n], _spans(self.slot_start[:n], self.slot_end[:n]))
        n = self.centroid_count
        clusters = (self.centroids[:n], self.weights[:n].cpu(), *(torch.from_numpy(times[:n]) for times in
                                                                   (self.time_start, self.time_end, self.time_sum)))
        self._read_clusters(out, ("temporal", "retrieved"), clusters, c.temporal_grid, c.retrieved_length,
                            c.retrieved_grid, representatives=self.representatives[:n],
                            scenes=self._scene_groups() if n else None)
        n = self.spatial_count
        out.add("spatial", self.spatial[:n], _spans(self.spatial_times[:n], self.spatial_times[:n]))


def _tensor(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A state array as a tensor sharing its memory (saved, and restored in place)."""
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _spans(start, end) -> list[tuple[float, float]]:
    """``[(start[i], end[i])]`` from two sequences (tensors or arrays) of seconds."""
    return list(zip(start.tolist(), end.tolist()))
