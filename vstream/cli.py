"""The ``vstream`` command: a thin layer that parses flags and calls the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np

import vstream
from vstream.errors import VStreamError

log = logging.getLogger("vstream")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except VStreamError as e:
        print(f"vstream: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vstream", description="Ask questions about long video streams.")
    parser.add_argument("--version", action="version", version=f"vstream {vstream.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(metavar="COMMAND")

    probe = commands.add_parser("probe", help="show the streams, duration, frame rate and audio rate of a source")
    probe.add_argument("source", help="file path, URL, camera (/dev/video0) or - for stdin")
    probe.add_argument("--json", action="store_true", help="print one JSON object")
    probe.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a live source (default 10)")
    probe.set_defaults(run=_probe)

    frames = commands.add_parser("frames", help="list the sampled frames and audio chunks of a source")
    frames.add_argument("source", help="file path, URL, camera (/dev/video0) or - for stdin")
    frames.add_argument("--fps", type=float, default=1.0, help="frames kept per second; 0 keeps every frame (default 1)")
    frames.add_argument("--size", type=int, default=None, help="resize so the shorter side is this many pixels")
    frames.add_argument("--chunk-seconds", type=float, default=1.0, help="length of each audio chunk (default 1)")
    frames.add_argument("--no-audio", action="store_true", help="skip the audio track")
    frames.add_argument("--realtime", action="store_true", help="replay a file at its own pace, as if live")
    frames.add_argument("--limit", type=int, default=None, help="stop after this many items")
    frames.add_argument("--json", action="store_true", help="print one JSON object per item")
    frames.set_defaults(run=_frames)

    ask = commands.add_parser("ask", help="answer questions about a video, with the times of the evidence")
    ask.add_argument("inputs", nargs="+", metavar="VIDEO QUESTION",
                     help="the video, then one or more questions (with --load-memory: questions only)")
    ask.add_argument("--model", default=None,
                     help="VLM or language model: hub id or folder (default: the embedded SmolLM2-135M-Instruct)")
    ask.add_argument("--encoder", default="pixels",
                     help="frame encoder when the model has no vision tower: pixels (default) or a vision model")
    ask.add_argument("--no-asr", dest="asr", action="store_false", help="do not transcribe the audio")
    ask.add_argument("--fps", type=float, default=1.0, help="frames sampled per second (default 1)")
    ask.add_argument("--max-new-tokens", type=int, default=160, help="longest answer in tokens (default 160)")
    ask.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    ask.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ask.add_argument("--save-memory", metavar="DIR", help="save the memories after ingesting")
    ask.add_argument("--load-memory", metavar="DIR", help="answer from memories saved by --save-memory")
    ask.add_argument("--json", action="store_true", help="print one JSON object per question")
    ask.add_argument("--quiet", action="store_true", help="no progress bar")
    ask.set_defaults(run=_ask)

    synth = commands.add_parser("synth", help="write a synthetic test clip (frame index bar code, moving square, tones)")
    synth.add_argument("output", help="output file: .mp4 .mkv .mov .ts .webm or .avi")
    synth.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    synth.add_argument("--fps", type=float, default=30.0, help="frame rate (default 30)")
    synth.add_argument("--width", type=int, default=320)
    synth.add_argument("--height", type=int, default=240)
    synth.add_argument("--vfr", action="store_true", help="variable frame rate")
    synth.add_argument("--no-audio", action="store_true", help="video only")
    synth.set_defaults(run=_synth)
    return parser


def _ask(args) -> None:
    from vstream.models import GenerationConfig
    from vstream.models.prompt import clock
    from vstream.session import Session, SessionConfig, answer_json

    video, questions = (None, args.inputs) if args.load_memory else (args.inputs[0], args.inputs[1:])
    if not questions or not all(q.strip() for q in questions):
        raise vstream.ConfigError("vstream ask needs a video and at least one non-empty question")
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    config = SessionConfig(fps=args.fps, asr=args.asr, encoder=args.encoder, generation=generation)
    if video is not None:
        vstream.probe(video)  # a bad path fails now, before any model loads
    if not args.verbose:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # our own bar is the one a user waits on
    qa = Session.load(args.load_memory, args.model, config) if args.load_memory else Session(args.model, config)
    with qa:
        if not args.load_memory:
            qa.ingest(video, progress=not (args.quiet or args.json))
        if args.save_memory:
            qa.save(args.save_memory)
        for question in questions:
            if args.json:
                print(answer_json(qa.ask(question)), flush=True)
                continue
            if len(questions) > 1:
                print(f"Q: {question}")
            stream = qa.stream(question)
            for text in stream:
                print(text, end="", flush=True)
            answer = stream.result()
            print()
            for evidence in answer.evidence[:5]:
                print(f"  {clock(evidence.start)}-{clock(evidence.end)}  {evidence.kind:<10} {evidence.score:.2f}")


def _probe(args) -> None:
    info = vstream.probe(args.source, open_timeout=args.timeout, read_timeout=args.timeout)
    print(info.to_json() if args.json else info.describe())


def _frames(args) -> None:
    source = vstream.open_source(
        args.source,
        fps=args.fps or None,
        size=args.size,
        chunk_seconds=args.chunk_seconds,
        audio=not args.no_audio,
        realtime=args.realtime,
    )
    with source:
        for n, item in enumerate(source):
            if args.limit is not None and n >= args.limit:
                break
            print(json.dumps(_describe(item)) if args.json else _line(item), flush=True)
    stats = source.stats
    print(
        f"# decoded={stats.decoded} sampled={stats.sampled} dropped={stats.dropped} "
        f"audio_seconds={stats.audio_seconds:.2f} reconnects={stats.reconnects}",
        file=sys.stderr,
    )


def _describe(item) -> dict:
    if isinstance(item, vstream.Frame):
        return {
            "kind": "frame",
            "t": round(item.t, 4),
            "index": item.index,
            "width": item.width,
            "height": item.height,
            "mean_rgb": [round(float(c), 1) for c in item.image.reshape(-1, 3).mean(axis=0)],
        }
    spectrum = np.abs(np.fft.rfft(item.samples))
    peak = float(np.argmax(spectrum[1:]) + 1) * vstream.AUDIO_SAMPLE_RATE / len(item.samples) if len(item.samples) > 1 else 0.0
    return {
        "kind": "audio",
        "start": round(item.start, 4),
        "end": round(item.end, 4),
        "rms": round(float(np.sqrt(np.mean(item.samples**2))), 4) if len(item.samples) else 0.0,
        "peak_hz": round(peak, 1),
    }


def _line(item) -> str:
    d = _describe(item)
    if d["kind"] == "frame":
        return f"frame  t={d['t']:9.3f}s  index={d['index']:<7d} {d['width']}x{d['height']}  mean_rgb={d['mean_rgb']}"
    return f"audio  {d['start']:9.3f}s..{d['end']:.3f}s  rms={d['rms']:.3f}  peak={d['peak_hz']:.0f} Hz"


def _synth(args) -> None:
    from vstream import synth

    times = synth.vfr_times(args.duration) if args.vfr else None
    info = synth.write_clip(
        args.output,
        duration=args.duration,
        fps=args.fps,
        size=(args.width, args.height),
        audio=not args.no_audio,
        frame_times=times,
        progress=args.duration >= 60,
    )
    print(f"wrote {info.path}: {info.duration:g} s, {len(info.frame_times)} frames, {info.size[0]}x{info.size[1]}")
