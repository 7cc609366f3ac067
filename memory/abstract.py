"""The abstract memory's update: semantic attention of memory slots over new frames.

    M ← (1 − α)·M + α·softmax(q(M)·k(E)ᵀ / √h)·E

``SemanticAttention`` holds q and k. Its parameter names are those of Flash-VStream's
``attention_model`` (``q_proj``, ``k_proj``: ``Linear(D, h)`` with bias), so a
checkpoint's ``model.attention_model.q_proj.weight`` etc. load with ``load_state_dict``
once the prefix is stripped; the checkpoint's ``v_proj``/``out_proj``/``out_ln`` are not
part of this update and are ignored (``load_state_dict(..., strict=False)``).

Without a checkpoint, q and k start as the same seeded random projection with
orthonormal rows, scaled by √(D/h) (when D > h): then ``q(x)·k(y)`` is a Johnson–Lindenstrauss
estimate of the dot product ``x·y``, and each slot moves toward the new frames most
similar to it (dot-product attention with temperature √h). That is a meaningful
untrained memory, not noise.

``replay_abstract`` rebuilds the abstract memory from a stream's frames (each pooled to
the abstract grid, in order) as the streaming update builds it, with autograd as the
caller has it: what training q and k (``vstream train``'s ``memory_attention``) needs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vstream.errors import MemoryStateError
from vstream.kernels import semantic_attention
from vstream.kernels.attention import semantic_attention_reference


class SemanticAttention(nn.Module):
    """q/k projections of the abstract memory's update.

    Args:
        dim: feature width D.
        hidden: projection width h (Flash-VStream: 32).
        seed: seed of the default projection.
    """

    def __init__(self, dim: int, hidden: int = 32, seed: int = 0):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.q_proj = nn.Linear(dim, hidden)
        self.k_proj = nn.Linear(dim, hidden)
        self.reset_to_similarity(seed)

    @torch.no_grad()
    def reset_to_similarity(self, seed: int = 0) -> None:
        """Set q = k = a seeded orthonormal projection scaled by √(D/h) (see module docstring)."""
        generator = torch.Generator().manual_seed(seed)
        gaussian = torch.randn(max(self.dim, self.hidden), min(self.dim, self.hidden), generator=generator)
        basis, _ = torch.linalg.qr(gaussian)  # orthonormal columns
        projection = (basis.T if self.dim >= self.hidden else basis)[: self.hidden, : self.dim]
        if self.dim > self.hidden:  # unbiased: E[WᵀW] = (h/D)·I for orthonormal rows
            projection = projection * math.sqrt(self.dim / self.hidden)
        for linear in (self.q_proj, self.k_proj):
            linear.weight.copy_(projection)
            linear.bias.zero_()

    @torch.no_grad()
    def forward(self, memory: torch.Tensor, new: torch.Tensor, alpha: float) -> torch.Tensor:
        """Update ``memory`` ``[S, D]`` with ``new`` ``[T, D]``; returns ``[S, D]`` float32."""
        weight = self.q_proj.weight
        memory = memory.to(weight.device, torch.float32)
        new = new.to(weight.device, torch.float32)
        return semantic_attention(memory, self.q_proj(memory), self.k_proj(new), new, alpha)


def replay_abstract(attention: SemanticAttention, frames: torch.Tensor, length: int, chunk: int,
                    alpha: float) -> torch.Tensor:
    """The abstract memory after ``frames`` ``[F, g*g, D]`` (every frame of a stream at the
    abstract grid, in order), as ``StarMemory`` builds it: the first ``length`` frames
    fill the slots, then each whole ``chunk`` of frames updates them by semantic
    attention with rate ``alpha`` (the frames of a last, partial chunk wait, as they do
    in a stream). Returns the slots ``[min(F, length), g*g, D]`` float32, with autograd
    as the caller has it (the PyTorch reference, never a kernel without a backward); on
    the CPU it equals the streaming memory's slots bit for bit."""
    if frames.ndim != 3 or frames.shape[2] != attention.dim:
        raise MemoryStateError(f"replay_abstract: frames must be [F, g*g, {attention.dim}], got {list(frames.shape)}")
    weight = attention.q_proj.weight
    frames = frames.to(weight.device, torch.float32)
    slots = frames[:length]
    shape = slots.shape
    for start in range(length, frames.shape[0] - chunk + 1, chunk):
        memory, new = slots.reshape(-1, attention.dim), frames[start : start + chunk].reshape(-1, attention.dim)
        slots = semantic_attention_reference(memory, attention.q_proj(memory), attention.k_proj(new), new,
                                             alpha).reshape(shape)
    return slots
