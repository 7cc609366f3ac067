"""The semantic-attention update of the abstract memory.

Each of the ``S`` memory slots attends over ``T`` new entries (frames pooled to one
token) and moves a fraction ``alpha`` of the way toward what it read:

    M <- (1 - alpha) * M + alpha * softmax(Q K^T / sqrt(h)) V

with ``Q [S, h]`` the slots' queries, ``K [T, h]`` the entries' keys and ``V [T, D]`` the
entries themselves. The kernel streams over ``T`` with an online softmax (a running
max and a running sum per slot), so any ``T`` fits in one pass.
"""

from __future__ import annotations

import math

import torch

from vstream.errors import KernelError

from .dispatch import backend_for, check_same_device, check_tensor, tl, triton


def semantic_attention_reference(
    memory: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, alpha: float
) -> torch.Tensor:
    """``memory [S, D]``, ``queries [S, h]``, ``keys [T, h]``, ``values [T, D]`` ->
    ``[S, D]`` in ``memory``'s dtype, computed in float32.

    Memory traffic: reads every input once and writes ``[S, D]``, plus the ``[S, T]``
    scores and probabilities it materialises and the float32 copies of half inputs.
    """
    scores = queries.float() @ keys.float().T / math.sqrt(queries.shape[1])
    read = torch.softmax(scores, dim=-1) @ values.float()
    return ((1.0 - alpha) * memory.float() + alpha * read).to(memory.dtype)


@triton.jit
def _semantic_attention_kernel(
    memory_ptr, queries_ptr, keys_ptr, values_ptr, out_ptr,
    S, T, H, DIM, scale, alpha,
    stride_ms, stride_md, stride_qs, stride_qh, stride_kt, stride_kh,
    stride_vt, stride_vd, stride_os, stride_od,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (block of slots, block of D); the scores are recomputed for each
    # block of D, which is cheap next to reading V (h is small).
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_h = tl.arange(0, BLOCK_H)

    row_max = tl.full((BLOCK_S,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_S,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        scores = tl.zeros((BLOCK_S, BLOCK_T), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + offs_h
            q = tl.load(queries_ptr + offs_s[:, None] * stride_qs + cols[None, :] * stride_qh,
                        mask=(offs_s[:, None] < S) & (cols[None, :] < H), other=0.0)
            k = tl.load(keys_ptr + offs_t[:, None] * stride_kt + cols[None, :] * stride_kh,
                        mask=(offs_t[:, None] < T) & (cols[None, :] < H), other=0.0)
            # fp32 operands (bf16 has no interpreter dot), "ieee": no TF32 rounding.
            scores += tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        scores = tl.where(offs_t[None, :] < T, scores * scale, float("-inf"))

        # Online softmax: rescale what was summed under the old max to the new one.
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        p = tl.exp(scores - new_max[:, None])
        rescale = tl.exp(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        v = tl.load(values_ptr + offs_t[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=(offs_t[:, None] < T) & (offs_d[None, :] < DIM), other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        row_max = new_max

    mask = (offs_s[:, None] < S) & (offs_d[None, :] < DIM)
    old = tl.load(memory_ptr + offs_s[:, None] * stride_ms + offs_d[None, :] * stride_md,
                  mask=mask, other=0.0)
    new = (1.0 - alpha) * old.to(tl.float32) + alpha * (acc / row_sum[:, None])
    out = out_ptr + offs_s[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(out, new.to(out_ptr.dtype.element_ty), mask=mask)


def _semantic_attention_triton(
    memory: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, alpha: float
) -> torch.Tensor:
    (s, dim), (t, h) = memory.shape, keys.shape
    out = torch.empty_like(memory, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    block_s = min(32, max(16, triton.next_power_of_2(s)))  # tl.dot wants sides >= 16
    block_t = min(32, max(16, triton.next_power_of_2(t)))
    block_h = min(64, max(16, triton.next_power_of_2(h)))
    block_d = min(128, max(16, triton.next_power_of_2(dim)))
    _semantic_attention_kernel[(triton.cdiv(s, block_s), triton.cdiv(dim, block_d))](
        memory, queries, keys, values, out,
        s, t, h, dim, 1.0 / math.sqrt(h), alpha,
        memory.stride(0), memory.stride(1), queries.stride(0), queries.stride(1),
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_S=block_s, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
    )
    return out


def semantic_attention(
    memory: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, alpha: float
) -> torch.Tensor:
    """``(1 - alpha) * memory + alpha * softmax(queries @ keys.T / sqrt(h)) @ values``.

    Args:
        memory: ``[S, D]`` the slots, float32, float16 or bfloat16.
        queries: ``[S, h]`` one query per slot, ``h >= 1``.
        keys: ``[T, h]`` one key per entry, ``T >= 1``.
        values: ``[T, D]`` the entries.
        alpha: step size, ``0 < alpha <= 1``.

    All four tensors share one dtype and device. Returns ``[S, D]`` in that dtype.
    """
    for name, t in (("memory", memory), ("queries", queries), ("keys", keys), ("values", values)):
        check_tensor(name, t, (2,))
        if t.dtype != memory.dtype:
            raise KernelError(f"{name}: expected the dtype of memory ({memory.dtype}), got {t.dtype}")
    check_same_device(memory=memory, queries=queries, keys=keys, values=values)
    (s, dim), (t, h) = memory.shape, keys.shape
    if t < 1:
        raise KernelError(f"keys: expected at least one entry (T >= 1), got shape {list(keys.shape)}")
    if h < 1:
        raise KernelError(f"keys: expected a head width h >= 1, got shape {list(keys.shape)}")
    if queries.shape != (s, h):
        raise KernelError(
            f"queries: expected shape [{s}, {h}] (S from memory, h from keys), got {list(queries.shape)}"
        )
    if values.shape != (t, dim):
        raise KernelError(
            f"values: expected shape [{t}, {dim}] (T from keys, D from memory), got {list(values.shape)}"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
        raise KernelError(f"alpha: expected a number in (0, 1], got {alpha!r}")
    if backend_for(memory, queries, keys, values) == "triton":
        return _semantic_attention_triton(memory, queries, keys, values, float(alpha))
    return semantic_attention_reference(memory, queries, keys, values, float(alpha))
