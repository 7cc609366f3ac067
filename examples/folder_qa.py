"""Offline QA over a folder of videos: the same questions asked of every video, one
line of JSON per video and question (answer, evidence times, timings).

    python examples/folder_qa.py videos/ "What is the speaker's main point?" "Who is on screen?"
    python examples/folder_qa.py videos/ "..." --model Qwen/Qwen2.5-0.5B-Instruct --save-memories mem/

One model serves every video; each video gets its own session (memory), saved with
``--save-memories`` so later questions need no new ingestion (``vstream ask
--load-memory mem/<video>``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import vstream
from vstream.models import load_model

VIDEO_SUFFIXES = {".mp4", ".mkv", ".mov", ".webm", ".avi", ".ts"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("questions", nargs="+")
    parser.add_argument("--model", default=None, help="hub id or folder (default: the embedded SmolLM2)")
    parser.add_argument("--no-asr", dest="asr", action="store_false")
    parser.add_argument("--save-memories", type=Path, default=None, help="save each video's memory here")
    args = parser.parse_args()
    videos = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        parser.error(f"no videos in {args.folder} ({', '.join(sorted(VIDEO_SUFFIXES))})")
    model = load_model(args.model)  # loaded once, shared by the sessions
    for video in videos:
        with vstream.Session(model, vstream.SessionConfig(asr=args.asr)) as session:
            try:
                session.ingest(str(video), progress=False)
            except vstream.VStreamError as exc:
                print(json.dumps({"video": video.name, "error": str(exc)}), flush=True)
                continue
            for question in args.questions:
                result = session.ask(question).to_dict()
                print(json.dumps({"video": video.name, "question": question, **result}), flush=True)
            if args.save_memories is not None:
                session.save(args.save_memories / video.stem)


if __name__ == "__main__":
    main()
