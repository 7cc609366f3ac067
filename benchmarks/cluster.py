"""The stream server on a Ray cluster against the single-process server, in one run.

A Ray cluster of one-CPU nodes on loopback (``ray.cluster_utils.Cluster``; the head has
no CPU, so every worker has a node of its own) and ``vstream serve``'s ``Server`` in this
process, with the embedded SmolLM2 and the pixel encoder (no ASR, no OCR): the costs
measured are the paths, not a vision tower.

1. Per-frame cost: one stream, ``--frames`` 640x360 frames sent lossless through the
   ordinary ``Client`` until all are in the memory, on the single-process server and on
   a one-worker cluster; best of ``--repeats``. ``overhead_ratio`` = cluster / single
   (target <= 1.5).
2. Streams sustained with 1, 2 and 3 workers: ``--streams`` clients, each on its own
   thread and stream, send ``--frames`` frames lossless; frames written per second across
   all streams = the number of 1 fps streams the cluster keeps up with.
3. Recovery: a stream on a two-worker cluster, checkpoints every ``--checkpoint-every``
   seconds; its node is killed; the time until a question about it is answered again,
   and the frames lost (target <= 10 s).

    python benchmarks/cluster.py [--frames 60] [--streams 6] [--repeats 2] [--checkpoint-every 5]

Last line: ``RESULT overhead_ratio=<cluster / single ms per frame> single_ms=... cluster_ms=...
streams_1w=... streams_2w=... streams_3w=... recovery_s=... frames_lost=...``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

# before Ray loads: every node and address on loopback (see docs/design.md)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np
import ray
import torch
from ray.cluster_utils import Cluster

from vstream import Frame
from vstream.client import Client
from vstream.cluster import ClusterConfig
from vstream.errors import ServerError
from vstream.models import GenerationConfig
from vstream.server import Server, ServerConfig
from vstream.session import SessionConfig

LOOPBACK = "127.0.0.1"


def frames(n: int, offset: int = 0) -> list[Frame]:
    rng = np.random.default_rng(offset)
    base = rng.integers(0, 256, (360, 640, 3), np.uint8)
    return [Frame(np.roll(base, 7 * (offset + i), axis=1), float(offset + i), offset + i) for i in range(n)]


class Running:
    """A ``Server`` on a thread: ``with Running(config) as server: ...``."""

    def __init__(self, config: ServerConfig):
        self.server = Server(config, None)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self.server

    def __exit__(self, *exc) -> None:
        self.server.stop()
        self.thread.join()


def server_config(state: Path, cluster: Cluster | None = None, checkpoint_every: float = 30.0,
                  batch_frames: int = 32) -> ServerConfig:
    session = SessionConfig(asr=False, ocr=False, encoder="pixels", generation=GenerationConfig(max_new_tokens=8))
    return ServerConfig(bind="tcp://127.0.0.1:*", state_dir=str(state), max_streams=64, max_fps=1e6, session=session,
                        cluster=None if cluster is None else ClusterConfig(
                            address=cluster.address, checkpoint_every=checkpoint_every, dead_after=5.0,
                            batch_frames=batch_frames))


def feed(address: str, items: list[Frame], stream: str | None = None) -> str:
    """Send ``items`` lossless into ``stream`` (a new one when None); wait until written."""
    with Client(address, ask_timeout=300.0) as client:
        stream = stream or client.open_stream()
        client.send_source(stream, items)
        while client.stats(stream)["frames_processed"] < len(items):
            time.sleep(0.01)
    return stream


def ms_per_frame(address: str, count: int) -> float:
    items = frames(count)
    began = time.perf_counter()
    stream = feed(address, items)
    elapsed = time.perf_counter() - began
    with Client(address) as client:
        client.close_stream(stream)
    return 1000 * elapsed / count


def sustained(address: str, streams: int, count: int) -> float:
    """Frames written per second across ``streams`` concurrent lossless senders."""
    items = frames(count)
    failures: list[BaseException] = []

    def sender() -> None:
        try:
            feed(address, items)
        except BaseException as exc:  # noqa: BLE001 - reported below, not lost in a thread
            failures.append(exc)

    threads = [threading.Thread(target=sender) for _ in range(streams)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if failures:
        raise failures[0]
    with Client(address) as client:
        for stream in client.list_streams():
            client.close_stream(stream["stream"])
    return streams * count / elapsed


def recovery(cluster: Cluster, state: Path, count: int, checkpoint_every: float) -> tuple[float, int]:
    """Seconds from a node's death to its stream's next answer, and the frames lost: ``count``
    frames are checkpointed, ``count`` more are written after the last checkpoint, then the
    stream's node dies."""
    with Running(server_config(state, cluster, checkpoint_every)) as server, Client(server.address) as client:
        stream = feed(server.address, frames(count))
        time.sleep(checkpoint_every * 1.2)  # a checkpoint holds the first frames
        feed(server.address, frames(count, offset=count), stream)
        node = client.stats(stream)["node"]
        victim = next(n for n in cluster.worker_nodes if n.node_id == node)
        killed = time.perf_counter()
        cluster.remove_node(victim)
        while True:
            try:
                client.ask(stream, "What was shown?")
                break
            except ServerError as exc:  # "moved": asked while the stream moved
                if exc.code != "moved":
                    raise
        answered = time.perf_counter() - killed
        return answered, client.stats(stream)["frames_lost"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--streams", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=float, default=5.0)
    parser.add_argument("--batch-frames", type=int, default=32, help="frames forwarded to a worker per call")
    parser.add_argument("--only-overhead", action="store_true", help="measure the per-frame cost only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), ray {ray.__version__}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="vstream-cluster-bench-"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": LOOPBACK})
    try:
        cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
        with Running(server_config(root / "single")) as single:
            single_ms = min(ms_per_frame(single.address, args.frames) for _ in range(args.repeats))
        with Running(server_config(root / "c1", cluster, batch_frames=args.batch_frames)) as one:
            cluster_ms = min(ms_per_frame(one.address, args.frames) for _ in range(args.repeats))
        print(f"per frame: single process {single_ms:.2f} ms, cluster {cluster_ms:.2f} ms "
              f"({cluster_ms / single_ms:.2f}x)", flush=True)
        if args.only_overhead:
            return
        streams = {}
        for workers in (1, 2, 3):
            while len(cluster.worker_nodes) < workers:
                cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
            with Running(server_config(root / f"s{workers}", cluster)) as server:
                streams[workers] = max(sustained(server.address, args.streams, args.frames)
                                       for _ in range(args.repeats))
            print(f"{workers} worker(s): {streams[workers]:.1f} frames/s across {args.streams} streams", flush=True)
        recovery_s, lost = recovery(cluster, root / "recovery", args.frames, args.checkpoint_every)
        print(f"recovery: answered {recovery_s:.2f} s after the node died, {lost} frame(s) lost", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    print(f"RESULT overhead_ratio={cluster_ms / single_ms:.3f} single_ms={single_ms:.2f} cluster_ms={cluster_ms:.2f} "
          + " ".join(f"streams_{w}w={s:.1f}" for w, s in streams.items())
          + f" recovery_s={recovery_s:.2f} frames_lost={lost}")


if __name__ == "__main__":
    main()
