"""The stream server end to end: real ``vstream serve`` processes on loopback (a tiny
random LLaMA, no ASR), driven by ``vstream.client.Client`` and by raw DEALER sockets
for the messages a client library would never send.

Servers: ``main`` (token, small limits, 2 s idle timeout, file sources allowed),
``tight`` (no token, a 2-frame session queue and a 1-question work queue, for
backpressure), ``curve`` (CURVE keys); the restart test runs two of its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import zmq
from helpers import wait_processed
from server_process import ServerProcess
from tiny_models import tiny_llama

from vstream import AudioChunk, Frame
from vstream.cli import main
from vstream.client import Client
from vstream.errors import ProtocolError, ServerBusy, ServerError, ServerTimeout
from vstream.models import GenerationConfig
from vstream.protocol import VERSION, Limits, decode, encode, encode_frame
from vstream.session import Session, SessionConfig
from vstream.types import evidence_lines

torch.set_num_threads(1)  # as the servers (--threads 1): the same answers to the bit
pytestmark = pytest.mark.timeout(60)

TOKEN = "secret"
MAX_TOKENS = "6"
MAIN = ("--token", TOKEN, "--max-streams", "4", "--max-fps", "20", "--max-audio-speed", "4", "--idle-timeout", "2", "--max-header-bytes",
        "4096", "--max-frame-bytes", "200000", "--queue-size", "8", "--sources", "file")
TIGHT = ("--max-fps", "100000", "--queue-frames", "2", "--batch-frames", "1", "--queue-size", "1",
         "--max-frame-bytes", "1000000", "--max-new-tokens", "400")  # long answers: the queue stays full


def frames(n: int, offset: float = 0.0, size: tuple[int, int] = (64, 96)) -> list[Frame]:
    """``n`` frames at 1 fps from ``offset`` s: scenes of 4 frames, each its own colour."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
    return [Frame(np.full((*size, 3), colours[(i // 4) % len(colours)], np.uint8), offset + i, i) for i in range(n)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(tiny_llama(tmp_path_factory.mktemp("server-model") / "llama"))


@pytest.fixture(scope="module")
def curve_keys(tmp_path_factory):
    import zmq.auth

    folder = tmp_path_factory.mktemp("curve")
    for name in ("server", "allowed", "partner", "stranger"):
        zmq.auth.create_certificates(folder, name)
    (folder / "clients").mkdir()
    for name in ("allowed", "partner"):
        os.replace(folder / f"{name}.key", folder / "clients" / f"{name}.key")
    return folder


@pytest.fixture(scope="module")
def servers(model, curve_keys, tmp_path_factory):
    """The three module servers, started at once (each loads torch and the model)."""
    root = tmp_path_factory.mktemp("servers")
    common = ("--model", model, "--no-asr", "--max-new-tokens", MAX_TOKENS)
    started = {"main": ServerProcess(root / "main", *common, *MAIN),
               "tight": ServerProcess(root / "tight", *common, *TIGHT)}
    if zmq.has("curve"):
        started["curve"] = ServerProcess(root / "curve", *common, "--curve-secret", str(curve_keys / "server.key_secret"),
                                         "--curve-clients", str(curve_keys / "clients"))
    try:
        for server in started.values():
            server.wait_ready()
        yield started
        for server in started.values():
            server.signal()
        for server in started.values():  # each saves its streams and exits cleanly, no traceback logged
            assert server.wait(timeout=20) == 0 and "Traceback" not in server.log(), server.log()
    finally:
        for server in started.values():
            server.kill()


@pytest.fixture
def main_server(servers):
    return servers["main"]


@pytest.fixture
def client(main_server):
    with Client(main_server.address, token=TOKEN, timeout=10) as c:
        yield c


def raw_socket(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    return sock


def replies(sock: zmq.Socket, n: int, timeout: float = 10.0) -> list:
    """The next ``n`` replies on a raw socket, decoded."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert sock.poll(max(1, int(1000 * (deadline - time.monotonic())))), f"{len(got)} of {n} replies came"
        got.append(decode(sock.recv_multipart(), Limits(), reply=True))
    return got


def sent_stream(client: Client, sent: list[Frame]) -> str:
    """A new stream on the server holding every frame of ``sent``, processed."""
    stream = client.open_stream()
    for frame in sent:
        assert client.send_frame(stream, frame)
    wait_processed(client, stream, len(sent))
    return stream


@contextmanager
def session_holding(model: str, sent: list[Frame]):
    """An in-process session with the servers' settings, holding every frame of ``sent``."""
    config = SessionConfig(asr=False, generation=GenerationConfig(max_new_tokens=int(MAX_TOKENS)))
    with Session(model, config) as session:
        for frame in sent:
            session.push_frame(frame, wait=True)
        assert session.wait(20)
        yield session


def same_answer(remote: dict, local) -> None:
    assert remote["answer"] == local.text
    assert remote["evidence"] == [{"start": e.start, "end": e.end, "kind": e.kind, "score": e.score}
                                  for e in local.evidence]


# -- the wire format ----------------------------------------------------------------------


def test_protocol_round_trip_without_pickle():
    frame = frames(3)[2]
    parts = [b"", *encode_frame("s1", frame, 5, token="k")]
    message = decode(parts, token="k")
    assert message.kind == "frame" and message.id == 5 and message.get("shape") == [64, 96, 3]
    again = message.frame(index=0)
    assert np.array_equal(again.image, frame.image) and (again.t, again.index) == (2.0, 2)
    chunk = AudioChunk(np.linspace(-1, 1, 800, dtype=np.float32), 1.5, 1.55)
    audio = decode([b"", *encode("audio", 6, chunk.samples, stream="s1", start=1.5)]).audio()
    assert np.array_equal(audio.samples, chunk.samples) and audio.end == pytest.approx(1.55)
    reply = decode([b"", *encode("busy", None, reason="queue")], reply=True)
    assert reply.kind == "busy" and reply.id is None
    with pytest.raises(ProtocolError, match="field 'question' is missing"):
        encode("ask", 1, stream="s1")
    with pytest.raises(ProtocolError, match="over the limit of 100") as big:
        decode(parts, Limits(max_payload_bytes=100), token="k")
    assert big.value.code == "too_large" and big.value.request_id == 5
    with pytest.raises(ProtocolError, match="wrong token"):
        decode(parts, token="other")


# -- serving ------------------------------------------------------------------------------


def test_health_list_and_stats(client):
    health = client.health()
    assert health["status"] == "ok" and health["protocol"] == VERSION and health["model"].endswith("llama")
    stream = client.open_stream()
    assert client.send_frame(stream, frames(1)[0])
    assert client.send_audio(stream, AudioChunk(np.zeros(1600, np.float32), 0.0, 0.1))  # taken, unheard: no ASR
    assert stream in [s["stream"] for s in client.list_streams()]
    stats = wait_processed(client, stream, 1)
    assert stats["frames_in"] == 1 and stats["rate_dropped"] == 0 and stats["source"] is None
    assert client.stats()["streams"] >= 1
    saved = client.close_stream(stream)
    assert os.path.isfile(os.path.join(saved, "session.json"))
    assert stream not in [s["stream"] for s in client.list_streams()]


def test_concurrent_streams_with_questions_in_flight(main_server):
    """Three clients stream at once; each asks mid-stream (tokens streamed) and at the
    end; every answer draws on its own stream only (stream k's clock starts at 100 k)."""

    def run(k: int) -> tuple:
        with Client(main_server.address, token=TOKEN, timeout=20) as c:
            stream = c.open_stream()
            pieces = []
            for i, frame in enumerate(frames(12, offset=100.0 * k)):
                assert c.send_frame(stream, frame)
                if i == 5:
                    mid = c.ask(stream, "what is on screen?", on_token=pieces.append)
                    assert "".join(pieces).strip() == mid["answer"]
            wait_processed(c, stream, 12)
            final = c.ask(stream, "what happened?", last=6)
            stats = c.stats(stream)
            c.close_stream(stream)
            return mid, final, stats

    with ThreadPoolExecutor(3) as pool:  # a failure in a thread is raised here
        results = list(pool.map(run, range(3)))
    for k, (mid, final, stats) in enumerate(results):
        assert stats["frames_processed"] == 12 and stats["questions"] == 2 and stats["frames_dropped"] == 0
        assert final["evidence"]  # mid-stream, the memory may still be empty: a question never waits for frames
        for answer in (mid, final):
            assert all(100 * k <= e["start"] <= e["end"] <= 100 * k + 11 for e in answer["evidence"])
        assert all(e["end"] >= 100 * k + 5 for e in final["evidence"])  # the last 6 s: from 105 s on


def test_server_answers_as_the_in_process_session(client, model):
    sent = frames(16)
    stream = sent_stream(client, sent)
    remote = [client.ask(stream, q) for q in ("what happens?", "what colour is it?")]
    window = client.ask(stream, "what happens?", start=4, end=9)
    client.close_stream(stream)
    with session_holding(model, sent) as session:
        same_answer(remote[0], session.ask("what happens?"))
        same_answer(remote[1], session.ask("what colour is it?"))
        same_answer(window, session.ask("what happens?", start=4, end=9))


def test_evidence_past_an_hour_prints_alike_from_the_server_and_the_session(client, main_server, model, capsys):
    """A stream whose clock crosses an hour: ``vstream ask --server`` and an in-process
    session's answer print the same lines, every time as ``h:mm:ss``."""
    sent = frames(10, offset=3595.0)  # 0:59:55 to 1:00:04
    stream = sent_stream(client, sent)
    assert main(["ask", "what happens?", "--stream", stream, "--server", main_server.address, "--token", TOKEN]) == 0
    remote = capsys.readouterr().out.splitlines()[1:]
    client.close_stream(stream)
    with session_holding(model, sent) as session:
        local = [f"  {line}" for line in evidence_lines(session.ask("what happens?").to_dict()["evidence"][:5])]
    assert remote == local and remote
    assert all(re.fullmatch(r"  \d:\d\d:\d\d-\d:\d\d:\d\d  frame +\d\.\d\d", line) for line in remote), remote
    assert any(line.startswith("  0:59:") for line in remote)  # under an hour, yet in the answer's h:mm:ss


def test_the_server_reads_a_source_itself(client, make_clip):
    clip = make_clip("server-source.mp4", duration=6.0, fps=4, size=(96, 64), audio=False)
    stream = client.open_stream(source=str(clip.path))
    stats = wait_processed(client, stream, 6)
    assert stats["source"] == str(clip.path) and stats["source_error"] is None
    assert client.ask(stream, "what happens?")["evidence"]
    client.close_stream(stream)
    with pytest.raises(ServerError) as refused:
        client.open_stream(source="/dev/video0")
    assert refused.value.code == "forbidden" and "camera" in str(refused.value)
    with pytest.raises(ServerError) as missing:
        client.open_stream(source="/no/such/clip.mp4")
    assert missing.value.code == "source" and "no such file" in str(missing.value)
    assert all(s["source"] != "/no/such/clip.mp4" for s in client.list_streams())  # it never was


def test_cli_stream_then_ask(main_server, model, make_clip, capsys):
    clip = make_clip("server-cli.mp4", duration=5.0, fps=4, size=(96, 64), audio=False)
    flags = ["--server", main_server.address, "--token", TOKEN]
    assert main(["stream", str(clip.path), *flags, "--quiet"]) == 0
    stream = capsys.readouterr().out.split()[1]
    with Client(main_server.address, token=TOKEN) as c:
        wait_processed(c, stream, 5)
        assert main(["ask", "what happens?", "--stream", stream, "--json", *flags]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert set(answer) == {"answer", "evidence", "timings"} and answer["evidence"]
        assert main(["ask", "what happens?", "--stream", stream, *flags]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[1:] == [f"  {line}" for line in evidence_lines(answer["evidence"][:5])]
        assert re.fullmatch(r"  \d+:\d\d-\d+:\d\d  (frame|transcript|screen) +\d\.\d\d", lines[1]), lines
        c.close_stream(stream)
    local = ["ask", str(clip.path), "what happens?", "--model", model, "--no-asr", "--max-new-tokens", MAX_TOKENS]
    assert main([*local, "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == lines  # `vstream ask VIDEO`: the same answer, the same lines
    assert main(["ask", "what happens?", "--stream", stream, *flags]) == 1
    assert f"no open stream '{stream}'" in capsys.readouterr().err


# -- bad input ----------------------------------------------------------------------------


def header(kind: str, **fields) -> bytes:
    return json.dumps({"v": VERSION, "kind": kind, "id": 7, "token": TOKEN, **fields}).encode()


FRAME = {"stream": "STREAM", "t": 0.0, "dtype": "uint8", "shape": [64, 96, 3]}
PIXELS = bytes(64 * 96 * 3)
MALFORMED = {
    "bad JSON": ([b"", b'{"v": "vstream/1", "kind": '], "bad_message", None),
    "JSON array": ([b"", b"[1, 2]"], "bad_message", None),
    "no delimiter": ([header("health")], "bad_message", None),
    "delimiter only": ([b""], "bad_message", None),
    "frame without payload": ([b"", header("frame", **FRAME)], "bad_message", 7),
    "two payloads": ([b"", header("frame", **FRAME), PIXELS, PIXELS], "bad_message", 7),
    "payload on a question": ([b"", header("ask", stream="STREAM", question="what?"), b"x"], "bad_message", 7),
    "shape lies": ([b"", header("frame", **{**FRAME, "shape": [64, 96, 4]}), PIXELS], "bad_message", 7),
    "shape lies by a byte": ([b"", header("frame", **FRAME), PIXELS[1:]], "bad_message", 7),
    "float64 frame": ([b"", header("frame", **{**FRAME, "dtype": "float64"}), PIXELS], "bad_message", 7),
    "NaN time": ([b"", header("frame", **{**FRAME, "t": float("nan")}), PIXELS], "bad_message", None),
    "string time": ([b"", header("frame", **{**FRAME, "t": "0"}), PIXELS], "bad_message", 7),
    "huge header": ([b"", header("health", pad="x" * 5000)], "too_large", None),
    "huge frame": ([b"", header("frame", **{**FRAME, "shape": [300, 300, 3]}), bytes(270000)], "too_large", 7),
    "unknown stream": ([b"", header("frame", **{**FRAME, "stream": "nope"}), PIXELS], "unknown_stream", 7),
    "wrong token": ([b"", header("health", token="guess")], "auth", 7),
    "no token": ([b"", json.dumps({"v": VERSION, "kind": "health", "id": 7}).encode()], "auth", 7),
    "unknown kind": ([b"", header("reboot")], "unknown_kind", 7),
    "unknown field": ([b"", header("health", reboot=True)], "bad_message", 7),
    "old version": ([b"", header("health", v="vstream/0")], "version", 7),
    "empty question": ([b"", header("ask", stream="STREAM", question="  ")], "invalid", 7),
    "frame back in time": ([b"", header("frame", **{**FRAME, "t": -1.0}), PIXELS], "invalid", 7),
    "audio of two channels": ([b"", header("audio", stream="STREAM", start=0.0, dtype="float32", shape=[2, 4]),
                               bytes(32)], "bad_message", 7),
    "bad window": ([b"", header("ask", stream="STREAM", question="what?", start=9, end=2)], "invalid", 7),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_message_gets_an_error_and_the_server_serves_on(case, client, main_server):
    parts, code, request_id = MALFORMED[case]
    other = client.open_stream()  # a stream that must keep working
    target = client.open_stream()
    assert client.send_frame(target, frames(1)[0])  # at 0 s
    parts = [p.replace(b"STREAM", target.encode()) for p in parts]
    sock = raw_socket(main_server.address)
    try:
        sock.send_multipart(parts)
        [reply] = replies(sock, 1)
    finally:
        sock.close()
    assert reply.kind == "error" and reply.get("code") == code, reply.header
    assert reply.id == request_id and reply.get("message")
    client.close_stream(target)  # still open (closed now: the server's idle timeout is 2 s)
    assert client.send_frame(other, frames(1)[0])
    wait_processed(client, other, 1)
    assert client.ask(other, "still there?")["evidence"]
    client.close_stream(other)


def test_wrong_token_is_refused_and_logged(main_server):
    with Client(main_server.address, token="guess") as c, pytest.raises(ServerError) as refused:
        c.open_stream()
    assert refused.value.code == "auth"
    assert 'refused principal=- peer=127.0.0.1 identity=' in main_server.log()
    assert 'reason="auth: wrong token"' in main_server.log() and "guess" not in main_server.log()


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq was built without CURVE")
def test_curve_lets_in_only_known_keys(servers, curve_keys):
    import zmq.auth

    server = servers["curve"]
    server_public, _ = zmq.auth.load_certificate(curve_keys / "server.key")

    def keys(name: str) -> tuple[str, str, str]:
        public, secret = zmq.auth.load_certificate(curve_keys / f"{name}.key_secret")
        return server_public.decode(), public.decode(), secret.decode()

    with Client(server.address, curve=keys("allowed")) as c, Client(server.address, curve=keys("partner")) as other:
        stream = c.open_stream()
        assert c.send_frame(stream, frames(1)[0])
        # each key is its own principal: another allowed key cannot reach the stream, nor see it
        with pytest.raises(ServerError) as forbidden:
            other.send_frame(stream, frames(2)[1])
        assert forbidden.value.code == "forbidden" and other.list_streams() == []
        assert [s["stream"] for s in c.list_streams()] == [stream]
        c.close_stream(stream)
    for curve in (keys("stranger"), None):
        with Client(server.address, curve=curve, timeout=1.0) as c, pytest.raises(ServerTimeout):
            c.health()
    assert "is not allowed" in server.log()


# -- limits and backpressure --------------------------------------------------------------


def test_rate_limit_drops_and_counts(client):
    stream = client.open_stream()
    accepted, refused = 0, []
    for frame in frames(40):
        try:
            accepted += client.send_frame(stream, frame)
        except ServerError as exc:
            refused.append(exc)
    assert refused and all(e.code == "rate" and 0 < e.retry_after <= 0.05 for e in refused)
    assert 20 <= accepted < 40 and accepted + len(refused) == 40
    stats = wait_processed(client, stream, accepted)
    assert stats["rate_dropped"] == len(refused) and stats["frames_in"] == accepted
    time.sleep(refused[-1].retry_after)
    assert client.send_frame(stream, frames(41)[-1])  # the bucket refills
    client.close_stream(stream)


def test_a_time_far_ahead_or_negative_is_refused_and_changes_nothing(client):
    """One frame at t=1e308 would have made every later frame "earlier than the previous"."""
    stream = client.open_stream()
    assert client.send_frame(stream, Frame(np.zeros((64, 96, 3), np.uint8), 5.0, 0))
    for t, why in ((1e308, "jumps"), (5.0 + 3601, "jumps"), (-1.0, "negative")):
        with pytest.raises(ServerError) as refused:
            client.send_frame(stream, Frame(np.zeros((64, 96, 3), np.uint8), t, 1))
        assert refused.value.code == "invalid" and why in str(refused.value)
    with pytest.raises(ServerError, match="jumps"):
        client.send_audio(stream, AudioChunk(np.zeros(1600, np.float32), 1e9, 1e9 + 0.1))
    assert client.send_frame(stream, Frame(np.zeros((64, 96, 3), np.uint8), 6.0, 1))  # the owner's frames go on
    stats = wait_processed(client, stream, 2)
    assert (stats["frames_in"], stats["last_t"], stats["rate_dropped"]) == (2, 6.0, 0)
    client.close_stream(stream)


def test_audio_rate_limit(client):
    """4 s of audio per second: a flood of 1-second chunks is cut to about that."""
    stream = client.open_stream()
    accepted, refused = 0, []
    for i in range(12):
        try:
            accepted += client.send_audio(stream, AudioChunk(np.zeros(16000, np.float32), float(i), i + 1.0))
        except ServerError as exc:
            refused.append(exc)
    assert refused and all(e.code == "rate" and 0 < e.retry_after <= 0.25 for e in refused)
    assert 4 <= accepted < 12 and accepted + len(refused) == 12
    assert client.stats(stream)["rate_dropped"] == len(refused)
    time.sleep(refused[-1].retry_after)
    assert client.send_audio(stream, AudioChunk(np.zeros(16000, np.float32), 12.0, 13.0))  # the bucket refills
    client.close_stream(stream)


def test_max_streams(client):
    opened = []
    with pytest.raises(ServerError) as full:
        for _ in range(5):
            opened.append(client.open_stream())
    assert full.value.code == "max_streams" and len(opened) == 4
    client.close_stream(opened.pop())
    opened.append(client.open_stream())
    for stream in opened:
        client.close_stream(stream)


def test_backpressure_busy_replies_and_counted_drops(servers):
    """A flood of frames into a 2-frame session queue: the server answers busy for each
    frame the session had to drop; a burst of questions at a 1-question work queue."""
    address = servers["tight"].address
    with Client(address) as c:
        stream = c.open_stream()
        sock = raw_socket(address)
        try:
            flood = frames(100, size=(240, 320))
            for i, frame in enumerate(flood):
                sock.send_multipart([b"", *encode_frame(stream, frame, i)])
            kinds = [r.kind for r in replies(sock, len(flood))]
            for i in range(6):
                sock.send_multipart([b"", *encode("ask", 1000 + i, stream=stream, question="what happens?")])
            asked = replies(sock, 6, timeout=30)
        finally:
            sock.close()
        busy = kinds.count("busy")
        assert busy > 0 and kinds.count("ok") + busy == len(flood)
        stats = c.stats(stream)
        assert stats["frames_dropped"] == busy == stats["busy"] and stats["frames_in"] == len(flood)
        assert {r.kind for r in asked} == {"answer", "busy"}
        assert all(r.get("reason") == "queue" for r in asked if r.kind == "busy")
        sock = raw_socket(address)  # the client library says busy too
        try:
            sock.send_multipart([b"", *encode("ask", 2000, stream=stream, question="what happens?", tokens=True)])
            assert replies(sock, 1)[0].kind == "token"  # the worker is generating (400 tokens, ~0.3 s) ...
            sock.send_multipart([b"", *encode("ask", 2001, stream=stream, question="what happens?")])
            deadline = time.monotonic() + 5
            while c.stats()["queue"] < 1:  # ... and one question waits: the queue is full
                assert time.monotonic() < deadline
            with pytest.raises(ServerBusy):
                c.ask(stream, "and now?")
            done = []
            while len(done) < 2:
                done += [r.id for r in replies(sock, 1, timeout=30) if r.kind == "answer"]
            assert done == [2000, 2001]
        finally:
            sock.close()
        c.close_stream(stream)


def test_lossless_sending_loses_nothing(servers):
    """The same flood sent lossless: the full stream refuses frames instead of dropping
    them, the client sends each again, and every frame reaches the memory once, in order."""
    with Client(servers["tight"].address) as c:
        stream = c.open_stream()
        flood = frames(60, size=(240, 320))
        counts = c.send_source(stream, flood)
        assert counts["frames"] == len(flood) and counts["busy"] > 0  # the queue did fill up
        stats = wait_processed(c, stream, len(flood))
        assert stats["frames_dropped"] == 0 and stats["frames_in"] == stats["frames_processed"] == len(flood)
        with pytest.raises(ServerError, match="earlier than"):  # refused frames did not move the clock
            c.send_frame(stream, flood[0], lossless=True)
        c.close_stream(stream)


# -- lifetime ----------------------------------------------------------------------------


def test_a_client_that_disappears_is_saved_and_closed_when_idle(client, main_server):
    other = client.open_stream()
    with Client(main_server.address, token=TOKEN) as gone:
        stream = gone.open_stream()
        for frame in frames(4):
            assert gone.send_frame(stream, frame)
        wait_processed(gone, stream, 4)
    # the socket is closed, the stream left open; the other stream keeps talking
    deadline = time.monotonic() + 10
    while stream in [s["stream"] for s in client.list_streams()]:
        assert time.monotonic() < deadline, "the idle stream was never closed"
        assert client.send_frame(other, frames(1)[0])
        time.sleep(0.2)
    while client.stats()["closing"]:  # saved on a closer thread
        assert time.monotonic() < deadline, "the idle stream was never saved"
        time.sleep(0.05)
    assert (main_server.state_dir / stream / "session.json").is_file()
    assert f"closing stream {stream}: idle" in main_server.log()
    resumed = client.open_stream(resume=stream)
    assert resumed == stream and client.stats(stream)["frames_processed"] == 4
    with pytest.raises(ServerError) as twice:
        client.open_stream(resume=stream)
    assert twice.value.code == "exists"
    with pytest.raises(ServerError) as missing:
        client.open_stream(resume="never-saved")
    assert missing.value.code == "not_found"
    for s in (stream, other):
        client.close_stream(s)


@pytest.mark.timeout(90)
def test_sigterm_saves_every_stream_and_a_new_server_resumes(model, tmp_path):
    """The second server starts while the first runs (to save time): it is a fresh
    process that knows the stream only from what the first saved on SIGTERM."""
    flags = ("--model", model, "--no-asr", "--max-new-tokens", MAX_TOKENS)
    first = ServerProcess(tmp_path / "first", *flags, state_dir=tmp_path / "state")
    second = ServerProcess(tmp_path / "second", *flags, state_dir=tmp_path / "state")
    try:
        with Client(first.wait_ready()) as c:
            stream = c.open_stream()
            for frame in frames(10):
                assert c.send_frame(stream, frame)
            before = wait_processed(c, stream, 10)
            answer = c.ask(stream, "what happens?")
        assert first.stop() == 0
        assert "SIGTERM: saving the streams" in first.log() and "saved 1 stream(s)" in first.log()
        with Client(second.wait_ready()) as c:
            assert c.open_stream(resume=stream) == stream
            after = c.stats(stream)
            assert after["frames_processed"] == before["frames_processed"] == 10
            assert after["memory_tokens"] == before["memory_tokens"] and after["last_t"] == 9.0
            again = c.ask(stream, "what happens?")
            assert again["answer"] == answer["answer"] and again["evidence"] == answer["evidence"]
        assert second.stop(signal.SIGINT) == 0  # SIGINT saves too
        assert "SIGINT: saving the streams" in second.log()
        assert "Traceback" not in first.log() + second.log()
    finally:
        first.kill()
        second.kill()


def test_streams_share_one_frame_encoder_and_its_forwards(model, tmp_path):
    """A vision tower is loaded once per server, not once per stream, and frames that
    several streams write at about the same time go through it in one forward."""
    import threading

    from vstream.server import Server, ServerConfig

    config = ServerConfig(bind="tcp://127.0.0.1:*", state_dir=str(tmp_path), encoder_wait_ms=300.0,
                          session=SessionConfig(asr=False, encoder="pixels", ocr=False))
    server = Server(config, model)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with Client(server.address, timeout=10) as c:
            first, second = c.open_stream(), c.open_stream()
            sessions = [server.streams[first].session, server.streams[second].session]
            assert sessions[0].encoder is sessions[1].encoder is server.encoder
            streams = [first, second, c.open_stream(), c.open_stream()]
            for frame in frames(3):  # one frame to each stream, three times over
                for stream in streams:
                    assert c.send_frame(stream, frame)
            for stream in streams:
                wait_processed(c, stream, 3)
            stats = c.stats()
            assert stats["encoder_frames"] == 12
            assert stats["encoder_forwards"] < 12, "every stream's frame had a forward of its own"
            for stream in streams[2:]:
                c.close_stream(stream)
            c.close_stream(first)
            resumed = c.open_stream(resume=first)
            assert server.streams[resumed].session.encoder is server.encoder
    finally:
        server.stop()
        thread.join(10)
        server.close()


def test_closing_a_stream_does_not_hold_up_the_others(model, tmp_path, monkeypatch):
    """A close writes the stream's backlog and saves it (seconds, for a long stream) on a
    thread of its own: meanwhile every other stream's frames are answered at once."""
    import threading as threads

    from vstream.server import Server, ServerConfig

    saving = threads.Event()
    original = Session.save

    def slow_save(self, folder):
        saving.set()
        time.sleep(2.0)
        original(self, folder)

    monkeypatch.setattr(Session, "save", slow_save)
    server = Server(ServerConfig(bind="tcp://127.0.0.1:*", state_dir=str(tmp_path / "state"),
                                 session=SessionConfig(asr=False, generation=GenerationConfig(max_new_tokens=4))), model)
    loop = threads.Thread(target=server.run, daemon=True)
    loop.start()
    try:
        with Client(server.address) as closer, Client(server.address) as other:
            slow, busy = closer.open_stream(), other.open_stream()
            assert closer.send_frame(slow, frames(1)[0])
            closing = threads.Thread(target=closer.close_stream, args=(slow,))
            closing.start()
            assert saving.wait(10)
            began = time.monotonic()
            for frame in frames(5):
                assert other.send_frame(busy, frame)
            assert time.monotonic() - began < 1.0  # not behind the 2-second save
            assert other.stats()["closing"] == 1
            closing.join(timeout=30)
            assert not closing.is_alive() and (tmp_path / "state" / slow / "session.json").is_file()
            assert other.stats()["closing"] == 0
            with pytest.raises(ServerError, match="no open stream"):
                other.stats(slow)
    finally:
        server.stop()
        loop.join(timeout=60)
