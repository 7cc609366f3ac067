"""``PixelEncoder``: a parameter-free frame encoder, for when no vision model is given.

Each frame is shrunk with PIL's box (area-average) filter to a square thumbnail of
``image_size`` pixels a side, cut into ``grid × grid`` cells, and described cell by cell:

| features | what | range |
|---|---|---|
| 0–2 | mean R, G, B of the cell, as ``2·mean − 1`` | [−1, 1] |
| 3–5 | standard deviation of R, G, B inside the cell, × 2 (``color_stats``) | [0, 1] |
| 6 | mean luminance gradient magnitude (forward differences of Rec. 601 luma) (``color_stats``) | [0, 1] |
| 7 | mean HSV saturation ``(max − min) / max`` (``color_stats``) | [0, 1] |

So ``D`` is 8 with ``color_stats`` and 3 without, whatever the frame size. The colour
means are centred on mid-grey so that inner products (the abstract memory's attention)
tell colours apart as well as distances do; every feature is scaled to a range of width
at most 2, so no statistic outweighs the others by its units.

Why this separates scenes: a scene cut changes the colours and textures of most cells at
once, so the squared L2 distance between two frames of different scenes sums changes
over nearly all ``grid²`` cells, while two frames of one scene differ only in the few
cells that something moved through. The memory's k-means, its nearest-frame retrieval
and the FAISS bank all work on L2 distances of these features, so they find scenes,
repeated views (a scene seen again lands near its earlier frames) and scene boundaries
(a jump in the distance between consecutive frames) with no weights at all. What it
cannot do is recognise the same object under a different view or light.

Features are computed on the CPU (NumPy) and come back as float32 on ``device``, so the
memory they feed runs there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from vstream.config import JsonConfig, check_int
from vstream.device import check_device, resolve_device
from vstream.encoders.registry import check_images, register_encoder
from vstream.errors import ConfigError

if TYPE_CHECKING:
    import torch

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # Rec. 601 weights of R, G, B


@dataclass
class PixelConfig(JsonConfig):
    """The pixel encoder.

    Attributes:
        grid: cells per side of the output grid (default 16: 256 tokens per frame, which
            the memory pools to its 8×8 base grid).
        color_stats: add per-cell colour spread, edge strength and saturation to the mean
            colour (default True: 8 features per cell; False: 3).
        image_size: side in pixels of the square thumbnail the frame is shrunk to before
            the cells are measured; a multiple of ``grid``. ``None`` (default) takes
            ``4 * grid`` (4×4 pixels per cell).
        device: where the features go (``vstream.device``): ``"auto"`` (default: CUDA
            when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    """

    grid: int = 16
    color_stats: bool = True
    image_size: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        check_int("PixelConfig", "grid", self.grid, 1)
        check_device("PixelConfig.device", self.device)
        if not isinstance(self.color_stats, bool):
            raise ConfigError(f"PixelConfig.color_stats must be True or False, got {self.color_stats!r}")
        if self.image_size is not None:
            check_int("PixelConfig", "image_size", self.image_size, self.grid)
            if self.image_size % self.grid:
                raise ConfigError(f"PixelConfig.image_size ({self.image_size}) must be a multiple of "
                                  f"grid ({self.grid})")

    @property
    def thumbnail_size(self) -> int:
        """Side of the thumbnail in pixels (``image_size``, or ``4 * grid``)."""
        return self.image_size if self.image_size is not None else 4 * self.grid


@register_encoder("pixels")
class PixelEncoder:
    """Pooled colour statistics per cell of a ``grid × grid`` grid; no weights.

    Attributes:
        grid: the config's grid side.
        dim: features per cell: 8 with ``color_stats``, 3 without.
    """

    config_class = PixelConfig

    def __init__(self, config: PixelConfig | None = None):
        self.config = config if config is not None else PixelConfig()
        if not isinstance(self.config, PixelConfig):
            raise ConfigError(f"PixelEncoder: config must be a PixelConfig, got {type(self.config).__name__}")
        self.grid = self.config.grid
        self.dim = 8 if self.config.color_stats else 3
        self.device = resolve_device(self.config.device, "PixelConfig.device")

    def __repr__(self) -> str:
        return (f"PixelEncoder(grid={self.grid}, dim={self.dim}, thumbnail={self.config.thumbnail_size}, "
                f"device={self.device})")

    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``images``: ``B`` frames ``[H, W, 3]`` uint8 RGB, any sizes ->
        ``[B, grid * grid, dim]`` float32 on ``device``, cells in row-major order.

        Raises:
            EncoderError: an image that is not ``[H, W, 3]`` uint8 (named by its index).
        """
        import torch

        batch = check_images(images)
        size = self.config.thumbnail_size
        if not batch:
            return torch.zeros(0, self.grid * self.grid, self.dim, device=self.device)
        thumbs = np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BOX)) for image in batch])
        return torch.from_numpy(self._describe(thumbs.astype(np.float32) / 255.0)).to(self.device)

    def describe(self, means) -> list[str]:
        """``[n, D]`` mean tokens -> the colour each one shows (``"red"``, ``"dark blue"``,
        ``"grey"``...), named from the mean RGB in features 0-2."""
        rgb = (np.asarray(means, np.float32)[:, :3] + 1.0) / 2.0
        return [colour_name(*np.clip(row, 0.0, 1.0)) for row in rgb]

    def _describe(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb [B, S, S, 3]`` in [0, 1] -> ``[B, grid², dim]`` per-cell features."""
        batch, size = rgb.shape[0], rgb.shape[1]
        grid, cell = self.grid, size // self.grid

        def per_cell(values: np.ndarray) -> np.ndarray:  # [B, S, S, C] -> [B, grid, cell, grid, cell, C]
            return values.reshape(batch, grid, cell, grid, cell, values.shape[-1])

        cells = per_cell(rgb)
        parts = [2.0 * cells.mean(axis=(2, 4)) - 1.0]
        if self.config.color_stats:
            parts.append(2.0 * cells.std(axis=(2, 4)))
            luma = rgb @ _LUMA  # [B, S, S]
            dy = np.diff(luma, axis=1, append=luma[:, -1:, :])
            dx = np.diff(luma, axis=2, append=luma[:, :, -1:])
            gradient = np.minimum(np.sqrt(dx * dx + dy * dy), 1.0)
            parts.append(per_cell(gradient[..., None]).mean(axis=(2, 4)))
            high, low = rgb.max(axis=-1), rgb.min(axis=-1)
            saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
            parts.append(per_cell(saturation[..., None]).mean(axis=(2, 4)))
        features = np.concatenate(parts, axis=-1)  # [B, grid, grid, dim]
        return np.ascontiguousarray(features.reshape(batch, grid * grid, self.dim), dtype=np.float32)


_HUES = ((15, "red"), (40, "orange"), (70, "yellow"), (165, "green"), (200, "cyan"), (255, "blue"), (290, "purple"),
         (335, "magenta"), (360, "red"))  # (upper bound of the hue in degrees, name)
_HUE_NAMES = np.array([name for _, name in _HUES])
_DARK_HUE_NAMES = np.array([f"dark {name}" for _, name in _HUES])


def colour_names(rgb) -> list[str]:
    """``[N, 3]`` RGB colours in [0, 1] -> a plain name each: black, grey or white when
    it has little saturation, else its hue, "dark" when it is dim."""
    rgb = np.asarray(rgb, np.float64).reshape(-1, 3)
    value, low = rgb.max(axis=1), rgb.min(axis=1)
    spread = value - low
    saturation = np.where(value > 0, spread / np.maximum(value, 1e-12), 0.0)
    red, green, blue = rgb.T
    safe = np.maximum(spread, 1e-12)
    sector = np.where(value == red, (green - blue) / safe,  # hue in sixths of the circle, as colorsys
                      np.where(value == green, 2.0 + (blue - red) / safe, 4.0 + (red - green) / safe))
    degrees = np.where(spread > 0, (sector / 6.0) % 1.0, 0.0) * 360
    hue = np.minimum(np.searchsorted(np.array([bound for bound, _ in _HUES]), degrees, side="right"), len(_HUES) - 1)
    # vectorised: main_colour names the 256 cells of every frame a session takes in
    names = np.where(value < 0.45, _DARK_HUE_NAMES[hue], _HUE_NAMES[hue])
    names = np.where(saturation < 0.25, np.where(value > 0.85, "white", "grey"), names)
    return np.where(value < 0.15, "black", names).tolist()


def colour_name(red: float, green: float, blue: float) -> str:
    """``colour_names`` of one RGB colour in [0, 1]."""
    return colour_names([[red, green, blue]])[0]


def main_colour(image: np.ndarray, share: float = 0.5) -> str | None:
    """The colour name (``colour_names``) of at least ``share`` of an ``[H, W, 3]`` uint8
    image, judged on a 16×16 copy; None when no colour covers that much (a photo, a busy
    scene). Words for a plain screen that a classifier has no label for."""
    small = np.asarray(Image.fromarray(image).resize((16, 16), Image.BOX), np.float64) / 255.0
    names, counts = np.unique(colour_names(small.reshape(-1, 3)), return_counts=True)
    best = int(counts.argmax())
    return str(names[best]) if counts[best] >= share * 256 else None
