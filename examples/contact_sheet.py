"""A contact sheet of any source: sampled frames in a grid, each stamped with its time,
and the loudness of the audio beside it. Works on files, URLs, cameras and stdin.

    python examples/contact_sheet.py VIDEO sheet.jpg --fps 0.2 --columns 6
    python examples/contact_sheet.py rtsp://camera/stream sheet.jpg --seconds 60
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw

import vstream


def contact_sheet(uri: str, fps: float, columns: int, thumb: int, seconds: float | None) -> Image.Image:
    cells: list[vstream.Frame] = []
    loudness: dict[int, float] = {}  # second -> audio RMS
    with vstream.open_source(uri, fps=fps, size=thumb) as source:
        for item in source:
            if isinstance(item, vstream.Frame):
                cells.append(item)
            else:
                loudness[int(item.start)] = float(np.sqrt(np.mean(item.samples**2))) if len(item.samples) else 0.0
            end = item.t if isinstance(item, vstream.Frame) else item.end
            if seconds is not None and end >= seconds:
                break
    if not cells:
        raise SystemExit(f"{uri}: no frames")
    height, width = cells[0].image.shape[:2]
    rows = -(-len(cells) // columns)
    sheet = Image.new("RGB", (columns * width, rows * (height + 14)), "black")
    draw = ImageDraw.Draw(sheet)
    for n, frame in enumerate(cells):
        t = frame.t
        x, y = (n % columns) * width, (n // columns) * (height + 14)
        sheet.paste(Image.fromarray(frame.image), (x, y))
        rms = loudness.get(int(t))
        label = f"{int(t) // 60:02d}:{t % 60:05.2f}" + (f"  rms {rms:.2f}" if rms is not None else "")
        draw.text((x + 2, y + height + 1), label, fill="white")
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("output", help="image file, e.g. sheet.jpg")
    parser.add_argument("--fps", type=float, default=0.2, help="frames per second of stream (default 0.2)")
    parser.add_argument("--columns", type=int, default=6)
    parser.add_argument("--thumb", type=int, default=120, help="shorter side of each thumbnail, pixels")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this much of the stream")
    args = parser.parse_args()
    contact_sheet(args.source, args.fps, args.columns, args.thumb, args.seconds).save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
