"""Server benchmark: how many live 1 fps 360p streams one ``vstream serve`` keeps up
with, how long questions take meanwhile, and raw frames per second through the wire.

A server process on loopback (``vstream serve``, tiny random LLaMA, pixel encoder, no
speech recognition, one torch thread) and this process as its clients:

1. **Wire.** One client sends 640x360 RGB frames to one stream as fast as the server
   answers, for ``--seconds`` s: ``wire_fps`` = frames acknowledged per second (taken
   or refused as busy: the cost of the wire and the server's loop, not of the memory).
2. **Streams.** For n = 1, 2, 4, 8, ... each of n client threads (one socket each) sends
   a 360p frame a second to its own stream, paced in real time, for ``--seconds`` s,
   while one more client asks questions on the streams in turn, back to back. A
   level passes when, after a short drain, every frame sent is in its stream's memory
   (no frame refused or dropped) and the questions' p99 latency stays under
   ``--max-p99-ms`` (default 1000: a server whose answers take seconds is not keeping
   up, even when it drops nothing). ``streams`` = the largest passing n; the question
   latencies (p50, p99) are those measured during that level.

Last line: ``RESULT streams=<n> ask_p50_ms=<ms> ask_p99_ms=<ms> wire_fps=<fps>``.

Run: ``python benchmarks/server.py [--seconds S] [--max-streams N]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny checkpoint and the server process the tests use

import numpy as np
from server_process import ServerProcess
from tiny_models import tiny_llama

import vstream
from vstream.client import Client

WIDTH, HEIGHT = 640, 360


def frame_at(t: float, index: int) -> vstream.Frame:
    """A 360p frame whose colour changes every 10 s (scenes for the memory)."""
    colour = np.array([(40 * (int(t) // 10)) % 256, 120, 200], dtype=np.uint8)
    image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    image[:] = colour
    image[::16, ::16] = index % 256  # a few pixels that differ frame to frame
    return vstream.Frame(image, t, index)


def wire_fps(address: str, seconds: float) -> float:
    with Client(address) as client:
        stream = client.open_stream()
        image = frame_at(0.0, 0).image
        sent, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            client.send_frame(stream, vstream.Frame(image, sent / 1000.0, sent))  # 1000 fps of stream time
            sent += 1
        rate = sent / (time.perf_counter() - started)
        client.close_stream(stream)
    return rate


def sender(address: str, stream: str, seconds: float, refused: list[int]) -> None:
    with Client(address) as client:
        started = time.perf_counter()
        for i in range(int(seconds)):
            delay = started + i - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if not client.send_frame(stream, frame_at(float(i), i)):
                refused.append(i)


def level(address: str, n: int, seconds: float, max_p99_ms: float) -> tuple[bool, list[float]]:
    """Run n paced streams with questions in flight; (no frame lost, ask latencies ms)."""
    with Client(address, ask_timeout=300.0) as control:
        streams = [control.open_stream() for _ in range(n)]
        refused: list[int] = []
        senders = [threading.Thread(target=sender, args=(address, s, seconds, refused)) for s in streams]
        for thread in senders:
            thread.start()
        latencies: list[float] = []
        time.sleep(2.0)  # every stream has frames before the first question
        i = 0
        while any(thread.is_alive() for thread in senders):
            started = time.perf_counter()
            control.ask(streams[i % n], "What is on screen?")
            latencies.append(1e3 * (time.perf_counter() - started))
            i += 1
        for thread in senders:
            thread.join()
        time.sleep(2.0)  # let the writers drain
        stats = [control.stats(s) for s in streams]
        for s in streams:
            control.close_stream(s)
    lost = sum(st["frames_dropped"] for st in stats) + len(refused)
    behind = sum(st["frames_in"] - st["frames_processed"] for st in stats)
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (np.inf, np.inf)  # none answered in time
    print(f"{n:>4} streams: {len(refused)} refused, {lost - len(refused)} dropped, {behind} still queued; "
          f"{len(latencies)} questions, p50 {p50:.0f} ms, p99 {p99:.0f} ms", flush=True)
    return lost == 0 and behind == 0 and p99 <= max_p99_ms, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-streams", type=int, default=256)
    parser.add_argument("--max-p99-ms", type=float, default=1000.0)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; server: tiny LLaMA, "
          f"pixel encoder, no ASR, 1 torch thread; 640x360 frames")
    with tempfile.TemporaryDirectory() as folder:
        model = tiny_llama(Path(folder) / "llama")
        server = ServerProcess(Path(folder) / "server", "--model", str(model), "--no-asr", "--encoder", "pixels",
                               "--no-ocr", "--max-new-tokens", "16",
                               "--max-streams", str(args.max_streams + 1), "--max-fps", "100000")
        try:
            address = server.wait_ready()
            wire = wire_fps(address, args.seconds / 2)
            print(f"wire: {wire:.0f} frames/s of 640x360 RGB ({wire * WIDTH * HEIGHT * 3 / 2**20:.0f} MiB/s)")
            sustained, latencies, n = 0, [0.0], 1
            while n <= args.max_streams:
                ok, measured = level(address, n, args.seconds, args.max_p99_ms)
                if not ok:
                    break
                sustained, latencies, n = n, measured, n * 2
        finally:
            server.stop()
    print(f"RESULT streams={sustained} ask_p50_ms={np.percentile(latencies, 50):.1f} "
          f"ask_p99_ms={np.percentile(latencies, 99):.1f} wire_fps={wire:.1f}")


if __name__ == "__main__":
    main()
