"""What every frame encoder shares: the ``FrameEncoder`` interface, a timm-style registry
(``register_encoder`` / ``create_encoder`` / ``list_encoders``), the input check for a
batch of images, and the JSON round trip of the encoders' configs.

A frame encoder turns a batch of RGB frames into a square grid of patch features per
frame, the input the memory takes (``StreamMemory.add`` wants ``[P, D]``, P a square
grid). Built in:

- ``"pixels"`` (``PixelEncoder``): parameter-free pooled colour statistics, for when no
  vision model is given;
- ``"vision"`` (``VisionEncoder``): the vision tower of a transformers model (CLIP,
  SigLIP, or the tower of a supported VLM), named by hub id or local folder.

``create_encoder`` takes a registered name, ``"auto"`` (``"imagenet"`` when its weights
are installed, else ``"pixels"``), or anything else that names a model (a hub id
``"org/name"`` or a local folder), which builds a ``VisionEncoder`` for it. Importing
this module does not import torch or transformers.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from vstream.config import parse_spec
from vstream.errors import ConfigError, EncoderError

if TYPE_CHECKING:
    import torch

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub repository id, ``"org/name"``."""
    return bool(_HUB_ID.match(name))


@runtime_checkable
class FrameEncoder(Protocol):
    """A batch of frames in, a square patch grid of features per frame out.

    An encoder whose features can be put in words may also have ``describe(means)``:
    ``[n, D]`` mean tokens (of memory clusters) -> ``n`` short captions, which the
    text-only path adds to its scene notes (``PixelEncoder`` names the colour).

    Attributes:
        grid: side of the square patch grid each frame becomes (``grid * grid`` tokens).
        dim: feature width ``D``.
        device: the ``torch.device`` its features come back on (the memory runs there).
    """

    grid: int
    dim: int
    device: torch.device

    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``images``: ``B`` arrays ``[H, W, 3]`` uint8 RGB (sizes may differ) ->
        ``[B, grid * grid, dim]`` float32, patches in row-major grid order."""
        ...


_REGISTRY: dict[str, type] = {}


def register_encoder(name: str):
    """Class decorator: make an encoder creatable by ``create_encoder(name)``. The class
    takes one config object, and names its config class in ``config_class``."""

    def register(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def _load_builtins() -> None:
    # The built-in encoders register themselves when their modules load; they import
    # this module, so they are imported here, on first use, not at the top.
    from vstream.encoders import biglittle, imagenet, pixels, vision  # noqa: F401


def default_encoder() -> str:
    """What ``"auto"`` names: ``"imagenet"`` when its packages are installed, else ``"pixels"``."""
    from vstream.encoders import imagenet

    return "imagenet" if imagenet.available() else "pixels"


def list_encoders() -> list[str]:
    """Names of the registered frame encoders."""
    _load_builtins()
    return sorted(_REGISTRY)


def create_encoder(name_or_model: str, config=None, device: str | None = None, **fields) -> FrameEncoder:
    """A frame encoder by registered name (``"pixels"``, ``"vision"``), or a
    ``VisionEncoder`` for a model named by hub id (``"openai/clip-vit-large-patch14"``)
    or local folder. Configured by a config object or by its fields as keywords:
    ``create_encoder("pixels", grid=8)``, ``create_encoder("vision", model="...")``,
    ``create_encoder("google/siglip-base-patch16-224", dtype="bfloat16")``. One string
    can also name an encoder with its fields (``vstream.config.parse_spec``), which is
    what ``SessionConfig.encoder`` and ``--encoder`` take:
    ``"biglittle:big=openai/clip-vit-large-patch14,little=openai/clip-vit-base-patch16,keep_ratio=0.25"``.
    ``device`` (``vstream.device``: ``"auto"``, ``"cpu"``, ``"cuda[:N]"``) places an
    encoder built from fields where its fields name no device.

    Raises:
        EncoderError: an unknown name that names no model either (the known names are
            listed), or a model that cannot be loaded.
        ConfigError: a bad config value.
    """
    _load_builtins()
    if not isinstance(name_or_model, (str, os.PathLike)):
        raise EncoderError(f"create_encoder: expected an encoder name or a model id/folder, got {name_or_model!r}")
    name = os.fspath(name_or_model)
    if name == "auto":
        name = default_encoder()
    if name.partition(":")[0] in _REGISTRY and ":" in name:
        if config is not None or fields:
            raise ConfigError(f"create_encoder({name!r}): the string already gives the fields; pass no others")
        name, fields = parse_spec(name)
    if name in _REGISTRY:
        cls = _REGISTRY[name]
    elif os.path.exists(name) or is_hub_id(name) or os.sep in name:
        cls = _REGISTRY["vision"]
        if config is not None:
            raise ConfigError(f"create_encoder({name!r}): pass either a model or a config, not both")
        fields = {**fields, "model": name}
    else:
        raise EncoderError(f"unknown encoder {name!r}; known: {', '.join(list_encoders())}, "
                           f"or a model as a hub id ('org/name') or a local folder")
    if config is None:
        if device is not None and "device" in {f.name for f in dataclasses.fields(cls.config_class)}:
            fields = {"device": device, **fields}
        return cls(cls.config_class.from_dict(fields))
    if fields:
        raise ConfigError(f"create_encoder({name!r}): pass either a config or its fields, not both")
    if not isinstance(config, cls.config_class):
        raise ConfigError(f"create_encoder({name!r}): config must be a {cls.config_class.__name__}, "
                          f"got {type(config).__name__}")
    return cls(config)


def check_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The batch as a list, each image checked: an ``np.ndarray`` ``[H, W, 3]`` uint8 with
    ``H, W >= 1``. A ``[B, H, W, 3]`` array counts as ``B`` images.

    Raises:
        EncoderError: naming the index of the first bad image and what it is.
    """
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise EncoderError(f"images: expected a sequence of [H, W, 3] arrays or one [B, H, W, 3] array, "
                               f"got an array of shape {images.shape}")
    elif not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        raise EncoderError(f"images: expected a sequence of [H, W, 3] uint8 arrays, got {type(images).__name__}")
    batch = list(images)
    for i, image in enumerate(batch):
        if not isinstance(image, np.ndarray):
            raise EncoderError(f"image {i}: expected an np.ndarray [H, W, 3] uint8, got {type(image).__name__}")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise EncoderError(f"image {i}: expected [H, W, 3] uint8 RGB with H, W >= 1, "
                               f"got {image.dtype} of shape {image.shape}")
    return batch


def encode_batched(encoder, images: Sequence[np.ndarray], forward):
    """What a tower-based encoder's ``encode`` does around its forward pass: check
    ``images``, run ``forward(list_of_images) -> [b, grid², dim]`` on
    ``encoder.config.batch_size`` frames at a time under ``encoder._lock`` and inference
    mode, and return ``[B, grid², dim]`` float32 on ``encoder.device``."""
    import torch

    batch = check_images(images)
    size = encoder.config.batch_size
    with encoder._lock, torch.inference_mode():
        chunks = [forward(batch[start : start + size]).float() for start in range(0, len(batch), size)]
    if not chunks:
        return torch.zeros(0, encoder.grid * encoder.grid, encoder.dim, device=encoder.device)
    return torch.cat(chunks)  # outside inference mode: an ordinary tensor
