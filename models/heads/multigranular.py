"""Multi-granular visual generation (PUMA): the LLM regresses a frame's features at a
chosen granularity, for an image decoder to draw.

Granularities are PUMA's five average-pooled grids of a 16×16 patch grid::

    f0: 16×16 = 256 tokens   f1: 8×8 = 64   f2: 4×4 = 16   f3: 2×2 = 4   f4: 1×1 = 1

``pyramid(features)`` computes them; each level is the 2×2 block mean of the next finer.

The head holds ``n`` learnable query embeddings per level. To generate level ``n``, its
queries are appended after the prompt's input embeddings; the LLM's last hidden states
at those positions ``[1, n, H]`` go through a linear or MLP regressor to ``[1, n, D]``
features. Training fits the queries and the regressor (the LLM stays frozen) with
``cosine_weight · (1 − cos) + mse_weight · MSE`` against a frame's real pooled features,
on requests "Show the frame at m:ss." whose answers are the stream's own frames: the
memory's feature bank holds every frame's features and time. The bank keeps frames at
its grid (8×8 by default), so levels finer than that cannot be trained from it.

    head = create_head("multigranular", hidden_size, feature_dim=memory.dim)
    for _ in range(steps):
        head.train_step(model, memory)
    features = head.generate(model, context, request(12.0), level=16)   # [1, 16, D]
    head.save(folder); MultigranularHead.from_folder(folder)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vstream.config import JsonConfig, check_choice, check_int, check_number
from vstream.errors import ConfigError, ModelLoadError
from vstream.kernels import pool_grid
from vstream.models.generation import position_kwargs
from vstream.models.heads import Head, register_head
from vstream.models.prompt import Context, clock

LEVELS = (1, 4, 16, 64, 256)  # tokens of f4, f3, f2, f1, f0
FINEST_GRID = 16
WEIGHTS, META = "multigranular.safetensors", "multigranular.json"
FORMAT, VERSION = "vstream.multigranular", 1


def pyramid(features: torch.Tensor) -> dict[int, torch.Tensor]:
    """Average-pooled levels of a frame's patch grid, by token count.

    Args:
        features: ``[P, D]`` or ``[B, P, D]``, ``P = G*G`` row-major patches. ``G`` a multiple
            of 16 gives all five levels (pooled to 16×16 first); ``G`` in 1, 2, 4, 8 gives the
            levels up to ``G*G``.

    Returns:
        ``{tokens: [tokens, D] or [B, tokens, D]}`` for tokens in 256, 64, 16, 4, 1 (those the
        grid allows); each level is the 2×2 block mean of the next finer one.
    """
    if not isinstance(features, torch.Tensor) or features.dim() not in (2, 3):
        got = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ConfigError(f"pyramid: features must be a Tensor [P, D] or [B, P, D], got {got}")
    grid = math.isqrt(features.shape[-2])
    if grid * grid != features.shape[-2] or not (grid % FINEST_GRID == 0 or grid in (1, 2, 4, 8)):
        raise ConfigError(f"pyramid: {features.shape[-2]} patches per frame; expected a square grid whose side "
                          f"is a multiple of {FINEST_GRID} (or 1, 2, 4, 8)")
    grid = min(grid, FINEST_GRID)
    level = pool_grid(features, grid)
    levels = {grid * grid: level}
    while grid > 1:
        grid //= 2
        level = pool_grid(level, grid)
        levels[grid * grid] = level
    return levels


def request(t: float) -> str:
    """The generation prompt for the frame at ``t`` seconds."""
    return f"Show the frame at {clock(t)}."


@dataclass
class MultigranularConfig(JsonConfig):
    """The multi-granular generation head.

    Attributes:
        feature_dim: width D of the features regressed: the frame encoder's (default 1024,
            CLIP ViT-L/14).
        levels: granularities the head has queries for, in tokens, from 1, 4, 16, 64, 256
            (default all five).
        head: regressor from hidden states to features: ``"linear"`` or ``"mlp"`` (default;
            two layers, GELU, as wide as the LLM's hidden size).
        cosine_weight: weight of ``1 − cosine similarity`` in the loss (default 1.0).
        mse_weight: weight of the mean squared error in the loss (default 1.0).
        lr: AdamW learning rate of ``train_step`` (default 1e-3).
        seed: seed of the initial queries and regressor, and of the frames ``train_step``
            draws (default 0).
    """

    feature_dim: int = 1024
    levels: list[int] = field(default_factory=lambda: list(LEVELS))
    head: str = "mlp"
    cosine_weight: float = 1.0
    mse_weight: float = 1.0
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("MultigranularConfig", "feature_dim", self.feature_dim, 1)
        levels = self.levels if isinstance(self.levels, (list, tuple)) else [self.levels]
        if not levels or any(n not in LEVELS for n in levels) or len(set(levels)) != len(levels):
            raise ConfigError(f"MultigranularConfig.levels must be distinct token counts from {list(LEVELS)}, "
                              f"got {self.levels!r}")
        self.levels = sorted(levels)
        check_choice("MultigranularConfig", "head", self.head, ("linear", "mlp"))
        for name in ("cosine_weight", "mse_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
                raise ConfigError(f"MultigranularConfig.{name} must be a number >= 0, got {value!r}")
        if self.cosine_weight + self.mse_weight == 0:
            raise ConfigError("MultigranularConfig: cosine_weight and mse_weight are both 0; the loss would be 0")
        check_number("MultigranularConfig", "lr", self.lr, 0.0)
        check_int("MultigranularConfig", "seed", self.seed, 0)


class _Net(nn.Module):
    """The trainable part: ``queries[str(n)]`` ``[n, H]`` per level and the regressor
    ``[..., H] -> [..., D]``."""

    def __init__(self, hidden_size: int, config: MultigranularConfig):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's generator
            torch.manual_seed(config.seed)
            # small, as token embeddings are, so the queries start inside the LLM's input range
            self.queries = nn.ParameterDict({str(n): nn.Parameter(0.02 * torch.randn(n, hidden_size))
                                             for n in config.levels})
            if config.head == "linear":
                self.regressor = nn.Linear(hidden_size, config.feature_dim)
            else:
                self.regressor = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                               nn.Linear(hidden_size, config.feature_dim))


@register_head("multigranular")
class MultigranularHead(Head):
    """Learnable queries per granularity and a regressor from the LLM's hidden states to
    frame features (see the module docstring).

    Args:
        hidden_size: the LLM's hidden size H (``hidden_size_of(model)``).
        config: ``MultigranularConfig`` (or a dict); keyword fields override it.
    """

    def __init__(self, hidden_size: int, config: MultigranularConfig | dict | None = None, **fields):
        config = MultigranularConfig.from_dict({**MultigranularConfig.from_dict(config or {}).to_dict(), **fields})
        super().__init__(config)
        check_int("MultigranularHead", "hidden_size", hidden_size, 1)
        self.hidden_size = hidden_size
        self.net = _Net(hidden_size, config)
        self._optimizer: torch.optim.Optimizer | None = None
        self._draws = torch.Generator().manual_seed(config.seed)

    # -- forward ------------------------------------------------------------------------

    def _predict(self, model, context: Context | None, prompt: str, level: int) -> torch.Tensor:
        """Features ``[1, level, D]`` for ``prompt`` after ``context``, with autograd as the caller has it."""
        if level not in self.config.levels:
            raise ConfigError(f"level {level!r}: this head generates {self.config.levels} tokens")
        if hidden_size_of(model) != self.hidden_size:
            raise ModelLoadError(f"this head was built for an LLM of hidden size {self.hidden_size}; "
                                 f"{model.name or 'the model'} has {hidden_size_of(model)}")
        with torch.no_grad():  # the prompt is data here: only the head learns
            embedded = model.embed(model.question_pieces(context or Context(), prompt))
        embeds = embedded.embeds
        self.net.to(model.device)
        queries = self.net.queries[str(level)].to(embeds.dtype).unsqueeze(0)
        visual = torch.cat([embedded.visual, torch.zeros(1, level, dtype=torch.bool)], dim=1)  # queries are text
        with model.routing(visual):  # attached heads (visual experts) see the memory tokens as in an answer
            out = model.lm(inputs_embeds=torch.cat([embeds, queries], dim=1), output_hidden_states=True,
                           **position_kwargs(embedded.positions, level))
        return self.net.regressor(out.hidden_states[-1][:, -level:].float())

    def generate(self, model, context: Context | None, prompt: str, level: int) -> torch.Tensor:
        """Features ``[1, level, D]`` (float32) that the LLM ``model`` (a ``ChatModel``)
        gives for ``prompt`` (e.g. ``request(t)``) after ``context`` (None: nothing seen)."""
        with model.lock, torch.no_grad():
            return self._predict(model, context, prompt, level)

    def loss(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``cosine_weight · mean(1 − cos) + mse_weight · MSE`` of ``[..., n, D]`` features."""
        cosine = 1 - nn.functional.cosine_similarity(predicted, target, dim=-1).mean()
        return self.config.cosine_weight * cosine + self.config.mse_weight * nn.functional.mse_loss(predicted, target)

    # -- training -----------------------------------------------------------------------

    def pair_loss(self, model, context: Context | None, prompt: str, features: torch.Tensor,
                  levels: list[int] | None = None) -> torch.Tensor:
        """The mean ``loss`` over ``levels`` (default: this head's levels that ``features``'
        grid gives) of what the head generates for ``prompt`` after ``context`` against
        ``features`` ``[P, D]`` (an image's patch grid) pooled to each level, with autograd
        as the caller has it: the loss of one image and the text that asks for it."""
        truth = pyramid(features.to(model.device))
        levels = levels or [n for n in self.config.levels if n in truth]
        if not levels:
            raise ConfigError(f"features of {features.shape[0]} tokens are coarser than every level of this head "
                              f"({self.config.levels})")
        return torch.stack([self.loss(self._predict(model, context, prompt, n), truth[n].unsqueeze(0))
                            for n in levels]).mean()

    def train_step(self, model, memory, context: Context | None = None, frames: int = 1) -> float:
        """One AdamW step of the queries and the regressor on ``frames`` frames of
        ``memory`` (a ``StreamMemory``) drawn at random (seeded): for each, the request for
        its time regresses its pooled bank features at every level the bank's grid allows.
        The LLM is frozen (its parameters stop requiring grad). ``context`` defaults to
        nothing seen. Returns the step's mean loss."""
        check_int("train_step", "frames", frames, 1)
        bank = getattr(memory, "bank", None)
        if bank is None or not len(bank):
            raise ConfigError("train_step needs a memory holding at least one frame")
        if bank.dim != self.config.feature_dim:
            raise ConfigError(f"the memory's features are {bank.dim} wide; this head regresses "
                              f"feature_dim={self.config.feature_dim}")
        levels = [n for n in self.config.levels if n <= bank.tokens]
        if not levels:
            raise ConfigError(f"the bank keeps {bank.tokens} tokens per frame, coarser than every level "
                              f"of this head ({self.config.levels})")
        model.lm.requires_grad_(False)
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(self.net.parameters(), lr=self.config.lr)
        ids = torch.randint(len(bank), (frames,), generator=self._draws).tolist()
        targets, times = bank.features(ids).to(model.device), bank.times[ids]
        with model.lock:
            total = torch.stack([self.pair_loss(model, context, request(t), targets[i], levels)
                                 for i, t in enumerate(times.tolist())]).mean()
            self._optimizer.zero_grad()
            total.backward()
            self._optimizer.step()
        return float(total.detach())

    # -- save and load ------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write the head alone: ``multigranular.safetensors`` (queries and regressor) and
        ``multigranular.json`` (format, config, hidden size)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}, folder / WEIGHTS)
        meta = {"format": FORMAT, "version": VERSION, "hidden_size": self.hidden_size, "config": self.config.to_dict()}
        (folder / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return folder

    @classmethod
    def from_folder(cls, folder: str | Path) -> MultigranularHead:
        """A head saved by ``save``; ``ModelLoadError`` when the folder is missing or its
        files are damaged or do not fit together."""
        folder = Path(folder)
        if not (folder / META).is_file() or not (folder / WEIGHTS).is_file():
            raise ModelLoadError(f"{folder}: no saved multigranular head (expected {META} and {WEIGHTS})")
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{folder / META}: not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or (meta.get("format"), meta.get("version")) != (FORMAT, VERSION):
            raise ModelLoadError(f"{folder / META}: not a {FORMAT} version {VERSION} file")
        try:
            head = cls(meta.get("hidden_size"), meta.get("config"))
        except ConfigError as exc:
            raise ModelLoadError(f"{folder / META}: {exc}") from None
        try:
            tensors = load_file(folder / WEIGHTS)
            head.net.load_state_dict(tensors)
        except (OSError, SafetensorError, RuntimeError) as exc:
            raise ModelLoadError(f"{folder / WEIGHTS}: cannot load the head's weights ({exc})") from None
        return head


def hidden_size_of(model) -> int:
    """The hidden size H of a ``ChatModel``'s LLM."""
    return model.lm.config.get_text_config().hidden_size
