"""Flash-VStream-Qwen (``zhang9302002/Flash-VStream-Qwen-7b``, ICCV 2025): Qwen2-VL-7B-Instruct
fine-tuned with its Flash Memory inside the vision tower, between the ViT blocks and the
patch merger.

The checkpoint, as the reference code (``Flash-VStream-Qwen/models/vstream_qwen2vl_model.py``
of IVGSZ/Flash-VStream, transformers 4.45) writes and reads it; inferred from that code,
not from the released files:

- ``config.json``: ``model_type`` ``"flash_vstream_qwen2_vl"`` (``FlashVStreamQwen2VLConfig``,
  a ``Qwen2VLConfig``), the Qwen2-VL fields, and ``vision_config.flash_memory_config``:
  ``flash_memory_temporal_length`` (120), ``flash_memory_temporal_method``
  (``"kmeans_ordered"``), ``flash_memory_temporal_poolsize`` (2),
  ``flash_memory_temporal_pca_dim`` (32, unused by ``kmeans_ordered``),
  ``flash_memory_spatial_length`` (60), ``flash_memory_spatial_method``
  (``"klarge_retrieve"``). The memory halves both lengths (its time unit is a pair of
  frames): 60 synopsis centroids, 30 detail frames.
- weights: Qwen2-VL's, in transformers 4.45's layout (``visual.``, ``model.``,
  ``lm_head.``: ``LEGACY_KEYS`` maps them onto today's classes); the memory has none.

What runs where:

| reference | vstream |
|---|---|
| the ViT's blocks on each frame (448 px: ``max_pixels`` 4·224²) and on the frame at half size (its pixels averaged 2×2), before the merger | ``MergedPatchEncoder(merged=False, half_view=True)``: 32×32 patches × (1280 + 1280) a frame, the half view's 16×16 patches each over the 2×2 full patches it covers |
| temporal memory: weighted k-means of the half-size frames into 60 centroids, ordered by mean member index | ``FlashMemory``'s synopsis: 60 centroids of the frames pooled to 16×16 patches (the half view exactly, beside the full view pooled), re-clustered on every frame (as its streaming code does) |
| spatial memory: for the 30 heaviest clusters, the full-resolution frame nearest to the centroid | ``FlashMemory``'s detail: 30 frames, 32×32 patches, from the feature bank |
| the merger on both | ``project``: the merger on each item's view (a detail frame's full view, a centroid's half view), 2×2 patches a token |
| spatial tokens, then temporal, placed by ``calc_am_rope`` | the same order and positions (``positions``) |

Where vstream differs, and why:

- k-means and the detail frame's nearest-frame search compare both views (the half view
  and the full view pooled to its grid), where the reference compares the half view alone:
  the two views travel as one feature, which ``FlashMemory`` pools and banks as any other;
- k-means runs in a seeded random projection (``FlashConfig.cluster_dim``) and starts
  from k-means++, where the reference clusters the full features from random frames:
  the same result for every run of a stream;
- detail frames are in time order (the reference: heaviest cluster first); each
  carries its own time on the rotary time axis either way;
- the time axis counts frames at ``frame_rate`` a second (vstream samples 1 fps by
  default; the reference numbers the frames it was given), and a centroid sits at the
  middle of its span, where the reference takes its members' mean index.

The prompt is Qwen2-VL's chat template with the memory as one video block (vision
start, detail tokens, synopsis tokens, vision end), its times in a line after it,
then vstream's transcript and screen text and the question.
"""

from __future__ import annotations

import math

import torch

from vstream.encoders.merged_patches import MergedPatchEncoder, full_view_patches, half_view_patches, unmerged_windows
from vstream.errors import ModelLoadError
from vstream.memory import BankConfig, FlashConfig

from .base import register_model
from .llm import load_pretrained
from .prompt import Context, Piece
from .qwen2_vl import Qwen2VLModel

MODEL_TYPE = "flash_vstream_qwen2_vl"
# transformers 4.45's Qwen2-VL key names -> today's (the checkpoint was saved by 4.45)
LEGACY_KEYS = {r"^visual\.": "model.visual.", r"^model\.(?!visual\.|language_model\.)": "model.language_model."}
REFERENCE_MEMORY = {"flash_memory_temporal_length": 120, "flash_memory_temporal_method": "kmeans_ordered",
                    "flash_memory_temporal_poolsize": 2, "flash_memory_temporal_pca_dim": 32,
                    "flash_memory_spatial_length": 60, "flash_memory_spatial_method": "klarge_retrieve"}


