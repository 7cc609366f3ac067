"""Image decoders: frame features ``[B, n, D]`` (a granularity of ``pyramid``) to pictures.

- ``RetrievalDecoder(memory)``: no weights. The picture is the stored thumbnail of the
  stream frame whose features are nearest: the bank's index proposes frames by the mean
  token (equal at every level of a frame's pyramid), and they are re-ranked by exact
  squared distance at the features' grid (``StreamMemory.nearest_frames``). Features
  finer than the bank's grid are pooled down to it first.
- ``DiffusionDecoder.from_pretrained(hub_id_or_folder)``: a PUMA-style diffusion decoder
  in the diffusers folder layout (``unet/`` a ``UNet2DConditionModel``, ``vae/`` an
  ``AutoencoderKL``, ``scheduler/`` any diffusers scheduler). The features are the UNet's
  ``encoder_hidden_states``; when D differs from its ``cross_attention_dim`` they pass
  through the linear map in ``projection.safetensors`` (``weight [C, D]``, ``bias [C]``)
  if the folder (or the hub id's snapshot) has one, else through a fixed random map (seed 0,
  scaled by 1/√D) that keeps the pipeline running but carries no trained meaning. A hub id
  is found as every model is (``vstream.config.resolve_model_folder``), only these files. Needs ``pip install
  'vstream[generate]'`` (diffusers).

``create_decoder(name, memory)``: ``"retrieval"`` or a diffusion decoder's hub id or folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vstream.config import JsonConfig, check_int, resolve_model_folder
from vstream.errors import ConfigError, ModelLoadError
from vstream.kernels import pool_grid
from vstream.memory import StreamMemory

from .llm import load_pretrained

PARTS = ("unet", "vae", "scheduler")
PROJECTION = "projection.safetensors"


class ImageDecoder:
    """Turns features ``[B, n, D]`` (n a square number of tokens) into ``B`` pictures."""

    def decode(self, features: torch.Tensor) -> list[Image.Image]:
        raise NotImplementedError


def _grid_of(features: torch.Tensor, dim: int | None) -> int:
    """The grid side of ``[B, n, D]`` features, checked."""
    if not isinstance(features, torch.Tensor) or features.dim() != 3 or not features.is_floating_point():
        got = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ConfigError(f"decode: features must be a float Tensor [B, n, D], got {got}")
    grid = math.isqrt(features.shape[1])
    if grid * grid != features.shape[1] or grid == 0:
        raise ConfigError(f"decode: {features.shape[1]} tokens per picture; expected a square grid (1, 4, 16, ...)")
    if dim is not None and features.shape[2] != dim:
        raise ConfigError(f"decode: features are {features.shape[2]} wide; this decoder takes {dim}")
    return grid


class RetrievalDecoder(ImageDecoder):
    """The thumbnail of the memory's bank frame nearest to each feature map.

    Args:
        memory: a ``StreamMemory`` whose bank keeps thumbnails (``BankConfig.thumbnails``).
        candidates: frames the index proposes per picture before the exact re-ranking (default 16).
    """

    def __init__(self, memory: StreamMemory, candidates: int = 16):
        if not isinstance(memory, StreamMemory):
            raise ConfigError(f"RetrievalDecoder takes a StreamMemory, got {type(memory).__name__}")
        check_int("RetrievalDecoder", "candidates", candidates, 1)
        self.memory, self.candidates = memory, candidates

    def nearest(self, features: torch.Tensor) -> list[int]:
        """Bank frame id nearest to each of ``features`` ``[B, n, D]``."""
        bank = self.memory.bank
        if bank is None or not len(bank):
            raise ConfigError("RetrievalDecoder: the memory holds no frames yet")
        grid = min(_grid_of(features, bank.dim), bank.config.grid)
        query = pool_grid(features.detach().float(), grid).to(self.memory.device)
        # one picture at a time: nearest_frames keeps the frames it picks distinct within a call
        return [self.memory.nearest_frames(query[b : b + 1], self.candidates)[0] for b in range(len(query))]

    def decode(self, features: torch.Tensor) -> list[Image.Image]:
        ids = self.nearest(features)
        pictures = self.memory.bank.thumbnails(ids)
        missing = [i for i, picture in zip(ids, pictures) if picture is None]
        if missing:
            raise ConfigError(f"RetrievalDecoder: bank frame {missing[0]} has no thumbnail (added without an image, "
                              "or BankConfig.thumbnails is off)")
        return pictures


@dataclass
class DiffusionConfig(JsonConfig):
    """How ``DiffusionDecoder`` samples.

    Attributes:
        steps: denoising steps (default 25).
        seed: seed of the initial latent noise (default 0); the same seed gives the same pictures.
        size: picture side in pixels, a multiple of the VAE's downscale factor; ``None``
            (default) takes the UNet's ``sample_size`` times that factor.
    """

    steps: int = 25
    seed: int = 0
    size: int | None = None

    def __post_init__(self) -> None:
        check_int("DiffusionConfig", "steps", self.steps, 1)
        check_int("DiffusionConfig", "seed", self.seed, 0)
        if self.size is not None:
            check_int("DiffusionConfig", "size", self.size, 8)


class DiffusionDecoder(ImageDecoder):
    """A diffusion decoder conditioned on features through cross-attention (see the module
    docstring). Build it with ``from_pretrained``."""

    def __init__(self, unet, vae, scheduler, projection: torch.nn.Linear | None, config: DiffusionConfig):
        self.unet, self.vae, self.scheduler = unet.eval(), vae.eval(), scheduler
        self.projection, self.config = projection, config
        self.scale = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent cell

    @classmethod
    def from_pretrained(cls, name: str | Path, config: DiffusionConfig | None = None,
                        dtype: torch.dtype = torch.float32, device: str = "cpu") -> DiffusionDecoder:
        """Load ``unet/``, ``vae/`` and ``scheduler/`` from a local folder or a hub id (the
        local cache first, as every model vstream loads)."""
        try:
            import diffusers
        except ImportError:
            raise ModelLoadError("the diffusion decoder needs diffusers: pip install 'vstream[generate]'") from None
        name = str(name)
        folder = resolve_model_folder(name, "diffusion decoder", allow_patterns=[f"{part}/*" for part in PARTS]
                                      + [PROJECTION])
        missing = [part for part in PARTS if not (folder / part).is_dir()]
        if missing:
            raise ModelLoadError(f"diffusion decoder {name!r}: expected the diffusers layout with subfolders "
                                 f"{', '.join(PARTS)}; missing {', '.join(missing)}")
        unet = load_pretrained(diffusers.UNet2DConditionModel, str(folder), "diffusion UNet", subfolder="unet",
                               torch_dtype=dtype)
        vae = load_pretrained(diffusers.AutoencoderKL, str(folder), "diffusion VAE", subfolder="vae", torch_dtype=dtype)
        scheduler_class = _scheduler_class(diffusers, name, folder)
        scheduler = load_pretrained(scheduler_class, str(folder), "diffusion scheduler", subfolder="scheduler")
        if unet.config.addition_embed_type is not None:
            raise ModelLoadError(f"diffusion decoder {name!r}: UNet addition_embed_type "
                                 f"{unet.config.addition_embed_type!r} is not supported (only plain cross-attention)")
        return cls(unet.to(device), vae.to(device), scheduler, _projection(folder, unet), config or DiffusionConfig())

    @torch.no_grad()
    def decode(self, features: torch.Tensor) -> list[Image.Image]:
        _grid_of(features, self.projection.in_features if self.projection is not None else None)
        device, dtype = self.unet.device, self.unet.dtype
        condition = features.detach().to(device, torch.float32)
        projection = self.projection or (_seeded_projection(condition.shape[2], self.width)
                                         if condition.shape[2] != self.width else None)
        if projection is not None:
            condition = projection.to(device)(condition)
        condition = condition.to(dtype)
        side = (self.config.size or self.unet.config.sample_size * self.scale) // self.scale
        generator = torch.Generator().manual_seed(self.config.seed)
        shape = (len(features), self.unet.config.in_channels, side, side)
        latents = torch.randn(shape, generator=generator).to(device, dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(self.config.steps)
        for t in self.scheduler.timesteps:
            noise = self.unet(self.scheduler.scale_model_input(latents, t), t, encoder_hidden_states=condition).sample
            latents = self.scheduler.step(noise, t, latents).prev_sample
        pixels = self.vae.decode(latents / self.vae.config.scaling_factor).sample  # [B, 3, H, W] in [-1, 1]
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        return [Image.fromarray(p.numpy()) for p in pixels]

    @property
    def width(self) -> int:
        """The UNet's ``cross_attention_dim``: the feature width it takes without a projection."""
        return self.unet.config.cross_attention_dim


