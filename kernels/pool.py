"""Grid average pooling: a frame's ``G x G`` patch grid to ``S x S`` tokens.

Every frame is pooled before it enters the memory (16x16 -> 8x8 for the spatial and
retrieved memories, 4x4 for the temporal one, 1x1 for the abstract one). The windows
are those of ``torch.nn.functional.adaptive_avg_pool2d``: output cell ``i`` covers input
rows ``floor(i*G/S)`` to ``ceil((i+1)*G/S)`` (exclusive), so when ``S`` divides ``G`` the
windows are exact blocks, and otherwise (SigLIP's 27x27 grid) neighbours share a row.
"""

from __future__ import annotations

import torch

from vstream.errors import KernelError

from .dispatch import backend_for, check_tensor, tl, triton


def pool_grid_reference(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x [B, G*G, D]`` (row-major grid) -> ``[B, size*size, D]``, in ``x``'s dtype.

    Memory traffic: reads ``B*G*G*D`` elements once, writes ``B*S*S*D``; the permutes
    are views (the ``[B, D, G, G]`` view is channels-last, which the pooling reads as is).
    """
    batch, patches, dim = x.shape
    grid = round(patches**0.5)
    image = x.reshape(batch, grid, grid, dim).permute(0, 3, 1, 2)  # [B, D, G, G]
    pooled = torch.nn.functional.adaptive_avg_pool2d(image, size)  # [B, D, S, S]
    return pooled.permute(0, 2, 3, 1).reshape(batch, size * size, dim)


@triton.jit
def _pool_grid_kernel(
    x_ptr, out_ptr,
    GRID, SIZE, DIM,
    stride_xb, stride_xp, stride_xd,
    stride_ob, stride_op, stride_od,
    BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (frame, output cell, block of D): average the cell's window.
    pid_b = tl.program_id(0)
    pid_cell = tl.program_id(1)
    pid_d = tl.program_id(2)
    row = pid_cell // SIZE
    col = pid_cell % SIZE
    row_start = (row * GRID) // SIZE
    row_end = ((row + 1) * GRID + SIZE - 1) // SIZE
    col_start = (col * GRID) // SIZE
    col_end = ((col + 1) * GRID + SIZE - 1) // SIZE

    offs_w = col_start + tl.arange(0, BLOCK_W)  # the window's columns, padded to BLOCK_W
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_w[:, None] < col_end) & (offs_d[None, :] < DIM)
    x_base = x_ptr + pid_b * stride_xb + offs_d[None, :] * stride_xd

    acc = tl.zeros((BLOCK_W, BLOCK_D), dtype=tl.float32)
    for r in range(row_start, row_end):
        patch = r * GRID + offs_w
        tile = tl.load(x_base + patch[:, None] * stride_xp, mask=mask, other=0.0)
        acc += tile.to(tl.float32)
    area = (row_end - row_start) * (col_end - col_start)
    mean = tl.sum(acc, axis=0) / area

    out = out_ptr + pid_b * stride_ob + pid_cell * stride_op + offs_d * stride_od
    tl.store(out, mean.to(out_ptr.dtype.element_ty), mask=offs_d < DIM)


def _pool_grid_triton(x: torch.Tensor, size: int) -> torch.Tensor:
    batch, patches, dim = x.shape
    grid = round(patches**0.5)
    out = torch.empty((batch, size * size, dim), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    widest = max(-(-(j + 1) * grid // size) - (j * grid) // size for j in range(size))
    block_d = min(256, triton.next_power_of_2(dim))
    launch = (batch, size * size, triton.cdiv(dim, block_d))
    _pool_grid_kernel[launch](
        x, out,
        grid, size, dim,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_W=triton.next_power_of_2(widest), BLOCK_D=block_d,
    )
    return out


def pool_grid(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool a square patch grid to ``size x size`` tokens.

    Args:
        x: ``[P, D]`` or ``[B, P, D]`` patch features, ``P = G*G`` in row-major order;
            float32, float16 or bfloat16.
        size: output grid side ``S``, ``1 <= S <= G``.

    Returns:
        ``[S*S, D]`` or ``[B, S*S, D]`` in ``x``'s dtype; ``x`` itself when ``S == G``.
    """
    check_tensor("x", x, (2, 3))
    patches = x.shape[-2]
    grid = round(patches**0.5)
    if patches < 1 or grid * grid != patches:
        raise KernelError(f"x: expected a square number of patches P = G*G, got P={patches}")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= grid:
        raise KernelError(f"size: expected an int in [1, {grid}] for a {grid}x{grid} grid, got {size!r}")
    if size == grid:
        return x
    batched = x if x.dim() == 3 else x.unsqueeze(0)
    if backend_for(x) == "triton":
        out = _pool_grid_triton(batched, size)
    else:
        out = pool_grid_reference(batched, size)
    return out if x.dim() == 3 else out.squeeze(0)
