"""A stream server and two streaming clients in one script: each client sends its own
video to the server as a live stream (paced in real time), and while they stream, a
third client asks both streams questions.

    python examples/server_two_clients.py left.mp4 right.mp4 "What is on screen?"
    python examples/server_two_clients.py a.mp4 b.mp4 "What was said?" --model Qwen/Qwen2.5-0.5B-Instruct

In production the server is its own process, `vstream serve --bind tcp://0.0.0.0:5555
--token ...`, and the senders are `vstream stream VIDEO --server tcp://HOST:5555`.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

import vstream
from vstream.client import Client
from vstream.server import Server, ServerConfig
from vstream.types import evidence_lines


def send(address: str, token: str, stream: str, video: str) -> None:
    with Client(address, token=token) as client, vstream.open_source(video, fps=1.0, realtime=True) as source:
        counts = client.send_source(stream, source, realtime=True)
        print(f"[{stream}] sent {counts['frames']} frames, {counts['audio_seconds']:.0f} s of audio")


def show(stream: str, reply: dict, label: str = "") -> None:
    """The answer, then its best two pieces of evidence, each line tagged with the stream."""
    lines = [f"{label}{reply['answer']!r}", *(f"  {line}" for line in evidence_lines(reply["evidence"][:2]))]
    print("\n".join(f"[{stream}] {line}" for line in lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("left")
    parser.add_argument("right")
    parser.add_argument("question")
    parser.add_argument("--model", default=None, help="hub id or folder (default: the embedded SmolLM2)")
    parser.add_argument("--no-asr", dest="asr", action="store_false")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between rounds of questions")
    args = parser.parse_args()
    token = "example-secret"
    with tempfile.TemporaryDirectory() as state:
        config = ServerConfig(bind="tcp://127.0.0.1:*", token=token, state_dir=state,
                              session=vstream.SessionConfig(asr=args.asr))
        server = Server(config, args.model)
        loop = threading.Thread(target=server.run, name="server-loop")
        loop.start()
        try:
            with Client(server.address, token=token) as asker:
                streams = [asker.open_stream(), asker.open_stream()]
                senders = [threading.Thread(target=send, args=(server.address, token, stream, video))
                           for stream, video in zip(streams, (args.left, args.right))]
                for thread in senders:
                    thread.start()
                while any(thread.is_alive() for thread in senders):
                    time.sleep(args.every)
                    for stream in streams:
                        show(stream, asker.ask(stream, args.question))
                for thread in senders:
                    thread.join()
                for stream in streams:
                    show(stream, asker.ask(stream, args.question), "final: ")
        finally:
            server.stop()
            loop.join()


if __name__ == "__main__":
    main()
