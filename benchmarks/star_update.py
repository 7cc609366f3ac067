"""STAR update benchmark: frames per second through ``StarMemory.extend`` at the memory's
real shapes (writer batches of 8 frames of 16×16 patches × 1024, a CLIP ViT-L/14 tower;
the default ``StarConfig``: 25 temporal centroids of 4×4 × 1024 = 16,384 dims), once the
temporal memory is full, with the kernels (``temporal_merge`` and the rest in Triton)
against the PyTorch references on the same device, in the same run.

Everything a writer batch costs is timed: pooling, the spatial, temporal and abstract
updates, the timeline and the bank's write (its spill file in a temporary folder). Each
backend runs ``--repeat`` rounds of ``--batches`` batches on its own memory (fed the
same frames), with ``torch.cuda.synchronize`` at the ends of a round; the best round
counts. On the CPU the kernels' side is not run (Triton needs CUDA; its interpreter is for
tests): the reference alone is reported.

``--profile`` adds a ``torch.profiler`` table of one round per backend (self time by
operator), and per frame: aten ops, host waits for the device (``_local_scalar_dense``,
stream synchronisations) and kernel launches: whether a frame is bound by launches, by
host round trips, or by the work.

Targets (issue 15, on a GPU): ``speedup >= 2`` and ``kernel_fps >= 5000``. Last line:
``RESULT device=... kernel_fps=... reference_fps=... speedup=... kernel_syncs_per_frame=...``.

Run: ``python benchmarks/star_update.py [--device cuda] [--batches 40] [--repeat 5] [--profile]``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.pop("TRITON_INTERPRET", None)  # time compiled kernels, never the interpreter

import torch
from torch.profiler import ProfilerActivity, profile

from vstream.kernels import use_backend
from vstream.memory import StarConfig, StarMemory

BATCH, PATCHES, WIDTH, SCENES = 8, 256, 1024, 12
SYNCS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")


def make_batches(count: int, start: int, device: str, seed: int = 0) -> list[tuple[torch.Tensor, list[float]]]:
    """``count`` writer batches from frame ``start`` on: frame i shows scene ``(i // 40) % 12``
    plus noise (scenes recur, so clusters join as well as take frames), at i seconds."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(SCENES, PATCHES, WIDTH, generator=generator)
    batches = []
    for b in range(count):
        first = start + b * BATCH
        scene = [(i // 40) % SCENES for i in range(first, first + BATCH)]
        noise = 0.2 * torch.randn(BATCH, PATCHES, WIDTH, generator=generator)
        batches.append(((patterns[scene] + noise).to(device), [float(i) for i in range(first, first + BATCH)]))
    return batches


def run(backend: str, args, sync) -> tuple[float, str | None, dict[str, float]]:
    """Best frames/s over the rounds, the profiler table and per-frame counts (``--profile``)."""
    memory = StarMemory(StarConfig())
    counts: dict[str, float] = {}
    table = None
    with use_backend(backend):
        warm = make_batches(8, 0, args.device)  # fills the temporal memory, compiles the kernels
        for features, times in warm:
            memory.extend(features, times)
        best = 0.0
        for r in range(args.repeat):
            batches = make_batches(args.batches, (8 + r * args.batches) * BATCH, args.device, seed=r + 1)
            sync()
            start = time.perf_counter()
            for features, times in batches:
                memory.extend(features, times)
            sync()
            best = max(best, args.batches * BATCH / (time.perf_counter() - start))
        if args.profile:
            cuda = args.device.startswith("cuda")
            batches = make_batches(args.batches, 10**6, args.device, seed=99)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                for features, times in batches:
                    memory.extend(features, times)
                sync()
            events = prof.key_averages()
            table = events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=20)
            frames = args.batches * BATCH
            counts = {"ops_per_frame": sum(e.count for e in events if e.key.startswith("aten::")) / frames,
                      "syncs_per_frame": sum(e.count for e in events if e.key in SYNCS) / frames,
                      "launches_per_frame": sum(e.count for e in events if e.key in LAUNCHES) / frames}
    memory.close()
    return best, table, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="where the frames arrive and the memory runs (cpu, cuda)")
    parser.add_argument("--batches", type=int, default=40, help="writer batches of 8 frames per round")
    parser.add_argument("--repeat", type=int, default=5, help="rounds per backend; the best counts")
    parser.add_argument("--profile", action="store_true", help="also profile one round per backend")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device: {name}; batches of {BATCH} frames of {PATCHES} x {WIDTH}; best of {args.repeat} rounds "
          f"of {args.batches} batches")
    results = {}
    for backend in ("reference", "triton") if cuda else ("reference",):
        fps, table, counts = run(backend, args, sync)
        results[backend] = (fps, counts)
        if table:
            print(f"-- profile, {backend}\n{table}")
        extra = " ".join(f"{k}={v:.1f}" for k, v in counts.items())
        print(f"{backend:<10} {fps:9.0f} frames/s {extra}", flush=True)
    line = [f"device={name.replace(' ', '_')}", f"reference_fps={results['reference'][0]:.0f}"]
    if cuda:
        kernel_fps, counts = results["triton"]
        line += [f"kernel_fps={kernel_fps:.0f}", f"speedup={kernel_fps / results['reference'][0]:.2f}"]
        line += [f"kernel_{k}={v:.1f}" for k, v in counts.items()]
    print("RESULT " + " ".join(line))


if __name__ == "__main__":
    main()
