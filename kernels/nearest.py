"""Nearest-row search: for each row of ``x``, the nearest row of ``y``.

The k-means step uses it to assign points to centroids, and the retrieved memory to
find the bank frame nearest to each heavy centroid (``x`` = centroids, ``y`` = the
bank's keys). Distances are squared Euclidean, computed as ``|x|^2 - 2 x.y + |y|^2``
in float32 and clamped at 0; ties go to the lowest index of ``y``.

Two kernels, for the two shapes the memory has: ``_nearest_kernel`` keeps a running
argmin per row of ``x`` while it walks ``y`` (many rows of ``y``: the bank), and
``_sq_dist_slice_kernel`` splits ``d`` across programs when both sides have few rows
and ``d`` is wide (the k-means assignment, re-ranking a few candidate frames).
"""

from __future__ import annotations

import torch

from vstream.errors import KernelError

from .dispatch import backend_for, check_same_device, check_tensor, tl, triton


def nearest_reference(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [N, d]``, ``y [M, d]`` -> ``(index [N] int64, distance [N] float32)``.

    Memory traffic: reads ``x`` and ``y`` once (plus their float32 copies for half
    inputs), then writes and reads back the ``[N, M]`` float32 distance matrix.
    """
    x32, y32 = x.float(), y.float()
    dist = (x32 * x32).sum(1)[:, None] - 2.0 * (x32 @ y32.T) + (y32 * y32).sum(1)[None, :]
    dist = dist.clamp_min_(0.0)
    index = dist.argmin(1)  # the first minimum: ties go to the lowest index
    return index, dist.gather(1, index[:, None]).squeeze(1)


@triton.jit
def _nearest_kernel(
    x_ptr, y_ptr, dist_ptr, index_ptr,
    N, M, DIM, M_PER_SPLIT,
    stride_xn, stride_xd, stride_ym, stride_yd, stride_dists, stride_indexs,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program per (block of x rows, slice of y rows): the nearest row in the slice.
    pid_n = tl.program_id(0)
    pid_split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_n[:, None] * stride_xn

    x_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, DIM, BLOCK_K):
        mask_x = (offs_n[:, None] < N) & (k0 + offs_k[None, :] < DIM)
        xt = tl.load(x_rows + (k0 + offs_k[None, :]) * stride_xd, mask=mask_x, other=0.0)
        xt = xt.to(tl.float32)
        x_sq += tl.sum(xt * xt, axis=1)

    best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_index = tl.zeros((BLOCK_N,), dtype=tl.int32)
    m_start = pid_split * M_PER_SPLIT
    m_end = tl.minimum(m_start + M_PER_SPLIT, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        y_rows = y_ptr + offs_m[:, None] * stride_ym
        xy = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        y_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, DIM, BLOCK_K):
            cols = k0 + offs_k[None, :]
            mask_x = (offs_n[:, None] < N) & (cols < DIM)
            xt = tl.load(x_rows + cols * stride_xd, mask=mask_x, other=0.0).to(tl.float32)
            mask_y = (offs_m[:, None] < m_end) & (cols < DIM)
            yt = tl.load(y_rows + cols * stride_yd, mask=mask_y, other=0.0).to(tl.float32)
            # fp32 operands (bf16 has no interpreter dot), "ieee": no TF32 rounding, so
            # the kernel picks the rows the float32 reference picks.
            xy += tl.dot(xt, tl.trans(yt), input_precision="ieee")
            y_sq += tl.sum(yt * yt, axis=1)
        dist = x_sq[:, None] - 2.0 * xy + y_sq[None, :]
        dist = tl.maximum(dist, 0.0)
        dist = tl.where(offs_m[None, :] < m_end, dist, float("inf"))
        block_best, block_index = tl.min(dist, axis=1, return_indices=True)
        better = block_best < best  # strict: an earlier block keeps its tie
        best = tl.where(better, block_best, best)
        best_index = tl.where(better, m0 + block_index, best_index)

    tl.store(dist_ptr + pid_split * stride_dists + offs_n, best, mask=offs_n < N)
    tl.store(index_ptr + pid_split * stride_indexs + offs_n, best_index, mask=offs_n < N)


# Few rows against few rows in a wide space (the temporal merge: 26 x 25 rows of 16384;
# the k-means assignment: 128 x 120) gives the kernel above only a handful of programs,
# each walking all of d. There, d is split instead: each program sums one slice of d
# of a tile's squared distances, and torch adds the slices and takes the argmin, over
# an [N, M] matrix that is small in exactly this case.
@triton.jit
def _sq_dist_slice_kernel(
    x_ptr, y_ptr, part_ptr,
    N, M, DIM, D_PER_SPLIT,
    stride_xn, stride_xd, stride_ym, stride_yd, stride_parts, stride_partn, stride_partm,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_split * D_PER_SPLIT
    k_end = tl.minimum(k_start + D_PER_SPLIT, DIM)

    xy = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    x_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    y_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + offs_k[None, :]
        xt = tl.load(x_ptr + offs_n[:, None] * stride_xn + cols * stride_xd,
                     mask=(offs_n[:, None] < N) & (cols < k_end), other=0.0).to(tl.float32)
        yt = tl.load(y_ptr + offs_m[:, None] * stride_ym + cols * stride_yd,
                     mask=(offs_m[:, None] < M) & (cols < k_end), other=0.0).to(tl.float32)
        xy += tl.dot(xt, tl.trans(yt), input_precision="ieee")
        x_sq += tl.sum(xt * xt, axis=1)
        y_sq += tl.sum(yt * yt, axis=1)
    part = x_sq[:, None] - 2.0 * xy + y_sq[None, :]

    out = part_ptr + pid_split * stride_parts + offs_n[:, None] * stride_partn + offs_m[None, :] * stride_partm
    tl.store(out, part, mask=(offs_n[:, None] < N) & (offs_m[None, :] < M))


_PROGRAMS = 512  # about what fills a large GPU several times over
_MIN_SLICE = 256  # the narrowest slice of d worth a program of its own


def _nearest_triton(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    (n, dim), m = x.shape, y.shape[0]
    block_n = min(32, max(16, triton.next_power_of_2(n)))  # tl.dot wants sides >= 16
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    block_k = min(64, max(16, triton.next_power_of_2(dim)))
    n_blocks, m_blocks = triton.cdiv(n, block_n), triton.cdiv(m, block_m)

    d_splits = min(triton.cdiv(dim, _MIN_SLICE), _PROGRAMS // (n_blocks * m_blocks))
    if d_splits > 1:
        d_per_split = triton.cdiv(triton.cdiv(dim, d_splits), block_k) * block_k
        d_splits = triton.cdiv(dim, d_per_split)
        parts = torch.empty((d_splits, n, m), device=x.device, dtype=torch.float32)
        _sq_dist_slice_kernel[(n_blocks, m_blocks, d_splits)](
            x, y, parts,
            n, m, dim, d_per_split,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            parts.stride(0), parts.stride(1), parts.stride(2),
            BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k,
        )
        dist = parts.sum(0).clamp_min_(0.0)
        index = dist.argmin(1)  # the first minimum: ties go to the lowest index
        return index, dist.gather(1, index[:, None]).squeeze(1)

    # Split y into slices so that a few x rows against a large bank still fill the GPU;
    # each slice reports its best, and torch picks among them.
    m_per_split = triton.cdiv(m_blocks, min(m_blocks, max(1, _PROGRAMS // n_blocks))) * block_m
    splits = triton.cdiv(m, m_per_split)
    dist = torch.empty((splits, n), device=x.device, dtype=torch.float32)
    index = torch.empty((splits, n), device=x.device, dtype=torch.int32)
    _nearest_kernel[(n_blocks, splits)](
        x, y, dist, index,
        n, m, dim, m_per_split,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), dist.stride(0), index.stride(0),
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k,
    )
    split = dist.argmin(0, keepdim=True)  # the first minimum: the slice of lowest index
    return index.gather(0, split).squeeze(0).long(), dist.gather(0, split).squeeze(0)


def nearest(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``x``, the nearest row of ``y`` under squared Euclidean distance.

    Args:
        x: ``[N, d]`` queries, float32, float16 or bfloat16.
        y: ``[M, d]`` candidates, ``M >= 1``, same dtype and device as ``x``.

    Returns:
        ``(index, distance)``: ``index [N]`` int64 into ``y`` (ties: the lowest index),
        ``distance [N]`` float32, the squared distance to that row.
    """
    check_tensor("x", x, (2,))
    check_tensor("y", y, (2,))
    check_same_device(x=x, y=y)
    if x.dtype != y.dtype:
        raise KernelError(f"y: expected the dtype of x ({x.dtype}), got {y.dtype}")
    if x.shape[1] != y.shape[1]:
        raise KernelError(f"y: expected rows of x's width d={x.shape[1]}, got shape {list(y.shape)}")
    if y.shape[0] == 0:
        raise KernelError("y: expected at least one row to search, got shape [0, d]")
    if x.shape[0] == 0:
        empty = torch.empty(0, device=x.device)
        return empty.long(), empty.float()
    if backend_for(x, y) == "triton":
        return _nearest_triton(x, y)
    return nearest_reference(x, y)
