"""``VisionEncoder``: patch features of frames from the vision tower of a transformers
model, named by hub id or local folder and loaded with ``from_pretrained``.

Loading. ``AutoConfig`` reads the checkpoint's ``model_type`` first and decides:

| model_type | tower class | where the tower's weights are |
|---|---|---|
| ``clip``, ``clip_vision_model`` | ``CLIPVisionModel`` | the whole checkpoint (text half skipped) |
| ``siglip``, ``siglip_vision_model`` (SigLIP, fixed-size SigLIP2) | ``SiglipVisionModel`` | same |
| ``siglip2``, ``siglip2_vision_model`` (SigLIP2 NaFlex) | ``Siglip2VisionModel`` | same |
| ``llava``, ``llava_next``, ``llava_onevision`` | by ``vision_config.model_type`` (CLIP or SigLIP) | ``vision_tower.*`` |

For a VLM only the tower is built and loaded: the tower class's ``from_pretrained`` gets
the VLM's ``vision_config`` and a ``key_mapping`` that strips ``vision_tower.`` (and
``model.vision_tower.``), so the language model and projector weights are never
materialised; what stays unmatched is reported by transformers as unexpected and ignored.
A tower weight missing from the checkpoint is an ``EncoderError``, never a silently random
tower. Both layouts load: the one transformers 5 writes (``vision_tower.embeddings...``) and
the older hub one (``vision_tower.vision_model.embeddings...``). Qwen2-VL is not supported:
its tower has no fixed image size and emits 2×2-merged tokens in window order, which needs
its own preprocessing and un-permuting.

Preprocessing. The checkpoint's image processor, always with transformers' PIL backend
(``backend="pil"``; the torchvision backend is not used even where it is installed, so
features do not depend on it). CLIP centre-crops, SigLIP resizes to a square. The anyres
processors of LLaVA-NeXT and LLaVA-OneVision tile an image into many views; the memory
wants one view per frame at the tower's resolution, so for them a plain PIL processor with
the checkpoint's resampling, rescale factor, mean and std resizes the frame to
``image_size × image_size`` (the same base view anyres puts first, and what LLaVA-OneVision
does to video frames). SigLIP2 NaFlex frames are resized to a square first, so its
``max_num_patches`` becomes a square grid.

Output. ``hidden_states[layer]`` of the tower (default ``-2``, the penultimate layer's
output, as LLaVA uses), with the CLS token dropped when the tower has one (CLIP:
``1 + grid²`` tokens; SigLIP: ``grid²``): ``[B, grid², D]``, ``grid = image_size //
patch_size``, ``D = hidden_size``. The layers after ``layer`` are removed from the tower
once at load, and the wanted layer's output is taken by a forward hook, so neither the
unused layers nor every layer's hidden state are computed or kept. Features are returned
as float32 on the encoder's device (the memory runs where its first features are).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vstream.config import JsonConfig, check_choice, check_int, resolve_model_folder
from vstream.device import check_device, resolve_device
from vstream.encoders.registry import encode_batched, register_encoder
from vstream.errors import ConfigError, EncoderError

_TOWER_CLASSES = {
    "clip_vision_model": "CLIPVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "siglip2_vision_model": "Siglip2VisionModel",
}
_TOWER_CHECKPOINTS = ("clip", "siglip", "siglip2", *_TOWER_CLASSES)  # a tower alone, or with its text half
_VLMS = ("llava", "llava_next", "llava_onevision")  # tower at model.vision_tower
_ANYRES = ("llava_next", "llava_onevision")  # processors that tile; one base view instead
_VLM_TOWER_KEYS = {r"^(?:model\.)?vision_tower\.": ""}
SUPPORTED_MODEL_TYPES = tuple(sorted({*_TOWER_CHECKPOINTS, *_VLMS}))
"""``model_type`` values whose vision tower ``VisionEncoder`` can load."""


@dataclass
class VisionConfig(JsonConfig):
    """The vision-tower encoder.

    Attributes:
        model: hub id (``"openai/clip-vit-large-patch14"``) or local folder of a CLIP,
            SigLIP or SigLIP2 checkpoint or of a supported VLM (LLaVA, LLaVA-NeXT,
            LLaVA-OneVision).
        layer: which hidden state is the feature, numbered as transformers'
            ``hidden_states``: ``k`` in ``1..L`` is the output of layer ``k``, ``-1`` the
            last layer's, ``-2`` (default) the penultimate's. ``0`` (the patch
            embeddings) is not offered.
        dtype: weights and activations, ``"float32"`` (default), ``"bfloat16"`` or
            ``"float16"``; features are returned as float32 whatever this is.
        device: ``"auto"`` (default: CUDA when available, else CPU), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``.
        batch_size: frames per forward pass (default 16); ``encode`` splits larger
            batches into chunks of this size.
    """

    model: str = ""
    layer: int = -2
    dtype: str = "float32"
    device: str = "auto"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        if not (isinstance(self.model, str) and self.model.strip()):
            raise ConfigError(f"VisionConfig.model must name a hub id or a local folder, got {self.model!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer == 0:
            raise ConfigError(f"VisionConfig.layer must be a nonzero int (-2: the penultimate layer), got {self.layer!r}")
        check_choice("VisionConfig", "dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_device("VisionConfig.device", self.device)
        check_int("VisionConfig", "batch_size", self.batch_size, 1)


@contextmanager
def _quiet_transformers():
    """Hold transformers' logging at errors: loading a tower from a whole checkpoint
    lists every skipped text or LLM weight as unexpected. Missing weights are checked
    by the caller instead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@register_encoder("vision")
