"""Ask questions about a live stream while it plays: a webcam, an RTSP/HTTP/HLS URL, or
a file replayed in real time. Type a question and press Enter at any moment; the
stream keeps flowing into the memory while the answer is written.

    python examples/live_session.py /dev/video0
    python examples/live_session.py rtsp://camera.local/stream --model Qwen/Qwen2.5-0.5B-Instruct
    python examples/live_session.py talk.mp4 --realtime

Commands: a question; ``/last N question`` asks about the last N seconds only;
``/stats`` prints the session's counters; an empty line or Ctrl-D quits.
"""

from __future__ import annotations

import argparse
import sys

import vstream
from vstream.types import evidence_lines


def answer(session: vstream.Session, line: str) -> None:
    last = None
    if line.startswith("/last "):
        _, seconds, line = line.split(" ", 2)
        last = float(seconds)
    stream = session.stream(line, last=last)
    for text in stream:
        print(text, end="", flush=True)
    result = stream.result()
    print()
    for evidence in evidence_lines(result.to_dict()["evidence"][:3]):
        print(f"  {evidence}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="camera (/dev/video0, camera:0), URL, or file")
    parser.add_argument("--model", default=None, help="hub id or folder (default: the embedded SmolLM2)")
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--no-asr", dest="asr", action="store_false")
    parser.add_argument("--realtime", action="store_true", help="replay a file at its own pace")
    args = parser.parse_args()
    config = vstream.SessionConfig(fps=args.fps, asr=args.asr)
    with vstream.Session(args.model, config) as session:
        session.start_source(args.source, realtime=args.realtime)
        print("streaming; ask a question (empty line quits)", file=sys.stderr)
        for line in sys.stdin:
            line = line.strip()
            if not line:
                break
            if line == "/stats":
                print(session.stats.to_dict())
                continue
            try:
                answer(session, line)
            except vstream.VStreamError as exc:
                print(f"error: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
