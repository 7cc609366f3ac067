"""Multi-granular generation (PUMA) on a stream's own memory: write a synthetic clip of
three coloured scenes, ingest it, fit the generation head on "show the frame at m:ss"
with the stream's own frames as answers, then generate frames at a coarse and a fine
granularity and draw them with the retrieval decoder. The contact sheet has a row per
time: the stored frame, the coarse picture, the fine picture.

    python examples/multigranular_generation.py --steps 200 --out multigranular.png
    python examples/multigranular_generation.py --model Qwen/Qwen2.5-0.5B-Instruct --coarse 1 --fine 64
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from vstream import synth
from vstream.models.heads.multigranular import LEVELS, MultigranularHead, hidden_size_of, request
from vstream.models.image_decoders import RetrievalDecoder
from vstream.session import Session, SessionConfig

CELL = 96  # pixels per picture on the sheet


def train_and_generate(model: str | None, steps: int, seconds: float, coarse: int, fine: int) -> Image.Image:
    with tempfile.TemporaryDirectory() as folder:
        scenes = [(0.0, (200, 40, 40)), (seconds / 3, (40, 200, 40)), (2 * seconds / 3, (40, 40, 200))]
        clip = synth.write_clip(Path(folder) / "clip.mp4", duration=seconds, fps=5, audio=False, scenes=scenes)
        with Session(model, SessionConfig(asr=False)) as session:
            session.ingest(str(clip.path), progress=False)
            head = MultigranularHead(hidden_size_of(session.model), feature_dim=session.memory.dim,
                                     levels=sorted({coarse, fine}), lr=3e-3)
            context = session.context(request(0.0))  # what imagine() puts before each request
            for step in range(1, steps + 1):
                loss = head.train_step(session.model, session.memory, context, frames=4)
                if step % max(1, steps // 5) == 0 or step == steps:
                    print(f"step {step}: loss {loss:.3f}")
            decoder = RetrievalDecoder(session.memory)
            times = [seconds * (i + 0.5) / 4 for i in range(4)]
            rows = [(t, session.memory.thumbnail_at(t), session.imagine(t, coarse, head, decoder),
                     session.imagine(t, fine, head, decoder)) for t in times]
    return contact_sheet(rows, ("stored", f"{coarse} tokens", f"{fine} tokens"))


def contact_sheet(rows, titles) -> Image.Image:
    """One row per ``(t, picture, ...)``, the time on the left, a column per title."""
    margin, header = 48, 14
    sheet = Image.new("RGB", (margin + len(titles) * CELL, header + len(rows) * CELL), "black")
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(titles):
        draw.text((margin + column * CELL + 2, 1), title, fill="white")
    for row, (t, *pictures) in enumerate(rows):
        y = header + row * CELL
        draw.text((2, y + CELL // 2), f"{t:5.1f} s", fill="white")
        for column, picture in enumerate(pictures):
            picture = picture.copy()
            picture.thumbnail((CELL, CELL))
            sheet.paste(picture, (margin + column * CELL, y))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="language model: hub id or folder (default: embedded SmolLM2)")
    parser.add_argument("--steps", type=int, default=100, help="training steps of the head (default 100)")
    parser.add_argument("--seconds", type=float, default=12.0, help="length of the synthetic clip (default 12)")
    parser.add_argument("--coarse", type=int, default=4, choices=LEVELS, help="coarse level, tokens (default 4)")
    parser.add_argument("--fine", type=int, default=64, choices=LEVELS, help="fine level, tokens (default 64)")
    parser.add_argument("--out", default="multigranular.png", help="contact sheet PNG (default multigranular.png)")
    args = parser.parse_args()
    train_and_generate(args.model, args.steps, args.seconds, args.coarse, args.fine).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
