"""A live MPEG-TS broadcast for the live-source tests: H.264 video and an AAC sine tone,
encoded with PyAV as it goes out and paced by the wall clock.

    python tests/live_server.py --port P [--fps 10] [--size 160x120]
        serves the broadcast over HTTP to every GET, with no length and no end;
    python tests/live_server.py --udp HOST:PORT [--fps 10] [--size 160x120]
        pushes it as UDP datagrams to HOST:PORT instead.

Frame ``i`` is due ``i / fps`` seconds after the broadcast began and carries ``i`` as a bar
code (``vstream.synth.draw_frame``). An HTTP client joins the broadcast where it is when it
connects, as a viewer of a real live stream does, so its first frame is not frame 0.

Prints "ready EPOCH" once a client can connect, EPOCH being the ``time.monotonic()`` at
which frame 0 is due; that clock is system-wide, so a test can tell when any frame it reads
was made. SIGUSR1 restarts the broadcast from frame 0 (and prints a new "ready EPOCH");
SIGTERM ends the server.
"""

from __future__ import annotations

import argparse
import http.server
import itertools
import signal
import sys
import threading
import time
from fractions import Fraction

import av
import numpy as np

from vstream.synth import draw_frame

AUDIO_RATE = 48_000
AUDIO_FRAME = 1024  # samples per AAC frame
TONE_HZ = 440.0
GREY = (96, 96, 96)


class _Writer:
    """The file-like object PyAV writes the muxed bytes to: ``write`` only, so PyAV
    treats the output as an unseekable stream."""

    def __init__(self, write):
        self.write = write


class Broadcast:
    """The clock every client shares: frame 0 is due at ``epoch`` (``time.monotonic()``).

    ``restart()`` (on SIGUSR1) starts the broadcast afresh, from frame 0 and timestamp 0,
    and ends the streams of the old one, as an encoder restarting upstream does.
    """

    def __init__(self):
        self.stopped = threading.Event()
        self.restart()

    def restart(self) -> None:
        self.epoch = time.monotonic()
        print(f"ready {self.epoch}", flush=True)


def stream(target, broadcast: Broadcast, fps: int, size: tuple[int, int]) -> None:
    """Encode the broadcast into ``target`` (a file-like writer or a URL) from the frame
    due now on, until the server stops, the broadcast restarts or the target fails."""
    width, height = size
    epoch = broadcast.epoch
    first = int((time.monotonic() - epoch) * fps)
    # flush_packets: hand every packet over at once rather than when PyAV's buffer fills.
    with av.open(target, "w", format="mpegts", container_options={"flush_packets": "1"}) as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.time_base = Fraction(1, fps)
        video.options = {"preset": "ultrafast", "tune": "zerolatency", "g": str(fps), "bf": "0"}
        audio = out.add_stream("aac", rate=AUDIO_RATE)
        audio.layout = "mono"
        sample = first * AUDIO_RATE // fps  # next audio sample to encode, counted from the epoch
        for index in itertools.count(first):
            due = epoch + index / fps
            if broadcast.stopped.wait(max(0.0, due - time.monotonic())) or broadcast.epoch != epoch:
                break
            frame = av.VideoFrame.from_ndarray(draw_frame(index, index / fps, width, height, GREY), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            out.mux(video.encode(frame))
            # Audio up to the end of this frame, so the two tracks stay interleaved.
            while sample < (index + 1) * AUDIO_RATE // fps:
                n = sample + np.arange(AUDIO_FRAME)
                tone = (0.5 * np.sin(2 * np.pi * TONE_HZ * n / AUDIO_RATE)).astype(np.float32)
                chunk = av.AudioFrame.from_ndarray(tone[None], format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts, chunk.time_base = AUDIO_RATE, sample, Fraction(1, AUDIO_RATE)
                out.mux(audio.encode(chunk))
                sample += AUDIO_FRAME


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the broadcast, from now on, for as long as it runs."""

    server: "_Server"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "video/mp2t")
        self.end_headers()
        try:
            stream(_Writer(self.wfile.write), self.server.broadcast, self.server.fps, self.server.size)
        except (OSError, av.error.FFmpegError):
            pass  # the client went away (BrokenPipe, ConnectionReset): its loss, not ours

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    # allow_reuse_address (inherited, on): a server restarted on the port binds it at once.
    # daemon_threads (inherited, on): streams still running do not hold the process up.
    broadcast: Broadcast
    fps: int
    size: tuple[int, int]


def serve_http(port: int, fps: int, size: tuple[int, int]) -> None:
    with _Server(("127.0.0.1", port), _Handler) as server:
        server.fps, server.size = fps, size
        server.broadcast = Broadcast()  # listening already: announce it
        signal.signal(signal.SIGUSR1, lambda *_: server.broadcast.restart())
        try:
            server.serve_forever(poll_interval=0.1)
        finally:
            server.broadcast.stopped.set()


def push_udp(address: str, fps: int, size: tuple[int, int]) -> None:
    broadcast = Broadcast()
    signal.signal(signal.SIGUSR1, lambda *_: broadcast.restart())
    while True:
        stream(f"udp://{address}?pkt_size=1316", broadcast, fps, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="serve HTTP on 127.0.0.1:PORT")
    where.add_argument("--udp", metavar="HOST:PORT", help="push UDP datagrams to HOST:PORT")
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--size", default="160x120", help="WIDTHxHEIGHT")
    args = parser.parse_args()
    size = tuple(int(s) for s in args.size.split("x"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.port is not None:
        serve_http(args.port, args.fps, size)
    else:
        push_udp(args.udp, args.fps, size)


if __name__ == "__main__":
    main()
