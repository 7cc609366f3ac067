"""``MergedPatchEncoder``: a Qwen2-VL / Qwen2.5-VL vision tower read as a frame encoder.

These towers take any image size (in multiples of ``patch_size · spatial_merge_size``
pixels) and end in a patch merger that maps each 2×2 window of patches into the LLM's
embedding space. The memory needs a fixed grid per frame, so every frame is resized to
one square (``grid · patch_size · spatial_merge_size`` pixels a side) and goes through
the model's own image processor (which lays the patches out as the tower expects, each
image doubled in time to the tower's ``temporal_patch_size``) and the tower: a frame
becomes ``grid × grid`` merged tokens, in raster order, already in the LLM's space.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from vstream.errors import EncoderError


class MergedPatchEncoder:
    """Frames -> ``[B, grid * grid, dim]`` patch-merger outputs of a loaded tower.

    Args:
        tower: the model's vision tower (``model.model.visual``), already loaded.
        processor: its image processor (``Qwen2VLImageProcessor`` or the PIL one).
        grid: merged tokens per side of a frame (16: 448 px frames at 14 px patches).
    """

    def __init__(self, tower, processor, grid: int = 16):
        if not (isinstance(grid, int) and grid >= 1):
            raise EncoderError(f"MergedPatchEncoder: grid must be an int >= 1, got {grid!r}")
        config = tower.config
        self.tower, self.processor, self.grid = tower, processor, grid
        self.side = grid * config.patch_size * config.spatial_merge_size
        linears = [m for m in tower.merger.modules() if isinstance(m, torch.nn.Linear)]
        self.dim = linears[-1].out_features  # the merger's output: the LLM's width
        parameter = next(tower.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    def __repr__(self) -> str:
        return f"MergedPatchEncoder(grid={self.grid}, side={self.side}px, dim={self.dim}, device={self.device})"

    @torch.inference_mode()
    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``B`` RGB frames ``[H, W, 3]`` uint8 -> ``[B, grid * grid, dim]`` float32."""
        if not len(images):
            return torch.zeros(0, self.grid * self.grid, self.dim, device=self.device)
        square = [np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((self.side, self.side),
                                                                                 Image.Resampling.BICUBIC))
                  for image in images]
        pixels = self.side * self.side
        batch = self.processor(images=square, size={"shortest_edge": pixels, "longest_edge": pixels},
                               return_tensors="pt")
        grid_thw = batch["image_grid_thw"].to(self.device)
        out = self.tower(batch["pixel_values"].to(self.device, self.dtype), grid_thw=grid_thw)
        merged = out.pooler_output if hasattr(out, "pooler_output") else out
        return merged.float().reshape(len(images), self.grid * self.grid, self.dim)
