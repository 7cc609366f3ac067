"""big.LITTLE frame encoding: how much of the big vision tower's work a stream needs.

A little tower sees every patch and scores its importance; only the top ``keep_ratio``
of patches go through the big tower (attending to all of them); the rest keep the
little tower's features, projected to the big width. This example encodes the frames of
a synthetic clip with the big tower alone and with big.LITTLE at several keep ratios,
prints the time per frame and how close the features stay to the big tower's, calibrates
the projection and scorer on half of the frames (closed-form least squares) and measures
again on the other half, then answers a question over the clip with the calibrated
encoder chosen by one string, as ``vstream ask --encoder`` and ``SessionConfig.encoder``
take it.

    python examples/biglittle_encoder.py --big openai/clip-vit-large-patch14 \\
        --little google/siglip-base-patch16-256

The two towers must have the same patch grid (both above: 16×16). Uncalibrated, the
little tower's own attention scores the patches and a seeded orthogonal map projects
them, so the patches left to the little tower are far from the big tower's features.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

import vstream
from vstream import synth
from vstream.encoders import create_encoder
from vstream.session import Session, SessionConfig
from vstream.types import evidence_lines

RATIOS = (1.0, 0.5, 0.25, 0.1)


def best_time(encode, images, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        encode(images)
        times.append(time.perf_counter() - started)
    return min(times)


def cosine(encoder, images, reference=None) -> float:
    """Mean cosine between the encoder's patch features and the big tower's."""
    reference = encoder.big.encode(images) if reference is None else reference
    return float(torch.nn.functional.cosine_similarity(encoder.encode(images), reference, dim=-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", required=True, help="the big tower: hub id or folder")
    parser.add_argument("--little", required=True, help="the little tower, with the same patch grid")
    parser.add_argument("--model", default=None, help="language model that answers (default: the embedded one)")
    parser.add_argument("--frames", type=int, default=8, help="frames timed per encoder (default 8)")
    parser.add_argument("--calibration", default="biglittle-calibration",
                        help="where the calibration is saved (default biglittle-calibration/)")
    parser.add_argument("--repeats", type=int, default=3, help="timing runs; the best counts (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as folder:
        clip = synth.write_clip(Path(folder) / "scenes.mp4", duration=12.0, fps=2, size=(160, 120), audio=False,
                                scenes=[(0.0, (220, 30, 30)), (6.0, (30, 30, 220))])
        with vstream.open_source(str(clip.path), fps=args.frames / clip.duration, audio=False) as source:
            images = [frame.image for frame in source][: args.frames]

        encoder = create_encoder(f"biglittle:big={args.big},little={args.little}")
        reference = encoder.big.encode(images)
        big_time = best_time(encoder.big.encode, images, args.repeats)
        print(f"big tower alone: {1000 * big_time / len(images):.1f} ms/frame, {encoder.grid}x{encoder.grid} patches")
        for ratio in RATIOS:
            encoder.config = dataclasses.replace(encoder.config, keep_ratio=ratio)
            similarity = cosine(encoder, images, reference)
            seconds = best_time(encoder.encode, images, args.repeats)
            print(f"keep {ratio:4.2f}: {1000 * seconds / len(images):.1f} ms/frame ({big_time / seconds:.2f}x), "
                  f"{encoder.kept_count} patches through the big tower, cosine to the big tower {similarity:.3f}")

        half = len(images) // 2
        encoder.config = dataclasses.replace(encoder.config, keep_ratio=0.25)
        before = cosine(encoder, images[half:])
        fit = encoder.calibrate(images[:half])
        print(f"calibrated on {half} frames (squared error per patch {fit['mse_before']:.3g} -> "
              f"{fit['mse_after']:.3g}); cosine at keep 0.25 on the other frames: {before:.3f} -> "
              f"{cosine(encoder, images[half:]):.3f}")
        encoder.save_calibration(args.calibration)

        spec = f"biglittle:big={args.big},little={args.little},keep_ratio=0.25,calibration={args.calibration}"
        with Session(args.model, SessionConfig(asr=False, encoder=spec)) as session:
            session.ingest(str(clip.path), progress=False)
            answer = session.ask("What colour is shown first?")
            print(f"answer with {spec}: {answer.text}")
            for line in evidence_lines(answer.to_dict()["evidence"][:3]):
                print(f"  {line}")


if __name__ == "__main__":
    main()
