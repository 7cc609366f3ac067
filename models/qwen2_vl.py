"""Qwen2-VL and Qwen2.5-VL, read training-free through their own parts.

- The frame encoder is the model's vision tower, read by ``MergedPatchEncoder``: each
  frame resized to one square and preprocessed by the model's own image processor, the
  tower's patch-merger output as the memory's features (``grid × grid`` tokens a frame,
  16 by default: 448 px frames). The merger already maps into the LLM's embedding
  space, so ``project`` only casts: the memory pools merged tokens, as LLaVA-OneVision's
  video path pools projected ones.
- A run of memory tokens is placed as the model places an image: between
  ``<|vision_start|>`` and ``<|vision_end|>``, with 3-D rotary positions (M-RoPE) as the
  model's ``get_rope_index`` gives an image: the time axis at the run's first position,
  height and width along its grid (``n`` tokens: a square grid when ``n`` is a square,
  else one row), the text after it from ``first + max(height, width)`` on. Generation
  and evidence ranking pass these positions explicitly, so the model's cached
  ``rope_deltas`` (left by any earlier call of its own ``generate``) never apply.
- The chat template is the tokenizer's (ChatML).

The time of each run is the text marker before it (``<temporal 0:00:12-0:00:40>``),
as for the other models: Qwen2.5-VL's absolute-time video positions (the time axis in
seconds × ``tokens_per_second``) are not used for the memory, whose runs are not a
regular video.
"""

from __future__ import annotations

import math

import torch

from vstream.encoders.merged_patches import MergedPatchEncoder

from .base import Embedded, Turns, register_model
from .llava_onevision import VisionLanguageModel
from .llm import load_pretrained
from .prompt import SYSTEM_PROMPT, Piece

CHATML = ("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
          "<|im_start|>assistant\n")


@register_model("qwen2_vl")
class Qwen2VLModel(VisionLanguageModel):
    """Qwen2-VL (a ViT with 2×2 patch merging, a Qwen2 LLM with M-RoPE).

    Args:
        lm: the whole model (``Qwen2VLForConditionalGeneration``).
        tokenizer: its tokenizer.
        name: what it was loaded from.
        image_processor: its image processor (``AutoImageProcessor`` of the checkpoint).
        frame_grid: merged tokens per side of a frame in the memory (16).
    """

    model_class = "Qwen2VLForConditionalGeneration"
    fallback_template = CHATML
    vision_tower_text = "its own ViT, frames at 448 px, the patch merger's output (16x16 tokens a frame)"
    prompt_text = "each run of memory tokens after its time marker, placed as an image (vision tokens, M-RoPE)"

    def __init__(self, lm, tokenizer, name: str, image_processor, frame_grid: int = 16):
        self.image_processor, self.frame_grid = image_processor, frame_grid
        super().__init__(lm, tokenizer, name)
        config = lm.config
        self.vision_marks = tuple(tokenizer.convert_ids_to_tokens(i)
                                  for i in (config.vision_start_token_id, config.vision_end_token_id))

    @classmethod
    def from_pretrained(cls, name: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        import transformers

        lm, tokenizer = cls.load_parts(name, dtype)
        processor = load_pretrained(transformers.AutoImageProcessor, name, "image processor")
        return cls(lm.to(device), tokenizer, name, processor)

    def vision_tower(self):
        return self.lm.model.visual

    def make_frame_encoder(self):
        return MergedPatchEncoder(self.vision_tower(), self.image_processor, self.frame_grid)

    @torch.inference_mode()
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Memory tokens ``[n, H]`` are merger outputs, already LLM embeddings."""
        return features.to(self.device)

    def embed(self, pieces: list[Piece], system: str = SYSTEM_PROMPT, history: Turns = ()) -> Embedded:
        start, end = self.vision_marks
        marked = []
        for piece in pieces:
            marked += [Piece(text=start), piece, Piece(text=end)] if piece.features is not None else [piece]
        return super().embed(marked, system, history)

    def positions(self, parts: list[tuple[int, bool]]) -> torch.Tensor:
        """``[3, 1, L]`` M-RoPE position ids: text parts count up on all three axes; a run
        of memory tokens is an image's grid at the next position (see the module docstring)."""
        axes, at = [], 0
        for length, memory in parts:
            if not memory:
                axes.append(torch.arange(at, at + length).expand(3, -1))
                at += length
                continue
            side = math.isqrt(length)
            rows, cols = (side, side) if side * side == length else (1, length)
            grid = torch.arange(length)
            axes.append(torch.stack([torch.full((length,), at), at + grid // cols, at + grid % cols]))
            at += max(rows, cols)
        return torch.cat(axes, dim=1).unsqueeze(1).to(self.device)


@register_model("qwen2_5_vl")
class Qwen2_5VLModel(Qwen2VLModel):
    """Qwen2.5-VL (window attention in the ViT, the same merger and M-RoPE layout)."""

    model_class = "Qwen2_5_VLForConditionalGeneration"
    vision_tower_text = "its own ViT (window attention), frames at 448 px, the patch merger's output"
