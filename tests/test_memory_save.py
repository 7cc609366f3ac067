"""Saving and loading memories: identical state, atomic under a real kill, and a clear
refusal of damaged, truncated or foreign saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_memory import scene_stream, small_config

from vstream.errors import MemoryStateError
from vstream.memory import FlashConfig, FlashMemory, StarMemory, load_memory

torch.set_num_threads(1)


def snapshot(path: Path) -> Path:
    return path / json.loads((path / "CURRENT").read_text())["snapshot"]


def assert_same(a, b) -> None:
    x, y = a.tokens(), b.tokens()
    assert x.kinds == y.kinds and x.spans == y.spans
    assert torch.equal(x.tokens, y.tokens)


@pytest.mark.parametrize("make", [lambda: StarMemory(small_config()),
                                  lambda: FlashMemory(FlashConfig(base_grid=4, synopsis_grid=2, synopsis_length=6,
                                                                  synopsis_chunk=4, detail_length=2, detail_grid=4,
                                                                  bank={"grid": 4, "ram_mb": 0.02}))])
def test_round_trip_is_identical_and_continues_identically(tmp_path, make):
    frames, times, _ = scene_stream([11, 17, 9, 14], noise=0.3)
    with make() as memory:
        memory.extend(frames[:33], times[:33])
        memory.save(tmp_path / "saved")
        with type(memory).load(tmp_path / "saved") as loaded, load_memory(tmp_path / "saved") as generic:
            assert_same(memory, loaded)
            assert_same(memory, generic)
            assert loaded.config == memory.config and loaded.frames_seen == 33
            assert torch.equal(loaded.bank.features(range(33)), memory.bank.features(range(33)))
            for frame, t in zip(frames[33:], times[33:]):
                memory.add(frame, t)
                loaded.add(frame, t)
            assert_same(memory, loaded)


def test_saving_again_replaces_the_snapshot(tmp_path):
    frames, times, _ = scene_stream([10, 10])
    with StarMemory(small_config()) as memory:
        memory.extend(frames[:10], times[:10])
        memory.save(tmp_path)
        first = snapshot(tmp_path)
        memory.extend(frames[10:], times[10:])
        memory.save(tmp_path)
        assert snapshot(tmp_path) != first and not first.exists()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("snap-")) == [snapshot(tmp_path).name]
        with StarMemory.load(tmp_path) as loaded:
            assert loaded.frames_seen == 20


def test_empty_memory_round_trip(tmp_path):
    StarMemory(small_config()).save(tmp_path)
    loaded = StarMemory.load(tmp_path)
    assert loaded.frames_seen == 0 and len(loaded.tokens()) == 0


KILLED_SAVER = textwrap.dedent("""
    import sys, time
    import numpy as np, torch
    sys.path.insert(0, sys.argv[2])
    from test_memory import scene_stream, small_config
    from vstream.memory import StarMemory, persist

    torch.set_num_threads(1)
    path = sys.argv[1]
    frames, times, _ = scene_stream([20, 30, 25], noise=0.3)
    memory = StarMemory(small_config())
    memory.extend(frames[:40], times[:40])
    memory.save(path)
    np.save(path + ".expected.npy", memory.tokens().tokens.numpy())
    memory.extend(frames[40:], times[40:])

    def stall(file):  # the new snapshot's files are written; hang before its manifest
        print("midway", flush=True)
        time.sleep(60)

    persist._digest = stall
    memory.save(path)
""")


def test_a_save_killed_midway_leaves_the_previous_save_intact(tmp_path):
    path = tmp_path / "saved"
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(path), str(Path(__file__).parent)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "midway"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert len([p for p in path.iterdir() if p.name.startswith("snap-")]) == 2  # the old and the half-written
    expected = np.load(str(path) + ".expected.npy")
    with StarMemory.load(path) as loaded:
        assert loaded.frames_seen == 40
        assert np.array_equal(loaded.tokens().tokens.numpy(), expected)
        loaded.save(path)  # the next save clears the half-written snapshot
    assert len([p for p in path.iterdir() if p.name.startswith("snap-")]) == 1


@pytest.fixture
def saved(tmp_path):
    frames, times, _ = scene_stream([12, 9])
    with StarMemory(small_config()) as memory:
        memory.extend(frames, times)
        memory.save(tmp_path / "saved")
    return tmp_path / "saved"


def rewrite_manifest(path: Path, change) -> None:
    manifest_file = snapshot(path) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    change(manifest)
    manifest_file.write_text(json.dumps(manifest))


def flip_byte(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "CURRENT").unlink(), "no saved memory at .*CURRENT is missing"),
    (lambda p: (p / "CURRENT").write_text("{not json"), "CURRENT: cannot read it as JSON"),
    (lambda p: (p / "CURRENT").write_text('{"snapshot": "../elsewhere"}'), "names no snapshot folder"),
    (lambda p: (snapshot(p) / "manifest.json").write_text("[]"), "manifest.json: expected a JSON object"),
    (lambda p: rewrite_manifest(p, lambda m: m.update(version=99)),
     "written by memory format version 99; this vstream reads version 2"),
    (lambda p: rewrite_manifest(p, lambda m: m.update(format="other")), "not a vstream memory"),
    (lambda p: (snapshot(p) / "state.safetensors").write_bytes((snapshot(p) / "state.safetensors").read_bytes()[:-9]),
     "state.safetensors: .* bytes, the manifest says .* .truncated"),
    (lambda p: flip_byte(snapshot(p) / "bank" / "features.bin", 100), "features.bin: contents do not match"),
    (lambda p: (snapshot(p) / "bank" / "index.faiss").unlink(), "file 'bank/index.faiss' is missing"),
    (lambda p: rewrite_manifest(p, lambda m: m["memory"].update(policy="flash")), "holds a 'flash' memory"),
])
def test_damaged_saves_are_refused(saved, damage, message):
    damage(saved)
    with pytest.raises(MemoryStateError, match=message):
        StarMemory.load(saved)


def test_consistent_but_wrong_contents_are_refused(saved):
    """A save whose digests were recomputed after an edit still has to make sense."""
    def edit(manifest):
        manifest["memory"]["counters"]["centroid_count"] = 99

    rewrite_manifest(saved, edit)
    with pytest.raises(MemoryStateError, match=r"counter centroid_count = 99, expected an int in \[0, 8\]"):
        StarMemory.load(saved)


def test_saving_onto_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MemoryStateError, match="exists and is not a folder"):
        StarMemory(small_config()).save(tmp_path / "file")
