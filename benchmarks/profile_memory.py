"""Where a STAR memory's per-frame time goes: ``torch.profiler`` over ``extend()`` of
writer batches at the memory's real shapes (8 frames of 16×16 patches × 1024, the default
``StarConfig``), once the temporal memory is full.

Prints the operators that took the most time (self CPU time, and self device time on
CUDA), how many ops and kernel launches one frame costs, and how often the host waited
for the device (``aten::item``, ``aten::_local_scalar_dense``, device-to-host copies):
the numbers that say whether a frame is bound by launches, by syncs or by the work.

Last line: ``RESULT device=... backend=... frame_us=... ops_per_frame=... syncs_per_frame=...
launches_per_frame=...``.

Run: ``python benchmarks/profile_memory.py [--device cuda] [--backend triton|reference]
[--batches 20]``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.pop("TRITON_INTERPRET", None)  # profile compiled kernels, never the interpreter

import torch
from torch.profiler import ProfilerActivity, profile

from vstream.kernels import use_backend
from vstream.memory import StarConfig, StarMemory

BATCH, PATCHES, WIDTH, SCENES = 8, 256, 1024, 12
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaMemcpyAsync")


def frames(generator: torch.Generator, patterns: torch.Tensor, start: int, device: str):
    scene = [(i // 40) % SCENES for i in range(start, start + BATCH)]
    noise = 0.2 * torch.randn(BATCH, PATCHES, WIDTH, generator=generator)
    return (patterns[scene] + noise).to(device), [float(i) for i in range(start, start + BATCH)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default=None, choices=("triton", "reference"),
                        help="the kernels' backend (default: Triton on CUDA, the reference on the CPU)")
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randn(SCENES, PATCHES, WIDTH, generator=generator)
    memory = StarMemory(StarConfig())
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with use_backend(args.backend):
        added = 0
        for _ in range(8):  # fill the temporal memory and compile the kernels
            memory.extend(*frames(generator, patterns, added, args.device))
            added += BATCH
        batches = [frames(generator, patterns, added + i * BATCH, args.device) for i in range(args.batches)]
        sync()
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for features, times in batches:
                memory.extend(features, times)
            sync()
            elapsed = time.perf_counter() - start
    memory.close()
    n = args.batches * BATCH
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=25))
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    syncs = sum(e.count for e in events if e.key in ("aten::_local_scalar_dense", "cudaStreamSynchronize"))
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    backend = args.backend or ("triton" if cuda else "reference")
    print(f"RESULT device={args.device} backend={backend} frame_us={elapsed / n * 1e6:.1f} ops_per_frame={ops / n:.1f} "
          f"syncs_per_frame={syncs / n:.1f} launches_per_frame={launches / n:.1f}")


if __name__ == "__main__":
    main()
