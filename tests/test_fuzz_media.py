"""Hostile media: seeded mutants of the committed speech clip through ``probe`` and
``open_source``, each ending in a clear error or a clean (maybe partial) result within a
bounded time, nothing left open.

The mutants run in a child process: a decoder that aborts (decord did, on a header
claiming billions of frames) would otherwise take pytest down with it and hide which
case it was. The child prints one JSON line per case; the test reads them.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SPEECH = Path(__file__).parent / "data" / "speech.mp4"
CASES = 200
CASE_SECONDS = 10.0  # the most one case may take (probe and every frame of an 8-second clip)


def _box(data: bytearray, name: bytes) -> int:
    """Offset of the first ``name`` box's payload (after size and type), or -1."""
    at = data.find(name)
    return at + 4 if at >= 4 else -1


def mutant(data: bytes, rng: random.Random, kind: str) -> bytes:
    """One mutant of ``data`` of ``kind``."""
    out = bytearray(data)
    if kind == "truncate":
        return bytes(out[: rng.randrange(len(out))])
    if kind == "header_flips":  # the first 4 KiB: ftyp, moov's tables in this faststart file
        for _ in range(rng.choice([1, 4, 16])):
            out[rng.randrange(min(4096, len(out)))] ^= 1 << rng.randrange(8)
    elif kind == "bitstream_flips":
        for _ in range(rng.choice([1, 8, 64])):
            out[rng.randrange(4096, len(out))] ^= 1 << rng.randrange(8)
    elif kind == "splice":  # two cuts of the clip glued together
        a, b = sorted(rng.sample(range(len(out)), 2))
        return bytes(out[:a] + out[b:] + out[a:b])
    elif kind == "absurd_dimensions":  # tkhd's width and height (16.16 fixed point) of a track
        at = _box(out, b"tkhd")
        if at > 0:
            end = at + (84 if out[at] == 0 else 96)  # version 0 or 1
            out[end - 8 : end] = struct.pack(">II", rng.choice([0, 0xFFFF0000, 0x7FFF0000]), 0xFFFF0000)
    elif kind == "absurd_duration":  # mvhd's duration, the size a reader may trust
        at = _box(out, b"mvhd")
        if at > 0:
            offset = at + (16 if out[at] == 0 else 24)
            out[offset : offset + 4] = struct.pack(">I", rng.choice([0xFFFFFFFF, 0, 1]))
    elif kind == "garbage_tail":
        out += rng.randbytes(rng.randrange(1, 65536))
    elif kind == "empty":
        return b""
    return bytes(out)


KINDS = ("truncate", "header_flips", "bitstream_flips", "splice", "absurd_dimensions", "absurd_duration",
         "garbage_tail", "empty")

CHILD = textwrap.dedent("""
    import json, os, sys, threading, time
    import vstream
    from vstream.errors import VStreamError

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    paths = sys.argv[1:]
    fds, threads = open_fds(), threading.active_count()
    for path in paths:
        began, result = time.monotonic(), {"path": path}
        try:
            info = vstream.probe(path)
            frames = audio = 0
            with vstream.open_source(path, fps=2.0) as source:
                for item in source:
                    if isinstance(item, vstream.Frame):
                        assert item.image.ndim == 3 and item.image.shape[2] == 3, item.image.shape
                        frames += 1
                    else:
                        audio += 1
            result.update(outcome="clean", frames=frames, audio=audio)
        except VStreamError as exc:
            result.update(outcome="error", type=type(exc).__name__, message=str(exc)[:300])
        except BaseException as exc:
            result.update(outcome="raw", type=type(exc).__name__, message=str(exc)[:300])
        result["seconds"] = time.monotonic() - began
        print(json.dumps(result), flush=True)
    time.sleep(0.2)  # decoder threads wind down after close
    print(json.dumps({"fds": open_fds() - fds, "threads": threading.active_count() - threads,
                      "rss_kb": int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024}))
""")


@pytest.mark.timeout(600)
def test_200_mutants_of_a_clip_end_in_a_clear_error_or_a_clean_result(tmp_path):
    data = SPEECH.read_bytes()
    rng = random.Random(2026)
    paths = []
    for i in range(CASES):
        kind = KINDS[i % len(KINDS)]
        path = tmp_path / f"{i:03d}-{kind}.mp4"
        path.write_bytes(mutant(data, rng, kind))
        paths.append(str(path))
    child = subprocess.run([sys.executable, "-c", CHILD, *paths], capture_output=True, text=True, check=False,
                           timeout=CASES * CASE_SECONDS, env={**os.environ, "PYTHONSAFEPATH": "1"})
    lines = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    results, summary = lines[:-1], lines[-1] if lines else {}
    assert child.returncode == 0, f"the child died after {len(results)} case(s): {child.stderr[-2000:]}"
    assert len(results) == CASES
    raw = [r for r in results if r["outcome"] == "raw"]
    assert not raw, raw[:3]  # every failure is a VStreamError, never a raw exception
    for r in results:
        assert r["seconds"] < CASE_SECONDS, r
        if r["outcome"] == "error":
            assert Path(r["path"]).name in r["message"] or "source" in r["message"], r  # names the input
    counts = {outcome: sum(r["outcome"] == outcome for r in results) for outcome in ("clean", "error")}
    assert counts["clean"] >= 10 and counts["error"] >= 50  # the mutants do both: the test sees each path
    assert summary["fds"] <= 0 and summary["threads"] <= 0, summary  # nothing left open or running
    assert summary["rss_kb"] < 1_500_000, summary
    print(f"\n{counts['clean']} clean, {counts['error']} clear errors, slowest "
          f"{max(r['seconds'] for r in results):.2f} s")


def test_a_header_claiming_two_billion_frames_does_not_abort_the_process(tmp_path):
    """Seeded bit flips that make the mp4 header claim 1,937,015,484 video frames: decord
    sized its tables by that and aborted the process (std::bad_alloc); PyAV decodes it."""
    data, flips = bytearray(SPEECH.read_bytes()), random.Random(283)
    for _ in range(flips.choice([1, 4, 16])):
        data[flips.randrange(len(data))] ^= 1 << flips.randrange(8)
    path = tmp_path / "billions.mp4"
    path.write_bytes(data)
    child = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=False, timeout=60,
                           env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout.splitlines()[0])
    assert result["outcome"] in ("clean", "error") and result.get("frames", 1) >= 1, result
    assert "claims 1937015484 video frames" in child.stderr
