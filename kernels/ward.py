"""Ward costs and STAR's temporal update.

``ward_costs``: what joining one point with each of ``K`` weighted centroids would add to
the within-cluster sum of squares, ``w_k·w/(w_k+w) · ‖c_k − x‖²``. The kernel gives each
centroid a program that walks ``d`` in ``BLOCK`` columns and sums its squared differences
in float32, always in the same order: deterministic, run to run.

``temporal_merge``: STAR's whole temporal update for a batch of frames arriving at a full
memory (``K`` = 25 centroids of ``d`` = 16,384 = 4×4 × 1024). For each frame in turn: its
Ward cost of joining each centroid, the cheapest pair of centroids (from the kept
``[K, K]`` pair costs), the cheaper of the two joins done (the frame into a centroid, or
two centroids together with the frame taking the freed slot), the changed centroid's
representative kept or replaced (the member nearer to it), and the pair costs of the
changed slots recomputed. It returns one decision per frame for the caller's bookkeeping
(times, runs, bank ids), read back once per batch.

The reference is that update in torch, frame by frame, with a host round trip for each
decision (what the memory ran before, and still runs on the CPU). The Triton kernel runs
the whole batch in one program: one launch and no host round trip per batch, the
distances summed in float32 in a fixed order (deterministic, run to run; within float32
rounding of the reference, so a near tie may resolve the other way). A frame's work is
one read of the centroids: one sweep after its merge gives the merged centroid's pair
costs and the next frame's join costs together (the freed slot's pair costs are the
frame's join costs: every other centroid but the merged one is unchanged).
"""

from __future__ import annotations

import torch

from vstream.errors import KernelError

from .dispatch import backend_for, check_same_device, check_tensor, tl, triton, use_backend


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


# -- temporal merge --------------------------------------------------------------------------
# A decision per frame, ``[B, 3]`` int64: (slot, freed, replaced). slot: the centroid that
# changed; freed: -1 when the frame joined ``slot``, else the centroid that joined ``slot``
# and now holds the frame alone; replaced: 1 when ``slot``'s representative changed (to the
# frame after a join, to ``freed``'s representative after a pair join).


def _keep_nearer_reference(centroids, representatives, slot: int, candidate: torch.Tensor) -> int:
    centroid = centroids[slot]
    if (candidate - centroid).square().sum() < (representatives[slot] - centroid).square().sum():
        representatives[slot] = candidate
        return 1
    return 0


def update_pair_costs(centroids: torch.Tensor, weights: torch.Tensor, pair_costs: torch.Tensor, slot: int,
                      count: int | None = None) -> None:
    """Refresh row and column ``slot`` of ``pair_costs`` ``[K, K]``: the Ward cost of joining
    centroid ``slot`` with each of the first ``count`` (default all K), ``inf`` with itself.
    What the temporal memory does for a centroid that changed (``ward_costs``, dispatched)."""
    used = slice(0, centroids.shape[0] if count is None else count)
    costs = ward_costs(centroids[used], weights[used], centroids[slot], float(weights[slot]))
    costs[slot] = torch.inf
    pair_costs[slot, used] = costs
    pair_costs[used, slot] = costs


