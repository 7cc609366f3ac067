"""What every memory policy shares: input checks, pooling, the feature bank, retrieval
of the bank frame nearest to a centroid, save/load, and the registry of policies.

A policy subclasses ``StreamMemory`` and fills in five hooks:

- ``_start(dim)``: allocate its state at full size once the feature width is known;
- ``_add_frame(parts, t)``: take one frame, already pooled to the grids it asked for
  (or ``_add_frames(parts, times)``: take a whole batch, for a policy that batches its
  update);
- ``_tokens(out)``: read its memories out into a ``TokenList``;
- ``_tensors()``: its state tensors by name (saved, and restored in place);
- ``_counters()``: its integer counters with their upper bounds (saved and checked).
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vstream.errors import ConfigError, MemoryStateError
from vstream.kernels import nearest, pool_grid
from vstream.memory.bank import FeatureBank, all_finite
from vstream.memory.persist import open_snapshot, save_snapshot
from vstream.memory.timeline import SceneRuns
from vstream.memory.tokens import FrameHit, MemoryTokens, TokenList

_REGISTRY: dict[str, type[StreamMemory]] = {}


def register_memory(name: str):
    """Class decorator: make a policy creatable by ``create_memory(name)``."""

    def register(cls):
        cls.policy = name
        _REGISTRY[name] = cls
        return cls

    return register


def list_memories() -> list[str]:
    """Names of the registered memory policies."""
    return sorted(_REGISTRY)


def _policy(name: str) -> type[StreamMemory]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown memory policy {name!r}; known: {', '.join(list_memories())}")
    return _REGISTRY[name]


def create_memory(name: str = "star", config=None, **fields) -> StreamMemory:
    """A new memory of policy ``name`` (``"star"`` or ``"flash"``), configured by a
    config object or by the config's fields as keywords."""
    cls = _policy(name)
    if config is None:
        config = cls.config_class(**fields)
    elif fields:
        raise ConfigError("create_memory: pass a config or config fields, not both")
    return cls(config)


def load_memory(path) -> StreamMemory:
    """Load a saved memory of whichever policy wrote it."""
    _, description = open_snapshot(path)
    return _policy(description.get("policy")).load(path)