class VisionEncoder:
    """Patch features from the vision tower of a CLIP, SigLIP or VLM checkpoint.

    Attributes:
        grid: side of the patch grid (``image_size // patch_size``).
        dim: feature width (the tower's ``hidden_size``).
        model_type: the checkpoint's ``model_type`` (``"clip"``, ``"llava_onevision"``, ...).
        tower: the loaded tower (a transformers ``PreTrainedModel``, cut after ``layer``).
        processor: the transformers PIL image processor that makes its input.
        device, dtype: where the tower runs and in what precision.

    Args:
        config: the model, feature layer, dtype, device and batch size.
        tower: a tower already loaded from ``config.model`` (a VLM adapter passes its
            own): used in place, with a hook on the feature layer, instead of loading
            and cutting a copy.

    Raises (on construction):
        EncoderError: no such folder, a hub id that cannot be fetched, an architecture
            not in ``SUPPORTED_MODEL_TYPES``, weights that do not match the config, no
            image processor, or a ``layer`` the tower does not have.
    """

    config_class = VisionConfig

    def __init__(self, config: VisionConfig, tower=None):
        import torch
        from transformers import AutoConfig

        if not isinstance(config, VisionConfig):
            raise ConfigError(f"VisionEncoder: config must be a VisionConfig, got {type(config).__name__}")
        self.config = config
        source = str(resolve_model_folder(config.model, "vision model", error=EncoderError))
        try:
            model_config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError, KeyError) as exc:
            raise EncoderError(f"cannot load the config of vision model {config.model!r}: {exc}") from None
        self.model_type = model_config.model_type
        if self.model_type in _VLMS:
            vision_config, key_mapping = model_config.vision_config, _VLM_TOWER_KEYS
        elif self.model_type in _TOWER_CHECKPOINTS:
            is_tower_config = self.model_type in _TOWER_CLASSES
            vision_config, key_mapping = (model_config if is_tower_config else model_config.vision_config), None
        else:
            raise EncoderError(f"vision model {config.model!r} has model_type {self.model_type!r}, which has no "
                               f"vision tower vstream can load; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        tower_type = vision_config.model_type
        if tower_type not in _TOWER_CLASSES:
            raise EncoderError(f"vision model {config.model!r} ({self.model_type}) has a {tower_type!r} tower; "
                               f"supported towers: {', '.join(sorted(_TOWER_CLASSES))}")
        self._naflex = tower_type == "siglip2_vision_model"
        self.device = resolve_device(config.device, "VisionConfig.device")
        self.dtype = getattr(torch, config.dtype)
        self._layer = self._layer_index(vision_config.num_hidden_layers)
        self._features = None  # the hooked layer's output of the running forward pass
        self._lock = threading.Lock()  # one forward pass at a time: the hook writes _features
        if tower is None:
            self.tower = self._load_tower(source, tower_type, vision_config, key_mapping)
        else:  # a VLM's own tower, already loaded: hook the wanted layer, cut nothing
            tower.encoder.layers[self._layer - 1].register_forward_hook(self._catch)
            self.tower = tower.eval()
            self.device, self.dtype = tower.device, tower.dtype
        self.processor = self._load_processor(source, vision_config)
        self.dim = vision_config.hidden_size
        self.grid = self._probe_grid(vision_config)

    def __repr__(self) -> str:
        return (f"VisionEncoder(model={self.config.model!r}, type={self.model_type}, grid={self.grid}, "
                f"dim={self.dim}, layer={self.config.layer}, dtype={self.config.dtype}, device={self.device})")

    # -- loading --------------------------------------------------------------------------

    def _layer_index(self, num_layers: int) -> int:
        """``config.layer`` as ``1..L`` (layer ``k``'s output is ``hidden_states[k]``)."""
        layer = self.config.layer
        index = layer if layer > 0 else num_layers + 1 + layer
        if not 1 <= index <= num_layers:
            raise EncoderError(f"VisionConfig.layer {layer} does not exist in {self.config.model!r}: its tower has "
                               f"{num_layers} layers (layer must be in 1..{num_layers} or -{num_layers}..-1)")
        return index

    def _load_tower(self, source: str, tower_type: str, vision_config, key_mapping):
        import transformers

        tower_class = getattr(transformers, _TOWER_CLASSES[tower_type])
        try:
            with _quiet_transformers():
                tower, info = tower_class.from_pretrained(source, config=vision_config, dtype=self.dtype,
                                                          key_mapping=key_mapping, output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise EncoderError(f"cannot load the vision tower of {self.config.model!r}: {exc}") from None
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise EncoderError(f"the checkpoint {self.config.model!r} lacks {len(missing)} weight(s) of its "
                               f"{tower_class.__name__}, e.g. {', '.join(missing[:3])}")
        # Keep the layers up to the wanted one; its output is caught by a hook.
        tower.encoder.layers = tower.encoder.layers[: self._layer]
        tower.encoder.layers[-1].register_forward_hook(self._catch)
        return tower.to(self.device).eval()

    def _catch(self, module, inputs, output) -> None:
        self._features = output[0] if isinstance(output, tuple) else output

    def _load_processor(self, source: str, vision_config):
        from transformers import AutoImageProcessor
        from transformers.image_processing_backends import PilBackend

        try:
            processor = AutoImageProcessor.from_pretrained(source, backend="pil")
        except (OSError, ValueError, KeyError) as exc:
            raise EncoderError(f"cannot load the image processor of {self.config.model!r}: {exc}") from None
        if self.model_type not in _ANYRES:
            return processor
        side = vision_config.image_size
        return PilBackend(do_resize=True, size={"height": side, "width": side}, resample=processor.resample,
                          do_center_crop=False, do_rescale=processor.do_rescale,
                          rescale_factor=processor.rescale_factor, do_normalize=processor.do_normalize,
                          image_mean=processor.image_mean, image_std=processor.image_std,
                          do_convert_rgb=True, do_pad=False)

    def _probe_grid(self, vision_config) -> int:
        """The patch grid side, checked against what the processor makes of a test image."""
        inputs = self._preprocess([np.zeros((8, 8, 3), np.uint8)])
        if self._naflex:
            rows, cols = inputs["spatial_shapes"][0].tolist()
            if rows != cols:
                raise EncoderError(f"{self.config.model!r}: the processor made a {rows}×{cols} patch grid of a "
                                   f"square image; expected a square grid")
            return rows
        size = tuple(inputs["pixel_values"].shape[-2:])
        expected = vision_config.image_size
        if size != (expected, expected):
            raise EncoderError(f"{self.config.model!r}: its image processor makes {size[0]}×{size[1]} images but "
                               f"the tower expects {expected}×{expected}")
        return expected // vision_config.patch_size

    # -- encoding -------------------------------------------------------------------------

    def _preprocess(self, images: list[np.ndarray]):
        if self._naflex:  # a square input gives a square grid of max_num_patches
            side = math.isqrt(self.processor.max_num_patches) * self.processor.patch_size
            images = [np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC)) for image in images]
        return self.processor(images=images, return_tensors="pt", input_data_format="channels_last")

    def encode(self, images: Sequence[np.ndarray]):
        """``images``: ``B`` frames ``[H, W, 3]`` uint8 RGB, any sizes ->
        ``[B, grid * grid, dim]`` float32 on ``device``, patches in row-major order;
        run ``batch_size`` frames at a time.

        Raises:
            EncoderError: an image that is not ``[H, W, 3]`` uint8 (named by its index).
        """
        return encode_batched(self, images, self._forward)

    def _forward(self, images: list[np.ndarray]):
        inputs = self._preprocess(images)
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        self._features = None
        if self._naflex:
            self.tower(pixel_values=pixel_values, pixel_attention_mask=inputs["pixel_attention_mask"].to(self.device),
                       spatial_shapes=inputs["spatial_shapes"].to(self.device))
        else:
            self.tower(pixel_values=pixel_values)
        features, patches = self._features, self.grid * self.grid
        self._features = None
        if self._naflex:  # padding patches, if any, come after the grid
            features = features[:, :patches]
        elif features.shape[1] == patches + 1:  # drop the CLS token
            features = features[:, 1:]
        if features.shape[1] != patches:
            raise EncoderError(f"{self.config.model!r}: the tower gave {features.shape[1]} tokens per frame; "
                               f"expected {patches} ({self.grid}×{self.grid}), or one more with a CLS token")
        return features.float()
