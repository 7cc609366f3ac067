"""QA benchmark: how long a question waits for its answer after 1 minute, 10 minutes
and 1 hour of stream.

The stream is simulated at 1 fps: every second a frame's patch features (16×16 × 8,
the pixel encoder's shape; 60 recurring shots of ``SHOT`` seconds plus noise) go into
the visual memory,
every 5 seconds a transcript line (embedded by the embedded all-MiniLM-L6-v2) into
the transcript memory, and every 30 seconds a slide's text into the screen-text memory,
so an hour builds in about a minute. After 60, 600 and 3,600
seconds, the same question is asked ``--repeat`` times through ``Session.ask``, and
the best time to first token (retrieval + prompt + first token) and to the whole answer
(at most ``--max-new-tokens``; evidence ranking excluded, reported apart) are kept,
with the prompt's length in tokens.

Two models: a tiny random LLaMA (hidden 64, 2 layers; the memory and prompt cost without
a real LM) and the embedded SmolLM2-135M-Instruct (text-only path). The prompt has the
same size whatever the stream length: a fixed number of views (``scene_lines``),
transcript lines and screen texts. Shots are 5 s long, so the first minute already
has more views than the notes describe: with 30 s shots it had two, and the 1-minute
time measured how empty the notes were, not whether the prompt grows.

Target (issue 4): time to first token after 1 hour within 1.1x of after 1 minute.
Last line: ``RESULT ttft_ratio=<1h/1min> ttft_ms=<1h> answer_ms=<1h>
prompt_tokens=<1min>/<1h>`` for SmolLM2, then the tiny model's keys.

Run: ``python benchmarks/qa.py [--repeat N] [--max-new-tokens N]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny checkpoints the tests build

import torch
from tiny_models import tiny_llama

from vstream.encoders.ocr import ScreenText
from vstream.models import GenerationConfig, load_model
from vstream.models.prompt import user_pieces
from vstream.session import Session, SessionConfig
from vstream.types import TranscriptSegment

POSITIONS = (60, 600, 3_600)
QUESTION = "What does the speaker say about the red car?"
COLORS = ("red", "blue", "green", "yellow", "white", "black")
THINGS = ("car", "train", "bicycle", "boat", "bus", "plane")
PLACES = ("station", "harbour", "bridge", "market", "school", "airport")
SHOT = 5
"""Seconds per shot: views change about as often as in a broadcast."""


def line(i: int) -> str:
    """Transcript line ``i``: a varied sentence, so retrieval has something to choose."""
    return (f"The {COLORS[i % 6]} {THINGS[(i // 6) % 6]} is near the {PLACES[(i // 36) % 6]} "
            f"at minute {i // 12}.")


class Stream:
    """Features of frame ``t`` (shot ``(t // SHOT) % 60`` plus noise) and transcript lines."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.patterns = torch.rand(60, 256, 8, generator=generator) * 2 - 1
        self.generator = generator

    def frames(self, start: int, stop: int) -> tuple[torch.Tensor, list[float]]:
        scenes = [(t // SHOT) % 60 for t in range(start, stop)]
        noise = 0.05 * torch.randn(stop - start, 256, 8, generator=self.generator)
        return self.patterns[scenes] + noise, [float(t) for t in range(start, stop)]

    @staticmethod
    def transcript(start: int, stop: int) -> list[TranscriptSegment]:
        return [TranscriptSegment(float(t), t + 3.0, line(t // 5)) for t in range(start, stop) if t % 5 == 0]

    @staticmethod
    def screen(start: int, stop: int) -> ScreenText:
        """A slide every 30 s, on screen for 10 s, with a number that the question does not ask for."""
        return ScreenText([TranscriptSegment(float(t), t + 10.0, f"Slide {t // 30} / Platform {t % 97}")
                           for t in range(start, stop) if t % 30 == 0])


def measure(qa: Session, repeat: int) -> dict[str, float]:
    """Best of ``repeat``: time to first token, answer, and evidence ranking, ms."""
    best = {"ttft": float("inf"), "answer": float("inf"), "attribution": float("inf")}
    for _ in range(repeat):
        answer = qa.ask(QUESTION)
        timings = answer.timings
        best["ttft"] = min(best["ttft"], 1e3 * (timings["retrieval"] + timings["first_token"]))
        best["answer"] = min(best["answer"], 1e3 * (timings["retrieval"] + timings["answer"]))
        best["attribution"] = min(best["attribution"], 1e3 * timings.get("attribution", 0.0))
    best["answer_text"] = answer.text
    pieces = user_pieces(qa.context(QUESTION), QUESTION, qa.model.reads_memory_tokens)
    best["prompt_tokens"] = qa.model.embed(pieces).embeds.shape[1]
    return best


def run(name: str, model, repeat: int, max_new_tokens: int) -> dict[int, dict[str, float]]:
    # The features are the pixel encoder's shape; nothing reads frames, so OCR is off and
    # the screen texts are added as a reader would add them.
    config = SessionConfig(asr=False, encoder="pixels", ocr=False,
                           generation=GenerationConfig(max_new_tokens=max_new_tokens))
    stream, results, added = Stream(), {}, 0
    with Session(model, config) as qa:
        for position in POSITIONS:
            for start in range(added, position, 300):
                stop = min(start + 300, position)
                qa.memory.extend(*stream.frames(start, stop))
                qa.add_transcript(stream.transcript(start, stop))
                qa.add_screen_text(stream.screen(start, stop))
            added = position
            qa.ask(QUESTION)  # warm-up at this length
            results[position] = measure(qa, repeat)
            r = results[position]
            print(f"{name:<10} {position:>6} s  ttft {r['ttft']:8.1f} ms  answer {r['answer']:8.1f} ms  "
                  f"evidence {r['attribution']:7.1f} ms  prompt {r['prompt_tokens']:>5} tokens  transcript lines {len(qa.transcript):>4}  "
                  f"screen texts {len(qa.screen):>4}  "
                  f"{r['answer_text'][:60]!r}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, 1 thread")
    with tempfile.TemporaryDirectory() as folder:
        tiny = load_model(str(tiny_llama(Path(folder) / "llama")))
        small = run("tiny", tiny, args.repeat, args.max_new_tokens)
    real = run("SmolLM2", load_model(None), args.repeat, args.max_new_tokens)
    first, last = POSITIONS[0], POSITIONS[-1]
    print(f"RESULT ttft_ratio={real[last]['ttft'] / real[first]['ttft']:.3f} ttft_ms={real[last]['ttft']:.1f} "
          f"answer_ms={real[last]['answer']:.1f} prompt_tokens={real[first]['prompt_tokens']}/{real[last]['prompt_tokens']} "
          f"tiny_ttft_ratio={small[last]['ttft'] / small[first]['ttft']:.3f} "
          f"tiny_ttft_ms={small[last]['ttft']:.1f} tiny_answer_ms={small[last]['answer']:.1f}")


if __name__ == "__main__":
    main()
