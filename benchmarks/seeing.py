"""Seeing benchmark: what the offline image models cost, and how fast a stream ingests
with them.

1. **Per frame.** ``ImageNetEncoder.encode`` on batches of 8 frames of 640x360 (ms per
   frame, best of ``--repeat``) against the pixel encoder; ``ScreenReader.read`` on a
   slide with two lines of text and on a frame with none (ms, best of ``--repeat``).
2. **Ingest.** A clip of ``--minutes`` minutes at 1 fps (written once into ``.bench/``):
   a slide with a number on it every 30 s, a grey frame with a moving square between
   them, so the picture changes every frame and OCR runs at its ``min_interval``. Ingested
   through ``Session.ingest`` (no audio; no question is asked)
   with the defaults (imagenet, OCR) and with ``--encoder pixels --no-ocr``; speed as a
   multiple of real time. Target (issue 13): >= 10x real time with OCR on.

Last line: ``RESULT ingest_speedup=<x real time, defaults> ingest_speedup_pixels=...
imagenet_ms=... ocr_slide_ms=... ocr_blank_ms=... pixels_ms=...``.

Run: ``python benchmarks/seeing.py [--minutes 10] [--repeat 5]`` (one torch thread).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from vstream import synth
from vstream.encoders import create_encoder
from vstream.encoders.ocr import ScreenReader
from vstream.session import Session, SessionConfig

ROOT = Path(__file__).resolve().parents[1]
SIZE = (640, 360)
def best_ms(call, repeat: int, per: int = 1) -> float:
    call()  # warm up
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return 1e3 * best / per


def write_stream(minutes: int) -> Path:
    """The ingest clip, cached: a numbered slide for 5 s every 30 s, grey with a moving square between."""
    path = ROOT / ".bench" / f"seeing_{minutes}min_1fps.mp4"
    if path.exists():
        return path
    path.parent.mkdir(exist_ok=True)
    scenes = []
    for start in range(0, 60 * minutes, 30):
        scenes.append((float(start), synth.text_slide([f"Slide {start // 30 + 1}", f"Code {1000 + 7 * start}"])))
        scenes.append((float(start + 5), (90, 90, 90)))
    partial = path.with_suffix(".partial.mp4")
    synth.write_clip(partial, duration=60.0 * minutes, fps=1, size=SIZE, audio=False, scenes=scenes, progress=True)
    partial.rename(path)
    return path


def ingest_speed(path: Path, minutes: int, **settings) -> float:
    with Session(None, SessionConfig(asr=False, **settings)) as session:
        started = time.perf_counter()
        session.ingest(str(path), progress=False)
        seconds = time.perf_counter() - started
        print(f"  {settings or 'defaults'}: {seconds:.1f} s, {60 * minutes / seconds:.1f}x real time, "
              f"{session.stats.ocr_frames} frames read by OCR, {session.stats.screen_segments} texts", flush=True)
    return 60 * minutes / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, 1 thread")
    frames = [synth.text_slide(["Invoice 4721", "Total: $38.50"])] * 8
    imagenet, pixels, reader = create_encoder("imagenet"), create_encoder("pixels"), ScreenReader()
    imagenet_ms = best_ms(lambda: imagenet.encode(frames), args.repeat, per=8)
    pixels_ms = best_ms(lambda: pixels.encode(frames), args.repeat, per=8)
    slide_ms = best_ms(lambda: reader.read(frames[0]), args.repeat)
    blank_ms = best_ms(lambda: reader.read(np.full((*SIZE[::-1], 3), 90, np.uint8)), args.repeat)
    print(f"per frame (640x360): imagenet {imagenet_ms:.1f} ms, pixels {pixels_ms:.2f} ms; "
          f"OCR of a slide {slide_ms:.0f} ms, of a blank frame {blank_ms:.0f} ms")
    path = write_stream(args.minutes)
    print(f"ingesting {path.name} ({args.minutes} min at 1 fps):")
    defaults = ingest_speed(path, args.minutes)
    plain = ingest_speed(path, args.minutes, encoder="pixels", ocr=False)
    print(f"RESULT ingest_speedup={defaults:.1f} ingest_speedup_pixels={plain:.1f} imagenet_ms={imagenet_ms:.1f} "
          f"ocr_slide_ms={slide_ms:.0f} ocr_blank_ms={blank_ms:.0f} pixels_ms={pixels_ms:.2f}")


if __name__ == "__main__":
    main()
