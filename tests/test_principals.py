"""Many users, one server: named tokens (``--tokens``), streams owned by whoever opened
them, per-principal limits, and the audit line of each refusal.

An in-process server on loopback (a tiny random LLaMA, no ASR) with four principals:
alice (2 streams at most, 2 questions a minute), bob (5 frames a second), carol (a disk
quota smaller than any save) and root (admin).
"""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
import torch
from tiny_models import tiny_llama

from vstream import Frame
from vstream.auth import Principals, token_hash
from vstream.cli import main
from vstream.client import Client
from vstream.errors import ConfigError, ServerError
from vstream.models import GenerationConfig
from vstream.server import Server, ServerConfig
from vstream.session import SessionConfig

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(120)

TOKENS = {"alice": "a-token", "bob": "b-token", "carol": "c-token", "root": "r-token"}
LIMITS = {"alice": {"max_streams": 2, "questions_per_minute": 2}, "bob": {"max_fps": 5}, "carol": {"disk_gb": 1e-9},
          "root": {"admin": True}}


def frame(t: float) -> Frame:
    return Frame(np.full((64, 96, 3), int(t * 20) % 255, np.uint8), t, int(t))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("principals")
    tokens = {name: {"sha256": token_hash(token), **LIMITS[name]} for name, token in TOKENS.items()}
    (folder / "tokens.json").write_text(json.dumps(tokens))
    config = ServerConfig(bind="tcp://127.0.0.1:*", state_dir=str(folder / "state"),
                          tokens=Principals.load_tokens(folder / "tokens.json"),
                          session=SessionConfig(asr=False, generation=GenerationConfig(max_new_tokens=4)))
    server = Server(config, str(tiny_llama(folder / "llama")))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(timeout=60)


def client(server, name: str) -> Client:
    return Client(server.address, token=TOKENS[name])


def refusal(call) -> ServerError:
    with pytest.raises(ServerError) as refused:
        call()
    return refused.value


def test_a_stream_is_its_openers_and_others_learn_nothing_about_it(server, caplog):
    caplog.set_level(logging.WARNING, logger="vstream.server")
    with client(server, "alice") as alice, client(server, "bob") as bob, client(server, "root") as root:
        stream = alice.open_stream()
        assert alice.send_frame(stream, frame(0.0))
        theirs = [refusal(call) for call in (lambda: bob.send_frame(stream, frame(1.0)),
                                             lambda: bob.ask(stream, "What is shown?"),
                                             lambda: bob.stats(stream), lambda: bob.close_stream(stream))]
        missing = refusal(lambda: bob.stats("0123456789abcdef"))
        assert all(e.code == "forbidden" == missing.code for e in theirs)
        assert str(theirs[2]).replace(stream, "ID") == str(missing).replace("0123456789abcdef", "ID")
        assert [s["stream"] for s in alice.list_streams()] == [stream] and bob.list_streams() == []
        assert stream in [s["stream"] for s in root.list_streams()]  # an admin sees and reaches every stream
        assert root.stats(stream)["frames_in"] == 1
        alice.close_stream(stream)
        assert refusal(lambda: bob.open_stream(resume=stream)).code == "forbidden"  # its saved memory too
        resumed = alice.open_stream(resume=stream)
        assert resumed == stream and alice.stats(stream)["frames_in"] == 1
        root.close_stream(stream)
    audit = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert any("principal=bob" in line and "forbidden" in line for line in audit)
    assert not any(token in line for line in audit for token in TOKENS.values())
    assert len([line for line in audit if "principal=bob" in line]) <= 2  # one line per peer per 10 s


def test_each_principal_has_its_own_limits(server):
    with client(server, "alice") as alice, client(server, "bob") as bob, client(server, "carol") as carol:
        held = [alice.open_stream(), alice.open_stream()]
        assert refusal(alice.open_stream).code == "max_streams"
        other = bob.open_stream()  # alice's limit is alice's
        answers = [alice.ask(held[0], "What is shown?") for _ in range(2)]
        assert len(answers) == 2
        limited = refusal(lambda: alice.ask(held[0], "What is shown?"))
        assert limited.code == "rate" and "questions a minute" in str(limited)
        rated = 0
        for i in range(12):  # a burst over bob's 5 frames a second
            try:
                bob.send_frame(other, frame(float(i)))
            except ServerError as exc:
                assert exc.code == "rate"
                rated += 1
        assert 5 <= rated <= 7
        for stream in held:
            alice.close_stream(stream)
        bob.close_stream(other)
        carols = carol.open_stream()
        carol.close_stream(carols)  # its first save: now over its quota
        assert refusal(carol.open_stream).code == "quota"


def test_a_wrong_or_missing_token_is_refused_and_the_tokens_file_is_checked(server, tmp_path):
    with Client(server.address, token="a-guess") as stranger:
        assert refusal(stranger.list_streams).code == "auth"
    with Client(server.address) as anonymous:
        assert refusal(anonymous.health).code == "auth"
    bad = tmp_path / "tokens.json"
    for content, why in (("{not json", "cannot read it as JSON"), ('{"eve": {"sha256": "abc"}}', "64 lowercase hex"),
                         ('{"eve": {"sha256": "' + "0" * 64 + '", "admin": 1}}', "true or false"),
                         ('{"a b": {"sha256": "' + "0" * 64 + '"}}', "principal name")):
        bad.write_text(content)
        with pytest.raises(ConfigError, match=why):
            Principals.load_tokens(bad)
    assert main(["serve", "--tokens", str(bad), "--token", "x", "--bind", "tcp://127.0.0.1:*"]) == 1
