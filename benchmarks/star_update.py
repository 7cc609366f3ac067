"""STAR update benchmark: frames per second through a STAR memory at its real shapes
(writer batches of 8 frames of 16×16 patches × 1024, a CLIP ViT-L/14 tower; the default
``StarConfig``: 25 temporal centroids of 4×4 × 1024 = 16,384 dims), with the kernels
(``temporal_merge`` and the rest in Triton) against the PyTorch references on the same
device, in the same run.

Two things are timed per backend, each on its own memory warmed past the bank's RAM ring
(2,112 frames: the ring's first-touch page faults are a start-up cost, not a per-frame one):

- ``extend``: all a writer batch costs: pooling, the finite check, the spatial, temporal
  and abstract updates, the timeline, and the bank's write (rows to the host, the spill
  file in a temporary folder, the FAISS index);
- ``update``: the same without the bank's write: what the kernels speed up.

Each runs ``--repeat`` rounds of ``--batches`` batches, with ``torch.cuda.synchronize``
at the ends of a round; the best round counts. On the CPU the kernels' side is not run
(Triton needs CUDA; its interpreter is for tests): the reference alone is reported.

``--profile`` adds a ``torch.profiler`` table of one round of ``extend`` per backend (self
time by operator), and per frame: aten ops, host waits for the device
(``_local_scalar_dense``, stream synchronisations) and kernel launches.

Targets (issue 15, on a GPU): speedup >= 2 and >= 5,000 frames/s at batch 8. Last line:
``RESULT device=... reference_extend_fps=... reference_update_fps=... kernel_extend_fps=...
kernel_update_fps=... extend_speedup=... update_speedup=... kernel_syncs_per_frame=...``.

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
WARM_BATCHES = 264  # 2,112 frames: past the bank's RAM ring of 2,048 frames
SYNCS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")


def make_features(count: int, device: str) -> list[torch.Tensor]:
    """``count`` writer batches ``[8, 256, 1024]``: frame i shows scene ``(i // 40) % 12`` plus
    noise (scenes recur, so frames join clusters and clusters join each other)."""
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randn(SCENES, PATCHES, WIDTH, generator=generator)
    batches = []
    for b in range(count):
        scene = [(i // 40) % SCENES for i in range(b * BATCH, (b + 1) * BATCH)]
        noise = 0.2 * torch.randn(BATCH, PATCHES, WIDTH, generator=generator)
        batches.append((patterns[scene] + noise).to(device))
    return batches


class Stream:
    """The batches again and again, each frame one second after the one before."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches, self.frames = batches, 0

    def take(self, count: int) -> list[tuple[torch.Tensor, list[float]]]:
        out = []
        for _ in range(count):
            features = self.batches[(self.frames // BATCH) % len(self.batches)]
            out.append((features, [float(t) for t in range(self.frames, self.frames + BATCH)]))
            self.frames += BATCH
        return out


def update_only(memory: StarMemory, features: torch.Tensor, times: list[float]) -> None:
    """What ``extend`` does but the bank's write: pooling, the check, the STAR update."""
    parts, _ = memory._pool(features)
    memory._add_frames(parts, times)


def run(backend: str, batches: list[torch.Tensor], args, sync) -> dict:
    """Best frames/s of ``extend`` and of the update alone over the rounds, each on its own
    memory warmed past its bank's RAM ring (so no first-touch page faults are timed); with
    ``--profile``, the profiler table and per-frame counts of one round of ``extend``."""
    result = {}
    with use_backend(backend):
        for mode in ("extend", "update"):
            memory, stream = StarMemory(StarConfig()), Stream(batches)
            step = memory.extend if mode == "extend" else lambda f, t, m=memory: update_only(m, f, t)
            for features, times in stream.take(WARM_BATCHES):  # compiles the kernels too
                memory.extend(features, times)
            best = 0.0
            for _ in range(args.repeat):
                work = stream.take(args.batches)
                sync()
                start = time.perf_counter()
                for features, times in work:
                    step(features, times)
                sync()
                best = max(best, args.batches * BATCH / (time.perf_counter() - start))
            result[f"{mode}_fps"] = best
            if args.profile and mode == "extend":
                cuda = args.device.startswith("cuda")
                work = stream.take(args.batches)
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                with profile(activities=activities) as prof:
                    for features, times in work:
                        memory.extend(features, times)
                    sync()
                events = prof.key_averages()
                result["table"] = events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                               row_limit=20)
                frames = args.batches * BATCH
                result["ops_per_frame"] = sum(e.count for e in events if e.key.startswith("aten::")) / frames
                result["syncs_per_frame"] = sum(e.count for e in events if e.key in SYNCS) / frames
                result["launches_per_frame"] = sum(e.count for e in events if e.key in LAUNCHES) / frames
            memory.close()
    return result


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
    batches = make_features(40, args.device)
    results = {}
    for backend in ("reference", "triton") if cuda else ("reference",):
        result = results[backend] = run(backend, batches, args, sync)
        if "table" in result:
            print(f"-- profile of extend, {backend}\n{result['table']}")
        counts = " ".join(f"{k}={result[k]:.1f}" for k in ("ops_per_frame", "syncs_per_frame", "launches_per_frame")
                          if k in result)
        print(f"{backend:<10} extend {result['extend_fps']:7.0f} frames/s, update alone {result['update_fps']:7.0f} "
              f"frames/s {counts}", flush=True)
    reference = results["reference"]
    line = [f"device={name.replace(' ', '_')}", f"reference_extend_fps={reference['extend_fps']:.0f}",
            f"reference_update_fps={reference['update_fps']:.0f}"]
    if cuda:
        kernels = results["triton"]
        line += [f"kernel_extend_fps={kernels['extend_fps']:.0f}", f"kernel_update_fps={kernels['update_fps']:.0f}",
                 f"extend_speedup={kernels['extend_fps'] / reference['extend_fps']:.2f}",
                 f"update_speedup={kernels['update_fps'] / reference['update_fps']:.2f}"]
        line += [f"kernel_{k}={kernels[k]:.1f}" for k in ("ops_per_frame", "syncs_per_frame", "launches_per_frame")
                 if k in kernels]
    print("RESULT " + " ".join(line))


if __name__ == "__main__":
    main()
