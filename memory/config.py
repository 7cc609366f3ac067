"""Configs of the memory stage: ``BankConfig``, ``StarConfig``, ``FlashConfig``.

Plain dataclasses, importable without torch, checked in ``__post_init__`` and
round-tripped through JSON (``to_json`` / ``from_json``). Grid sizes are sides of a
square token grid: ``8`` means 8×8 = 64 tokens per frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vstream.config import JsonConfig, check_choice, check_int, check_number
from vstream.errors import ConfigError


@dataclass
class BankConfig(JsonConfig):
    """The feature bank: every frame's pooled features with its time, and a FAISS index.

    Attributes:
        grid: side of the grid each frame is stored at (default 8: 64 tokens per frame).
        dtype: storage dtype of the features, ``"float16"`` (default) or ``"float32"``.
        ram_mb: MiB of RAM for the newest frames' features (default 256). Older frames
            are read back from the spill file on disk. The index is not part of this
            budget: a ``"Flat"`` index holds 4 bytes per key dimension per frame
            (147 MB for 10 hours at 1 fps with 1024-dim keys); a compressed factory
            string (``"SQ8"``: 1 byte per dimension) shrinks it.
        spill_dir: folder of the spill file; ``None`` (default) makes a temporary folder
            that is removed when the bank closes.
        disk_gb: GiB of disk the spill files (features and thumbnails) may take (default
            4; 0: no cap). When they are full, older frames are thinned, the older the
            sparser, keeping the frames the memory reads (see ``FeatureBank``). At 1 fps
            with the default STAR bank (8×8 × 1024 float16 and a thumbnail slot: 29,640
            frames in 4 GiB), every frame of about the last 2.5 hours is kept after a day
            of stream, of the last 70 minutes after a month, 50 after a year; older frames
            are about ``age / 1 h`` (a month) seconds apart.
        index: FAISS index factory string (default ``"Flat"``: exact search). Trained
            indexes (``"IVF256,Flat"``, ``"PQ32"``, ...) train once ``train_size`` frames
            have arrived; until then search is exact over the frames held.
        index_params: FAISS parameter string applied after building or loading the index,
            e.g. ``"nprobe=8"`` (default empty).
        metric: ``"l2"`` (default; squared Euclidean distance) or ``"ip"`` (inner product,
            larger is nearer).
        device: ``"auto"`` (default: faiss-gpu on CUDA when both are present, CPU
            otherwise), ``"cpu"`` or ``"cuda"``.
        train_size: frames collected before a trained index is trained (default 4096).
        thumbnails: keep a small JPEG of every frame given one (default True), for showing
            evidence and for ``RetrievalDecoder``; written to a second spill file.
        thumbnail_size: longest side of a thumbnail, pixels (default 96).
        thumbnail_quality: JPEG quality of a thumbnail, 1-95 (default 80).
        thumbnail_ram_frames: newest thumbnails also kept in RAM (default 512, about 1 MiB
            at 96 px); older ones are read back from the spill file.
    """

    grid: int = 8
    dtype: str = "float16"
    ram_mb: float = 256.0
    spill_dir: str | None = None
    disk_gb: float = 4.0
    index: str = "Flat"
    index_params: str = ""
    metric: str = "l2"
    device: str = "auto"
    train_size: int = 4096
    thumbnails: bool = True
    thumbnail_size: int = 96
    thumbnail_quality: int = 80
    thumbnail_ram_frames: int = 512

    def __post_init__(self) -> None:
        check_int("BankConfig", "grid", self.grid, 1)
        check_choice("BankConfig", "dtype", self.dtype, ("float16", "float32"))
        check_number("BankConfig", "ram_mb", self.ram_mb, 0.0)
        check_number("BankConfig", "disk_gb", self.disk_gb, 0.0, include_low=True)
        if self.spill_dir is not None and not isinstance(self.spill_dir, str):
            raise ConfigError(f"BankConfig.spill_dir must be a folder path or None, got {self.spill_dir!r}")
        if not (isinstance(self.index, str) and self.index.strip()):
            raise ConfigError(f"BankConfig.index must be a FAISS factory string such as 'Flat', got {self.index!r}")
        if not isinstance(self.index_params, str):
            raise ConfigError(f"BankConfig.index_params must be a string such as 'nprobe=8', got {self.index_params!r}")
        check_choice("BankConfig", "metric", self.metric, ("l2", "ip"))
        check_choice("BankConfig", "device", self.device, ("auto", "cpu", "cuda"))
        check_int("BankConfig", "train_size", self.train_size, 1)
        if not isinstance(self.thumbnails, bool):
            raise ConfigError(f"BankConfig.thumbnails must be true or false, got {self.thumbnails!r}")
        check_int("BankConfig", "thumbnail_size", self.thumbnail_size, 8)
        check_int("BankConfig", "thumbnail_quality", self.thumbnail_quality, 1)
        if self.thumbnail_quality > 95:
            raise ConfigError(f"BankConfig.thumbnail_quality must be in [1, 95], got {self.thumbnail_quality!r}")
        check_int("BankConfig", "thumbnail_ram_frames", self.thumbnail_ram_frames, 1)


@dataclass
class StarConfig(JsonConfig):
    """The STAR memory (spatial, temporal, abstract, retrieved). The defaults are the
    released Flash-VStream-7b layout: 25 + 25×16 + 3×64 + 64 = 681 tokens.

    Every frame is first average-pooled to ``base_grid``; each memory pools further.

    Attributes:
        base_grid: side of the grid every frame is pooled to first (default 8).
        spatial_length: newest frames kept whole (default 1).
        spatial_grid: their grid side (default 8: 64 tokens per frame).
        temporal_length: weighted k-means centroids over all frames (default 25).
        temporal_grid: grid side of a centroid (default 4: 16 tokens).
        abstract_length: semantic-attention slots (default 25).
        abstract_grid: grid side of a slot (default 1: one token).
        abstract_chunk: frames buffered per abstract update (default 25); the update
            attends over the whole chunk at once, so a frame-at-a-time stream and an
            offline pass give the same memory.
        abstract_alpha: update rate α of ``M ← (1−α)M + α·softmax(q(M)k(E)ᵀ/√h)E``
            (default 0.2).
        abstract_hidden: width h of the q/k projections (default 32).
        retrieved_length: heaviest temporal clusters whose representative frame (the
            member nearest to the centroid) is retrieved (default 3).
        retrieved_grid: grid side of a retrieved frame (default 8); at most ``bank.grid``.
        seed: seed of the default q/k projection (default 0). The streaming update has
            no randomness.
        timeline_runs: runs (separate appearances) kept per temporal cluster for the
            timeline (default 16; more blur the closest ones together; see
            ``vstream.memory.timeline``).
        cut_ratio: a frame is a cut (a change of scene) when its change from the frame
            before is over this many times the average change (default 3.0) and
            over ``cut_floor`` (default 0.5; the change is the squared distance over
            the frames' mean squared norm, at ``temporal_grid``).
        bank: the feature bank's ``BankConfig``.
    """

    base_grid: int = 8
    spatial_length: int = 1
    spatial_grid: int = 8
    temporal_length: int = 25
    temporal_grid: int = 4
    abstract_length: int = 25
    abstract_grid: int = 1
    abstract_chunk: int = 25
    abstract_alpha: float = 0.2
    abstract_hidden: int = 32
    retrieved_length: int = 3
    retrieved_grid: int = 8
    seed: int = 0
    timeline_runs: int = 16
    cut_ratio: float = 3.0
    cut_floor: float = 0.5
    bank: BankConfig = field(default_factory=BankConfig)

    def __post_init__(self) -> None:
        self.bank = BankConfig.from_dict(self.bank)
        for name in ("base_grid", "spatial_grid", "temporal_grid", "abstract_grid", "retrieved_grid",
                     "abstract_chunk", "abstract_hidden", "timeline_runs"):
            check_int("StarConfig", name, getattr(self, name), 1)
        check_number("StarConfig", "cut_ratio", self.cut_ratio, 1.0, include_low=True)
        check_number("StarConfig", "cut_floor", self.cut_floor, 0.0, include_low=True)
        for name in ("spatial_length", "temporal_length", "abstract_length", "retrieved_length"):
            check_int("StarConfig", name, getattr(self, name), 0)
        check_int("StarConfig", "seed", self.seed, 0)
        check_number("StarConfig", "abstract_alpha", self.abstract_alpha, 0.0, 1.0)
        for name in ("spatial_grid", "temporal_grid", "abstract_grid"):
            if getattr(self, name) > self.base_grid:
                raise ConfigError(f"StarConfig.{name} ({getattr(self, name)}) must be <= base_grid ({self.base_grid})")
        if self.retrieved_length > self.temporal_length:
            raise ConfigError(f"StarConfig.retrieved_length ({self.retrieved_length}) must be <= "
                              f"temporal_length ({self.temporal_length}): it picks among the temporal clusters")
        if self.retrieved_length and self.retrieved_grid > self.bank.grid:
            raise ConfigError(f"StarConfig.retrieved_grid ({self.retrieved_grid}) must be <= bank.grid ({self.bank.grid})")
        if self.bank.grid > self.base_grid:
            raise ConfigError(f"StarConfig.bank.grid ({self.bank.grid}) must be <= base_grid ({self.base_grid})")

    @property
    def num_tokens(self) -> int:
        """Tokens in a full memory (once ``max(temporal_length, abstract_length)`` frames arrived)."""
        return (self.abstract_length * self.abstract_grid**2
                + self.temporal_length * self.temporal_grid**2
                + self.retrieved_length * self.retrieved_grid**2
                + self.spatial_length * self.spatial_grid**2)


@dataclass
class FlashConfig(JsonConfig):
    """The 2025 Flash-VStream memory: a context synopsis memory and a detail memory.

    Attributes:
        base_grid: side of the grid every frame is pooled to first (default 8).
        synopsis_length: weighted k-means centroids over all frames (default 120),
            ordered by the mean time of their members.
        synopsis_grid: grid side of a centroid (default 4: half the base resolution).
        synopsis_chunk: frames buffered before the centroids and the buffered frames are
            re-clustered together (default 8).
        kmeans_iters: Lloyd iterations per re-clustering (default 10).
        cluster_dim: width of the seeded random projection the clustering runs in
            (default 64); the centroids are means of the full features.
        detail_length: heaviest clusters whose nearest bank frame is kept at full
            resolution (default 60).
        detail_grid: grid side of a detail frame (default 8); at most ``bank.grid``.
        retrieval_candidates: frames the index proposes per centroid, re-ranked by exact
            distance at the synopsis grid (default 16).
        seed: seed of the k-means++ initialisation (default 0).
        bank: the feature bank's ``BankConfig``.
    """

    base_grid: int = 8
    synopsis_length: int = 120
    synopsis_grid: int = 4
    synopsis_chunk: int = 8
    kmeans_iters: int = 10
    cluster_dim: int = 64
    detail_length: int = 60
    detail_grid: int = 8
    retrieval_candidates: int = 16
    seed: int = 0
    bank: BankConfig = field(default_factory=BankConfig)

    def __post_init__(self) -> None:
        self.bank = BankConfig.from_dict(self.bank)
        for name in ("base_grid", "synopsis_length", "synopsis_grid", "synopsis_chunk", "kmeans_iters",
                     "cluster_dim", "detail_grid", "retrieval_candidates"):
            check_int("FlashConfig", name, getattr(self, name), 1)
        check_int("FlashConfig", "detail_length", self.detail_length, 0)
        check_int("FlashConfig", "seed", self.seed, 0)
        if self.synopsis_grid > self.base_grid:
            raise ConfigError(f"FlashConfig.synopsis_grid ({self.synopsis_grid}) must be <= base_grid ({self.base_grid})")
        if self.detail_length > self.synopsis_length:
            raise ConfigError(f"FlashConfig.detail_length ({self.detail_length}) must be <= "
                              f"synopsis_length ({self.synopsis_length}): it picks among the synopsis clusters")
        if self.detail_length and self.detail_grid > self.bank.grid:
            raise ConfigError(f"FlashConfig.detail_grid ({self.detail_grid}) must be <= bank.grid ({self.bank.grid})")
        if self.bank.grid > self.base_grid:
            raise ConfigError(f"FlashConfig.bank.grid ({self.bank.grid}) must be <= base_grid ({self.base_grid})")

    @property
    def num_tokens(self) -> int:
        """Tokens in a full memory (once ``synopsis_length`` frames arrived)."""
        return self.synopsis_length * self.synopsis_grid**2 + self.detail_length * self.detail_grid**2