def temporal_merge_reference(centroids: torch.Tensor, weights: torch.Tensor, pair_costs: torch.Tensor,
                             representatives: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """``temporal_merge`` in torch, one frame at a time (see ``temporal_merge``); its pair
    costs too (``update_pair_costs`` under the reference backend)."""
    with use_backend("reference"):
        return _temporal_merge_frames(centroids, weights, pair_costs, representatives, frames)


def _temporal_merge_frames(centroids, weights, pair_costs, representatives, frames) -> torch.Tensor:
    decisions = []
    for x in frames:
        join_costs = ward_costs_reference(centroids, weights, x, 1.0)
        j = int(torch.argmin(join_costs))
        a, b = divmod(int(torch.argmin(pair_costs)), centroids.shape[0])
        if join_costs[j] <= pair_costs[a, b]:
            w = weights[j]
            centroids[j] = (centroids[j] * w.float() + x) / (w.float() + 1)
            weights[j] += 1
            decisions.append((j, -1, _keep_nearer_reference(centroids, representatives, j, x)))
            update_pair_costs(centroids, weights, pair_costs, j)
        else:
            wa, wb = weights[a].clone(), weights[b].clone()
            centroids[a] = (centroids[a] * wa.float() + centroids[b] * wb.float()) / (wa + wb).float()
            weights[a] = wa + wb
            replaced = _keep_nearer_reference(centroids, representatives, a, representatives[b])
            centroids[b], weights[b], representatives[b] = x, 1.0, x
            update_pair_costs(centroids, weights, pair_costs, b)
            update_pair_costs(centroids, weights, pair_costs, a)
            decisions.append((a, b, replaced))
    return torch.tensor(decisions, dtype=torch.int64).reshape(-1, 3).to(centroids.device)


@triton.jit
def _temporal_merge_kernel(c_ptr, w_ptr, pc_ptr, r_ptr, x_ptr, out_ptr, FRAMES, K, DIM,
                           BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    # One program for the whole batch: frames depend on each other in order. Rows of c, r
    # and x are DIM apart; pc is K x K. A pass that writes what other threads of the
    # program read next ends in a barrier. Passes over all centroids take [BLOCK_K,
    # BLOCK_D] tiles (centroid, column); passes over single rows take [ROWS, BLOCK_D]
    # pieces of the row, ROWS * BLOCK_D columns at a time. Masks built from scalars are
    # bounds and indices (cols < n, ks == i): the interpreter cannot and a scalar into a vector.
    ks = tl.arange(0, BLOCK_K)
    ds = tl.arange(0, BLOCK_D)
    piece = tl.arange(0, ROWS)[:, None] * BLOCK_D + ds[None, :]
    used = ks < K
    inf = float("inf")
    pc_offsets = ks[:, None] * K + ks[None, :]
    pc_used = used[:, None] & used[None, :]
    # the first frame's squared distance to every centroid (later frames get theirs from
    # the previous frame's sweep, which reads the updated centroids anyway)
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, DIM, BLOCK_D):
        cols = d0 + ds
        c = tl.load(c_ptr + ks[:, None] * DIM + cols[None, :], mask=used[:, None] & (cols < DIM)[None, :], other=0.0)
        xv = tl.load(x_ptr + cols, mask=cols < DIM, other=0.0)
        acc += (c - xv[None, :]) * (c - xv[None, :])
    squared = tl.sum(acc, axis=1).to(tl.float64)
    for i in range(FRAMES):
        x_row = x_ptr + i * DIM
        # the cheaper of: the frame joining a centroid, the cheapest pair joining
        w = tl.load(w_ptr + ks, mask=used, other=1.0)
        join = tl.where(used, w * 1.0 / (w + 1.0) * squared, inf)
        join_cost = tl.min(join, axis=0)
        j = tl.min(tl.where(join == join_cost, ks, BLOCK_K), axis=0)  # the first cheapest, as torch.argmin
        pc = tl.load(pc_ptr + pc_offsets, mask=pc_used, other=inf)
        pair_cost = tl.min(tl.min(pc, axis=1), axis=0)
        flat = tl.min(tl.min(tl.where(pc == pair_cost, ks[:, None] * BLOCK_K + ks[None, :], BLOCK_K * BLOCK_K),
                             axis=1), axis=0)
        joined = join_cost <= pair_cost
        paired = join_cost > pair_cost
        slot = tl.where(joined, j, flat // BLOCK_K)
        other = flat % BLOCK_K  # the pair's second centroid (unused after a join)
        freed = tl.where(paired, other, -1)
        freed_cols = tl.where(paired, DIM, 0)
        w_slot = tl.sum(tl.where(ks == slot, w, 0.0), axis=0)
        w_part = tl.where(joined, 1.0, tl.sum(tl.where(ks == other, w, 0.0), axis=0))
        w_new = w_slot + w_part
        # the merged centroid; the frame into the freed slot; the two distances to the
        # merged centroid that decide its representative
        acc_new = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        acc_old = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, DIM, ROWS * BLOCK_D):
            cols = d0 + piece
            inside = cols < DIM
            xv = tl.load(x_row + cols, mask=inside, other=0.0)
            c_slot = tl.load(c_ptr + slot * DIM + cols, mask=inside, other=0.0)
            c_other = tl.load(c_ptr + other * DIM + cols, mask=inside, other=0.0)
            partner = tl.where(joined, xv, c_other)
            merged = (c_slot * w_slot.to(tl.float32) + partner * w_part.to(tl.float32)) / w_new.to(tl.float32)
            tl.store(c_ptr + slot * DIM + cols, merged, mask=inside)
            tl.store(c_ptr + other * DIM + cols, xv, mask=cols < freed_cols)
            r_slot = tl.load(r_ptr + slot * DIM + cols, mask=inside, other=0.0)
            candidate = tl.where(joined, xv, tl.load(r_ptr + other * DIM + cols, mask=inside, other=0.0))
            acc_new += (candidate - merged) * (candidate - merged)
            acc_old += (r_slot - merged) * (r_slot - merged)
        replaced = tl.sum(tl.sum(acc_new, axis=1), axis=0) < tl.sum(tl.sum(acc_old, axis=1), axis=0)
        replaced_cols = tl.where(replaced, DIM, 0)
        tl.debug_barrier()
        # representatives (the freed slot's frame is its own)
        for d0 in range(0, DIM, ROWS * BLOCK_D):
            cols = d0 + piece
            inside = cols < DIM
            xv = tl.load(x_row + cols, mask=inside, other=0.0)
            candidate = tl.where(joined, xv, tl.load(r_ptr + other * DIM + cols, mask=inside, other=0.0))
            tl.store(r_ptr + slot * DIM + cols, candidate, mask=cols < replaced_cols)
            tl.store(r_ptr + other * DIM + cols, xv, mask=cols < freed_cols)
        w = tl.where(ks == slot, w_new, tl.where(ks == freed, 1.0, w))
        tl.store(w_ptr + ks, w, mask=used)
        tl.debug_barrier()
        # the freed slot's row: it holds the frame, and every other centroid but the merged
        # one is unchanged, so its distances are the frame's join distances
        frame_costs = tl.where(ks == other, inf, w * 1.0 / (w + 1.0) * squared)
        keep = (ks < tl.where(paired, K, 0)) & (ks != slot)
        tl.store(pc_ptr + other * K + ks, frame_costs, mask=keep)
        tl.store(pc_ptr + ks * K + other, frame_costs, mask=keep)
        # one sweep of the updated centroids: each one's squared distance to the merged one
        # (its row of pair costs, which also sets its entry with the freed slot) and to the
        # next frame (that frame's join distances)
        next_cols = tl.where(i + 1 < FRAMES, DIM, 0)
        acc_slot = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
        acc_next = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, DIM, BLOCK_D):
            cols = d0 + ds
            c = tl.load(c_ptr + ks[:, None] * DIM + cols[None, :], mask=used[:, None] & (cols < DIM)[None, :],
                        other=0.0)
            c_slot = tl.load(c_ptr + slot * DIM + cols, mask=cols < DIM, other=0.0)
            x_next = tl.load(x_row + DIM + cols, mask=cols < next_cols, other=0.0)
            acc_slot += (c - c_slot[None, :]) * (c - c_slot[None, :])
            acc_next += (c - x_next[None, :]) * (c - x_next[None, :])
        squared = tl.sum(acc_next, axis=1).to(tl.float64)
        slot_costs = tl.where(ks == slot, inf, w * w_new / (w + w_new) * tl.sum(acc_slot, axis=1).to(tl.float64))
        tl.store(pc_ptr + slot * K + ks, slot_costs, mask=used)
        tl.store(pc_ptr + ks * K + slot, slot_costs, mask=used)
        tl.store(out_ptr + i * 3, slot.to(tl.int64))
        tl.store(out_ptr + i * 3 + 1, freed.to(tl.int64))
        tl.store(out_ptr + i * 3 + 2, replaced.to(tl.int64))
        tl.debug_barrier()