def create_decoder(name: str, memory: StreamMemory | None = None, config: DiffusionConfig | None = None) -> ImageDecoder:
    """``"retrieval"``: a ``RetrievalDecoder`` over ``memory``; anything else: a
    ``DiffusionDecoder`` from that hub id or folder."""
    if name == "retrieval":
        return RetrievalDecoder(memory)
    return DiffusionDecoder.from_pretrained(name, config)


def _seeded_projection(dim: int, width: int) -> torch.nn.Linear:
    """The documented stand-in for a missing projection: ``[D] -> [C]``, weights from seed 0 scaled by 1/√D, no bias."""
    projection = torch.nn.Linear(dim, width, bias=False)
    weight = torch.randn(width, dim, generator=torch.Generator().manual_seed(0)) / math.sqrt(dim)
    projection.weight.data.copy_(weight)
    return projection


def _scheduler_class(diffusers, name: str, folder: Path):
    """The scheduler class named in ``scheduler/scheduler_config.json`` of decoder ``name``'s ``folder``."""
    try:
        class_name = json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("_class_name")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"diffusion decoder {name!r}: cannot read scheduler/scheduler_config.json ({exc})") from None
    scheduler = getattr(diffusers, str(class_name), None)
    if scheduler is None or not hasattr(scheduler, "set_timesteps"):
        raise ModelLoadError(f"diffusion decoder {name!r}: unknown scheduler class {class_name!r}")
    return scheduler


def _projection(folder: Path, unet) -> torch.nn.Linear | None:
    """The folder's ``projection.safetensors`` as a Linear, or None (features pass as they are)."""
    path = folder / PROJECTION
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
        weight, bias = tensors["weight"], tensors["bias"]
    except (OSError, SafetensorError, KeyError) as exc:
        raise ModelLoadError(f"{path}: cannot read weight and bias ({exc})") from None
    width = unet.config.cross_attention_dim
    if weight.dim() != 2 or weight.shape[0] != width or bias.shape != (width,):
        raise ModelLoadError(f"{path}: weight {list(weight.shape)} and bias {list(bias.shape)} do not map "
                             f"features to the UNet's cross_attention_dim {width}")
    projection = torch.nn.Linear(weight.shape[1], width)
    projection.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return projection
