"""Memory benchmark: the STAR memory's per-frame cost and RAM over a 10-hour stream.

One process, one torch thread, the default ``StarConfig`` (681 tokens, bank at 8×8
float16, 256 MiB of bank RAM, flat FAISS index), frames of 16×16 patches × 1024 (CLIP
ViT-L/14 at 224 px). The stream is ``--frames`` frames (default 36,000: 10 hours at
1 fps) of 60 recurring scenes, each frame its scene's pattern plus fresh noise.

- ``update_ms`` at stream positions 100, 3,600 and 36,000: each of the ``--repeat``
  frames from that position on is added alone with ``add()`` and timed; the best is
  reported (frames in between go in with ``extend()`` in batches of 100, which leaves
  the same memory). ``update_ratio`` = time at the last position / time at 100: the
  baseline is the same memory early in the same run.
- ``rss_mb`` at each position (``/proc/self/statm``), and ``rss_growth_mb`` from
  3,600 frames to the end, to compare with the bank's RAM cap.
- ``read_ms`` at the same positions: best of ``--repeat`` reads of the whole memory
  (``tokens()``, the retrieved frames read from the bank included), each after a new
  frame, i.e. without the read cache; ``read_ratio`` = read at the last position / read
  at 100.
- ``query_ms``: best of ``--repeat`` ``bank.search`` calls of one key for its 5 nearest
  frames over the whole bank (what a search by example costs; reads no longer search).
- ``disk_gb``: what the bank's spill files span at the end, under the default cap
  (``BankConfig.disk_gb`` 4 GiB: 29,640 frames of 128 KiB and a thumbnail slot, so the
  last 6,400 frames of a 36,000-frame stream thin the older ones, and the adds timed at
  36,000 are those of a bank that thins), and ``kept`` frames.

Targets (issue 3): ``update_ratio <= 1.2``, ``update_ms < 5``, ``rss_growth_mb`` under
the bank's ``ram_mb``; (issue 14) ``read_ms <= 5`` at 36,000 frames, ``read_ratio
<= 1.2``, ``disk_gb <= 4``. Last line: ``RESULT update_ratio=... update_ms=...
rss_growth_mb=... query_ms=... read_ms=... read_ratio=... frames=... disk_gb=... kept=...``.

Run: ``python benchmarks/memory.py [--frames N] [--repeat N] [--device cuda]`` (on CUDA
the memory runs where its frames arrive; times include a ``torch.cuda.synchronize``). The bank's spill files
go to a temporary folder and are removed at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from vstream.memory import StarConfig, StarMemory

PATCHES, WIDTH, SCENES, BATCH = 256, 1024, 60, 100


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class SceneStream:
    """Frame i: the pattern of scene ``(i // 40) % 60`` plus noise, at time i seconds."""

    def __init__(self, seed: int = 0, device: torch.device = torch.device("cpu")):
        self.generator = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(SCENES, PATCHES, WIDTH, generator=self.generator)
        self.device = device

    def frames(self, start: int, count: int) -> tuple[torch.Tensor, list[float]]:
        scene = [(i // 40) % SCENES for i in range(start, start + count)]
        noise = 0.2 * torch.randn(count, PATCHES, WIDTH, generator=self.generator)
        return (self.patterns[scene] + noise).to(self.device), [float(i) for i in range(start, start + count)]


def best_of(repeat: int, run) -> float:
    """Best wall time of ``run()`` over ``repeat`` calls, milliseconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=36_000)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--device", default="cpu", help="where the frames arrive and the memory runs (cpu, cuda)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    positions = [p for p in (100, 3_600, 36_000) if p < args.frames] + [args.frames]
    positions = sorted(set(positions))
    config = StarConfig()
    stream = SceneStream(device=torch.device(args.device))
    memory = StarMemory(config)
    sync = torch.cuda.synchronize if stream.device.type == "cuda" else (lambda: None)
    card = f", {torch.cuda.get_device_name()}" if stream.device.type == "cuda" else ""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, 1 thread{card}; bank RAM cap {config.bank.ram_mb} MiB")
    print(f"{'frames':>8} {'update ms (best)':>17} {'median':>8} {'read ms (best)':>15} {'rss MB':>8}")
    results: dict[int, tuple[float, float, float]] = {}
    added = 0
    started = time.perf_counter()
    for position in positions:
        target = position - args.repeat
        while added < target:
            count = min(BATCH, target - added)
            memory.extend(*stream.frames(added, count))
            added += count
        times = []
        for frame, t in zip(*stream.frames(added, args.repeat)):
            sync()
            start = time.perf_counter()
            memory.add(frame, t)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
            added += 1
        times.sort()
        reads = []
        for frame, t in zip(*stream.frames(added, args.repeat)):
            memory.add(frame, t)  # a new frame: the read is not cached
            added += 1
            sync()
            start = time.perf_counter()
            memory.tokens()
            sync()
            reads.append((time.perf_counter() - start) * 1e3)
        results[position] = (times[0], rss_mb(), min(reads))
        print(f"{position:>8} {times[0]:>17.3f} {times[len(times) // 2]:>8.3f} {min(reads):>15.2f} "
              f"{results[position][1]:>8.0f}", flush=True)
    print(f"stream of {added} frames built in {time.perf_counter() - started:.0f} s")

    keys = stream.patterns[:1].mean(dim=1)
    query_ms = best_of(args.repeat, lambda: memory.bank.search(keys, 5))
    print(f"faiss search over {len(memory.bank)} frames: {query_ms:.2f} ms ({len(memory.tokens())} tokens a read)")
    disk_gb, kept = memory.bank.disk_bytes() / 2**30, len(memory.bank.kept_ids())
    print(f"spill: {disk_gb:.2f} GiB, {kept} of {len(memory.bank)} frames kept "
          f"(cap {config.bank.disk_gb} GiB, {memory.bank.disk_frames} frames)")
    memory.close()

    first, last = positions[0], positions[-1]
    ratio = results[last][0] / results[first][0]
    growth_from = 3_600 if 3_600 in results else first
    growth = results[last][1] - results[growth_from][1]
    print(f"RESULT update_ratio={ratio:.3f} update_ms={results[last][0]:.3f} rss_growth_mb={growth:.1f} "
          f"query_ms={query_ms:.3f} read_ms={results[last][2]:.2f} read_ratio={results[last][2] / results[first][2]:.3f} "
          f"frames={last} disk_gb={disk_gb:.2f} kept={kept}")


if __name__ == "__main__":
    main()
