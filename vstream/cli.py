"""The ``vstream`` command: a thin layer that parses flags and calls the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

import vstream
from vstream.errors import VStreamError
from vstream.types import evidence_lines

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
                     help="the video, then one or more questions (with --load-memory or --server: questions "
                          "only); several videos and images (files) before the questions: one dialogue over "
                          "all of them, each question a turn")
    ask.add_argument("--server", metavar="ADDR", help="ask a stream on a running server (vstream serve) instead")
    ask.add_argument("--stream", metavar="ID", help="with --server: the stream to ask (vstream stream prints it)")
    ask.add_argument("--start", type=float, help="only the stream from this many seconds on")
    ask.add_argument("--end", type=float, help="only the stream up to this many seconds")
    ask.add_argument("--last", type=float, help="only the last this many seconds of the stream")
    _client_flags(ask)
    _model_flags(ask)
    _session_flags(ask)
    _generation_flags(ask, max_new_tokens=160)
    ask.add_argument("--save-memory", metavar="DIR", help="save the memories after ingesting")
    ask.add_argument("--load-memory", metavar="DIR", help="answer from memories saved by --save-memory")
    ask.add_argument("--json", action="store_true", help="print one JSON object per question")
    ask.add_argument("--quiet", action="store_true", help="no progress bar")
    ask.add_argument("--show", metavar="DIR",
                     help="save pictures per answer: its evidence frames and a frame generated at --show-level")
    ask.add_argument("--show-level", type=int, default=16, choices=(1, 4, 16, 64, 256),
                     help="tokens of the generated frame's features, PUMA's granularity (default 16)")
    ask.add_argument("--generation-head", metavar="DIR",
                     help="trained multigranular head for --show (default: an untrained one from seed 0, "
                          "whose pictures mean nothing)")
    ask.add_argument("--decoder", default="retrieval", metavar="retrieval|DIR",
                     help="draws generated features for --show: retrieval (default: the nearest stored frame) "
                          "or a diffusion decoder's folder or hub id (needs vstream[generate])")
    ask.set_defaults(run=_ask)

    serve = commands.add_parser("serve", help="run a ZeroMQ stream server: many streams, one model")
    serve.add_argument("--bind", default="tcp://127.0.0.1:5555",
                       help="tcp://HOST:PORT (port * picks a free one) or ipc://PATH (default tcp://127.0.0.1:5555)")
    _model_flags(serve)
    serve.add_argument("--token", default=os.environ.get("VSTREAM_TOKEN"),
                       help="shared secret every request must carry (default: $VSTREAM_TOKEN; none if unset)")
    serve.add_argument("--tokens", metavar="FILE",
                       help="named principals, each with its own token: a JSON object name -> {\"sha256\": "
                            "sha256 of the token, \"admin\", \"max_streams\", \"max_fps\", "
                            "\"questions_per_minute\", \"disk_gb\"}; a stream belongs to whoever opened it")
    serve.add_argument("--curve-secret", metavar="FILE",
                       help="the server's CURVE secret certificate (zmq.auth.create_certificates): encrypt and "
                            "authenticate with CURVE")
    serve.add_argument("--curve-clients", metavar="DIR",
                       help="folder of the public certificates of the clients allowed in (default: any client "
                            "that has the server's public key)")
    serve.add_argument("--state-dir", help="where stream memories are saved (default: ~/.cache/vstream/streams)")
    serve.add_argument("--max-streams", type=int, default=16, help="streams open at once (default 16)")
    serve.add_argument("--max-frame-bytes", type=int, default=3840 * 2160 * 3,
                       help="largest frame or audio chunk in bytes (default: a 4K RGB frame)")
    serve.add_argument("--max-header-bytes", type=int, default=16384, help="largest JSON header (default 16384)")
    serve.add_argument("--max-fps", type=float, default=30.0, help="frames accepted per second and stream (default 30)")
    serve.add_argument("--max-audio-speed", type=float, default=30.0,
                       help="seconds of audio accepted per second and stream (default 30)")
    serve.add_argument("--idle-timeout", type=float, default=300.0,
                       help="seconds without a message before a stream is saved and closed (default 300)")
    serve.add_argument("--queue-size", type=int, default=32, help="questions waiting for the model (default 32)")
    serve.add_argument("--max-time-jump", type=float, default=3600.0,
                       help="seconds a frame's or audio chunk's time may jump past the stream's newest (default 3600)")
    serve.add_argument("--encoder-batch", type=int, default=32,
                       help="most frames, from any streams, in one frame-encoder forward (default 32; 1: none shared)")
    serve.add_argument("--encoder-wait-ms", type=float, default=2.0,
                       help="how long an idle frame encoder waits for more streams' frames (default 2.0)")
    serve.add_argument("--sources", default="url",
                       help="comma-separated kinds of source clients may ask the server to read: url, file, "
                            "camera, or none (default url)")
    _session_flags(serve)
    serve.add_argument("--batch-frames", type=int, default=8, help="frames encoded per batch (default 8)")
    serve.add_argument("--queue-frames", type=int, default=64,
                       help="frames and audio chunks waiting per stream; beyond that the oldest is dropped (default 64)")
    _generation_flags(serve, max_new_tokens=160)
    serve.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    web = serve.add_argument_group("HTTP API and web page (pip install 'vstream[web]')")
    web.add_argument("--http", metavar="HOST:PORT",
                     help="also serve the HTTP API and the page there, e.g. 127.0.0.1:8080 (without --token: "
                          "loopback only)")
    web.add_argument("--max-upload-bytes", type=int, default=2 * 1024**3,
                     help="largest video uploaded through the page or the API (default 2 GiB)")
    cluster = serve.add_argument_group("Ray cluster (pip install 'vstream[cluster]')")
    cluster.add_argument("--cluster", metavar="ADDRESS",
                         help="host the streams on a Ray cluster's nodes: auto (the cluster `ray start` runs here), "
                              "local (start one in this process) or the head's HOST:PORT")
    cluster.add_argument("--streams-per-worker", type=int, default=16, help="streams one node's worker hosts (default 16)")
    cluster.add_argument("--worker-cpus", type=float, default=1.0,
                         help="Ray CPUs (and torch threads) of each node's worker (default 1)")
    cluster.add_argument("--worker-gpus", type=float, default=0.0, help="Ray GPUs of each node's worker (default 0)")
    cluster.add_argument("--checkpoint-every", type=float, default=30.0,
                         help="seconds between saves of each stream into --state-dir, which every node must share "
                              "(default 30): a node's death loses at most this much of its streams")
    serve.set_defaults(run=_serve)

    cluster_cmd = commands.add_parser("cluster", help="manage a cluster server (vstream serve --cluster)")
    cluster_actions = cluster_cmd.add_subparsers(dest="action", required=True)
    drain = cluster_actions.add_parser("drain", help="move every stream off a node, losing nothing, and stop its "
                                                     "worker (then the node can go)")
    drain.add_argument("node", help="the Ray node id, or a unique prefix of it (vstream cluster workers lists them)")
    drain.add_argument("--server", required=True, metavar="ADDR", help="the server's address")
    _client_flags(drain)
    drain.set_defaults(run=_cluster_drain)
    workers = cluster_actions.add_parser("workers", help="list the cluster's workers: node and streams held")
    workers.add_argument("--server", required=True, metavar="ADDR", help="the server's address")
    _client_flags(workers)
    workers.set_defaults(run=_cluster_workers)

    stream = commands.add_parser("stream", help="send a file, URL or camera to a server as a stream")
    stream.add_argument("source", help="file path, URL, camera (/dev/video0) or - for stdin")
    stream.add_argument("--server", required=True, metavar="ADDR", help="the server's address")
    stream.add_argument("--stream", metavar="ID", help="add to this open stream instead of opening a new one")
    pace = stream.add_mutually_exclusive_group()
    pace.add_argument("--realtime", action="store_true",
                      help="send a file at its own pace, as if live; what the server cannot take is dropped")
    pace.add_argument("--as-fast-as-accepted", dest="realtime", action="store_false",
                      help="send as fast as the server takes it, losing nothing: each item waits while the "
                           "stream is full (default)")
    stream.add_argument("--fps", type=float, default=1.0, help="frames sent per second of video (default 1)")
    stream.add_argument("--size", type=int, default=None, help="resize so the shorter side is this many pixels")
    stream.add_argument("--no-audio", action="store_true", help="send no audio")
    stream.add_argument("--wait", action="store_true",
                        help="a listener (udp://, rtp://, srt://...?mode=listener) waits for its sender as long as "
                             "it takes, instead of giving up after 10 s")
    stream.add_argument("--close", action="store_true", help="close the stream when the source ends (it is saved)")
    stream.add_argument("--quiet", action="store_true", help="no progress line")
    _client_flags(stream)
    stream.set_defaults(run=_stream)

    evaluate = commands.add_parser("eval", help="answer and score a benchmark's questions over a folder of its videos")
    evaluate.add_argument("annotations", help="the benchmark's annotation file (.json or .jsonl)")
    evaluate.add_argument("video_folder", help="the folder its video paths are relative to")
    evaluate.add_argument("--format", required=True,
                          choices=["videomme", "egoschema", "streaming", "vstreamqa", "mmiu"],
                          help="annotation format: videomme (also MVBench-style), egoschema, streaming "
                               "(StreamingBench, OVO-Bench: asked at a time), vstreamqa (open-ended, at a time), "
                               "mmiu (multi-image multiple choice; the folder holds its images)")
    _model_flags(evaluate)
    evaluate.add_argument("--fps", type=float, default=1.0, help="frames sampled per second (default 1)")
    evaluate.add_argument("--out", default="results.jsonl",
                          help="results, one JSON line per question; rerunning skips what it holds (default results.jsonl)")
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N questions")
    evaluate.add_argument("--tasks", default=None, help="only these comma-separated tasks")
    evaluate.add_argument("--no-asr", dest="asr", action="store_false", help="do not transcribe the audio")
    _generation_flags(evaluate, max_new_tokens=32)
    evaluate.add_argument("--realtime", action="store_true",
                          help="read each clip at its own pace, as if live, instead of as fast as possible "
                               "(the same answers when the model keeps up; frames it falls behind on are dropped)")
    evaluate.add_argument("--answers", metavar="FILE",
                          help="egoschema: the answers file to merge (default: subset_answers.json beside the "
                               "annotations, if there); questions left without an answer are skipped")
    evaluate.add_argument("--judge", metavar="model[:MODEL]",
                          help="also score open-ended answers with a local model: the evaluated one (model) or "
                               "another hub id or folder (model:MODEL)")
    evaluate.add_argument("--judge-endpoint", metavar="URL",
                          help="also score open-ended answers with an OpenAI-compatible server (/v1/chat/completions)")
    evaluate.add_argument("--judge-model", metavar="NAME", help="with --judge-endpoint: the server's model name")
    evaluate.add_argument("--judge-key-env", metavar="VAR",
                          help="with --judge-endpoint: the environment variable holding the API key (default "
                               "OPENAI_API_KEY; when that is unset, no key is sent)")
    evaluate.add_argument("--benchmark", default=None,
                          help="print this benchmark's published figures beside the summary (keys of "
                               "vstream/evaluate/published.json; default: the format's name when it is one)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(run=_eval)

    data = commands.add_parser("data", help="check training data files")
    data_actions = data.add_subparsers(dest="action", required=True)
    check = data_actions.add_parser("check", help="read a LLaVA-style conversation file (JSON or JSON Lines) record "
                                                  "by record: counts, and the first record that does not fit")
    check.add_argument("file")
    check.add_argument("--media-root", help="folder the records' media paths are relative to (default: the file's)")
    check.add_argument("--missing", action="store_true", help="also report media files that do not exist")
    check.add_argument("--format", choices=("llava", "mminstruct"), default="llava",
                       help="llava (default) or mminstruct: ids optional, questions counted by type")
    check.set_defaults(run=_data_check)

    extract = commands.add_parser("extract", help="run each video of a conversation file through the frame encoder "
                                                  "and the memory once; store its memory tokens, timeline and the "
                                                  "abstract memory's inputs (or each image of interleaved documents "
                                                  "through the frame encoder)")
    extract.add_argument("data", help="a LLaVA-style conversation file (JSON array or JSON Lines), or interleaved "
                                      "image-text documents (OmniCorpus Parquet or JSON Lines)")
    extract.add_argument("--out", required=True, metavar="DIR", help="the features folder (a run resumes there)")
    extract.add_argument("--media-root", help="folder the records' video (or the documents' image) paths are relative "
                                              "to (default: the file's)")
    _model_flags(extract)
    extract.add_argument("--encoder", default="auto", help="frame encoder when the model has no vision tower "
                                                           "(as for ask; default auto)")
    extract.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video (default 1)")
    extract.add_argument("--quiet", action="store_true", help="no progress bar")
    extract.set_defaults(run=_extract)

    train_cmd = commands.add_parser("train", help="fine-tune the parts vstream plugs into a model (projector, visual "
                                                  "experts, LoRA, the abstract memory's attention; the multi-granular "
                                                  "head on interleaved documents) from features extracted by vstream "
                                                  "extract (one JSON config)")
    train_cmd.add_argument("config", help="a JSON file of TrainConfig fields (model, data, features, out, train, "
                                          "held_out, epochs, learning_rate, accumulate, checkpoint_every, seed, device, "
                                          "precision)")
    train_cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    train_cmd.set_defaults(run=_train)

    models = commands.add_parser("models", help="list the supported model architectures, the checkpoints of each in "
                                                "the local Hugging Face cache, and how each reads the memory")
    models.add_argument("--cache-dir", help="a Hugging Face cache folder other than the default")
    models.add_argument("--json", action="store_true", help="one JSON array")
    models.set_defaults(run=_models)

    synth = commands.add_parser("synth", help="write a synthetic test clip (frame index bar code, moving square, tones)")
    synth.add_argument("output", help="output file: .mp4 .mkv .mov .ts .webm or .avi")
    synth.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    synth.add_argument("--fps", type=float, default=30.0, help="frame rate (default 30)")
    synth.add_argument("--width", type=int, default=320)
    synth.add_argument("--height", type=int, default=240)
    synth.add_argument("--vfr", action="store_true", help="variable frame rate")
    synth.add_argument("--no-audio", action="store_true", help="video only")
    synth.add_argument("--noise", type=float, default=0.0,
                       help="standard deviation of white noise added to the audio, full scale 1 (default 0)")
    synth.set_defaults(run=_synth)
    return parser


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="VLM or language model: hub id or folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--head", action="append", default=[], metavar="SPEC",
                        help="attach a model head, e.g. visual_experts:weights=DIR (repeatable)")
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                        help="where the model, the frame encoder and the memory run (default auto: CUDA when present)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                        help="the model's precision (default auto: float16 on CUDA, float32 on the CPU)")


def _session_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", default="auto",
                        help="frame encoder when the model has no vision tower: auto (default: imagenet when "
                             "installed, else pixels), imagenet (MobileNetV2 with ImageNet labels, offline), pixels "
                             "(colours), a vision model, or an encoder with its settings: "
                             "biglittle:big=MODEL,little=MODEL,keep_ratio=0.25")
    parser.add_argument("--no-asr", dest="asr", action="store_false", help="do not transcribe the audio")
    parser.add_argument("--ocr", action=argparse.BooleanOptionalAction, default="auto",
                        help="read the text on screen where the picture changes (PP-OCRv4, offline); "
                             "default: when installed")
    parser.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video (default 1)")
    parser.add_argument("--bank-disk", type=float, default=None, metavar="GB",
                        help="GiB of disk for each stream's frame bank (default 4; 0: no cap); past it, older "
                             "frames are thinned, the older the sparser")


def _generation_flags(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help=f"longest answer in tokens (default {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def _generation(args):
    from vstream.models import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", default=os.environ.get("VSTREAM_TOKEN"),
                        help="the server's shared secret (default: $VSTREAM_TOKEN)")
    parser.add_argument("--curve-server-key", metavar="FILE", help="the server's public CURVE certificate: talk CURVE")
    parser.add_argument("--curve-key", metavar="FILE",
                        help="this client's secret CURVE certificate (default: a new key pair)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a reply (default 30)")


def _client(args):
    from vstream.client import Client

    curve = None
    if args.curve_server_key:
        import zmq
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(args.curve_server_key)
        public, secret = zmq.auth.load_certificate(args.curve_key) if args.curve_key else zmq.curve_keypair()
        if secret is None:
            raise vstream.ConfigError(f"--curve-key {args.curve_key}: holds no secret key")
        curve = (server_public.decode(), public.decode(), secret.decode())
    elif args.curve_key:
        raise vstream.ConfigError("--curve-key needs --curve-server-key")
    return Client(args.server, token=args.token, curve=curve, timeout=args.timeout, ask_timeout=max(args.timeout, 120))


def _ask(args) -> None:
    window = {"start": args.start, "end": args.end, "last": args.last}
    if args.server or args.stream:
        return _ask_server(args, window)
    from vstream.session import Session, SessionConfig

    media, questions = ([], args.inputs) if args.load_memory else _split_media(args.inputs)
    if not questions or not all(q.strip() for q in questions):
        raise vstream.ConfigError("vstream ask needs a video and at least one non-empty question")
    generation = _generation(args)
    config = SessionConfig(fps=args.fps, asr=args.asr, encoder=args.encoder, ocr=args.ocr, heads=args.head,
                           device=args.device, dtype=args.dtype, bank_disk_gb=args.bank_disk, generation=generation)
    if len(media) > 1 or (media and _is_image(media[0])):
        return _ask_media(args, media, questions, config)
    video = media[0] if media else None
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
        generation_tools = _generation_tools(args, qa) if args.show else None
        for number, question in enumerate(questions, 1):
            if args.json:
                answer = qa.ask(question, **window)
                print(json.dumps(answer.to_dict()), flush=True)
            else:
                if len(questions) > 1:
                    print(f"Q: {question}")
                answer = _print_streamed(qa.stream(question, **window))
            if generation_tools is not None:
                saved = _show(args, qa, number, answer, *generation_tools)
                if not args.json:
                    print(f"  saved {len(saved)} pictures to {args.show}")


def _print_streamed(stream):
    """Print an answer as it is generated, then its best evidence; return the ``Answer``."""
    for text in stream:
        print(text, end="", flush=True)
    answer = stream.result()
    print()
    _print_evidence(answer.to_dict()["evidence"])
    return answer


def _print_evidence(evidence: list[dict]) -> None:
    """The best five pieces of an answer's evidence (its JSON form), one line each: how
    every path of ``vstream ask`` (a video, several media, a server's stream) prints it."""
    for line in evidence_lines(evidence[:5]):
        print(f"  {line}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def _split_media(inputs: list[str]) -> tuple[list[str], list[str]]:
    """The leading inputs that are files (the media), and the questions after them. The
    first input is always a medium, so a wrong path fails as one."""
    count = 1
    while count < len(inputs) and os.path.isfile(inputs[count]):
        count += 1
    return inputs[:count], inputs[count:]


def _ask_media(args, media: list[str], questions: list[str], config) -> None:
    """Several images and videos: one ``Dialogue``, each question a turn."""
    from vstream.dialogue import Dialogue

    unused = [flag for flag, value in (("--start/--end/--last", args.start is not None or args.end is not None
                                        or args.last is not None), ("--save-memory", args.save_memory),
                                       ("--show", args.show)) if value]
    if unused:
        raise vstream.ConfigError(f"{', '.join(unused)}: for one video, not for several media")
    for path in media:
        if not _is_image(path):
            vstream.probe(path)  # a bad video fails now, before any model loads
    if not args.verbose:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    with Dialogue(args.model, config, max_turns=len(questions)) as dialogue:
        for path in media:
            if _is_image(path):
                dialogue.add_image(path)
            else:
                dialogue.add_video(path, progress=not (args.quiet or args.json))
        for question in questions:
            if args.json:
                print(json.dumps(dialogue.ask(question).to_dict()), flush=True)
                continue
            if len(questions) > 1:
                print(f"Q: {question}")
            _print_streamed(dialogue.stream(question))


def _generation_tools(args, qa) -> tuple:
    """The multigranular head and image decoder that ``--show`` draws with."""
    from vstream.models.heads.multigranular import MultigranularHead, hidden_size_of
    from vstream.models.image_decoders import create_decoder

    if args.generation_head:
        head = MultigranularHead.from_folder(args.generation_head)
    else:
        head = MultigranularHead(hidden_size_of(qa.model), feature_dim=qa.memory.dim or qa.encoder.dim)
    return head, create_decoder(args.decoder, qa.memory)


def _show(args, qa, number: int, answer, head, decoder) -> list[str]:
    """Save the evidence frames of the ``number``-th answer (``q<number>-evidence-<seconds>s.jpg``)
    and the frame generated for its best evidence time (``q<number>-generated-<level>-<seconds>s.png``)."""
    os.makedirs(args.show, exist_ok=True)
    saved = []
    evidence = qa.frames_for(answer)
    for t, image in evidence:
        saved.append(os.path.join(args.show, f"q{number}-evidence-{t:08.2f}s.jpg"))
        image.save(saved[-1])
    t = evidence[0][0] if evidence else qa.stats.last_t
    saved.append(os.path.join(args.show, f"q{number}-generated-{args.show_level}-{t:08.2f}s.png"))
    qa.imagine(t, args.show_level, head, decoder).save(saved[-1])
    return saved


def _ask_server(args, window: dict) -> None:
    if not (args.server and args.stream):
        raise vstream.ConfigError("asking a server needs both --server ADDR and --stream ID")
    if args.load_memory or args.save_memory:
        raise vstream.ConfigError("--load-memory and --save-memory work on local videos, not with --server")
    questions = args.inputs
    if not all(q.strip() for q in questions):
        raise vstream.ConfigError("vstream ask needs non-empty questions")
    with _client(args) as client:
        for question in questions:
            if args.json:
                print(json.dumps(client.ask(args.stream, question, **window)), flush=True)
                continue
            if len(questions) > 1:
                print(f"Q: {question}")
            answer = client.ask(args.stream, question, **window, on_token=lambda text: print(text, end="", flush=True))
            print()
            _print_evidence(answer["evidence"])


def _serve(args) -> None:
    from vstream.models import load_model
    from vstream.server import Server, ServerConfig
    from vstream.session import SessionConfig

    curve_secret, curve_clients = None, ()
    if args.curve_secret:
        import zmq.auth

        _, secret = zmq.auth.load_certificate(args.curve_secret)
        if secret is None:
            raise vstream.ConfigError(f"--curve-secret {args.curve_secret}: holds no secret key")
        curve_secret = secret.decode()
        if args.curve_clients:
            curve_clients = tuple(key.decode() for key in zmq.auth.load_certificates(args.curve_clients))
    elif args.curve_clients:
        raise vstream.ConfigError("--curve-clients needs --curve-secret")
    generation = _generation(args)
    session = SessionConfig(fps=args.fps, asr=args.asr, encoder=args.encoder, ocr=args.ocr, device=args.device,
                            dtype=args.dtype, bank_disk_gb=args.bank_disk, batch_frames=args.batch_frames,
                            queue_frames=args.queue_frames, generation=generation, heads=tuple(args.head))
    cluster = None
    if args.cluster:
        from vstream.cluster import ClusterConfig

        cluster = ClusterConfig(address=args.cluster, streams_per_worker=args.streams_per_worker,
                                worker_cpus=args.worker_cpus, worker_gpus=args.worker_gpus,
                                checkpoint_every=args.checkpoint_every)
    sources = tuple(kind.strip() for kind in args.sources.split(",") if kind.strip() not in ("", "none"))
    tokens = None
    if args.tokens:
        from vstream.auth import Principals

        tokens = Principals.load_tokens(args.tokens)
    config = ServerConfig(bind=args.bind, token=args.token, tokens=tokens, curve_secret_key=curve_secret,
                          curve_clients=curve_clients, state_dir=args.state_dir, max_streams=args.max_streams,
                          max_frame_bytes=args.max_frame_bytes, max_header_bytes=args.max_header_bytes,
                          max_fps=args.max_fps, max_audio_speed=args.max_audio_speed, idle_timeout=args.idle_timeout,
                          queue_size=args.queue_size, max_time_jump=args.max_time_jump,
                          encoder_batch=args.encoder_batch,
                          encoder_wait_ms=args.encoder_wait_ms, sources=sources, session=session, cluster=cluster)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.verbose:
        logging.getLogger("vstream.server").setLevel(logging.INFO)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    # on a cluster each node's worker loads the model; here, the server does
    if args.http and curve_secret:
        raise vstream.ConfigError("--http does not go with CURVE yet: the page talks to the server as a client "
                                  "with the token")
    gateway = None
    if args.http:
        from vstream.http_api import HttpConfig, HttpGateway

        http_config = HttpConfig(bind=args.http, max_upload_bytes=args.max_upload_bytes, fps=args.fps)
    server = Server(config, args.model if cluster else load_model(args.model, args.dtype, args.device, args.head))
    try:
        if args.http:
            gateway = HttpGateway(server.address, bool(args.token or tokens), http_config)
            print(f"vstream serve: page and HTTP API on {gateway.start()}", flush=True)
        print(f"vstream serve: listening on {server.address}", flush=True)
        server.serve()
    finally:
        if gateway is not None:
            gateway.stop()
        server.close()


def _cluster_drain(args) -> None:
    with _client(args) as client:
        client.ask_timeout = max(client.ask_timeout, args.timeout)
        result = client.drain(args.node)
    print(f"node {result['node']}: {result['moved']} stream(s) moved")


def _cluster_workers(args) -> None:
    with _client(args) as client:
        workers = client.stats().get("workers")
    if workers is None:
        raise vstream.ConfigError(f"{args.server} runs no cluster (vstream serve --cluster)")
    for worker in workers:
        print(f"{worker['node']}  {worker['streams']:4d} stream(s)")


def _stream(args) -> None:
    source = vstream.open_source(args.source, fps=args.fps, size=args.size, audio=not args.no_audio,
                                 realtime=args.realtime, open_timeout=None if args.wait else 10.0)
    with source, _client(args) as client:
        stream, offset = args.stream or client.open_stream(), 0.0
        if args.stream:  # go on with the stream's clock, after what it holds
            stats = client.stats(stream)
            if stats["frames_in"]:
                offset = stats["last_t"] + stats["lag_seconds"] + 1.0 / args.fps
        print(f"stream {stream}", flush=True)
        shown = time.monotonic()

        def progress(counts: dict, t: float) -> None:
            nonlocal shown
            if not args.quiet and time.monotonic() - shown >= 1.0:
                shown = time.monotonic()
                print(f"\r{_progress(counts)}, at {t:.1f} s", end="", file=sys.stderr, flush=True)

        counts = client.send_source(stream, source, realtime=args.realtime, offset=offset, on_progress=progress)
        if not args.quiet:
            print(f"\r{_progress(counts)}; the source ended", file=sys.stderr, flush=True)
        if args.close:
            print(f"closed; saved in {client.close_stream(stream)}", flush=True)


def _progress(counts: dict) -> str:
    return (f"sent {counts['frames']} frames, {counts['audio_seconds']:.0f} s of audio; "
            f"{counts['busy']} busy, {counts['rate_dropped']} over the rate limit")


def _probe(args) -> None:
    info = vstream.probe(args.source, open_timeout=args.timeout, read_timeout=args.timeout)
    stats = _decoder_stats(args.source) if info.video is not None else None
    if args.json:
        decoder = {"decoder": stats.decoder, "decoder_choice": stats.decoder_choice,
                   "decoder_rates": stats.decoder_rates} if stats else {}
        print(json.dumps({**json.loads(info.to_json()), **decoder}))
    elif stats:
        rates = ", ".join(f"{name} {rate:.0f} frames/s" for name, rate in stats.decoder_rates.items())
        print(f"{info.describe()}\ndecoder:  {stats.decoder} ({stats.decoder_choice}"
              f"{f' sampling 1 frame a second: {rates}' if rates else ''})")
    else:
        print(info.describe())


def _decoder_stats(uri: str) -> vstream.SourceStats | None:
    """The stats of a file opened at 1 fps once its decoder is chosen (``decoder``,
    ``decoder_choice``, ``decoder_rates``); None for a live source."""
    from vstream.ingest import FileSource

    with vstream.open_source(uri, audio=False) as source:
        if not isinstance(source, FileSource) or not len(source):
            return None
        source[0]  # opens the decoder: the two are timed on the first frames to read
        return source.stats


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
        f"audio_seconds={stats.audio_seconds:.2f} reconnects={stats.reconnects} decoder={stats.decoder or '-'}",
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


def _extract(args) -> int:
    from vstream.extract import extract_features
    from vstream.session import SessionConfig

    config = SessionConfig(fps=args.fps, asr=False, ocr=False, encoder=args.encoder, heads=args.head,
                           device=args.device, dtype=args.dtype)
    report = extract_features(args.data, args.out, args.model, config, args.media_root, progress=not args.quiet)
    nothing = (f"without images {report.without_images}" if report.documents
               else f"without video {report.without_video}")
    listed = f" (listed in {os.path.join(args.out, 'failed.jsonl')})" if report.failed else ""
    print(f"extracted {report.extracted}, already there {report.skipped}, {nothing}, failed {len(report.failed)}{listed}")
    for record, error in report.failed[:5]:
        print(f"  {record}: {error}", file=sys.stderr)
    return 1 if report.failed else 0


def _train(args) -> None:
    from vstream.train import HEAD_SPECS, TrainConfig, train

    try:
        with open(args.config, encoding="utf-8") as file:
            config = TrainConfig.from_json(file.read())
    except OSError as exc:
        raise vstream.ConfigError(f"{args.config}: cannot read the training config ({exc.strerror})") from None
    report = train(config, progress=not args.quiet)
    held = ("no held-out records" if report.held_out_before is None
            else f"held-out loss {report.held_out_before:.3f} -> {report.held_out_after:.3f}"
                 + ("" if report.held_out_score is None else f", answer score {report.held_out_score:.3f}"))
    load = " ".join(HEAD_SPECS[part].format(report.out) for part in config.train)
    print(f"{report.steps} steps over {report.train_samples} samples; last epoch's loss {report.train_loss:.3f}; "
          f"{held} ({report.held_out_samples} samples); weights in {report.out} ({load})")


def _models(args) -> None:
    from vstream.models.loading import describe_models

    rows = describe_models(args.cache_dir)
    if args.json:
        print(json.dumps(rows))
        return
    for row in rows:
        installed = ", ".join(row["installed"]) or "none in the cache"
        print(f"{row['model_type']} ({row['adapter']})\n  vision tower: {row['vision_tower']}\n"
              f"  memory:       {row['memory']}\n  prompt:       {row['prompt']}\n  installed:    {installed}")


def _data_check(args) -> None:
    from vstream.data import read_conversations

    counts = {"video": 0, "image": 0, "text": 0}
    types: dict[str, int] = {}  # questions by type (MMInstruct)
    turns = missing = 0
    records = (_typed_conversations(args.file, args.media_root, types) if args.format == "mminstruct"
               else read_conversations(args.file, args.media_root))
    for record in records:  # a DataError names the record and field
        counts[record.media or "text"] += 1
        turns += len(record.turns)
        if args.missing:
            for path in record.paths:
                if not path.exists():
                    missing += 1
                    if missing <= 5:
                        print(f"missing: record {record.id!r}: {path}", file=sys.stderr)
    total = sum(counts.values())
    print(f"{args.file}: {total} records ({counts['video']} video, {counts['image']} image, {counts['text']} text), "
          f"{turns} turns" + (f", {missing} media file(s) missing" if args.missing else ""))
    if types:
        print("questions by type: " + ", ".join(f"{kind} {count}" for kind, count in sorted(types.items())))
    if missing:
        raise vstream.VStreamError(f"{missing} media file(s) of {args.file} do not exist under the media folder")


def _typed_conversations(path: str, media_root: str | None, types: dict[str, int]):
    """An MMInstruct file's conversations, one at a time, counting its questions by type into ``types``."""
    from vstream.data import read_mminstruct

    for record in read_mminstruct(path, media_root):
        for kind in record.types:
            types[kind] = types.get(kind, 0) + 1
        yield record.conversation


def _synth(args) -> None:
    from vstream import synth

    times = synth.vfr_times(args.duration) if args.vfr else None
    info = synth.write_clip(
        args.output,
        duration=args.duration,
        fps=args.fps,
        size=(args.width, args.height),
        audio=not args.no_audio,
        noise=args.noise,
        frame_times=times,
        progress=args.duration >= 60,
    )
    print(f"wrote {info.path}: {info.duration:g} s, {len(info.frame_times)} frames, {info.size[0]}x{info.size[1]}")


def _eval(args) -> None:
    from vstream.evaluate import HTTPJudge, ModelJudge, evaluate, format_summary, load_questions, published_figures
    from vstream.models import load_model

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    if args.format == "mmiu":
        return _eval_mmiu(args, tasks)
    questions = load_questions(args.annotations, args.format, answers=args.answers)
    published = published_figures()["benchmarks"]
    if args.benchmark and args.benchmark not in published:  # refused now, not after the run
        raise vstream.ConfigError(f"--benchmark {args.benchmark}: no published figures; known: {', '.join(published)}")
    benchmark = args.benchmark or (args.format if args.format in published else None)
    if args.judge and args.judge_endpoint:
        raise vstream.ConfigError("give --judge or --judge-endpoint, not both")
    if args.judge_model and not args.judge_endpoint:
        raise vstream.ConfigError("--judge-model names the model of a --judge-endpoint server")
    if not args.verbose:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    # the evaluated model is loaded here when it carries heads or also judges
    model = (load_model(args.model, args.dtype, args.device, args.head) if args.head or args.judge == "model"
             else args.model)
    judge = None
    if args.judge:
        kind, _, name = args.judge.partition(":")
        if kind != "model":
            raise vstream.ConfigError(f"--judge takes model or model:HUB_ID_OR_FOLDER, got {args.judge!r}")
        judge = ModelJudge(load_model(name, args.dtype, args.device) if name else model)
    elif args.judge_endpoint:
        if not args.judge_model:
            raise vstream.ConfigError("--judge-endpoint needs --judge-model, the model name the server knows")
        key = os.environ.get(args.judge_key_env or "OPENAI_API_KEY")
        if args.judge_key_env and key is None:
            raise vstream.ConfigError(f"--judge-key-env {args.judge_key_env}: no such environment variable")
        judge = HTTPJudge(args.judge_endpoint, args.judge_model, api_key=key)
    summary = evaluate(questions, args.video_folder, model, args.out, fps=args.fps, limit=args.limit,
                       tasks=tasks, progress=not args.quiet, asr=args.asr,
                       generation=_generation(args), realtime=args.realtime,
                       judge=judge, device=args.device, dtype=args.dtype)
    print(format_summary(summary, benchmark))
    print(f"results: {args.out}")


def _eval_mmiu(args, tasks) -> None:
    from vstream.evaluate.mmiu import evaluate_mmiu, format_mmiu_summary, load_mmiu
    from vstream.models import load_model

    unused = [flag for flag, value in (("--judge", args.judge), ("--judge-endpoint", args.judge_endpoint),
                                       ("--answers", args.answers), ("--realtime", args.realtime)) if value]
    if unused:
        raise vstream.ConfigError(f"{', '.join(unused)}: not for --format mmiu (multiple choice over images)")
    questions = load_mmiu(args.annotations)
    model = load_model(args.model, args.dtype, args.device, args.head) if args.head else args.model
    summary = evaluate_mmiu(questions, args.video_folder, model, args.out, limit=args.limit, tasks=tasks,
                            progress=not args.quiet, generation=_generation(args), device=args.device,
                            dtype=args.dtype)
    print(format_mmiu_summary(summary))
    print(f"results: {args.out}")
