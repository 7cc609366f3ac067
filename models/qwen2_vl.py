"""Qwen2-VL and Qwen2.5-VL, read training-free through their own parts.

- The frame encoder is the model's vision tower, read by ``MergedPatchEncoder``: each
  frame resized to one square and preprocessed by the model's own image processor, the
  tower's patch-merger output as the memory's features (``grid × grid`` tokens a frame,
  16 by default: 448 px frames). The merger already maps into the LLM's embedding
  space, so ``project`` only casts: the memory pools merged tokens, as LLaVA-OneVision's
  video path pools projected ones.
- Memory tokens sit between ``<|vision_start|>`` and ``<|vision_end|>`` with 3-D rotary
  positions (M-RoPE), as the model's ``get_rope_index`` places images and videos.
  Qwen2-VL: each run of memory tokens after its time marker, as an image (the time axis
  at the run's first position, height and width along its grid: ``n`` tokens make a
  square grid when ``n`` is a square, else one row). Qwen2.5-VL, trained with absolute
  time: the whole memory as one video block, each run's time axis at
  ``floor((t − t0) · tokens_per_second)`` past the block's first position, the times also
  in a line after the block. Text after a block goes on one past its largest position.
- Generation and evidence ranking pass these positions explicitly, so the model's
  cached ``rope_deltas`` (left by any earlier call of its own ``generate``) never apply.
- The chat template is the tokenizer's (ChatML).
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
        lm, tokenizer = cls.load_parts(name, dtype)
        return cls(lm.to(device), tokenizer, name, cls.load_image_processor(name))

    @staticmethod
    def load_image_processor(name: str):
        """The checkpoint's image processor (what the frame encoder preprocesses with)."""
        import transformers

        return load_pretrained(transformers.AutoImageProcessor, name, "image processor")

    def vision_tower(self):
        return self.lm.model.visual

    def make_frame_encoder(self):
        return MergedPatchEncoder(self.vision_tower(), self.image_processor, self.frame_grid)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Memory tokens ``[n, H]`` are merger outputs, already LLM embeddings."""
        return features.to(self.device)

    def memory_projector(self) -> None:
        return None  # the merger runs inside the tower, before the memory

    def embed(self, pieces: list[Piece], system: str = SYSTEM_PROMPT, history: Turns = ()) -> Embedded:
        """``ChatModel.embed`` with each block of consecutive memory runs between the
        model's vision start and end tokens (a block of one run with time markers, the
        whole memory without)."""
        start, end = self.vision_marks
        marked: list[Piece] = []
        for i, piece in enumerate(pieces):
            memory = piece.features is not None
            if memory and (i == 0 or pieces[i - 1].features is None):
                marked.append(Piece(text=start))
            marked.append(piece)
            if memory and (i == len(pieces) - 1 or pieces[i + 1].features is None):
                marked.append(Piece(text=end))
        return super().embed(marked, system, history)

    def time_interval(self) -> float | None:
        """Time-axis positions per second of stream within a block of memory runs (None:
        no time axis; every run of a block at the block's first position, as an image)."""
        return None

    def positions(self, parts: list[tuple[int, Piece]]) -> torch.Tensor:
        """``[3, 1, L]`` M-RoPE position ids: text counts up on all three axes; each block
        of consecutive memory runs is placed by ``block_positions`` from the next position."""
        axes: list[torch.Tensor] = []
        at, i = 0, 0
        while i < len(parts):
            length, piece = parts[i]
            if piece.features is None:
                axes.append(torch.arange(at, at + length).expand(3, -1))
                at, i = at + length, i + 1
                continue
            block = []
            while i < len(parts) and parts[i][1].features is not None:
                block.append(parts[i])
                i += 1
            placed, at = self.block_positions(block, at)
            axes.append(placed)
        return torch.cat(axes, dim=1).unsqueeze(1).to(self.device)

    def block_positions(self, block: list[tuple[int, Piece]], at: int) -> tuple[torch.Tensor, int]:
        """A block of memory runs (each its token count and piece) from position ``at`` ->
        their ``[3, n]`` positions and the text's next position. Each run's height and width
        go along its grid from ``at`` (``n`` tokens: a square grid when ``n`` is a square, else
        one row), its time axis at ``at`` (images) or at ``at + floor((t − t0) · interval)``
        (``time_interval``, ``t`` the run's start, ``t0`` the block's first); the text after
        the block goes on one past its largest position."""
        interval = self.time_interval()
        first = min(piece.evidence[0] if piece.evidence else 0.0 for _, piece in block)
        axes = []
        for length, piece in block:
            side = math.isqrt(length)
            cols = side if side * side == length else length
            t = at if interval is None or piece.evidence is None else at + int((piece.evidence[0] - first) * interval)
            grid = torch.arange(length)
            axes.append(torch.stack([torch.full((length,), t), at + grid // cols, at + grid % cols]))
        placed = torch.cat(axes, dim=1)
        return placed, int(placed.max()) + 1


@register_model("qwen2_5_vl")
class Qwen2_5VLModel(Qwen2VLModel):
    """Qwen2.5-VL (window attention in the ViT, the same merger; M-RoPE with absolute time:
    the whole memory is one block, as a video, each run's time axis at its stream time,
    ``tokens_per_second`` positions a second; the times also as one line after it)."""

    model_class = "Qwen2_5_VLForConditionalGeneration"
    timed_memory = False  # the times are in the positions (and in a line after the block)
    vision_tower_text = "its own ViT (window attention), frames at 448 px, the patch merger's output"
    prompt_text = ("the memory as one video block (vision tokens), each run's M-RoPE time axis at its stream "
                   "time (tokens_per_second), the times in a line after it")

    def time_interval(self) -> float:
        return float(self.lm.config.vision_config.tokens_per_second)