class StreamMemory:
    """A bounded memory of a stream of frame features. Thread-safe: ``add``, ``extend``,
    ``tokens`` and ``save`` hold one lock, so a reader sees a consistent state."""

    policy = ""
    config_class: type = object

    def __init__(self, config=None):
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise ConfigError(f"{type(self).__name__} takes a {self.config_class.__name__}, "
                              f"got {type(self.config).__name__}")
        self.dim: int | None = None
        self.device = torch.device("cpu")
        self.bank: FeatureBank | None = None
        self.frames_seen = 0
        self.last_t = -math.inf
        self._lock = threading.RLock()
        self._cached: tuple[int, MemoryTokens] | None = None
        self._retrieved: dict[int, torch.Tensor] = {}  # bank id -> the frame the previous read retrieved, pooled

    # -- policy hooks -----------------------------------------------------------------

    def _grids(self) -> dict[str, int]:
        """The grids each frame is pooled to, by name (besides the bank's)."""
        raise NotImplementedError

    def _start(self, dim: int) -> None:
        raise NotImplementedError

    def _add_frame(self, parts: dict[str, torch.Tensor], t: float) -> None:
        raise NotImplementedError

    def _add_frames(self, parts: dict[str, torch.Tensor], times: list[float]) -> None:
        """Take a batch (each part ``[T, ...]``, the bank's frames ``frames_seen`` on),
        advancing ``frames_seen`` and ``last_t``: by default one ``_add_frame`` at a time."""
        for i, t in enumerate(times):
            self._add_frame({name: part[i] for name, part in parts.items()}, t)
            self.frames_seen += 1
            self.last_t = t

    def _tokens(self, out: TokenList) -> None:
        raise NotImplementedError

    def _tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _counters(self) -> dict[str, int]:
        """Counter name -> largest valid value; the values are the attributes of that name."""
        raise NotImplementedError

    def _pinned_frames(self, times: np.ndarray) -> list[int]:
        """Bank ids that thinning must keep (``FeatureBank``'s ``keep``), given every
        frame's time ``[n]``: none by default, the policy reading frames by search."""
        return []

    # -- writing ------------------------------------------------------------------------

    def add(self, features: torch.Tensor, t: float, thumbnail=None) -> None:
        """Add one frame: ``features`` ``[P, D]`` patch features (P a square grid, row
        major), ``t`` its time in seconds (not earlier than the previous frame's), and
        optionally its image (``[H, W, 3]`` uint8 or PIL), kept by the bank as a thumbnail."""
        if not isinstance(features, torch.Tensor) or features.ndim != 2:
            raise MemoryStateError(f"add: features must be a Tensor [P, D], got {_describe(features)}")
        self.extend(features.unsqueeze(0), [t], None if thumbnail is None else [thumbnail])

    def extend(self, features: torch.Tensor, times, thumbnails=None) -> None:
        """Add frames in a batch: ``features`` ``[T, P, D]``, ``times`` ``T`` seconds,
        ``thumbnails`` None or ``T`` images (each None or ``[H, W, 3]`` uint8 or PIL). Pools
        and banks the batch at once; the memory ends as if they were added one by one."""
        if not isinstance(features, torch.Tensor) or features.ndim != 3 or not features.is_floating_point():
            raise MemoryStateError(f"extend: features must be a float Tensor [T, P, D], got {_describe(features)}")
        times = [float(t) for t in (times.tolist() if isinstance(times, torch.Tensor) else times)]
        if len(times) != features.shape[0]:
            raise MemoryStateError(f"extend: {features.shape[0]} frames but {len(times)} times")
        if not times:
            return
        with self._lock:
            self._check(features, times)
            parts, banked = self._pool(features)
            # the bank's rows and keys leave the device in the bank's dtype (half the bytes;
            # the keys are the mean token of the rows as stored, as the bank would make them)
            self.bank.add(banked.cpu(), times, keys=banked.float().mean(dim=1).cpu(), thumbnails=thumbnails)
            self._add_frames(parts, times)
            self._cached = None

    def _pool(self, features: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A checked batch ``[T, P, D]`` pooled to the base grid (refused unless finite), then
        to each grid of the policy's (``parts``) and the bank's (in the bank's dtype), on
        the memory's device. Starts the memory on the first batch."""
        base = pool_grid(features, self.config.base_grid).float()
        if not all_finite(base):
            raise MemoryStateError("features contain NaN or infinite values")
        if self.dim is None:
            self._begin(features.shape[2], features.device)
        base = base.to(self.device)
        parts = {name: pool_grid(base, grid) for name, grid in self._grids().items()}
        return parts, pool_grid(base, self.bank.config.grid).to(getattr(torch, self.bank.config.dtype))

    def _check(self, features: torch.Tensor, times: list[float]) -> None:
        grid = math.isqrt(features.shape[1])
        if grid * grid != features.shape[1] or grid < self.config.base_grid:
            raise MemoryStateError(f"features have {features.shape[1]} patches per frame; expected a square grid "
                                   f"of at least {self.config.base_grid}×{self.config.base_grid}")
        if self.dim is not None and features.shape[2] != self.dim:
            raise MemoryStateError(f"features have width {features.shape[2]}; this memory holds width {self.dim}")
        previous = self.last_t
        for t in times:
            if not math.isfinite(t) or t < previous:
                raise MemoryStateError(f"frame time {t!r} s: times must be finite and not earlier than the "
                                       f"previous frame's ({previous} s)")
            previous = t

    def _begin(self, dim: int, device: torch.device) -> None:
        self.dim, self.device = dim, device
        self.bank = FeatureBank(dim, self.config.bank, keep=self._pinned_frames)
        self._start(dim)

    # -- reading ------------------------------------------------------------------------

    def tokens(self) -> MemoryTokens:
        """The memory as tokens (``MemoryTokens``); empty before the first frame."""
        with self._lock:
            if self.dim is None:
                return TokenList(0).build()
            if self._cached is None or self._cached[0] != self.frames_seen:
                out = TokenList(self.dim)
                self._tokens(out)
                self._cached = (self.frames_seen, out.build())
            return self._cached[1]

    def __len__(self) -> int:
        return self.frames_seen

    def token_count(self) -> int:
        """How many tokens ``tokens()`` gives now (a policy may count without building them)."""
        return len(self.tokens())

    def timeline(self, means: bool = False) -> list[SceneRuns]:
        """The scenes of the clustered memory on the timeline (``SceneRuns``: when each
        was on screen, how many separate times, how many frames), by first appearance;
        with ``means``, each with its mean token (its clusters' means, by weight). A
        policy that keeps no runs gives each cluster as a scene, its whole span, its
        appearances None."""
        with self._lock:
            if self.dim is None:
                return []
            n = self.centroid_count
            cluster_means = self.centroids[:n].reshape(n, -1, self.dim).mean(dim=1).cpu() if means else None
            scenes = []
            for members, runs, appearances in self._scenes():
                weights = self.weights[members].cpu()
                mean = None if cluster_means is None else (
                    (cluster_means[members] * weights[:, None].float()).sum(dim=0) / float(weights.sum()))
                scenes.append(SceneRuns(runs, appearances, float(weights.sum()), mean))
        return sorted(scenes, key=lambda scene: (scene.start, scene.end))

    def _scenes(self) -> list[tuple[list[int], tuple[tuple[float, float], ...], int | None]]:
        """``(clusters, runs, appearances)`` per scene; by default each cluster alone with
        its whole span, appearances unknown."""
        return [([i], ((float(self.time_start[i]), float(self.time_end[i])),), None)
                for i in range(self.centroid_count)]

    def search(self, key: torch.Tensor, k: int = 5) -> list[FrameHit]:
        """The ``k`` bank frames nearest to ``key`` (``[D]``, in the space of the frames'
        mean token), best first, with their times; empty before the first frame."""
        with self._lock:
            if self.bank is None:
                return []
            ids, scores = self.bank.search(key.reshape(1, -1).cpu(), k)
            times = self.bank.times
        return [FrameHit(i, float(times[i]), s) for i, s in zip(ids[0].tolist(), scores[0].tolist()) if i >= 0]

    def frame_at(self, t: float) -> int | None:
        """Id of the kept bank frame (``FeatureBank.kept_ids``) nearest to ``t`` seconds
        (the earlier on a tie); None before the first frame."""
        with self._lock:
            if self.bank is None or not len(self.bank):
                return None
            kept = self.bank.kept_ids()
            times = self.bank.times[kept]
        after = int(np.searchsorted(times, t))
        if after == len(times) or (after and t - times[after - 1] <= times[after] - t):
            return int(kept[after - 1])
        return int(kept[after])

    def thumbnail_at(self, t: float) -> Image.Image | None:
        """The thumbnail of the bank frame nearest to ``t`` seconds; None when that frame
        has none (added without an image, or ``BankConfig.thumbnails`` off) or there is no frame."""
        i = self.frame_at(t)
        return None if i is None else self.bank.thumbnails([i])[0]

    def nearest_frames(self, centroids: torch.Tensor, candidates: int) -> list[int]:
        """Bank frame ids nearest to each centroid ``[K, g*g, D]``, one distinct frame per
        centroid where the candidates allow. The index proposes ``candidates`` kept
        frames by the centroid's mean token (more where thinning left too few of them);
        they are re-ranked by exact squared distance at the centroid's grid."""
        grid = math.isqrt(centroids.shape[1])
        keys = centroids.mean(dim=1).cpu()
        chosen: list[int] = []
        for k in range(centroids.shape[0]):
            proposed, wanted = [], candidates
            while not proposed:  # a thinned bank may hold none of the first candidates
                ids, _ = self.bank.search(keys[k], wanted)
                found = ids[0][ids[0] >= 0].numpy()
                proposed = found[self.bank.kept(found)].tolist()
                if wanted >= len(self.bank):
                    break
                wanted *= 8
            fresh = [i for i in proposed if i not in chosen] or proposed
            frames = pool_grid(self.bank.features(fresh).to(self.device), grid)
            best, _ = nearest(centroids[k].reshape(1, -1), frames.reshape(len(fresh), -1))
            chosen.append(fresh[int(best[0])])
        return chosen

    def _read_clusters(self, out: TokenList, kinds: tuple[str, str], clusters: tuple[torch.Tensor, ...],
                       grid: int, retrieve: int, retrieve_grid: int,
                       representatives: torch.Tensor | None = None, scenes: list[list[int]] | None = None) -> None:
        """Add centroids (in the order of their mean member time) as ``kinds[0]``, then a
        bank frame for each of the ``retrieve`` heaviest (in time order) as ``kinds[1]``:
        its entry of ``representatives`` (``[n]`` bank ids) when given, else the bank frame
        nearest to it (``nearest_frames``). With ``scenes`` (groups of cluster indices),
        the heaviest scenes are chosen, each by its heaviest cluster: a long scene split
        among clusters is not outweighed by a shorter one kept whole; with fewer scenes
        than ``retrieve``, the heaviest other clusters fill in, so the count is fixed.

        ``clusters`` is ``(centroids [n, grid*grid*D], weights [n], start [n], end [n],
        time_sum [n])``; times in seconds, ``time_sum`` the sum of member times."""
        centroids, weights, start, end, time_sum = clusters
        n = centroids.shape[0]
        centroids = centroids.reshape(n, grid * grid, self.dim)
        mean_time = time_sum / weights
        by_time = torch.argsort(mean_time, stable=True)
        out.add(kinds[0], centroids[by_time], list(zip(start[by_time].tolist(), end[by_time].tolist())))
        if not (retrieve and n):
            return
        w, mean_t = weights.tolist(), mean_time.tolist()  # Python floats: 25 clusters, no tensor ops per item

        def weight(group: list[int]) -> tuple[float, float]:  # heavier first, then earlier
            return -sum(w[i] for i in group), min(mean_t[i] for i in group)

        groups = sorted(scenes if scenes is not None else [[i] for i in range(n)], key=weight)
        firsts = [max(group, key=lambda i: (w[i], -i)) for group in groups]
        rest = sorted(set(range(n)) - set(firsts), key=lambda i: weight([i]))  # fewer scenes than slots: fill in
        heaviest = (firsts + rest)[:retrieve]
        ids = sorted(representatives[heaviest].tolist() if representatives is not None
                     else self.nearest_frames(centroids[heaviest], self.config.retrieval_candidates))
        out.add(kinds[1], self._retrieved_frames(ids, retrieve_grid), [(t, t) for t in self.bank.times[ids].tolist()])

    def _retrieved_frames(self, ids: list[int], grid: int) -> torch.Tensor:
        """``[len(ids), grid*grid, D]``: the bank frames ``ids`` pooled to ``grid``, kept
        from the previous read for the ids it also retrieved (the heaviest scenes change
        seldom), so a read does not go to disk for them."""
        cache = self._retrieved  # a policy reads its retrieved frames at one grid
        missing = [i for i in ids if i not in cache]
        if missing:
            cache.update(zip(missing, pool_grid(self.bank.features(missing).to(self.device), grid)))
        self._retrieved = {i: cache[i] for i in ids}
        return torch.stack([cache[i] for i in ids])

    # -- save and load ------------------------------------------------------------------

    def save(self, path) -> None:
        """Save the whole memory into the folder ``path``, atomically (see ``persist``)."""
        with self._lock:
            save_snapshot(path, self._write)

    def _write(self, folder: Path) -> dict:
        description = {"policy": self.policy, "config": self.config.to_dict(), "dim": self.dim,
                       "frames_seen": self.frames_seen, "last_t": self.last_t}
        if self.dim is not None:
            description["counters"] = {name: getattr(self, name) for name in self._counters()}
            tensors = {name: t.detach().cpu().contiguous() for name, t in self._tensors().items()}
            save_file(tensors, folder / "state.safetensors")
            (folder / "bank").mkdir()
            self.bank.save(folder / "bank")
        return description

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu", bank: dict | None = None):
        """Load a memory saved by ``save`` onto ``device`` (where the features it will take
        are), with ``bank`` (``BankConfig`` fields such as ``disk_gb`` or ``device``)
        replacing the saved bank settings that may change (see ``FeatureBank.load``);
        raises ``MemoryStateError`` if the save is missing, damaged, truncated, of another
        format version, or of another policy."""
        folder, description = open_snapshot(path)
        if description.get("policy") != cls.policy:
            raise MemoryStateError(f"{path}: holds a {description.get('policy')!r} memory, not {cls.policy!r}")
        try:
            config = cls.config_class.from_dict(description.get("config"))
            memory = cls(replace(config, bank=replace(config.bank, **bank)) if bank else config)
        except ConfigError as exc:
            raise MemoryStateError(f"{path}: saved config is invalid ({exc})") from None
        memory.device = torch.device(device)  # the state is allocated there, then filled
        memory._restore(folder, description)
        return memory

    def _restore(self, folder: Path, description: dict) -> None:
        dim, frames, last_t = description.get("dim"), description.get("frames_seen"), description.get("last_t")
        if not (isinstance(frames, int) and frames >= 0 and isinstance(last_t, (int, float))):
            raise MemoryStateError(f"{folder}: bad frame counter or last time in the manifest")
        self.frames_seen, self.last_t = frames, float(last_t)
        if dim is None:
            return
        if not (isinstance(dim, int) and dim >= 1):
            raise MemoryStateError(f"{folder}: bad feature width {dim!r} in the manifest")
        self.dim = dim
        self._start(dim)
        counters = description.get("counters")
        if not isinstance(counters, dict):
            raise MemoryStateError(f"{folder}: the manifest has no counters")
        for name, limit in self._counters().items():
            value = counters.get(name)
            if not (isinstance(value, int) and 0 <= value <= limit):
                raise MemoryStateError(f"{folder}: counter {name} = {value!r}, expected an int in [0, {limit}]")
            setattr(self, name, value)
        try:
            saved = load_file(folder / "state.safetensors")
        except (OSError, SafetensorError) as exc:
            raise MemoryStateError(f"{folder / 'state.safetensors'}: cannot read it ({exc})") from None
        with torch.no_grad():
            for name, tensor in self._tensors().items():
                value = saved.get(name)
                if value is None or value.shape != tensor.shape or value.dtype != tensor.dtype:
                    raise MemoryStateError(f"{folder / 'state.safetensors'}: tensor {name} is missing or has "
                                           f"shape {None if value is None else tuple(value.shape)}, expected "
                                           f"{tuple(tensor.shape)} {tensor.dtype}")
                tensor.copy_(value)
        self.bank = FeatureBank.load(folder / "bank", self.config.bank, keep=self._pinned_frames)
        if len(self.bank) != self.frames_seen:
            raise MemoryStateError(f"{folder}: the bank holds {len(self.bank)} frames, the memory {self.frames_seen}")

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the bank (removing its temporary spill file). Idempotent."""
        with self._lock:
            if self.bank is not None:
                self.bank.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} Tensor of shape {list(value.shape)}"
    return type(value).__name__
