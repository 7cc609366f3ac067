"""``MergedPatchEncoder``: a Qwen2-VL / Qwen2.5-VL vision tower read as a frame encoder.

These towers take any image size (in multiples of ``patch_size · spatial_merge_size``
pixels) and end in a patch merger that maps each 2×2 window of patches into the LLM's
embedding space. The memory needs a fixed grid per frame, so every frame is resized to
one square (``grid · patch_size · spatial_merge_size`` pixels a side) and goes through
the model's own image processor (which lays the patches out as the tower expects, each
image doubled in time to the tower's ``temporal_patch_size``) and the tower: a frame
becomes ``grid × grid`` merged tokens, in raster order, already in the LLM's space.

With ``merged=False`` the encoder stops before the merger and gives the tower's patch
features (``2·grid × 2·grid`` patches of ``embed_dim``, in raster order): what a memory
that lives inside the tower holds (Flash-VStream-Qwen's), the merger running when the
memory is read (``unmerged_windows`` puts a raster grid back in the merger's order).
``half_view=True`` adds a second view in as many channels again: the frame at half size
(its normalised pixels averaged 2×2, as Flash-VStream-Qwen's small path makes it) through
the same tower, each of its patches repeated over the 2×2 patches of the full view it
covers, so pooling the features 2×2 gives the half view's patches exactly
(``half_view_patches``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from vstream.errors import EncoderError


class MergedPatchEncoder:
    """Frames -> ``[B, grid * grid, dim]`` patch-merger outputs of a loaded tower (or,
    with ``merged=False``, ``[B, (2·grid)², embed_dim]`` patch features before it).

    Args:
        tower: the model's vision tower (``model.model.visual``), already loaded.
        processor: its image processor (``Qwen2VLImageProcessor`` or the PIL one).
        grid: merged tokens per side of a frame (16: 448 px frames at 14 px patches).
        merged: whether the features are the merger's output (True) or its input.
        half_view: with ``merged=False``, also the half-size frame's patches, in the
            second half of the channels (see the module docstring).
    """

    def __init__(self, tower, processor, grid: int = 16, merged: bool = True, half_view: bool = False):
        if not (isinstance(grid, int) and grid >= 1):
            raise EncoderError(f"MergedPatchEncoder: grid must be an int >= 1, got {grid!r}")
        config = tower.config
        if not merged and getattr(config, "fullatt_block_indexes", None) is not None:
            raise EncoderError("MergedPatchEncoder: merged=False reads Qwen2-VL towers; a Qwen2.5-VL tower leaves "
                               "its patch features in its window attention's order")
        if half_view and (merged or grid % config.spatial_merge_size):
            raise EncoderError(f"MergedPatchEncoder: half_view needs merged=False and a grid ({grid}) that the half "
                               f"view's windows of {config.spatial_merge_size} divide")
        self.tower, self.processor, self.merged, self.half_view = tower, processor, merged, half_view
        self.merge, self.patch = config.spatial_merge_size, config.patch_size
        self.side = grid * config.patch_size * self.merge
        linears = [m for m in tower.merger.modules() if isinstance(m, torch.nn.Linear)]
        # the merger's output is the LLM's width; its input, the tower's patch width
        self.grid, self.dim = (grid, linears[-1].out_features) if merged else (grid * self.merge, linears[0].in_features
                                                                                 // self.merge**2 * (1 + half_view))
        parameter = next(tower.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    def __repr__(self) -> str:
        return (f"MergedPatchEncoder(grid={self.grid}, side={self.side}px, dim={self.dim}, merged={self.merged}, "
                f"device={self.device})")

    @torch.inference_mode()
    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``B`` RGB frames ``[H, W, 3]`` uint8 -> ``[B, grid * grid, dim]`` float32 (raster order)."""
        if not len(images):
            return torch.zeros(0, self.grid * self.grid, self.dim, device=self.device)
        square = [np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((self.side, self.side),
                                                                                 Image.Resampling.BICUBIC))
                  for image in images]
        pixels = self.side * self.side
        batch = self.processor(images=square, size={"shortest_edge": pixels, "longest_edge": pixels},
                               return_tensors="pt")
        values, grid_thw = batch["pixel_values"], batch["image_grid_thw"]
        if self.half_view:
            half, half_thw = self._half_view(values, grid_thw)
            values, grid_thw = torch.cat([values, half]), torch.cat([grid_thw, half_thw])
        out = self.tower(values.to(self.device, self.dtype), grid_thw=grid_thw.to(self.device))
        if self.merged:
            merged = out.pooler_output if hasattr(out, "pooler_output") else out
            return merged.float().reshape(len(images), self.grid * self.grid, self.dim)
        states = out.last_hidden_state.float()
        full = self._raster(states[:len(images) * self.grid**2], self.grid)
        if not self.half_view:
            return full.reshape(len(images), self.grid**2, self.dim)
        half = self._raster(states[len(images) * self.grid**2:], self.grid // 2)
        half = half.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # each over its 2x2 full patches
        return torch.cat([full, half], dim=3).reshape(len(images), self.grid**2, self.dim)

    def _raster(self, states: torch.Tensor, side: int) -> torch.Tensor:
        """The tower's patch states of frames of ``side × side`` patches, each merge window's
        patches together, -> ``[B, side, side, D]`` in raster order."""
        windows = side // self.merge
        grid = states.reshape(-1, windows, windows, self.merge, self.merge, states.shape[-1])
        return grid.permute(0, 1, 3, 2, 4, 5).reshape(-1, side, side, states.shape[-1])

    def _half_view(self, values: torch.Tensor, grid_thw: torch.Tensor):
        """The processor's patches of each frame (rows: merge windows in raster order, their
        patches together; columns: channel, time, pixel row, pixel column) -> the patches of
        that frame at half size, its normalised pixels averaged 2×2, and their grid rows."""
        frames, side, m, p = len(grid_thw), self.grid, self.merge, self.patch
        t = values.shape[1] // (3 * p * p)  # the tower's temporal patch (the frame repeated)
        cells = values.reshape(frames, side // m, side // m, m, m, 3, t, p, p)
        image = cells.permute(0, 5, 6, 1, 3, 7, 2, 4, 8).reshape(frames, 3 * t, side * p, side * p)
        half = torch.nn.functional.avg_pool2d(image, 2)  # [frames, 3t, side*p/2, side*p/2]
        h = side // 2
        cells = half.reshape(frames, 3, t, h // m, m, p, h // m, m, p).permute(0, 3, 6, 4, 7, 1, 2, 5, 8)
        rows = torch.tensor([[1, h, h]] * frames, dtype=grid_thw.dtype)
        return cells.reshape(frames * h * h, 3 * t * p * p), rows


def half_view_patches(features: torch.Tensor) -> torch.Tensor:
    """``[n, 2D]`` features of a ``half_view`` encoder (or a pooling of them) -> the half
    view's ``[n, D]``."""
    return features[:, features.shape[1] // 2:]


def full_view_patches(features: torch.Tensor) -> torch.Tensor:
    """``[n, 2D]`` features of a ``half_view`` encoder -> the full view's ``[n, D]``."""
    return features[:, :features.shape[1] // 2]


def unmerged_windows(patches: torch.Tensor, merge: int = 2) -> torch.Tensor:
    """A raster grid of patch features ``[side * side, D]`` in the merger's order: the
    ``merge × merge`` patches of each window together, windows in raster order (the
    order the tower emits and its merger reads, ``merge²`` rows a token)."""
    side = math.isqrt(patches.shape[0])
    if side * side != patches.shape[0] or side % merge:
        raise EncoderError(f"unmerged_windows: {patches.shape[0]} patches are not a square grid whose side is a "
                           f"multiple of {merge}")
    windows = side // merge
    grid = patches.reshape(windows, merge, windows, merge, patches.shape[1])
    return grid.permute(0, 2, 1, 3, 4).reshape(side * side, patches.shape[1])
