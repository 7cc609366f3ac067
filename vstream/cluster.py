"""The stream server on a Ray cluster: the ZeroMQ front places streams on worker actors.

``vstream serve --cluster ADDRESS`` runs the same ``Server`` loop, protocol and limits
as a single process; only where a stream's session lives changes (``ClusterHost``
instead of the in-process ``LocalHost``):

- One ``StreamWorker`` actor per node (``worker_cpus`` / ``worker_gpus`` of Ray's
  resources, pinned to its node) loads the model, the frame encoder and the OCR once
  and hosts up to ``streams_per_worker`` sessions. A node that joins later gets a
  worker at the next health check. The session does not know it runs in a worker.
- The front keeps each stream's bounded queue (``RemoteSession``): a frame is answered
  ``ok`` / ``busy`` at once with the single-process semantics (evict the oldest, or
  refuse a lossless one), and a forwarder thread sends what is queued, in order, in
  batches of up to ``batch_frames`` items. Frames cross as numpy arrays (Ray's
  zero-copy serialisation of arrays), never as objects of ours. The worker pushes them
  with ``wait``: when its writer falls behind, the forwarder waits and the front's
  queue fills, so backpressure reaches the sender as it would in one process.
- Before a question, the stream's queue is flushed to the worker: the answer sees every
  frame accepted before it, as in one process. Tokens come back through a Ray
  streaming generator.
- Every ``checkpoint_every`` seconds a worker saves each of its sessions (the atomic
  ``Session.save``) under ``state_dir/<stream id>``, a folder every node shares.
- A health check every ``health_every`` seconds pings the workers. One that is gone
  (its actor died, or it did not answer within ``dead_after`` seconds) is killed for
  good, and its streams reopen on the workers with room from their last checkpoint:
  the stream's stats say ``moved``, ``node`` and ``frames_lost`` (frames the old worker
  took after its last checkpoint); a question that was being answered there gets the
  error ``moved`` (ask again). Frames pushed meanwhile wait in the front's queue.
- ``drain(node)`` moves a node's streams with no loss (each is written, saved, closed
  and reopened from that save on another worker, its queued frames following), then
  stops that node's worker; no new worker starts there.

Ray is an optional dependency (``pip install 'vstream[cluster]'``); only this module
imports it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vstream.config import JsonConfig, check_int, check_number
from vstream.errors import ConfigError, ProtocolError, VStreamError
from vstream.ingest.queue import Closed, ItemQueue
from vstream.session import SessionConfig, SessionStats, SharedModels, check_time_order
from vstream.types import AUDIO_SAMPLE_RATE, AudioChunk, Frame

logger = logging.getLogger(__name__)

READY_TIMEOUT = 300.0  # seconds a new worker may take to load its models
CALL_TIMEOUT = 60.0  # seconds a worker may take to open, save or close a stream


@dataclass
class ClusterConfig(JsonConfig):
    """Settings of a server's Ray cluster.

    Attributes:
        address: the Ray cluster: ``auto`` (join the one running on this machine, as
            ``ray start`` left it), ``local`` (start one in this process), or an
            address (``HOST:PORT`` of the head's GCS, or ``ray://HOST:PORT``).
        streams_per_worker: sessions one worker hosts at most (default 16); a new stream
            finds no room when every worker holds this many.
        worker_cpus: Ray CPUs each worker takes; also its torch threads (default 1.0).
        worker_gpus: Ray GPUs each worker takes (default 0.0; 1.0 puts the model on the
            node's GPU).
        checkpoint_every: seconds between a worker's saves of its streams (default 30.0).
        batch_frames: frames and audio chunks sent to a worker in one call (default 32:
            a call costs a few milliseconds whatever it carries; 8 made the cluster path
            1.6x the single process's per-frame cost, 32 1.3x, benchmarks/cluster.py).
        health_every: seconds between health checks of the workers (default 1.0).
        dead_after: seconds a worker may leave a health check unanswered before it is
            taken for dead (default 10.0).
    """

    address: str = "auto"
    streams_per_worker: int = 16
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0
    checkpoint_every: float = 30.0
    batch_frames: int = 32
    health_every: float = 1.0
    dead_after: float = 10.0

    def __post_init__(self) -> None:
        if not (isinstance(self.address, str) and self.address):
            raise ConfigError(f"ClusterConfig.address must be 'auto', 'local' or a Ray address, got {self.address!r}")
        for name in ("streams_per_worker", "batch_frames"):
            check_int("ClusterConfig", name, getattr(self, name), 1)
        check_number("ClusterConfig", "worker_cpus", self.worker_cpus, 0.0)
        check_number("ClusterConfig", "worker_gpus", self.worker_gpus, 0.0, include_low=True)
        for name in ("checkpoint_every", "health_every", "dead_after"):
            check_number("ClusterConfig", name, getattr(self, name), 0.0)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("the cluster server needs Ray: pip install 'vstream[cluster]'") from None
    return ray


def _result(ref, timeout: float | None = CALL_TIMEOUT):
    """``ray.get(ref)``; an error of ours raised in the worker is raised here as itself
    (Ray would wrap it with the worker's traceback in its message)."""
    ray = _import_ray()
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, (VStreamError, ValueError)):
            raise exc.cause from None
        raise


# -- the worker, in a Ray actor process -------------------------------------------------


class StreamWorker:
    """Many sessions in one Ray actor process, sharing one model, frame encoder and OCR
    (as a single-process server's sessions do). Created by ``ClusterHost``; every
    method takes and returns plain values and numpy arrays."""

    def __init__(self, model: str | None, session: dict, state_dir: str, encoder_batch: int,
                 encoder_wait_ms: float, checkpoint_every: float, threads: int):
        import torch

        from vstream.encoders.batching import BatchingConfig

        torch.set_num_threads(threads)
        self.shared = SharedModels.load(model, SessionConfig.from_dict(session),
                                        BatchingConfig(encoder_batch, encoder_wait_ms))
        self.state_dir = Path(state_dir)
        self.sessions: dict = {}
        self._asking: dict[str, int] = {}  # stream id -> questions being answered
        self._lock = threading.Condition()  # guards the two tables
        self._saving = threading.Lock()  # one save at a time: a checkpoint and a close never write one folder at once
        self._stopped = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, args=(checkpoint_every,),
                                              name="vstream-worker-checkpoint", daemon=True)
        self._checkpointer.start()

    def describe(self) -> dict:
        """The worker's node id and model name (also: it is up)."""
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "model": self.shared.model.name}

    def ping(self) -> int:
        """The number of sessions held: a health check."""
        return len(self.sessions)

    def open(self, stream_id: str, resume: bool) -> int:
        """Open stream ``stream_id``: from its save under the state folder with ``resume``,
        else empty. Returns the frames its memory holds (what a moved stream kept)."""
        session = self.shared.session(self.state_dir / stream_id if resume else None)
        with self._lock:
            self.sessions[stream_id] = session
        return session.stats.frames_processed

    def push(self, stream_id: str, items: list[tuple]) -> None:
        """Write ``items`` into the stream's session, in order, waiting for room:
        ``("frame", t, index, pixels)`` and ``("audio", start, samples)``."""
        session = self._session(stream_id)
        for item in items:
            if item[0] == "frame":
                session.push_frame(Frame(item[3], item[1], item[2]), wait=True)
            else:
                samples = item[2]
                session.push_audio(AudioChunk(samples, item[1], item[1] + len(samples) / AUDIO_SAMPLE_RATE),
                                   wait=True)

    def start_source(self, stream_id: str, source: str, settings: dict) -> None:
        self._session(stream_id).start_source(source, **settings)

    def stats(self, stream_id: str) -> dict:
        return self._session(stream_id).stats.to_dict()

    def wait(self, stream_id: str, timeout: float) -> bool:
        return self._session(stream_id).wait(timeout)

    def thumbnail(self, stream_id: str, t: float) -> tuple[float, bytes] | None:
        return self._session(stream_id).thumbnail(t)

    def texts(self, stream_id: str, limit: int) -> dict:
        return self._session(stream_id).texts(limit)

    def ask(self, stream_id: str, question: str, window: dict):
        """Answer ``question`` (a generator: Ray streams its items): ``("token", text)``
        for each piece, then ``("answer", answer dict)``, or ``("error", code, message)``."""
        with self._lock:
            session = self.sessions.get(stream_id)
            if session is None:
                yield ("error", "unknown_stream", f"no open stream {stream_id!r} on this worker")
                return
            self._asking[stream_id] = self._asking.get(stream_id, 0) + 1
        try:
            answer_stream = session.stream(question, **window)
            for piece in answer_stream:
                yield ("token", piece)
            yield ("answer", answer_stream.result().to_dict())
        except (VStreamError, ValueError) as exc:
            yield ("error", "invalid", str(exc))
        finally:
            with self._lock:
                self._asking[stream_id] -= 1
                self._lock.notify_all()

    def close(self, stream_id: str, save: bool, timeout: float = 5.0) -> int:
        """Close the stream once its questions are answered: with ``save``, write what was
        pushed (up to ``timeout`` s) and save it under the state folder. Returns the
        frames its memory held."""
        with self._lock:
            self._lock.wait_for(lambda: not self._asking.get(stream_id), timeout=CALL_TIMEOUT)
            session = self.sessions.pop(stream_id, None)
            self._asking.pop(stream_id, None)
        if session is None:
            raise ConfigError(f"no open stream {stream_id!r} on this worker")
        try:
            if save:
                session.wait(timeout)
                with self._saving:
                    session.save(self.state_dir / stream_id)
            return session.stats.frames_processed
        finally:
            session.close()

    def shutdown(self) -> None:
        """Stop checkpointing (the front saves the streams by closing them first)."""
        self._stopped.set()
        self._checkpointer.join(timeout=CALL_TIMEOUT)

    def _session(self, stream_id: str):
        session = self.sessions.get(stream_id)
        if session is None:
            raise ConfigError(f"no open stream {stream_id!r} on this worker")
        return session

    def _checkpoint_loop(self, every: float) -> None:
        while not self._stopped.wait(every):
            with self._lock:
                held = list(self.sessions.items())
            for stream_id, session in held:
                with self._saving:
                    if self.sessions.get(stream_id) is not session:  # closed meanwhile: its close saved it
                        continue
                    try:
                        session.save(self.state_dir / stream_id)
                    except Exception:
                        logger.exception("checkpoint of stream %s failed", stream_id)


# -- the front's side -----------------------------------------------------------------------


@dataclass(eq=False)
class Worker:
    """The front's record of one worker actor."""

    handle: object  # the Ray actor handle
    node: str  # Ray node id (hex)
    streams: set = field(default_factory=set)  # RemoteSession objects it hosts
    alive: bool = True  # False once retired (dead or drained): a stream may still hold it until it moves

    def describe(self) -> dict:
        return {"node": self.node, "streams": len(self.streams)}


class RemoteAnswer:
    """A finished answer from a worker, in the wire shape (``Answer.to_dict()``)."""

    def __init__(self, data: dict):
        self._data = data

    def to_dict(self) -> dict:
        return self._data


class RemoteAnswerStream:
    """The tokens of an answer being generated on a worker (iterate), then ``result()``."""

    def __init__(self, generator, remote: RemoteSession, worker: Worker):
        self._generator, self._remote, self._worker, self._answer = generator, remote, worker, None

    def __iter__(self):
        ray = _import_ray()
        try:
            for ref in self._generator:
                item = ray.get(ref)
                if item[0] == "token":
                    yield item[1]
                elif item[0] == "answer":
                    self._answer = RemoteAnswer(item[1])
                else:
                    raise ProtocolError(item[2], item[1])
        except ray.exceptions.RayActorError:
            self._remote.host.worker_failed(self._worker)  # now, not at the next health check
            raise ProtocolError(f"stream {self._remote.id}: its worker stopped while answering; the stream moved to "
                                "another worker: ask again", "moved") from None

    def result(self) -> RemoteAnswer:
        if self._answer is None:
            for _ in self:
                pass
        return self._answer


class RemoteSession:
    """A stream whose session lives on a worker: what the server calls on a ``Session``
    (push, ask, stats, wait, save, close), with the queue and order kept here."""

    def __init__(self, host: ClusterHost, stream_id: str, worker: Worker):
        self.host, self.id, self.worker = host, stream_id, worker
        self.forwarded = 0  # frames the current worker took, as its memory counts them after a move
        self.moved = self.frames_lost = 0
        self._queue = ItemQueue(host.session.queue_frames, drop=True)
        self._frames_in = self._frames_dropped = 0  # counted here: frames pushed, and dropped from this queue
        self._last_frame_t = float("-inf")
        self._last_stats: dict = {}
        self._offered = self._done = 0  # items queued; items written, evicted or lost (flush waits for these)
        self._reads_source = False  # the worker reads the stream's source: its counts of frames in are the ones
        self._sent = threading.Condition()  # signalled when items are settled
        self._send_lock = threading.Lock()  # held while a batch is on its way, and while the stream moves
        self._closed = False
        self._forwarder = threading.Thread(target=self._forward_loop, name=f"vstream-forward-{stream_id}", daemon=True)
        self._forwarder.start()

    # -- feeding (the server's loop thread) ---------------------------------------------

    def push_frame(self, frame: Frame, wait: bool = False, evict: bool = True) -> bool:
        """As ``Session.push_frame``: queue ``frame`` for the worker."""
        check_time_order(frame.t, self._last_frame_t)
        taken = self._offer(("frame", frame.t, frame.index, np.ascontiguousarray(frame.image)), wait, evict)
        if taken is not None:
            self._last_frame_t = frame.t
            self._frames_in += 1
        return bool(taken)

    def push_audio(self, chunk: AudioChunk, wait: bool = False, evict: bool = True) -> bool:
        """As ``Session.push_audio``: queue ``chunk`` for the worker (nothing crosses to it
        when the sessions do not recognise speech, as a session would ignore it)."""
        if not self.host.session.asr:
            return True
        return bool(self._offer(("audio", chunk.start, np.ascontiguousarray(chunk.samples)), wait, evict))

    def _offer(self, item: tuple, wait: bool, evict: bool) -> bool | None:
        """True: queued; False: queued, the oldest dropped; None: refused (lossless, full)."""
        if self._closed:
            raise VStreamError("the session is closed")
        if not (wait or evict):
            taken = self._queue.offer(item)
            self._offered += taken
            return True if taken else None
        evicted = self._queue.put(item, wait=wait)
        self._offered += 1
        if evicted is not None:
            self._frames_dropped += evicted[0] == "frame"
            self._settled(1)
        return evicted is None

    def _forward_loop(self) -> None:
        ray = _import_ray()
        while True:
            try:
                items = [self._queue.get(timeout=3600.0)]
            except TimeoutError:
                continue
            except Closed:
                return
            while len(items) < self.host.config.batch_frames:
                try:
                    items.append(self._queue.get(timeout=0.0))
                except (TimeoutError, Closed):
                    break
            self._send(items, ray)
            self._settled(len(items))

    def _settled(self, count: int) -> None:
        """``count`` items taken are written to the worker, evicted or lost."""
        with self._sent:
            self._done += count
            self._sent.notify_all()

    def _send(self, items: list[tuple], ray) -> None:
        """Write ``items`` to the stream's worker; when the worker is gone, wait for the
        stream to move and write them to the new one."""
        frames = sum(item[0] == "frame" for item in items)
        while not self._closed:
            with self._send_lock:
                worker = self.worker
                if worker is None:  # no worker had room when it moved: the items are lost
                    return
                try:
                    ray.get(worker.handle.push.remote(self.id, items))
                    self.forwarded += frames
                    return
                except ray.exceptions.RayActorError:
                    pass
                except Exception:
                    logger.exception("stream %s: writing %d item(s) on node %s failed", self.id, len(items), worker.node)
                    return
            self.host.worker_failed(worker)  # outside the lock: moving the stream takes it

    def flush(self, timeout: float = CALL_TIMEOUT) -> bool:
        """Wait until every item queued so far is written to the worker (or evicted)."""
        with self._sent:
            offered = self._offered
            return self._sent.wait_for(lambda: self._done >= offered, timeout)

    # -- the server's other calls --------------------------------------------------------

    def stream(self, question: str, start: float | None = None, end: float | None = None,
               last: float | None = None) -> RemoteAnswerStream:
        """As ``Session.stream``: the question goes to the worker after the queued frames."""
        self.flush()
        worker = self._worker()
        window = {name: value for name, value in (("start", start), ("end", end), ("last", last)) if value is not None}
        generator = worker.handle.ask.options(num_returns="streaming").remote(self.id, question, window)
        return RemoteAnswerStream(generator, self, worker)

    def start_source(self, source: str, **settings) -> None:
        self._reads_source = True
        _result(self._worker().handle.start_source.remote(self.id, source, settings))

    @property
    def stats(self) -> SessionStats:
        """The worker's counters (the last ones known when it does not answer), with the
        frames pushed here and those dropped here."""
        ray = _import_ray()
        worker = self.worker
        if worker is not None and worker.alive:
            try:
                self._last_stats = _result(worker.handle.stats.remote(self.id), timeout=5.0)
            except (ray.exceptions.RayError, TimeoutError, ConfigError):  # moving, or gone: the last ones known
                pass
        stats = SessionStats(**self._last_stats)
        if not self._reads_source:  # what was pushed here, some of it still queued, some lost in a move
            stats.frames_in = self._frames_in
        stats.frames_dropped += self._frames_dropped
        return stats

    def thumbnail(self, t: float) -> tuple[float, bytes] | None:
        return _result(self._worker().handle.thumbnail.remote(self.id, t))

    def texts(self, limit: int = 200) -> dict:
        return _result(self._worker().handle.texts.remote(self.id, limit))

    def placement(self) -> dict:
        """Where the stream runs and what moving cost it: ``node``, ``moved``, ``frames_lost``."""
        return {"node": self.worker.node if self.worker else None, "moved": self.moved, "frames_lost": self.frames_lost}

    def wait(self, timeout: float | None = None) -> bool:
        timeout = CALL_TIMEOUT if timeout is None else timeout
        return self.flush(timeout) and _result(self._worker().handle.wait.remote(self.id, timeout), timeout + 5.0)

    def save(self, folder) -> None:
        """Write what was pushed and save it into ``folder`` (the server's state folder,
        which the workers share), then close it on the worker."""
        if Path(folder) != self.host.state_dir / self.id:
            raise ConfigError(f"a cluster stream saves only into the shared state folder, not {folder}")
        self.flush()
        with self._send_lock:
            worker = self._worker()
            self.worker = None
            worker.streams.discard(self)
        _result(worker.handle.close.remote(self.id, True))

    def close(self) -> None:
        """Stop forwarding; close the session on its worker (unsaved) if ``save`` did not."""
        if self._closed:
            return
        self._closed = True
        self._queue.close()
        self._forwarder.join(timeout=CALL_TIMEOUT)
        self.host.forget(self)
        with self._send_lock:
            worker, self.worker = self.worker, None
        if worker is not None and worker.alive:
            worker.streams.discard(self)
            try:
                _result(worker.handle.close.remote(self.id, False))
            except Exception as exc:  # noqa: BLE001 - the worker may be gone; nothing is left to free there
                logger.warning("stream %s: closing on node %s: %s", self.id, worker.node, exc)

    def _worker(self) -> Worker:
        worker = self.worker
        if worker is None:
            raise ProtocolError(f"stream {self.id}: its worker stopped and no other worker has room for it",
                                "moved")
        return worker


class ClusterHost:
    """The workers of a Ray cluster, and which stream each hosts (see the module
    docstring). Joins or starts Ray, starts one worker per node with room, and checks
    their health on a thread of its own."""

    def __init__(self, config: ClusterConfig, model: str | None, session: SessionConfig, state_dir: Path,
                 encoder_batch: int, encoder_wait_ms: float):
        if model is not None and not isinstance(model, str):
            raise ConfigError("a cluster's workers load the model themselves: give its hub id or folder, not a "
                              "loaded model")
        ray = _import_ray()
        self.config, self.state_dir = config, Path(state_dir)
        self._worker_args = (model, session.to_dict(), str(self.state_dir), encoder_batch, encoder_wait_ms,
                             config.checkpoint_every, max(1, round(config.worker_cpus)))
        self.session = session
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            if config.address == "local":
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=config.address, logging_level=logging.WARNING)
        self.workers: dict[str, Worker] = {}
        self._left: set[str] = set()  # nodes drained or dead: no worker starts there again
        self._lock = threading.RLock()
        self._pending: dict[str, tuple] = {}  # node id -> (handle, its first ping, when started): workers loading
        self._stopped = threading.Event()
        try:
            self._start_workers()
            self._collect(READY_TIMEOUT)
        except BaseException:
            self.close()
            raise
        if not self.workers:
            self.close()
            raise ConfigError(f"no node of the Ray cluster has room for a worker ({config.worker_cpus:g} CPU, "
                              f"{config.worker_gpus:g} GPU)")
        self.name = self._describe_first()
        self._health = threading.Thread(target=self._health_loop, name="vstream-cluster-health", daemon=True)
        self._health.start()

    def _describe_first(self) -> str:
        ray = _import_ray()
        worker = next(iter(self.workers.values()))
        return ray.get(worker.handle.describe.remote(), timeout=CALL_TIMEOUT)["model"]

    def _start_workers(self) -> None:
        """Start a worker on every live node that has none and the resources for one; it
        is used once it answers (``_collect``)."""
        ray = _import_ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor = ray.remote(StreamWorker)
        for node in ray.nodes():
            node_id, resources = node["NodeID"], node.get("Resources", {})
            if (not node.get("Alive") or node_id in self.workers or node_id in self._pending
                    or node_id in self._left or resources.get("CPU", 0) < self.config.worker_cpus
                    or resources.get("GPU", 0) < self.config.worker_gpus):
                continue
            handle = actor.options(num_cpus=self.config.worker_cpus, num_gpus=self.config.worker_gpus,
                                   max_concurrency=4 * self.config.streams_per_worker + 8, max_restarts=0,
                                   scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                                   ).remote(*self._worker_args)
            self._pending[node_id] = (handle, handle.ping.remote(), time.monotonic())

    def _collect(self, timeout: float) -> None:
        """Take the new workers that answer within ``timeout`` seconds; leave out the
        nodes whose worker failed to start or took longer than ``READY_TIMEOUT``."""
        ray = _import_ray()
        if not self._pending:
            return
        refs = [ref for _, ref, _ in self._pending.values()]
        ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for node_id, (handle, ref, started) in list(self._pending.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if not ready and time.monotonic() - started < READY_TIMEOUT:
                continue
            del self._pending[node_id]
            try:
                if not ready:
                    raise TimeoutError(f"not ready after {READY_TIMEOUT:g} s")
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a worker that cannot start leaves its node out, not the cluster
                logger.warning("no worker on node %s: %s", node_id, exc)
                ray.kill(handle)
                self._left.add(node_id)
                continue
            with self._lock:
                self.workers[node_id] = Worker(handle, node_id)
            logger.info("worker ready on node %s", node_id)

    # -- the server's calls ----------------------------------------------------------------

    def open(self, stream_id: str, resume: bool) -> RemoteSession:
        """A new stream (from its save with ``resume``) on the worker with the most room."""
        with self._lock:
            worker = self._roomiest()
            if worker is None:
                raise ProtocolError(f"every worker holds its maximum of {self.config.streams_per_worker} streams; "
                                    "close one first or add a node", "max_streams")
            remote = RemoteSession(self, stream_id, worker)
            worker.streams.add(remote)
        try:
            remote.forwarded = _result(worker.handle.open.remote(stream_id, resume))
        except BaseException:
            remote.close()
            raise
        return remote

    def stats(self) -> dict:
        with self._lock:
            return {"workers": [worker.describe() for worker in self.workers.values()]}

    def drain(self, node: str) -> dict:
        """Move every stream off ``node`` (an id, or a unique prefix of one) with no loss,
        then stop its worker. Returns ``{"node", "moved"}``."""
        ray = _import_ray()
        with self._lock:
            matches = [w for w in self.workers.values() if w.node.startswith(node)] if node else []
            if len(matches) != 1:
                raise ProtocolError(f"node {node!r} names {len(matches)} of the cluster's workers; known: "
                                    f"{', '.join(sorted(self.workers)) or 'none'}", "invalid")
            worker = matches[0]  # _move places nothing on it: the lock keeps opens out meanwhile
            moved = 0
            for remote in list(worker.streams):
                self._move(remote, lossless=True)
                moved += 1
            self._retire(worker)
        ray.kill(worker.handle)
        logger.info("drained node %s: %d stream(s) moved", worker.node, moved)
        return {"node": worker.node, "moved": moved}

    def worker_failed(self, worker: Worker) -> None:
        """``worker`` is gone: kill it for good and move its streams from their checkpoints."""
        with self._lock:
            if not worker.alive:
                return
            logger.warning("worker on node %s is gone; moving its %d stream(s)", worker.node, len(worker.streams))
            self._retire(worker)
            try:
                _import_ray().kill(worker.handle)
            except Exception:  # noqa: BLE001, S110 - already dead is what we want
                pass
            for remote in list(worker.streams):
                self._move(remote, lossless=False)

    def forget(self, remote: RemoteSession) -> None:
        with self._lock:
            for worker in self.workers.values():
                worker.streams.discard(remote)

    def close(self) -> None:
        """Stop the health checks and the workers; disconnect from Ray if this host
        connected. The server closes the streams first."""
        ray = _import_ray()
        self._stopped.set()
        if getattr(self, "_health", None) is not None:
            self._health.join(timeout=CALL_TIMEOUT)
        for worker in list(self.workers.values()):
            if worker.alive:
                try:
                    ray.get(worker.handle.shutdown.remote(), timeout=CALL_TIMEOUT)
                except Exception as exc:  # noqa: BLE001 - stopping anyway
                    logger.warning("stopping the worker on node %s: %s", worker.node, exc)
                ray.kill(worker.handle)
        for handle, _, _ in self._pending.values():
            ray.kill(handle)
        self.workers.clear()
        self._pending.clear()
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    # -- placement and movement -----------------------------------------------------------

    def _roomiest(self, exclude: Worker | None = None) -> Worker | None:
        candidates = [w for w in self.workers.values() if w is not exclude
                      and len(w.streams) < self.config.streams_per_worker]
        return min(candidates, key=lambda w: len(w.streams), default=None)

    def _retire(self, worker: Worker) -> None:
        worker.alive = False
        self._left.add(worker.node)
        self.workers.pop(worker.node, None)

    def _move(self, remote: RemoteSession, lossless: bool) -> None:
        """Reopen ``remote`` on another worker: with ``lossless`` (its worker is alive),
        from a save made now; otherwise from its last checkpoint, counting what is lost."""
        with remote._send_lock:  # no batch is on its way while the stream moves
            old = remote.worker
            if old is None:
                return
            old.streams.discard(remote)
            kept = None
            if lossless:
                kept = _result(old.handle.close.remote(remote.id, True))
            target = self._roomiest(exclude=old)
            resume = (self.state_dir / remote.id / "session.json").is_file()
            if target is None:
                remote.worker = None
                remote.frames_lost += remote.forwarded
                logger.error("stream %s: no worker has room; it is lost", remote.id)
                return
            restored = _result(target.handle.open.remote(remote.id, resume))
            if kept is not None and restored != kept:
                raise VStreamError(f"stream {remote.id}: moved with {kept} frames, reopened with {restored}")
            remote.frames_lost += max(0, remote.forwarded - restored)
            remote.forwarded = restored
            remote.moved += 1
            remote.worker = target
            target.streams.add(remote)
        logger.info("stream %s moved from node %s to %s (%d frame(s) lost so far)", remote.id, old.node,
                    target.node, remote.frames_lost)

    def _health_loop(self) -> None:
        ray = _import_ray()
        while not self._stopped.wait(self.config.health_every):
            with self._lock:
                workers = list(self.workers.values())
            pings = {worker.handle.ping.remote(): worker for worker in workers}
            ready = ray.wait(list(pings), num_returns=len(pings), timeout=self.config.dead_after)[0] if pings else []
            for ref, worker in pings.items():
                try:
                    if ref not in ready:
                        raise TimeoutError(f"no answer in {self.config.dead_after:g} s")
                    ray.get(ref)
                except (ray.exceptions.RayActorError, TimeoutError) as exc:
                    logger.warning("worker on node %s: %s", worker.node, exc)
                    self.worker_failed(worker)
            if not self._stopped.is_set():
                try:
                    self._start_workers()
                    self._collect(0.0)
                except Exception:
                    logger.exception("starting workers on new nodes failed")
