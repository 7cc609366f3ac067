"""Live sources over loopback: an HTTP (and a UDP) MPEG-TS broadcast made by
``tests/live_server.py`` in another process, cut off, restarted and read too slowly.

Each frame of the broadcast carries its index as a bar code, and the server says when
frame 0 was due on the system-wide monotonic clock, so a test knows exactly which frame
it got and when that frame was made.
"""

from __future__ import annotations

import functools
import http.server
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

import vstream
from vstream import AUDIO_SAMPLE_RATE, AudioChunk, Frame, synth

SERVER = Path(__file__).with_name("live_server.py")
SERVER_FPS = 20  # FFmpeg probes about 20 frames when it opens a stream: 1 s at this rate
SIZE = (160, 120)
TONE_HZ = 440.0  # live_server.TONE_HZ

# no_leaked_threads (conftest.py): no decoder thread may outlive a test.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leaked_threads")]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """One ``live_server.py`` process; ``epoch`` is when its frame 0 was due."""

    def __init__(self, *args: str):
        cmd = [sys.executable, str(SERVER), "--fps", str(SERVER_FPS), "--size", "x".join(map(str, SIZE)), *args]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.epoch = self._read_epoch()

    def made(self, frame: Frame) -> float:
        """When the server made ``frame``, on the ``time.monotonic()`` clock."""
        return self.epoch + synth.read_index(frame.image) / SERVER_FPS

    def restart(self) -> None:
        """Restart the broadcast from frame 0, as an encoder restarting upstream does."""
        self.process.send_signal(signal.SIGUSR1)
        self.epoch = self._read_epoch()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()

    def _read_epoch(self) -> float:
        line = self.process.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"live_server.py did not start (exit code {self.process.poll()})")
        return float(line.split()[1])


@pytest.fixture
def serve():
    """``serve(*args) -> LiveServer``; every server started is stopped when the test ends."""
    servers: list[LiveServer] = []

    def start(*args: str) -> LiveServer:
        servers.append(LiveServer(*args))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def http_source(port: int, **settings) -> vstream.LiveSource:
    settings = {"fps": 2, "read_timeout": 2, "open_timeout": 5, **settings}
    return vstream.open_source(f"http://127.0.0.1:{port}/live.ts", **settings)


def read_for(items, seconds: float, frames: int | None = None) -> tuple[list[Frame], list[AudioChunk]]:
    """Frames and chunks from ``items`` for ``seconds`` of wall time, or until ``frames`` frames."""
    got: tuple[list[Frame], list[AudioChunk]] = ([], [])
    deadline = time.monotonic() + seconds
    for item in items:
        got[0 if isinstance(item, Frame) else 1].append(item)
        if time.monotonic() > deadline or frames is not None and len(got[0]) >= frames:
            break
    return got


def tone_hz(chunk: AudioChunk) -> float:
    spectrum = np.abs(np.fft.rfft(chunk.samples))
    return float(np.argmax(spectrum)) * AUDIO_SAMPLE_RATE / len(chunk.samples)


def check_broadcast(frames: list[Frame], chunks: list[AudioChunk], fps: float) -> None:
    """Frames of one connection, sampled at ``fps``, and its audio, are what was sent."""
    bars = [synth.read_index(f.image) for f in frames]
    assert all(f.image.shape == (SIZE[1], SIZE[0], 3) for f in frames)
    # Every decoded frame is counted: index and bar code move together.
    assert {f.index - b for f, b in zip(frames, bars)} == {frames[0].index - bars[0]}
    assert np.diff(bars).tolist() == [SERVER_FPS / fps] * (len(bars) - 1)
    # Times are the stream's own: one constant away from the bar code's time.
    assert np.ptp([f.t - b / SERVER_FPS for f, b in zip(frames, bars)]) < 2e-3
    full = [c for c in chunks if len(c.samples) == AUDIO_SAMPLE_RATE]
    assert len(full) >= 2 and all(c.samples.dtype == np.float32 for c in chunks)
    assert all(b.start == pytest.approx(a.end, abs=1e-3) for a, b in zip(chunks, chunks[1:]))
    assert all(abs(tone_hz(c) - TONE_HZ) <= 2 for c in full)
    # Audio and video share the clock: both start together.
    assert abs(chunks[0].start - frames[0].t) <= 1 / SERVER_FPS


def split_at_restart(frames: list[Frame]) -> tuple[list[Frame], list[Frame]]:
    """Frames of the first broadcast and of the restarted one (its bar codes start again
    near 0, far below where the first one had got to)."""
    bars = [synth.read_index(f.image) for f in frames]
    cut = next((i for i in range(1, len(bars)) if bars[i] < bars[i - 1]), len(bars))
    return frames[:cut], frames[cut:]


