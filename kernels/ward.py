"""Ward join costs: what joining one point with each of ``K`` weighted centroids would
add to the within-cluster sum of squares, ``w_k·w/(w_k+w) · ‖c_k − x‖²``.

STAR's temporal memory runs this twice per frame at ``K = 25`` and ``d = 16,384`` (4×4 ×
1024): the new frame against every centroid (should it join one?) and, after a join,
the changed centroid against the others (its row of the kept pair-cost matrix). The
distances are the work (``2·K·d`` reads); the weight factor, the argmin and the merge
are ``K``-sized and stay in torch.

The kernel gives each centroid a program that walks ``d`` in ``BLOCK`` columns and sums
its squared differences in float32, always in the same order: deterministic, run to run.
The reference sums with torch's own reduction, so the two differ in the last bits.
"""

from __future__ import annotations

import torch

from vstream.errors import KernelError

from .dispatch import backend_for, check_same_device, check_tensor, tl, triton


def ward_costs_reference(centroids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor,
                         w: float) -> torch.Tensor:
    """``centroids [K, d]``, ``weights [K]`` (float64), ``x [d]``, the point's weight ``w``
    -> ``[K]`` float64 Ward costs. Reads ``centroids`` once."""
    squared = (centroids - x).square().sum(dim=1).double()
    return weights * w / (weights + w) * squared


@triton.jit
def _squared_distance_kernel(c_ptr, x_ptr, out_ptr, DIM, stride_ck, stride_cd, BLOCK: tl.constexpr):
    # One program per centroid: its squared distance to x, summed over d in order.
    k = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for d0 in range(0, DIM, BLOCK):
        cols = d0 + offs
        c = tl.load(c_ptr + k * stride_ck + cols * stride_cd, mask=cols < DIM, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + cols, mask=cols < DIM, other=0.0).to(tl.float32)
        diff = c - xv
        total += diff * diff
    tl.store(out_ptr + k, tl.sum(total, axis=0))


def _ward_costs_triton(centroids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor, w: float) -> torch.Tensor:
    k, dim = centroids.shape
    squared = torch.empty(k, device=centroids.device, dtype=torch.float32)
    block = min(1024, triton.next_power_of_2(dim))
    _squared_distance_kernel[(k,)](centroids, x.contiguous(), squared, dim,
                                   centroids.stride(0), centroids.stride(1), BLOCK=block)
    return weights * w / (weights + w) * squared.double()


def ward_costs(centroids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor, w: float) -> torch.Tensor:
    """The Ward cost of joining a point ``x`` of weight ``w`` with each centroid.

    Args:
        centroids: ``[K, d]`` float32, float16 or bfloat16.
        weights: ``[K]`` float64, each centroid's weight (frames it holds).
        x: ``[d]``, the dtype and device of ``centroids``.
        w: the point's weight.

    Returns:
        ``[K]`` float64 costs (``inf`` nowhere unless a weight is; the caller masks).
    """
    check_tensor("centroids", centroids, (2,))
    check_tensor("x", x, (1,))
    check_same_device(centroids=centroids, weights=weights, x=x)
    if x.dtype != centroids.dtype or x.shape[0] != centroids.shape[1]:
        raise KernelError(f"x: expected [{centroids.shape[1]}] {centroids.dtype}, got {list(x.shape)} {x.dtype}")
    if weights.dtype != torch.float64 or tuple(weights.shape) != (centroids.shape[0],):
        raise KernelError(f"weights: expected [{centroids.shape[0]}] float64, got {list(weights.shape)} {weights.dtype}")
    if centroids.shape[0] and backend_for(centroids, x) == "triton":
        return _ward_costs_triton(centroids, weights, x, w)
    return ward_costs_reference(centroids, weights, x, w)
