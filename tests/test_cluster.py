"""The stream server on a real Ray cluster (``ray.cluster_utils.Cluster``: a head with no
CPU and one-CPU nodes, every one on loopback), driven by the ordinary ``Client``.

One cluster and one cluster server (a tiny random LLaMA, no ASR, two streams per worker,
checkpoints every 2 s) serve the module; a single-process server on the same model gives
the answers the cluster must repeat. The tests run in file order: the last one kills a
node.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import ray
import torch
from helpers import wait_processed
from ray.cluster_utils import Cluster
from server_process import ServerProcess
from tiny_models import tiny_llama

from vstream import Frame
from vstream.cli import main
from vstream.client import Client
from vstream.cluster import ClusterConfig
from vstream.errors import ServerError
from vstream.models import GenerationConfig
from vstream.server import Server, ServerConfig
from vstream.session import SessionConfig

torch.set_num_threads(1)  # as each worker (one CPU, one thread): the same answers to the bit
pytestmark = pytest.mark.timeout(240)

QUESTION = "What was on the screen?"
LOOPBACK = "127.0.0.1"


def frames(n: int, offset: int = 0) -> list[Frame]:
    """``n`` frames at 1 fps from ``offset`` s: scenes of 4 frames, each its own colour."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
    return [Frame(np.full((64, 96, 3), colours[((offset + i) // 4) % len(colours)], np.uint8), float(offset + i),
                  offset + i) for i in range(n)]


def session_config() -> SessionConfig:
    return SessionConfig(asr=False, generation=GenerationConfig(max_new_tokens=8))


def running(server: Server):
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return thread


def send(client: Client, stream: str, items: list[Frame]) -> None:
    for frame in items:
        assert client.send_frame(stream, frame, lossless=True)


@pytest.fixture(scope="module")
def cluster():
    # every address on loopback: conftest.py sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray loads
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": LOOPBACK})
    for _ in range(2):
        cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(tiny_llama(tmp_path_factory.mktemp("cluster-model") / "llama"))


@pytest.fixture(scope="module")
def server(cluster, model, tmp_path_factory):
    config = ServerConfig(bind="tcp://127.0.0.1:*", state_dir=str(tmp_path_factory.mktemp("cluster-state")),
                          session=session_config(),
                          cluster=ClusterConfig(address=cluster.address, streams_per_worker=2, checkpoint_every=2.0,
                                                dead_after=5.0))
    server = Server(config, model)
    thread = running(server)
    yield server
    server.stop()
    thread.join(timeout=120)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def local_answer(model, tmp_path_factory):
    """The single-process server's answer to ``QUESTION`` after 12 frames."""
    config = ServerConfig(bind="tcp://127.0.0.1:*", state_dir=str(tmp_path_factory.mktemp("local-state")),
                          session=session_config())
    server = Server(config, model)
    thread = running(server)
    try:
        with Client(server.address) as client:
            stream = client.open_stream()
            send(client, stream, frames(12))
            wait_processed(client, stream, 12, timeout=60)
            return client.ask(stream, QUESTION)
    finally:
        server.stop()
        thread.join(timeout=60)


def test_vstream_serve_cluster_local_streams_answers_and_saves_on_sigterm(model, tmp_path):
    """The CLI end to end: ``vstream serve --cluster local`` starts Ray in its own process."""
    server = ServerProcess(tmp_path, "--model", model, "--no-asr", "--max-new-tokens", "8", "--cluster", "local",
                           "--checkpoint-every", "60")
    try:
        address = server.wait_ready(timeout=120)
        with Client(address) as client:
            stream = client.open_stream()
            send(client, stream, frames(6))
            wait_processed(client, stream, 6, timeout=60)
            assert client.ask(stream, QUESTION)["answer"]
            workers = client.stats()["workers"]
            assert [w["node"] for w in workers] == [client.stats(stream)["node"]]
        assert server.stop(timeout=60) == 0  # SIGTERM: the stream is saved before Ray stops
        assert (server.state_dir / stream / "session.json").is_file()
        assert "on 1 Ray worker(s)" in server.log()
    finally:
        server.kill()


def test_streams_spread_over_the_nodes_and_answer_as_one_process_does(server, local_answer):
    with Client(server.address) as client:
        streams = [client.open_stream() for _ in range(2)]
        for stream in streams:
            send(client, stream, frames(12))
        nodes = {wait_processed(client, stream, 12, timeout=60)["node"] for stream in streams}
        assert len(nodes) == 2  # one stream on each worker
        for stream in streams:
            answer = client.ask(stream, QUESTION)
            assert answer["answer"] == local_answer["answer"]
            assert answer["evidence"] == local_answer["evidence"]
        tokens: list[str] = []
        streamed = client.ask(streams[0], QUESTION, on_token=tokens.append)
        assert "".join(tokens) == streamed["answer"] == local_answer["answer"]
        stats = client.stats()
        assert sorted(worker["node"] for worker in stats["workers"]) == sorted(nodes)
        assert all(worker["streams"] == 1 for worker in stats["workers"])
        for stream in streams:
            client.close_stream(stream)


def test_a_full_cluster_refuses_new_streams_and_takes_them_once_there_is_room(server):
    with Client(server.address) as client:
        streams = [client.open_stream() for _ in range(4)]  # two workers, two streams each
        with pytest.raises(ServerError) as refused:
            client.open_stream()
        assert refused.value.code == "max_streams" and "every worker" in str(refused.value)
        client.close_stream(streams.pop())
        streams.append(client.open_stream())
        assert len(client.list_streams()) == 4
        for stream in streams:
            client.close_stream(stream)


def test_bad_requests_get_the_single_process_errors(server):
    with Client(server.address) as client:
        damaged = server.state_dir / "damaged"
        damaged.mkdir(parents=True)
        (damaged / "session.json").write_text("{not json")
        with pytest.raises(ServerError) as refused:
            client.open_stream(resume="damaged")
        assert refused.value.code == "invalid" and "damaged" in str(refused.value)
        assert "Traceback" not in str(refused.value)  # the worker's error, not Ray's wrapping of it
        stream = client.open_stream()
        send(client, stream, frames(3, offset=5))
        with pytest.raises(ServerError) as back:
            client.send_frame(stream, frames(1)[0])  # t=0 after t=7
        assert back.value.code == "invalid" and "earlier than the previous frame" in str(back.value)
        with pytest.raises(ServerError) as window:
            client.ask(stream, QUESTION, start=5.0, end=1.0)
        assert window.value.code == "invalid"
        assert len(client.list_streams()) == 1  # the refused resume left nothing open
        client.close_stream(stream)


def test_drain_moves_a_nodes_streams_with_nothing_lost(server, capsys):
    with Client(server.address) as client:
        stream = client.open_stream()
        send(client, stream, frames(12))
        before = wait_processed(client, stream, 12, timeout=60)
        answer = client.ask(stream, QUESTION)
        assert main(["cluster", "drain", before["node"][:12], "--server", server.address]) == 0
        assert "1 stream(s) moved" in capsys.readouterr().out
        after = client.stats(stream)
        assert after["node"] != before["node"]
        assert (after["moved"], after["frames_lost"], after["frames_processed"]) == (1, 0, 12)
        again = client.ask(stream, QUESTION)  # the same memory on the new worker: the same answer
        assert (again["answer"], again["evidence"]) == (answer["answer"], answer["evidence"])
        send(client, stream, frames(4, offset=12))  # the stream goes on there
        assert wait_processed(client, stream, 16, timeout=60)["frames_in"] == 16
        assert main(["cluster", "workers", "--server", server.address]) == 0
        listed = capsys.readouterr().out
        assert before["node"] not in listed and after["node"] in listed  # the drained node's worker stopped
        with pytest.raises(ServerError) as unknown:
            client.drain("no-such-node")
        assert unknown.value.code == "invalid"
        client.close_stream(stream)


def test_a_killed_nodes_streams_answer_again_elsewhere_with_the_loss_counted(server, cluster):
    cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)  # the drained node's worker is gone: one more
    with Client(server.address) as client:
        deadline = time.monotonic() + 120
        while len(client.stats()["workers"]) < 2:
            assert time.monotonic() < deadline, "no worker started on the new node"
            time.sleep(0.2)
        stream = client.open_stream()
        send(client, stream, frames(12))
        before = wait_processed(client, stream, 12, timeout=60)
        time.sleep(4.5)  # two checkpoints: the 12 frames are saved
        send(client, stream, frames(6, offset=12))  # some of these may be lost with the node
        victim = next(node for node in cluster.worker_nodes if node.node_id == before["node"])
        killed = time.monotonic()
        cluster.remove_node(victim)
        send(client, stream, frames(6, offset=18))  # pushed while the stream moves: they wait, none is lost
        answer = client.ask(stream, QUESTION)
        assert time.monotonic() - killed < 30.0
        assert answer["answer"]
        deadline = time.monotonic() + 60
        while (after := client.stats(stream))["frames_processed"] + after["frames_lost"] < 24:
            assert time.monotonic() < deadline, after
            time.sleep(0.1)
        assert after["node"] != before["node"] and after["moved"] == 1
        # every frame pushed is in the memory or counted lost; only frames after the last checkpoint are lost
        assert after["frames_processed"] + after["frames_lost"] == 24
        assert after["frames_lost"] <= 6 and after["frames_processed"] >= 18
        assert after["last_t"] == 23.0
        workers = client.stats()["workers"]
        assert [w["node"] for w in workers] == [after["node"]]
        client.close_stream(stream)