def check_reconnected(source, frames: list[Frame], audio: list[AudioChunk], epochs: tuple[float, float], min_new: int) -> None:
    """After a lost connection: a reconnect was counted, frames of the new broadcast came,
    the source clock ran on by as much as the wall clock did between the last frame of
    the old broadcast and the first of the new one (``epochs``: when each broadcast's
    frame 0 was due), and audio never went back."""
    old, new = split_at_restart(frames)
    assert source.stats.reconnects >= 1
    assert len(new) >= min_new, "too few frames after the reconnect"
    ts = [f.t for f in frames]
    assert ts == sorted(ts) and len(set(ts)) == len(ts)
    made_before = epochs[0] + synth.read_index(old[-1].image) / SERVER_FPS
    made_after = epochs[1] + synth.read_index(new[0].image) / SERVER_FPS
    assert new[0].t - old[-1].t == pytest.approx(made_after - made_before, abs=0.3)
    assert all(b.start >= a.end - 1 / SERVER_FPS for a, b in zip(audio, audio[1:]))


@pytest.mark.timeout(60)
def test_read_live_http(serve):
    port = free_port()
    serve("--port", str(port))
    with http_source(port) as source:
        frames, chunks = read_for(source, seconds=10, frames=6)
    assert len(frames) == 6
    assert 0.0 <= frames[0].t < 0.1
    check_broadcast(frames, chunks, fps=2)
    assert source.stats.reconnects == 0 and source.stats.dropped == 0


@pytest.mark.timeout(60)
def test_reconnects_after_outage_and_clock_runs_on(serve):
    port = free_port()
    first = serve("--port", str(port))
    settings = {"read_timeout": 1.5, "reconnect_tries": 20, "reconnect_backoff": 0.2, "reconnect_backoff_max": 0.5}
    with http_source(port, **settings) as source:
        items = iter(source)
        frames, chunks = read_for(items, seconds=10, frames=4)
        first.stop()
        time.sleep(1.5)  # down long enough for failed reopen attempts
        second = serve("--port", str(port))
        more, more_chunks = read_for(items, seconds=15, frames=6)
    check_reconnected(source, frames + more, chunks + more_chunks, (first.epoch, second.epoch), min_new=3)


@pytest.mark.timeout(60)
def test_broadcast_restart_is_a_reconnect(serve):
    """A restart of the broadcast is seen as a loss and a reconnect, not spliced in."""
    port = free_port()
    server = serve("--port", str(port))
    with http_source(port, read_timeout=1.5, reconnect_backoff=0.2) as source:
        items = iter(source)
        frames, chunks = read_for(items, seconds=10, frames=4)
        epoch_before = server.epoch
        server.restart()
        more, more_chunks = read_for(items, seconds=5, frames=2)
    check_reconnected(source, frames + more, chunks + more_chunks, (epoch_before, server.epoch), min_new=1)


@pytest.mark.timeout(60)
def test_gives_up_when_server_stays_down(serve):
    port = free_port()
    server = serve("--port", str(port))
    with http_source(port, read_timeout=1.5, reconnect_tries=2, reconnect_backoff=0.1) as source:
        items = iter(source)
        read_for(items, seconds=10, frames=2)
        server.stop()
        lost = time.monotonic()
        with pytest.raises(vstream.SourceError, match=f"127.0.0.1:{port}") as error:
            read_for(items, seconds=15)
    # The loss shows within FFmpeg's own HTTP retry (about 1 s) or read_timeout; then come
    # a few refused reopens, 0.1 s and 0.2 s apart.
    assert time.monotonic() - lost < 6.0
    assert "reconnect" in str(error.value)
    assert source.stats.reconnects == 0
    # Given up means stopped: the decoder thread is gone already, not merely told to go.
    assert not [t for t in threading.enumerate() if t.name.startswith("vstream-decode")]


@pytest.mark.timeout(30)
def test_unreachable_url_fails_fast():
    url = f"http://127.0.0.1:{free_port()}/x.ts"
    start = time.monotonic()
    with pytest.raises(vstream.SourceError, match=url):
        vstream.open_source(url, open_timeout=5)
    assert time.monotonic() - start < 5.0


@pytest.mark.timeout(60)
def test_slow_consumer_drops_oldest_frames(serve):
    port = free_port()
    server = serve("--port", str(port))
    got, lag = [], []
    with http_source(port, fps=None, queue_size=2) as source:
        deadline = time.monotonic() + 4.0
        for item in source:
            if isinstance(item, Frame):
                got.append(synth.read_index(item.image))
                lag.append(time.monotonic() - server.made(item))
            time.sleep(0.3)
            if time.monotonic() > deadline:
                break
    stats = source.stats
    assert stats.dropped > 0 and stats.sampled == stats.decoded
    # Each frame kept is handed over, dropped, or still queued (or in the decoder's hand)
    # when close() discards them.
    assert len(got) + stats.dropped <= stats.sampled <= len(got) + stats.dropped + source.config.queue_size + 1
    assert got == sorted(got) and len(set(got)) == len(got)
    # Dropping the oldest keeps what the consumer sees fresh (the first frame may be from
    # the backlog FFmpeg read while it probed the stream).
    assert max(lag[1:]) < 0.7


