"""Kernels benchmark: each Triton kernel against its PyTorch reference, at the shapes the
memories really call them with (default configs, a CLIP ViT-L/14 or SigLIP tower, the
session's 8-frame writer batches).

| case | call in the memory | shapes |
|---|---|---|
| pool (CLIP) | every batch: patches to the base grid | 8 frames of 16x16 patches x 1024 -> 8x8 |
| pool (SigLIP) | the same, LLaVA-OneVision's tower | 8 frames of 27x27 patches x 1152 -> 8x8 |
| pool (temporal) | every batch: base grid to STAR's temporal grid | 8 x 8x8 x 1024 -> 4x4 |
| nearest | every read: a retrieved centroid re-ranks its 16 candidates | 1 x 16384 vs 16 x 16384 |
| kmeans_step | Flash, every 8 frames: 120 centroids + 8 frames, projected | 128 x 64, K = 120 |
| attention | STAR, every 25 frames: the abstract update | S = 25, T = 25, h = 32, D = 1024 |
| ward | STAR, while its 25 temporal slots fill: a new centroid's pair costs | 1 x 16384 vs 25 x 16384 |
| temporal_merge | STAR, every batch: the whole temporal update of 8 frames | 8 x 16384 into 25 x 16384 |

temporal_merge is timed on a copy of one full memory's state each call (the copy is in
the time: 3.3 MB on the device). The bank's search (FAISS) is not a kernel and is not
timed here; ``benchmarks/star_update.py`` times whole writer batches, and
``benchmarks/memory.py`` updates and reads over a long stream.

Each public function is timed under ``use_backend("reference")`` and, on CUDA,
``use_backend("triton")`` (the wrapper's checks included, as a caller pays them): one
warm-up call (it compiles the kernel), then the best of ``--repeat`` calls (default 20
on CUDA, with ``torch.cuda.synchronize()`` around each; 5 on CPU, one thread). GB/s is
the bytes a kernel must move at least (inputs read once, outputs written once) over the
time. On CUDA the Triton result is also checked against the reference (max abs error).

On CPU there is no Triton run (Triton needs CUDA); the table says so and the last line
reports the reference times instead:

    RESULT device=cpu pool_ref_ms=... pool_siglip_ref_ms=... nearest_ref_ms=... ...
    RESULT device=<cuda name> pool_speedup=<ref/triton> ... attention_speedup=...

Run: ``python benchmarks/kernel_speed.py [--repeat N] [--dtype float32|float16|bfloat16]``.
Seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.pop("TRITON_INTERPRET", None)  # time compiled kernels, never the interpreter

import torch

from vstream.kernels import (
    kmeans_step,
    nearest,
    pool_grid,
    semantic_attention,
    temporal_merge,
    update_pair_costs,
    use_backend,
    ward_costs,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cases(device: str, dtype: torch.dtype) -> list[tuple[str, str, Callable, int]]:
    """(key, shape text, call, bytes moved) for each case, inputs made up front."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    size = torch.tensor([], dtype=dtype).element_size()
    clip, siglip, base = randn(8, 256, 1024), randn(8, 729, 1152), randn(8, 64, 1024)
    centroid, candidates = randn(1, 16384), randn(16, 16384)
    points, weights, start = randn(128, 64), torch.rand(128, generator=g, device=device), randn(120, 64)
    memory, queries, keys, values = randn(25, 1024), randn(25, 32), randn(25, 32), randn(25, 1024)
    clusters, frame = randn(25, 16384), randn(16384)
    counts = torch.rand(25, generator=g, device=device).double() * 100 + 1
    state, frames = merge_case(device)
    return [
        ("pool", "8x16x16x1024 -> 8x8", lambda: pool_grid(clip, 8),
         (clip.numel() + 8 * 64 * 1024) * size),
        ("pool_siglip", "8x27x27x1152 -> 8x8", lambda: pool_grid(siglip, 8),
         (siglip.numel() + 8 * 64 * 1152) * size),
        ("pool_temporal", "8x8x8x1024 -> 4x4", lambda: pool_grid(base, 4),
         (base.numel() + 8 * 16 * 1024) * size),
        ("nearest", "1x16384 vs 16x16384", lambda: nearest(centroid, candidates),
         (centroid.numel() + candidates.numel()) * size + 12),
        ("kmeans", "128x64, K=120", lambda: kmeans_step(points, weights, start),
         (points.numel() + 2 * start.numel()) * size + 128 * (4 + 8) + 120 * 4),
        ("attention", "S=25 T=25 h=32 D=1024", lambda: semantic_attention(memory, queries, keys, values, 0.2),
         (2 * memory.numel() + queries.numel() + keys.numel() + values.numel()) * size),
        ("ward", "1x16384 vs 25x16384", lambda: ward_costs(clusters, counts, frame, 1.0),
         (clusters.numel() + frame.numel()) * size + 25 * 16),
        ("temporal_merge", "8x16384 into 25x16384", lambda: temporal_merge(*[t.clone() for t in state], frames),
         8 * 2 * state[0].numel() * 4),  # per frame: the centroids read twice
    ]


def merge_case(device: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A full STAR temporal state (25 centroids of 16,384, weights 1 to 40, the pair costs
    they imply, representatives near them) and 8 frames, some near centroids, some not."""
    g = torch.Generator().manual_seed(1)
    centroids = 4.0 * torch.randn(25, 16384, generator=g)
    weights = torch.randint(1, 41, (25,), generator=g).double()
    pair_costs = torch.full((25, 25), torch.inf, dtype=torch.float64)
    for slot in range(25):
        update_pair_costs(centroids, weights, pair_costs, slot)  # CPU tensors: the reference
    representatives = centroids + 0.3 * torch.randn(25, 16384, generator=g)
    frames = torch.cat([centroids[:4] + 0.5 * torch.randn(4, 16384, generator=g), 40 * torch.randn(4, 16384, generator=g)])
    return [t.to(device) for t in (centroids, weights, pair_costs, representatives)], frames.to(device)


def best_ms(call: Callable, backend: str, repeat: int, cuda: bool):
    """The call's result and its best time in ms over ``repeat`` runs, after a warm-up."""
    with use_backend(backend):
        result = call()
        best = float("inf")
        for _ in range(repeat):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return result, best * 1e3


def max_error(a, b) -> float:
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per case (20 on CUDA, 5 on CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    repeat = args.repeat or (20 if cuda else 5)
    if not cuda:
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device: {name}, dtype: {args.dtype}, best of {repeat}")
    print(f"{'case':<14} {'shape':<24} {'ref ms':>9} {'ref GB/s':>9} {'triton ms':>10} {'triton GB/s':>11} "
          f"{'speedup':>8} {'max err':>9}")
    result = [f"device={name.replace(' ', '_')}"]
    for key, shape, call, nbytes in cases(device, DTYPES[args.dtype]):
        ref, ref_ms = best_ms(call, "reference", repeat, cuda)
        line = f"{key:<14} {shape:<24} {ref_ms:9.3f} {nbytes / ref_ms / 1e6:9.1f} "
        if cuda:
            out, tri_ms = best_ms(call, "triton", repeat, cuda)
            line += (f"{tri_ms:10.3f} {nbytes / tri_ms / 1e6:11.1f} {ref_ms / tri_ms:8.2f} "
                     f"{max_error(out, ref):9.2e}")
            result.append(f"{key}_speedup={ref_ms / tri_ms:.2f}")
        else:
            line += f"{'(Triton needs CUDA)':>31}"
            result.append(f"{key}_ref_ms={ref_ms:.3f}")
        print(line, flush=True)
    print("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()
