"""big.LITTLE encoder against the big tower alone, on tiny-ish random CLIP towers.

Big: hidden 256, 6 layers, MLP 1024, 8 heads; little: hidden 64, 2 layers, MLP 256,
2 heads; both 224 px in 16 px patches (14×14 grid), feature layer -2. Times ``encode``
of 16 frames (preprocessing included, seconds, best of ``--repeats``) at keep ratios
1, 0.5, 0.25, 0.1, and estimates the towers' forward FLOPs (matmuls only: 2 FLOPs per
multiply-add; embeddings, norms and softmax left out).

Calibration: on 32 frames of random 4x4 colour blocks, ``calibrate`` fits the projection
and the scorer on the first 16; the mean cosine between big.LITTLE's patch features at
keep 0.25 and the big tower's is measured on the other 16, before and after.

    python benchmarks/biglittle.py [--frames 16] [--repeats 5] [--threads N]

Last line: ``RESULT biglittle_speedup_at_0.25=<big time / big.LITTLE time>
cosine_uncalibrated=... cosine_calibrated=...``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vstream.encoders.biglittle import BigLittleConfig, BigLittleEncoder
from vstream.encoders.vision import VisionConfig, VisionEncoder

BIG = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 8}
LITTLE = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2}
IMAGE, PATCH = 224, 16
RATIOS = (1.0, 0.5, 0.25, 0.1)


def write_tower(folder: Path, sizes: dict, seed: int) -> str:
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(**sizes, image_size=IMAGE, patch_size=PATCH)
    transformers.CLIPVisionModel(config).save_pretrained(folder)
    transformers.CLIPImageProcessorPil(size={"shortest_edge": IMAGE},
                                       crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(folder)
    return str(folder)


def layer_flops(sizes: dict, queries: int, keys: int, context: int = 0) -> int:
    """FLOPs of one encoder layer: ``queries`` tokens updated, attending to ``keys``
    tokens of which ``context`` only get key/value projections."""
    d, mlp = sizes["hidden_size"], sizes["intermediate_size"]
    projections = 4 * queries * d * d + 2 * context * d * d  # q, k, v, o; k, v of the context
    attention = 2 * queries * keys * d  # scores and the weighted sum
    return 2 * (projections + attention + 2 * queries * d * mlp)


def flops(ratio: float | None, frames: int) -> int:
    """Forward FLOPs for ``frames`` frames: the big tower alone (``ratio`` None) or big.LITTLE."""
    patches = (IMAGE // PATCH) ** 2
    tokens = patches + 1
    big_layers = BIG["num_hidden_layers"] - 1  # feature layer -2
    if ratio is None:
        return frames * big_layers * layer_flops(BIG, tokens, tokens)
    kept = round(ratio * patches)
    little = (LITTLE["num_hidden_layers"] - 1) * layer_flops(LITTLE, tokens, tokens)
    projection = 2 * patches * LITTLE["hidden_size"] * BIG["hidden_size"]
    big = big_layers * layer_flops(BIG, kept + 1, tokens, patches - kept) if kept else 0
    return frames * (little + projection + big)


def best_time(encoder, frames: list[np.ndarray], repeats: int) -> float:
    encoder.encode(frames[:2])  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        encoder.encode(frames)
        best = min(best, time.perf_counter() - start)
    return best


def block_frames(count: int, seed: int) -> list[np.ndarray]:
    """``count`` frames ``[IMAGE, IMAGE, 3]`` uint8 of random 4x4 colour blocks."""
    rng = np.random.default_rng(seed)
    side = IMAGE // 4
    return [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8).repeat(side, 0).repeat(side, 1) for _ in range(count)]


def cosine_to_big(encoder: BigLittleEncoder, frames: list[np.ndarray], reference: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(encoder.encode(frames), reference, dim=-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8) for _ in range(args.frames)]
    with tempfile.TemporaryDirectory() as root:
        big = write_tower(Path(root) / "big", BIG, 0)
        little = write_tower(Path(root) / "little", LITTLE, 1)
        common = {"device": "cpu", "batch_size": args.frames}
        big_time = best_time(VisionEncoder(VisionConfig(model=big, **common)), frames, args.repeats)
        big_flops = flops(None, args.frames)
        print(f"{args.frames} frames, {IMAGE}px/{PATCH} ({(IMAGE // PATCH) ** 2} patches), threads "
              f"{torch.get_num_threads()}, best of {args.repeats}")
        print(f"{'encoder':<22}{'time s':>9}{'speedup':>9}{'GFLOPs':>9}{'FLOPs ratio':>13}")
        print(f"{'big alone':<22}{big_time:>9.4f}{1.0:>9.2f}{big_flops / 1e9:>9.2f}{1.0:>13.2f}")
        speedups = {}
        for ratio in RATIOS:
            encoder = BigLittleEncoder(BigLittleConfig(big=big, little=little, keep_ratio=ratio, **common))
            seconds = best_time(encoder, frames, args.repeats)
            speedups[ratio] = big_time / seconds
            cost = flops(ratio, args.frames)
            print(f"{f'big.LITTLE keep {ratio}':<22}{seconds:>9.4f}{speedups[ratio]:>9.2f}{cost / 1e9:>9.2f}"
                  f"{big_flops / cost:>13.2f}")
        fit_frames, held_out = block_frames(16, 1), block_frames(16, 2)
        encoder = BigLittleEncoder(BigLittleConfig(big=big, little=little, keep_ratio=0.25, **common))
        reference = encoder.big.encode(held_out)
        before = cosine_to_big(encoder, held_out, reference)
        fit = encoder.calibrate(fit_frames)
        after = cosine_to_big(encoder, held_out, reference)
        print(f"calibration on 16 block-colour frames: squared error per patch {fit['mse_before']:.3g} -> "
              f"{fit['mse_after']:.3g}; cosine to the big tower at keep 0.25 on 16 other frames "
              f"{before:.3f} -> {after:.3f}")
    print(f"RESULT biglittle_speedup_at_0.25={speedups[0.25]:.3f} cosine_uncalibrated={before:.3f} "
          f"cosine_calibrated={after:.3f}")


if __name__ == "__main__":
    main()