def temporal_merge(centroids: torch.Tensor, weights: torch.Tensor, pair_costs: torch.Tensor,
                   representatives: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """STAR's temporal update for ``frames`` arriving, in order, at a full memory; the
    state is updated in place.

    Args:
        centroids: ``[K, d]`` float32, the weighted centroids (K >= 1).
        weights: ``[K]`` float64, frames per centroid.
        pair_costs: ``[K, K]`` float64, the Ward cost of joining each pair (``inf`` on
            the diagonal).
        representatives: ``[K, d]`` float32, each centroid's member nearest to it.
        frames: ``[B, d]`` float32.

    Returns:
        ``[B, 3]`` int64 on the state's device, one ``(slot, freed, replaced)`` per frame:
        the frame joined centroid ``slot`` (``freed`` = -1), or centroid ``freed`` joined
        ``slot`` and now holds the frame alone; ``replaced`` = 1 when ``slot``'s
        representative changed (to the frame, or to ``freed``'s old representative).
    """
    check_same_device(centroids=centroids, weights=weights, pair_costs=pair_costs,
                      representatives=representatives, frames=frames)
    k = centroids.shape[0] if centroids.dim() == 2 else 0
    dim = centroids.shape[-1]
    expected = {"centroids": (centroids, (k, dim), torch.float32), "weights": (weights, (k,), torch.float64),
                "pair_costs": (pair_costs, (k, k), torch.float64),
                "representatives": (representatives, (k, dim), torch.float32),
                "frames": (frames, (frames.shape[0] if frames.dim() == 2 else -1, dim), torch.float32)}
    for name, (t, shape, dtype) in expected.items():
        if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
            raise KernelError(f"{name}: expected a contiguous [{', '.join(map(str, shape))}] {dtype}, "
                              f"got {list(t.shape)} {t.dtype}")
    if k == 0:
        raise KernelError("centroids: the memory holds no centroid to merge into")
    if not frames.shape[0]:
        return torch.zeros(0, 3, dtype=torch.int64, device=centroids.device)
    if backend_for(centroids, frames) == "triton":
        decisions = torch.empty(frames.shape[0], 3, dtype=torch.int64, device=centroids.device)
        _temporal_merge_kernel[(1,)](centroids, weights, pair_costs, representatives, frames, decisions,
                                     frames.shape[0], k, dim, BLOCK_K=triton.next_power_of_2(k),
                                     BLOCK_D=min(512, triton.next_power_of_2(dim)), ROWS=4, num_warps=16)
        return decisions
    return temporal_merge_reference(centroids, weights, pair_costs, representatives, frames)
