"""Needle benchmark: are needles still found as the stream grows?

For each stream length (default 1 minute, 10 minutes, 1 hour), needle position (start,
middle, end) and kind (spoken, visual), a needle clip is made with
``vstream.evaluate.needle`` (cached under ``.bench/needle/``), ingested by a session with
the embedded default models (whisper tiny.en, all-MiniLM-L6-v2, SmolLM2-135M-Instruct,
the pixel encoder), and its question asked after the stream ends. A spoken needle is
right when the answer holds the fact's keyword; a visual one ("when did the magenta
screen appear?") when the best frame evidence is within 5 s of the scene. The evidence
error is the gap in seconds between the best evidence of the needle's kind and the
needle.

Spoken needles need espeak-ng; without it (and without a way to install it) only visual
needles run, and the output says so.

Target (issue 7): accuracy at 1 hour no more than 5 points below accuracy at 1 minute,
at every needle position.
Last line: ``RESULT needle_acc_1min=<x> needle_acc_1h=<y> evidence_err_s=<median>``,
accuracy at the shortest and longest lengths run.

Run: ``python benchmarks/needle.py [--lengths 60 600 3600] [--kinds spoken visual]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure the vstream of this checkout

import torch

from vstream.evaluate.needle import POSITIONS, evidence_error, make_needle_clip, score_answer, speech_available
from vstream.models import GenerationConfig
from vstream.session import Session, SessionConfig


def install_espeak() -> bool:
    """Try ``apt-get install -y espeak-ng`` (as root only); whether speech is available after."""
    if speech_available():
        return True
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "espeak-ng"], check=False, capture_output=True, timeout=300)
    return speech_available()


def run_case(path: Path, case, max_new_tokens: int) -> dict:
    """Ingest ``path``, ask the case's question after the stream ends; the scored row."""
    config = SessionConfig(generation=GenerationConfig(max_new_tokens=max_new_tokens))
    started = time.perf_counter()
    with Session(None, config) as session:
        session.ingest(str(path), progress=False)
        ingest_s = time.perf_counter() - started
        answer = session.ask(case.question)
    return {"kind": case.kind, "length": case.length, "position": case.position, "needle": case.needle,
            "correct": score_answer(case, answer), "error": evidence_error(case, answer),
            "ingest_s": ingest_s, "answer": answer.text.strip().replace("\n", " ")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=float, nargs="+", default=[60, 600, 3600], help="stream lengths, seconds")
    parser.add_argument("--kinds", nargs="+", default=["spoken", "visual"], choices=["spoken", "visual"])
    parser.add_argument("--positions", nargs="+", default=list(POSITIONS), choices=list(POSITIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--cache", default=str(ROOT / ".bench" / "needle"), help="folder for the generated clips")
    args = parser.parse_args()

    kinds = list(args.kinds)
    if "spoken" in kinds and not install_espeak():
        print("espeak-ng is missing and could not be installed: spoken needles skipped")
        kinds.remove("spoken")
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'kind':7} {'length s':>8} {'position':8} {'needle s':>8} {'correct':7} {'err s':>6} {'ingest s':>8}  answer")
    rows = []
    for length in args.lengths:
        for position in args.positions:
            for kind in kinds:
                path, case = make_needle_clip(args.cache, kind, length, position, args.seed)
                row = run_case(path, case, args.max_new_tokens)
                rows.append(row)
                error = "-" if row["error"] is None else f"{row['error']:.1f}"
                print(f"{kind:7} {length:8.0f} {position:8} {case.needle:8.1f} {row['correct']!s:7} {error:>6} "
                      f"{row['ingest_s']:8.1f}  {row['answer'][:60]}", flush=True)

    def accuracy(length: float) -> float:
        scored = [r["correct"] for r in rows if r["length"] == length]
        return 100.0 * sum(scored) / len(scored)

    print(f"\n{'length s':>8} " + " ".join(f"{p:>7}" for p in args.positions) + "     all")
    for length in args.lengths:
        cells = []
        for position in args.positions:
            scored = [r["correct"] for r in rows if r["length"] == length and r["position"] == position]
            cells.append(f"{100.0 * sum(scored) / len(scored):7.0f}")
        print(f"{length:8.0f} " + " ".join(cells) + f" {accuracy(length):7.0f}")
    errors = [r["error"] for r in rows if r["error"] is not None]
    median = statistics.median(errors) if errors else float("nan")
    shortest, longest = min(args.lengths), max(args.lengths)
    print(f"RESULT needle_acc_1min={accuracy(shortest):.1f} needle_acc_1h={accuracy(longest):.1f} "
          f"evidence_err_s={median:.1f}")


if __name__ == "__main__":
    main()