@pytest.mark.timeout(60)
def test_read_live_udp(serve):
    port = free_port(socket.SOCK_DGRAM)
    serve("--udp", f"127.0.0.1:{port}")
    with vstream.open_source(f"udp://127.0.0.1:{port}", fps=2, read_timeout=2, open_timeout=5) as source:
        frames, chunks = read_for(source, seconds=10, frames=5)
    assert len(frames) == 5
    check_broadcast(frames, chunks, fps=2)


@pytest.mark.timeout(60)
def test_a_udp_listener_waits_for_a_sender_that_starts_later(serve, no_leaked_threads):
    port = free_port(socket.SOCK_DGRAM)
    began = time.monotonic()
    with vstream.open_source(f"udp://127.0.0.1:{port}", fps=2, read_timeout=2, open_timeout=None) as source:
        assert time.monotonic() - began < 1.0 and source.info is None  # it reads nothing until data comes
        started = threading.Timer(3.5, serve, args=("--udp", f"127.0.0.1:{port}"))  # longer than any open attempt
        started.start()
        frames, chunks = read_for(source, seconds=20, frames=5)
        started.join()
        assert source.info is not None and source.info.video is not None
    assert len(frames) == 5
    check_broadcast(frames, chunks, fps=2)


@pytest.mark.timeout(30)
def test_closing_a_listener_that_still_waits_ends_its_wait(no_leaked_threads):
    port = free_port(socket.SOCK_DGRAM)
    source = vstream.open_source(f"udp://127.0.0.1:{port}", open_timeout=None)
    got = []
    reader = threading.Thread(target=lambda: got.extend(source))
    reader.start()
    time.sleep(1.5)
    began = time.monotonic()
    source.close()
    reader.join(timeout=10)
    assert not reader.is_alive() and time.monotonic() - began < 3.0 and got == []


@pytest.mark.timeout(30)
def test_read_stdin(tmp_path):
    clip = synth.write_clip(tmp_path / "clip.ts", duration=2.0, fps=10)
    # A pipe fed from a file outruns any consumer: drop=False keeps every frame.
    reader = (
        "import vstream; from vstream import Frame, synth\n"
        "with vstream.open_source('-', fps=None, drop=False) as source:\n"
        "    for item in source:\n"
        "        if isinstance(item, Frame):\n"
        "            print(item.index, synth.read_index(item.image), round(item.t, 3))\n"
    )
    with open(clip.path, "rb") as stdin:
        out = subprocess.run([sys.executable, "-c", reader], stdin=stdin, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()]
    assert [int(index) for index, _, _ in rows] == list(range(len(clip.frame_times)))
    assert [int(bar) for _, bar, _ in rows] == list(range(len(clip.frame_times)))
    offset = float(rows[0][2])
    assert [float(t) - offset for _, _, t in rows] == pytest.approx(clip.frame_times.tolist(), abs=2e-3)


@pytest.mark.timeout(60)
def test_close_is_not_reported_as_a_loss(serve, caplog):
    port = free_port()
    serve("--port", str(port))
    with caplog.at_level(logging.WARNING, logger="vstream"):
        with http_source(port) as source:
            read_for(source, seconds=10, frames=2)
    assert [r.getMessage() for r in caplog.records if "lost" in r.getMessage()] == []


@pytest.fixture
def hls_playlist(make_clip, tmp_path):
    """A VOD HLS playlist of a bar-coded clip, served over loopback HTTP by a thread."""
    clip = make_clip("cfr.ts", duration=6.0, fps=30)
    with av.open(str(clip.path)) as source, av.open(
        str(tmp_path / "index.m3u8"), "w", format="hls",
        options={"hls_time": "2", "hls_playlist_type": "vod", "hls_segment_filename": str(tmp_path / "seg%03d.ts")},
    ) as playlist:
        streams = {s.index: playlist.add_stream_from_template(s) for s in source.streams}
        for packet in source.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream_index]
                playlist.mux(packet)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield clip, f"http://127.0.0.1:{server.server_address[1]}/index.m3u8"
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(60)
def test_read_hls_playlist(hls_playlist):
    """A VOD playlist has a length: it is read to its end like a file, without drops."""
    clip, url = hls_playlist
    assert vstream.probe(url).format == "hls"
    with vstream.open_source(url, fps=None, queue_size=2) as source:
        items = []
        for item in source:
            items.append(item)
            time.sleep(0.002)  # slower than the decoder: a file-like source waits
    frames = [i for i in items if isinstance(i, Frame)]
    assert not source.live and source.stats.dropped == 0
    assert [synth.read_index(f.image) for f in frames] == [f.index for f in frames] == list(range(180))
    assert sum(c.duration for c in items if isinstance(c, AudioChunk)) == pytest.approx(6.0, abs=0.1)
