"""``MemoryTokens``: what a memory hands the model, one row per token, each with its
kind and the stretch of stream time it stands for."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import torch

KINDS = ("abstract", "temporal", "retrieved", "spatial", "synopsis", "detail")
"""Token kinds: the four STAR memories, then the two memories of the Flash policy."""


@dataclass(frozen=True, eq=False)
class MemoryTokens:
    """A memory read out as tokens.

    Attributes:
        tokens: ``[N, D]`` float32 features, in the memory's order (STAR: abstract,
            temporal, retrieved, spatial).
        kinds: ``N`` kind names (one of ``KINDS``), one per token.
        spans: ``N`` ``(start, end)`` pairs in seconds: the stream time a token stands
            for (a single frame has ``start == end``).
    """

    tokens: torch.Tensor
    kinds: list[str]
    spans: list[tuple[float, float]]

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or not (len(self.kinds) == len(self.spans) == self.tokens.shape[0]):
            raise ValueError(f"MemoryTokens: tokens {tuple(self.tokens.shape)} with {len(self.kinds)} kinds "
                             f"and {len(self.spans)} spans; expected [N, D] and N of each")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, indices: list[int]) -> MemoryTokens:
        """The tokens at ``indices``, in that order, with their kinds and spans."""
        return MemoryTokens(self.tokens[indices], [self.kinds[i] for i in indices], [self.spans[i] for i in indices])

    def counts(self) -> dict[str, int]:
        """Tokens per kind, in order of first appearance."""
        return dict(Counter(self.kinds))


class FrameHit(NamedTuple):
    """One frame found by ``StreamMemory.search``: its bank id, its time in seconds,
    and its score (squared distance for an ``"l2"`` bank, inner product for ``"ip"``)."""

    frame: int
    t: float
    score: float


class TokenList:
    """Builds a ``MemoryTokens`` from blocks: ``add(kind, block [n, t, D], spans [n])``."""

    def __init__(self, dim: int):
        self.dim = dim
        self.blocks: list[torch.Tensor] = []
        self.kinds: list[str] = []
        self.spans: list[tuple[float, float]] = []

    def add(self, kind: str, block: torch.Tensor, spans: list[tuple[float, float]]) -> None:
        """Append ``block`` (``[n, t, D]``: n items of t tokens), item i standing for ``spans[i]``."""
        n, per_item = block.shape[0], block.shape[1]
        self.blocks.append(block.reshape(n * per_item, self.dim).float())
        self.kinds.extend([kind] * (n * per_item))
        for span in spans:
            self.spans.extend([(float(span[0]), float(span[1]))] * per_item)

    def build(self) -> MemoryTokens:
        if self.blocks:
            tokens = torch.cat(self.blocks)
        else:
            tokens = torch.zeros(0, self.dim)
        return MemoryTokens(tokens, self.kinds, self.spans)
