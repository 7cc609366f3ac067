"""One weighted k-means (Lloyd) step: assign each point to its nearest centroid, then
move each centroid to the weighted mean of its points.

The temporal memory clusters weighted frames (a weight is the number of frames a
point already stands for), so both the means and the returned cluster weights are
weighted. A cluster that receives no weight keeps its old centroid and weight 0.
"""

from __future__ import annotations

import torch

from vstream.errors import KernelError

from .dispatch import backend_for, check_same_device, check_tensor, tl, triton
from .nearest import _nearest_triton, nearest_reference


def kmeans_step_reference(
    points: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``points [N, d]``, ``weights [N]``, ``centroids [K, d]`` ->
    ``(new_centroids [K, d]`` in the centroids' dtype, ``new_weights [K]`` float32,
    ``assign [N]`` int64)``.

    Memory traffic: the assignment's (see ``nearest_reference``), then reads the points
    twice more (weighting, scatter-add) and writes the ``[K, d]`` float32 sums.
    """
    assign, _ = nearest_reference(points, centroids)
    w = weights.float()
    sums = torch.zeros(centroids.shape, device=points.device, dtype=torch.float32)
    sums.index_add_(0, assign, points.float() * w[:, None])
    mass = torch.zeros(centroids.shape[0], device=points.device, dtype=torch.float32)
    mass.index_add_(0, assign, w)
    return _finish(sums, mass, centroids), mass, assign


def _finish(sums: torch.Tensor, mass: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Divide the weighted sums by the cluster weights; empty clusters keep their centroid."""
    filled = mass > 0
    means = sums / torch.where(filled, mass, 1.0)[:, None]
    return torch.where(filled[:, None], means, centroids.float()).to(centroids.dtype)


# The step is two launches: the assignment (the nearest kernel), then the weighted sums
# below. Fusing them would not pay: a point's cluster is known only once its distance
# over all d is summed, while the sums are split over d across programs, so one kernel
# would need a grid-wide barrier between the two, or read every point twice anyway.
#
# The sums are a matrix product, onehot(assign)^T . (w * points), one program per
# (block of clusters, block of d) looping over the points, rather than tl.atomic_add of
# w*x into the sums: the result does not depend on the order programs run in, so a
# step is bitwise repeatable (the memory's k-means must be deterministic), and no
# [K, d] buffer has to be zeroed first.
@triton.jit
def _kmeans_sums_kernel(
    points_ptr, weights_ptr, assign_ptr, sums_ptr, mass_ptr,
    N, K, DIM,
    stride_pn, stride_pd, stride_wn, stride_sk, stride_sd,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)

    sums = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    mass = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        assign = tl.load(assign_ptr + rows, mask=rows < N, other=-1)
        w = tl.load(weights_ptr + rows * stride_wn, mask=rows < N, other=0.0).to(tl.float32)
        # member[k, n] = w[n] where point n belongs to cluster k, else 0
        member = tl.where(offs_k[:, None] == assign[None, :], w[None, :], 0.0)
        mask_p = (rows[:, None] < N) & (offs_d[None, :] < DIM)
        tile = tl.load(points_ptr + rows[:, None] * stride_pn + offs_d[None, :] * stride_pd,
                       mask=mask_p, other=0.0).to(tl.float32)
        sums += tl.dot(member, tile, input_precision="ieee")
        mass += tl.sum(member, axis=1)

    mask_s = (offs_k[:, None] < K) & (offs_d[None, :] < DIM)
    tl.store(sums_ptr + offs_k[:, None] * stride_sk + offs_d[None, :] * stride_sd, sums,
             mask=mask_s)
    if pid_d == 0:
        tl.store(mass_ptr + offs_k, mass, mask=offs_k < K)


def _kmeans_step_triton(
    points: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    (n, dim), k = points.shape, centroids.shape[0]
    assign, _ = _nearest_triton(points, centroids)
    assign32 = assign.to(torch.int32)
    sums = torch.empty((k, dim), device=points.device, dtype=torch.float32)
    mass = torch.empty(k, device=points.device, dtype=torch.float32)
    block_k = min(64, max(16, triton.next_power_of_2(k)))  # tl.dot wants sides >= 16
    block_d = min(128, max(16, triton.next_power_of_2(dim)))
    _kmeans_sums_kernel[(triton.cdiv(k, block_k), triton.cdiv(max(dim, 1), block_d))](
        points, weights, assign32, sums, mass,
        n, k, dim,
        points.stride(0), points.stride(1), weights.stride(0), sums.stride(0), sums.stride(1),
        BLOCK_K=block_k, BLOCK_N=32, BLOCK_D=block_d,
    )
    return _finish(sums, mass, centroids), mass, assign


def kmeans_step(
    points: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One weighted Lloyd step.

    Args:
        points: ``[N, d]``, float32, float16 or bfloat16.
        weights: ``[N]``, non-negative, any float dtype.
        centroids: ``[K, d]``, ``K >= 1``, the dtype of ``points``.

    Returns:
        ``(new_centroids [K, d]`` in the centroids' dtype, ``new_weights [K]`` float32
        (the summed weight of each cluster's points), ``assign [N]`` int64 (each point's
        cluster)``. A cluster with no weight keeps its old centroid and gets weight 0.
    """
    check_tensor("points", points, (2,))
    check_tensor("weights", weights, (1,), floating=False)
    if not weights.is_floating_point():
        raise KernelError(f"weights: expected a floating-point dtype, got {weights.dtype}")
    check_tensor("centroids", centroids, (2,))
    check_same_device(points=points, weights=weights, centroids=centroids)
    if weights.shape[0] != points.shape[0]:
        raise KernelError(
            f"weights: expected shape [{points.shape[0]}] (one per point), got {list(weights.shape)}"
        )
    if centroids.dtype != points.dtype:
        raise KernelError(f"centroids: expected the dtype of points ({points.dtype}), got {centroids.dtype}")
    if centroids.shape[1] != points.shape[1]:
        raise KernelError(
            f"centroids: expected rows of the points' width d={points.shape[1]}, got shape {list(centroids.shape)}"
        )
    if centroids.shape[0] == 0:
        raise KernelError("centroids: expected at least one centroid, got shape [0, d]")
    if bool((weights < 0).any()):
        raise KernelError(f"weights: expected non-negative values, got a minimum of {weights.min().item()}")
    if points.shape[0] == 0:
        mass = torch.zeros(centroids.shape[0], device=points.device)
        return centroids.clone(), mass, torch.empty(0, device=points.device, dtype=torch.long)
    if backend_for(points, weights, centroids) == "triton":
        return _kmeans_step_triton(points, weights, centroids)
    return kmeans_step_reference(points, weights, centroids)
