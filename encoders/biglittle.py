"""``BigLittleEncoder`` (big.LITTLE ViT): a little vision tower sees every patch, the
big tower only the most important ones, and the two are merged back into one patch grid.

Per frame (``P = grid²`` patches):

1. The little tower runs on all patches up to its feature layer: features ``[B, P, d]``.
2. Importance scores ``[B, P]`` (each row sums to 1):
   - ``scorer="attention"`` (untrained): the attention of the little tower's feature layer
     (its last layer that runs), averaged over heads: from the class token to each patch
     for a tower with one (CLIP); for one without (SigLIP), the mean attention each patch
     receives from all patches, renormalised;
   - ``scorer="linear"``: a learnable ``nn.Linear(d, 1)`` on the little features, softmax
     over the patches (seeded init; random until trained).
3. The top ``k = round(keep_ratio * P)`` patches are kept, in patch order.
4. The big tower runs on the kept patches with every other patch as context. The kept
   patches (and CLIP's class token) start from the big tower's own embeddings (with its
   pre-layer norm where it has one); the other patches are represented by the little
   features projected to the big width. At each big layer only the kept tokens are
   queries and go through the attention output and the MLP; keys and values are
   computed, with that layer's norm and projections, for every position: the kept
   tokens' current states and the context tokens' fixed projected little features. So a
   kept token attends to all tokens, as the issue asks, while a dropped token costs
   only its key and value projections (2·D² of the ~12·D² per token of a layer), never
   a query, an output projection or an MLP. The context is not updated through the big
   layers: updating it would cost as much as running them on it.
5. Merge: the big features for the kept patches are scattered back to their patch
   positions; every other patch keeps its projected little feature. Output
   ``[B, P, D]`` float32 at the big tower's feature layer, row-major patch order.

With ``keep_ratio=1`` there is no context and step 4 is exactly the big tower (the same
as ``VisionEncoder`` on ``big``); with ``keep_ratio=0`` the big tower does not run and
the output is the projected little features.

Projection. ``nn.Identity`` when the widths are equal; otherwise ``nn.Linear(d, D)``,
zero bias, weight a seeded (semi-)orthogonal matrix: for ``d < D`` its columns are
orthonormal, so it is an isometry that keeps the little features' norms and distances.
That is only a start: an encoder built from two checkpoints has no paired features, so
``calibrate(frames)`` makes them from sample frames and fits the projection (and a
linear scorer) by ridge least squares; ``save_calibration`` / ``calibration=DIR`` keep
the fit (``projection`` and ``scorer`` are ordinary modules, to train further if wanted).

Both towers load through ``VisionEncoder`` (same ``layer``, ``dtype``, ``device``) and
each preprocesses frames with its own image processor. They must have the same patch
grid; SigLIP2 NaFlex towers are refused (their grid depends on the frame).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vstream.config import JsonConfig, check_choice, check_int, check_number
from vstream.device import check_device
from vstream.encoders.registry import check_images, encode_batched, register_encoder
from vstream.errors import ConfigError, EncoderError


@dataclass
class BigLittleConfig(JsonConfig):
    """The big.LITTLE encoder.

    Attributes:
        big: hub id or local folder of the big tower (CLIP / SigLIP family, or a
            supported VLM's tower); its width is the output width.
        little: hub id or local folder of the little tower; same patch grid as ``big``.
        keep_ratio: fraction of patches, in ``[0, 1]``, that go through the big tower
            (default 0.25); ``round(keep_ratio * grid²)`` patches are kept.
        scorer: ``"attention"`` (default: the little tower's attention, no training) or
            ``"linear"`` (a learnable linear scorer with softmax).
        layer: feature layer of both towers, numbered as transformers'
            ``hidden_states`` (default -2, the penultimate layer's output).
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``; features are
            returned as float32.
        device: ``"auto"`` (default), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        batch_size: frames per forward pass (default 16).
        seed: seed of the projection's and the linear scorer's initialisation (default 0).
        calibration: folder of a projection and linear scorer fitted by ``calibrate`` and
            saved by ``save_calibration`` (default None: the seeded defaults).
    """

    big: str = ""
    little: str = ""
    keep_ratio: float = 0.25
    scorer: str = "attention"
    layer: int = -2
    dtype: str = "float32"
    device: str = "auto"
    batch_size: int = 16
    seed: int = 0
    calibration: str | None = None

    def __post_init__(self) -> None:
        for name in ("big", "little"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                setattr(self, name, value)
            if not (isinstance(value, str) and value.strip()):
                raise ConfigError(f"BigLittleConfig.{name} must name a hub id or a local folder, got {value!r}")
        check_number("BigLittleConfig", "keep_ratio", self.keep_ratio, 0.0, 1.0, include_low=True)
        check_choice("BigLittleConfig", "scorer", self.scorer, ("attention", "linear"))
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer == 0:
            raise ConfigError(f"BigLittleConfig.layer must be a nonzero int (-2: the penultimate layer), "
                              f"got {self.layer!r}")
        check_choice("BigLittleConfig", "dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_device("BigLittleConfig.device", self.device)
        check_int("BigLittleConfig", "batch_size", self.batch_size, 1)
        check_int("BigLittleConfig", "seed", self.seed, 0)
        if isinstance(self.calibration, os.PathLike):
            self.calibration = os.fspath(self.calibration)
        if self.calibration is not None and not (isinstance(self.calibration, str) and self.calibration.strip()):
            raise ConfigError(f"BigLittleConfig.calibration must be a folder or None, got {self.calibration!r}")


def _attend(layer, hidden, context=None, want_probs: bool = False):
    """One CLIP / SigLIP encoder layer with queries from ``hidden`` only.

    ``hidden`` ``[B, Q, D]`` (the tokens the layer updates), ``context`` ``[B, C, D]``
    or None (fixed tokens that only give keys and values). Returns the updated hidden
    ``[B, Q, D]`` and, if ``want_probs``, the head-averaged attention ``[B, Q, Q + C]``.
    """
    import torch
    import torch.nn.functional as F

    attn = layer.self_attn
    batch, queries, width = hidden.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    normed = layer.layer_norm1(hidden)
    keys_in = normed if context is None else torch.cat([normed, layer.layer_norm1(context)], dim=1)

    def split(x):  # [B, N, D] -> [B, heads, N, head_dim]
        return x.view(batch, -1, heads, head_dim).transpose(1, 2)

    q, k, v = split(attn.q_proj(normed)), split(attn.k_proj(keys_in)), split(attn.v_proj(keys_in))
    probs = None
    if want_probs:
        probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)
        mixed = probs @ v
        probs = probs.mean(dim=1)
    else:
        mixed = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    hidden = hidden + attn.out_proj(mixed.transpose(1, 2).reshape(batch, queries, width))
    hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return hidden, probs


def _embed(tower, pixel_values):
    """The tower's input tokens: embeddings, then the pre-layer norm where it has one (CLIP)."""
    hidden = tower.embeddings(pixel_values)
    norm = getattr(tower, "pre_layrnorm", None)
    return hidden if norm is None else norm(hidden)


def merge(context, kept_features, kept):
    """Scatter the big features back to their patch positions.

    ``context`` ``[B, P, D]`` (projected little features), ``kept_features``
    ``[B, k, D]``, ``kept`` ``[B, k]`` patch indices -> ``[B, P, D]``: row ``kept[b, j]``
    of frame ``b`` is ``kept_features[b, j]``, every other row is ``context``'s.
    """
    index = kept.unsqueeze(-1).expand(-1, -1, context.shape[-1])
    return context.scatter(1, index, kept_features.to(context.dtype))


@register_encoder("biglittle")
class BigLittleEncoder:
    """Patch features from a big tower on the important patches and a little tower on all.

    Attributes:
        grid: side of the patch grid (the same for both towers).
        dim: feature width, the big tower's ``hidden_size``.
        big, little: the two ``VisionEncoder`` s (towers cut after the feature layer).
        projection: little width -> big width (``nn.Linear`` or ``nn.Identity``).
        scorer: the ``nn.Linear(little_dim, 1)`` scorer, or None with ``scorer="attention"``.

    Raises (on construction):
        EncoderError: a tower that cannot be loaded, a NaFlex tower, or towers whose
            patch grids differ.
    """

    config_class = BigLittleConfig

    def __init__(self, config: BigLittleConfig):
        import torch
        from torch import nn

        from vstream.encoders.vision import VisionConfig, VisionEncoder

        if not isinstance(config, BigLittleConfig):
            raise ConfigError(f"BigLittleEncoder: config must be a BigLittleConfig, got {type(config).__name__}")
        self.config = config
        common = {"layer": config.layer, "dtype": config.dtype, "device": config.device, "batch_size": config.batch_size}
        self.big = VisionEncoder(VisionConfig(model=config.big, **common))
        self.little = VisionEncoder(VisionConfig(model=config.little, **common))
        for role, encoder in (("big", self.big), ("little", self.little)):
            if encoder._naflex:
                raise EncoderError(f"BigLittleConfig.{role} {getattr(config, role)!r} is a SigLIP2 NaFlex tower; "
                                   f"big.LITTLE needs a fixed patch grid")
        if self.big.grid != self.little.grid:
            raise EncoderError(f"big tower {config.big!r} has a {self.big.grid}×{self.big.grid} patch grid but little "
                               f"tower {config.little!r} has {self.little.grid}×{self.little.grid}; they must match")
        self.grid, self.dim = self.big.grid, self.big.dim
        self.device, self.dtype = self.big.device, self.big.dtype
        generator = torch.Generator().manual_seed(config.seed)
        if self.little.dim == self.dim:
            self.projection = nn.Identity()
        else:
            self.projection = nn.Linear(self.little.dim, self.dim)
            with torch.no_grad():
                nn.init.orthogonal_(self.projection.weight, generator=generator)
                self.projection.bias.zero_()
        self.scorer = None
        if config.scorer == "linear":
            self.scorer = nn.Linear(self.little.dim, 1)
            with torch.no_grad():
                nn.init.normal_(self.scorer.weight, std=self.little.dim ** -0.5, generator=generator)
                self.scorer.bias.zero_()
            self.scorer.to(self.device, self.dtype)
        self.projection.to(self.device, self.dtype)
        self._lock = threading.Lock()
        if config.calibration is not None:
            self.load_calibration(config.calibration)

    def __repr__(self) -> str:
        return (f"BigLittleEncoder(big={self.config.big!r}, little={self.config.little!r}, grid={self.grid}, "
                f"dim={self.dim}, keep_ratio={self.config.keep_ratio}, scorer={self.config.scorer})")

    @property
    def kept_count(self) -> int:
        """Patches per frame that go through the big tower: ``round(keep_ratio * grid²)``."""
        return round(self.config.keep_ratio * self.grid * self.grid)

    # -- the steps --------------------------------------------------------------------------

    def _pixels(self, encoder, images: list[np.ndarray]):
        inputs = encoder.processor(images=images, return_tensors="pt", input_data_format="channels_last")
        pixel_values = inputs["pixel_values"]
        if pixel_values.ndim == 5:  # an anyres processor's views: the base view
            pixel_values = pixel_values[:, 0]
        return pixel_values.to(self.device, self.dtype)

    def _run_little(self, pixel_values):
        """The little tower on all patches -> features ``[B, P, d]`` (class token
        dropped) and importance scores ``[B, P]``."""
        import torch

        hidden = _embed(self.little.tower, pixel_values)
        layers = self.little.tower.encoder.layers
        for i, layer in enumerate(layers):
            hidden, probs = _attend(layer, hidden, want_probs=self.scorer is None and i == len(layers) - 1)
        patches = self.grid * self.grid
        has_cls = hidden.shape[1] == patches + 1
        features = hidden[:, 1:] if has_cls else hidden
        if self.scorer is not None:
            scores = torch.softmax(self.scorer(features).squeeze(-1).float(), dim=-1)
        elif has_cls:  # from the class token to each patch, renormalised over the patches
            scores = probs[:, 0, 1:].float()
            scores = scores / scores.sum(dim=-1, keepdim=True)
        else:  # no class token: the mean attention each patch receives
            scores = probs.float().mean(dim=1)
            scores = scores / scores.sum(dim=-1, keepdim=True)
        return features, scores

    def select(self, scores):
        """``scores`` ``[B, P]`` -> the indices ``[B, k]`` of the ``k = kept_count``
        highest-scoring patches, ascending (patch order)."""
        import torch

        kept = torch.topk(scores, self.kept_count, dim=-1, sorted=False).indices
        return kept.sort(dim=-1).values

    def _run_big(self, pixel_values, context, kept):
        """The big tower on the kept patches, with ``context`` ``[B, P, D]`` (projected
        little features) standing for the others -> merged ``[B, P, D]``."""
        import torch

        if kept.shape[1] == 0:
            return context
        embedded = _embed(self.big.tower, pixel_values)
        patches = self.grid * self.grid
        cls = embedded.shape[1] - patches  # 1 for CLIP, 0 for SigLIP
        index = kept.unsqueeze(-1).expand(-1, -1, self.dim)
        hidden = torch.cat([embedded[:, :cls], embedded[:, cls:].gather(1, index)], dim=1)
        others = None
        if kept.shape[1] < patches:
            dropped = torch.ones(kept.shape[0], patches, dtype=torch.bool, device=kept.device)
            dropped.scatter_(1, kept, False)
            others = context[dropped].view(kept.shape[0], patches - kept.shape[1], self.dim)
        for layer in self.big.tower.encoder.layers:
            hidden, _ = _attend(layer, hidden, others)
        return merge(context, hidden[:, cls:], kept)

    def scores(self, images: Sequence[np.ndarray]):
        """Importance of each patch: ``B`` frames -> ``[B, grid²]`` float32, rows sum to 1."""
        import torch

        batch = check_images(images)
        with self._lock, torch.inference_mode():
            scores = self._run_little(self._pixels(self.little, batch))[1]
        return scores.clone()  # outside inference mode: an ordinary tensor

    def encode(self, images: Sequence[np.ndarray]):
        """``images``: ``B`` frames ``[H, W, 3]`` uint8 RGB, any sizes ->
        ``[B, grid², dim]`` float32 on ``device``, patches in row-major order.

        Raises:
            EncoderError: an image that is not ``[H, W, 3]`` uint8 (named by its index).
        """
        return encode_batched(self, images, self._forward)

    def _forward(self, images: list[np.ndarray]):
        features, scores = self._run_little(self._pixels(self.little, images))
        context = self.projection(features)
        kept = self.select(scores)
        pixel_values = self._pixels(self.big, images) if kept.shape[1] else None
        return self._run_big(pixel_values, context, kept)

    # -- calibration ------------------------------------------------------------------------

    def calibrate(self, images: Sequence[np.ndarray], ridge: float = 1e-3) -> dict:
        """Fit the projection and a linear scorer to sample frames (a few dozen from the
        stream, or from footage like it), in closed form:

        - the projection by ridge least squares from the little tower's features to the
          big tower's, patch by patch, so a patch left to the little tower is as close
          to the big tower's feature as a linear map can make it;
        - the scorer (the encoder switches to ``scorer="linear"``) by least squares to
          the log of each patch's remaining squared error, so the patches the projection
          stands in for worst are the ones sent through the big tower.

        Returns ``{"mse_before", "mse_after"}``: the mean squared error per patch between
        the projected little features and the big tower's, on ``images``.
        """
        import torch
        from torch import nn

        batch = check_images(images)
        if not batch:
            raise EncoderError("calibrate: needs at least one frame")
        big = self.big.encode(batch).reshape(-1, self.dim).double()
        with self._lock, torch.inference_mode():
            little = self._run_little(self._pixels(self.little, batch))[0].reshape(-1, self.little.dim).double()
            before = float(((self.projection(little.to(self.dtype)).double() - big) ** 2).sum(-1).mean())
        inputs = torch.cat([little, torch.ones(len(little), 1, dtype=little.dtype)], dim=1)
        mapping = _ridge(inputs, big, ridge)  # [d + 1, D]
        error = ((inputs @ mapping - big) ** 2).sum(-1)
        weights = _ridge(inputs, torch.log(error + 1e-6 * float(error.mean()) + 1e-12).unsqueeze(1), ridge)
        projection, scorer = nn.Linear(self.little.dim, self.dim), nn.Linear(self.little.dim, 1)
        with torch.no_grad():
            for layer, fitted in ((projection, mapping), (scorer, weights)):
                layer.weight.copy_(fitted[:-1].T)
                layer.bias.copy_(fitted[-1])
        self._use(projection, scorer)
        return {"mse_before": before, "mse_after": float(error.mean())}

    def _use(self, projection, scorer) -> None:
        """Encode with a fitted ``projection`` and linear ``scorer`` from now on."""
        with self._lock:
            self.projection = projection.to(self.device, self.dtype)
            self.scorer = scorer.to(self.device, self.dtype)
            self.config = replace(self.config, scorer="linear")

    def save_calibration(self, folder) -> Path:
        """Write the projection and scorer (``calibration.safetensors``, ``calibration.json``
        naming the towers) into ``folder``; ``BigLittleConfig(calibration=folder)`` loads them."""
        from safetensors.torch import save_file
        from torch import nn

        if self.scorer is None or not isinstance(self.projection, nn.Linear):
            raise EncoderError("save_calibration: nothing fitted yet (run calibrate first)")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.{key}": value.detach().float().cpu().contiguous()
                   for name, module in (("projection", self.projection), ("scorer", self.scorer))
                   for key, value in module.state_dict().items()}
        save_file(tensors, folder / "calibration.safetensors")
        meta = {"big": self.config.big, "little": self.config.little, "little_dim": self.little.dim, "dim": self.dim}
        (folder / "calibration.json").write_text(json.dumps(meta, indent=1))
        return folder

    def load_calibration(self, folder) -> None:
        """Use the projection and scorer ``save_calibration`` wrote in ``folder``."""
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from torch import nn

        folder = Path(folder)
        try:
            meta = json.loads((folder / "calibration.json").read_text())
            tensors = load_file(folder / "calibration.safetensors")
        except (OSError, ValueError, SafetensorError) as exc:
            raise EncoderError(f"BigLittleConfig.calibration {str(folder)!r}: no readable calibration ({exc})") from None
        shapes = {"projection.weight": (self.dim, self.little.dim), "projection.bias": (self.dim,),
                  "scorer.weight": (1, self.little.dim), "scorer.bias": (1,)}
        found = {key: tuple(value.shape) for key, value in tensors.items()}
        if found != shapes or not isinstance(meta, dict) or not all(torch.isfinite(v).all() for v in tensors.values()):
            raise EncoderError(f"{folder / 'calibration.safetensors'}: fitted for a little tower of width "
                               f"{meta.get('little_dim') if isinstance(meta, dict) else '?'} and a big one of width "
                               f"{meta.get('dim') if isinstance(meta, dict) else '?'}; these are {self.little.dim} "
                               f"and {self.dim} (or its tensors are damaged)")
        projection, scorer = nn.Linear(self.little.dim, self.dim), nn.Linear(self.little.dim, 1)
        projection.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("projection.")})
        scorer.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("scorer.")})
        self._use(projection, scorer)


def _ridge(inputs, targets, ridge: float):
    """``W`` minimising ``|inputs @ W - targets|² + λ|W|²``, with ``λ`` = ``ridge`` times
    the mean diagonal of ``inputsᵀ inputs`` (so it does not depend on the features' scale)."""
    import torch

    gram = inputs.T @ inputs
    scale = ridge * float(gram.diagonal().mean())
    return torch.linalg.solve(gram + scale * torch.eye(len(gram), dtype=gram.dtype), inputs.T @ targets)
