"""How many 1 fps streams one frame encoder sustains, each stream's frames on their own
against every stream's frames batched (``BatchingEncoder``, what ``vstream serve`` does).

The tower has a real size with random weights: ``--tower siglip-base`` (SigLIP
base/16 at 224 px: hidden 768, 12 layers, 12 heads, MLP 3072; the default on a CPU) or
``clip-large`` (CLIP ViT-L/14 at 224 px: hidden 1024, 24 layers, 16 heads, MLP 4096).
``--streams`` threads stand for the streams' writer threads: at 1 fps each has one frame
waiting at a time, so each calls ``encode`` with one 640x360 frame, again as soon as it
returns, ``--frames`` times. Throughput in frames/s is then the number of 1 fps streams
the encoder keeps up with. Preprocessing (the tower's image processor) is included: it is
part of every frame's cost and batching does not shrink it.

    python benchmarks/encoder_batching.py [--tower siglip-base] [--streams 16] [--frames 2]
        [--repeats 2] [--device auto] [--threads 1]

Last line: ``RESULT batching_speedup=<batched / plain frames per s> plain_fps=...
batched_fps=... streams_1fps=<batched, whole streams> mean_batch=... tower=... device=...``.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from vstream.device import resolve_device
from vstream.encoders.batching import BatchingConfig, BatchingEncoder
from vstream.encoders.vision import VisionConfig, VisionEncoder

TOWERS = {
    "siglip-base": ("siglip", {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                               "num_attention_heads": 12, "image_size": 224, "patch_size": 16}),
    "clip-large": ("clip", {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                            "num_attention_heads": 16, "image_size": 224, "patch_size": 14}),
}


def write_tower(folder: Path, name: str) -> str:
    """A random-weight tower of ``name``'s shape, with its image processor, in ``folder``."""
    import transformers

    kind, sizes = TOWERS[name]
    torch.manual_seed(0)
    if kind == "siglip":
        transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**sizes)).save_pretrained(folder)
        transformers.SiglipImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(folder)
    else:
        transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**sizes)).save_pretrained(folder)
        transformers.CLIPImageProcessorPil(size={"shortest_edge": 224},
                                           crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return str(folder)


def streams_throughput(encoder, streams: int, frames: int) -> float:
    """Frames per second when ``streams`` writers each encode ``frames`` frames, one at a time."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (360, 640, 3), np.uint8) for _ in range(streams)]
    start = threading.Barrier(streams + 1)
    failures: list[BaseException] = []

    def writer(k: int) -> None:
        start.wait()
        try:
            for _ in range(frames):
                encoder.encode([images[k]])
        except BaseException as exc:  # noqa: BLE001 - reported below, not lost in a thread
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(streams)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    if failures:
        raise failures[0]
    return streams * frames / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tower", choices=sorted(TOWERS), default="siglip-base")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--frames", type=int, default=2, help="frames per stream and run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        print(f"writing a random {args.tower} tower ...", flush=True)
        tower = VisionEncoder(VisionConfig(model=write_tower(Path(folder), args.tower), layer=-1,
                                           dtype="float16" if device.type == "cuda" else "float32",
                                           device=str(device), batch_size=args.streams))
        tower.encode([np.zeros((360, 640, 3), np.uint8)])  # warm-up
        plain = batched = mean_batch = 0.0
        for repeat in range(args.repeats):
            plain = max(plain, streams_throughput(tower, args.streams, args.frames))
            with BatchingEncoder(tower, BatchingConfig(max_frames=args.streams)) as batching:
                batched = max(batched, streams_throughput(batching, args.streams, args.frames))
                mean_batch = batching.frames / batching.forwards
            print(f"repeat {repeat + 1}: plain {plain:.2f} frames/s, batched {batched:.2f} frames/s "
                  f"(mean batch {mean_batch:.1f})", flush=True)
    print(f"RESULT batching_speedup={batched / plain:.3f} plain_fps={plain:.2f} batched_fps={batched:.2f} "
          f"streams_1fps={int(batched)} mean_batch={mean_batch:.1f} tower={args.tower} device={device}")


if __name__ == "__main__":
    main()