def register_config() -> None:
    """Teach ``AutoConfig`` the checkpoint's model type: a Qwen2-VL config under another name
    (its ``vision_config`` keeps ``flash_memory_config`` as an extra field)."""
    from transformers import AutoConfig, Qwen2VLConfig

    class FlashVStreamQwen2VLConfig(Qwen2VLConfig):
        model_type = MODEL_TYPE

    try:
        AutoConfig.register(MODEL_TYPE, FlashVStreamQwen2VLConfig)
    except ValueError:  # registered already
        pass


def memory_config_from(settings: dict, frame_grid: int) -> FlashConfig:
    """The ``FlashConfig`` of a checkpoint's ``flash_memory_config`` for frames of
    ``frame_grid`` merged tokens a side (``2·frame_grid`` patches); ``ValueError`` naming
    what vstream cannot run."""
    if settings is not None and not isinstance(settings, dict):
        raise ValueError(f"expected an object of flash_memory_* fields, got {type(settings).__name__}")
    settings = {**REFERENCE_MEMORY, **(settings or {})}  # none: the reference's defaults, as it falls back
    methods = (settings["flash_memory_temporal_method"], settings["flash_memory_spatial_method"])
    if methods != ("kmeans_ordered", "klarge_retrieve"):
        raise ValueError(f"temporal/spatial methods {methods[0]!r}/{methods[1]!r}: vstream runs "
                         "'kmeans_ordered'/'klarge_retrieve' (the released settings)")
    if settings["flash_memory_temporal_poolsize"] != 2:
        raise ValueError(f"flash_memory_temporal_poolsize {settings['flash_memory_temporal_poolsize']!r}: vstream "
                         "runs 2 (the synopsis at half resolution)")
    temporal, spatial = settings["flash_memory_temporal_length"], settings["flash_memory_spatial_length"]
    if not (isinstance(temporal, int) and isinstance(spatial, int) and temporal >= 2 and spatial >= 0
            and temporal % 2 == 0 and spatial % 2 == 0):
        raise ValueError(f"temporal/spatial lengths {temporal!r}/{spatial!r}: expected even ints, temporal >= 2")
    patches = 2 * frame_grid
    return FlashConfig(base_grid=patches, synopsis_length=temporal // 2, synopsis_grid=frame_grid, synopsis_chunk=1,
                       detail_length=spatial // 2, detail_grid=patches, bank=BankConfig(grid=patches))


@register_model(MODEL_TYPE)
class FlashVStreamQwenModel(Qwen2VLModel):
    """Flash-VStream-Qwen: Qwen2-VL whose tower's patch features feed a ``FlashMemory`` at
    the checkpoint's settings, the merger projecting what the memory gives (see the
    module docstring).

    Args:
        lm, tokenizer, name, image_processor, frame_grid: as ``Qwen2VLModel``.
        memory: the checkpoint's ``FlashConfig``.
    """

    timed_memory = False
    frame_rate = 1.0  # time-axis positions a second: one a frame at vstream's default sampling
    vision_tower_text = ("Qwen2-VL's ViT, frames at 448 px and at half size, patch features before the merger "
                         "(32x32 a frame, the half view beside the full)")
    memory_text = "Flash (60 synopsis centroids at 16x16 patches, 30 detail frames at 32x32), the checkpoint's sizes"
    prompt_text = ("one video block: detail frames then synopsis centroids through the merger, M-RoPE positions "
                   "as the reference's calc_am_rope; the times in a line after it")

    def __init__(self, lm, tokenizer, name: str, image_processor, memory: FlashConfig, frame_grid: int = 16):
        self.memory = memory
        super().__init__(lm, tokenizer, name, image_processor, frame_grid)

    @classmethod
    def from_pretrained(cls, name: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        import transformers

        register_config()
        config = load_pretrained(transformers.AutoConfig, name, "Flash-VStream-Qwen config")
        settings = getattr(config.vision_config, "flash_memory_config", None)
        try:
            memory = memory_config_from(settings, frame_grid=16)
        except ValueError as exc:
            raise ModelLoadError(f"{name!r}: its flash_memory_config is not one vstream runs: {exc}") from None
        (lm, info), tokenizer = cls.load_parts(name, dtype, config=config, key_mapping=LEGACY_KEYS,
                                               output_loading_info=True)
        wrong = [f"{what} {', '.join(sorted(keys)[:4])}" for what, keys in
                 (("missing", info["missing_keys"]), ("unexpected", info["unexpected_keys"])) if keys]
        if wrong:
            raise ModelLoadError(f"{name!r} does not match the Qwen2-VL layout: {'; '.join(wrong)}")
        return cls(lm.to(device), tokenizer, name, cls.load_image_processor(name), memory)

    def make_frame_encoder(self):
        return MergedPatchEncoder(self.vision_tower(), self.image_processor, self.frame_grid, merged=False,
                                  half_view=True)

    def memory_config(self) -> FlashConfig:
        return self.memory

    def memory_projector(self) -> torch.nn.Module:
        return self.vision_tower().merger

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """One memory item's features ``[s*s, 2D]`` (raster order; the full and half views)
        -> its ``[s*s/4, H]`` LLM embeddings: a detail frame's full view or a centroid's
        half view through the merger."""
        merger = self.memory_projector()
        weight = next(merger.parameters())
        detail = features.shape[0] == self.memory.detail_grid**2
        view = full_view_patches(features) if detail else half_view_patches(features)
        return merger(unmerged_windows(view.to(weight.device, weight.dtype)))

    def question_pieces(self, context: Context, question: str) -> list[Piece]:
        """The untimed user turn (``ChatModel.question_pieces``) with the memory block as
        the reference orders it: each detail frame, then each synopsis centroid, one piece
        an item (the merger reads an item's whole grid)."""
        pieces = super().question_pieces(context, question)
        memory = [i for i, piece in enumerate(pieces) if piece.features is not None]
        if not memory:
            return pieces
        items = {"detail": [], "synopsis": []}
        sizes = {"detail": self.memory.detail_grid ** 2, "synopsis": self.memory.synopsis_grid ** 2}
        tokens = context.memory
        at = 0
        while at < len(tokens):
            kind = tokens.kinds[at]
            if kind not in sizes:
                raise ModelLoadError(f"{self.name}: reads a Flash memory; got {kind!r} tokens")
            (t0, t1), end = tokens.spans[at], at + sizes[kind]
            items[kind].append(Piece(features=tokens.tokens[at:end], evidence=(t0, t1, "frame")))
            at = end
        return [*pieces[:memory[0]], *items["detail"], *items["synopsis"], *pieces[memory[-1] + 1:]]

    def block_positions(self, block: list[tuple[int, Piece]], at: int) -> tuple[torch.Tensor, int]:
        """The memory block's M-RoPE positions as the reference's ``calc_am_rope`` gives
        them, and the text's next position as its ``get_rope_index`` does: from the block's
        first position ``p`` (= ``at``), a detail frame's tokens at ``p + (f, h, w)`` (``f``
        its frame index, ``h, w`` along its merged grid), then each centroid's at
        ``p + S + (f, h, w)`` (``S`` the number of detail tokens, ``f`` its span's middle),
        and the text after the block from ``p + S + max(C, side)`` (``C`` centroids of
        ``side × side`` tokens), where the reference's placeholder grid ends."""
        detail_tokens = (self.memory.detail_grid // 2) ** 2
        spatial = sum(length for length, _ in block if length == detail_tokens)
        axes, centroids = [], 0
        for length, piece in block:
            side = math.isqrt(length)
            start, end = piece.evidence[0], piece.evidence[1]
            frame = round((start + end) / 2 * self.frame_rate)
            detail = length == detail_tokens
            centroids += not detail
            cells = torch.arange(length)
            axes.append(torch.stack([torch.full((length,), frame), cells // side, cells % side])
                        + (at if detail else at + spatial))
        return torch.cat(axes, dim=1), at + spatial + max(centroids, self.memory.synopsis_grid // 2)
