"""Several images and a video in one dialogue: synthetic media written with
``vstream.synth``, two questions in a row (the second refers back to the first), each
answer printed with the medium each piece of its evidence came from.

    python examples/multi_image_dialogue.py
    python examples/multi_image_dialogue.py --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf

The embedded default model reads text only: it learns of each medium what its notes
say (views and when they are on screen), not its pixels. A vision-language model
reads every image's and the video's memory tokens.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image

import vstream
from vstream import synth
from vstream.models import GenerationConfig
from vstream.types import evidence_lines

COLOURS = {"red": (200, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 200)}
QUESTIONS = ["Which image shows the colour that <video> starts with: <image>, <image> or <image>?",
             "And which colour does the video end with?"]


def write_media(folder: Path, duration: float) -> tuple[Path, list[Path]]:
    """A clip that goes red, green, blue, and one 96x64 image of each colour."""
    third = duration / 3
    clip = synth.write_clip(folder / "clip.mp4", duration=duration, fps=2, size=(96, 64), audio=False,
                            scenes=[(i * third, colour) for i, colour in enumerate(COLOURS.values())])
    images = []
    for i, (name, colour) in enumerate(COLOURS.items()):
        path = folder / f"{name}.png"
        Image.fromarray(synth.draw_frame(i, 0.0, 96, 64, colour)).save(path)
        images.append(path)
    return clip.path, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="hub id or folder (default: the embedded SmolLM2)")
    parser.add_argument("--duration", type=float, default=9.0, help="seconds of synthetic video")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    config = vstream.SessionConfig(asr=False, generation=GenerationConfig(max_new_tokens=args.max_new_tokens))
    with tempfile.TemporaryDirectory() as folder, vstream.Dialogue(args.model, config) as dialogue:
        clip, images = write_media(Path(folder), args.duration)
        dialogue.add_video(clip)
        for image in images:
            dialogue.add_image(image)
        print("media:", ", ".join(dialogue.labels))
        for question in QUESTIONS:
            answer = dialogue.ask(question)
            print(f"\nQ: {question}\nA: {answer.text}")
            for line in evidence_lines(answer.to_dict()["evidence"][:4]):
                print("   ", line)


if __name__ == "__main__":
    main()
