"""The examples run: offline QA over a folder, and a live session asked from stdin."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import tiny_llama

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(tiny_llama(tmp_path_factory.mktemp("examples-model") / "llama"))


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True, timeout=240,
                          check=False)


def test_folder_qa(model, make_clip, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a.mp4", "b.mkv"):
        clip = make_clip(f"examples-{name}", duration=4.0, fps=5, size=(64, 48))
        (folder / name).write_bytes(clip.path.read_bytes())
    (folder / "broken.mp4").write_bytes(b"not a video")
    done = run(str(EXAMPLES / "folder_qa.py"), str(folder), "what is shown?", "what colour?", "--model", model,
               "--no-asr", "--save-memories", str(tmp_path / "mem"))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(line["video"], line.get("question")) for line in lines] == [
        ("a.mp4", "what is shown?"), ("a.mp4", "what colour?"), ("b.mkv", "what is shown?"), ("b.mkv", "what colour?"),
        ("broken.mp4", None)]
    assert all(line["evidence"] for line in lines[:4]) and "error" in lines[4]
    assert (tmp_path / "mem" / "a" / "session.json").is_file()


def evidence_times(lines: list[str]) -> list[tuple[int, int]]:
    """(start, end) seconds of every evidence line (``  m:ss-m:ss  kind  score``) printed."""
    found = [re.fullmatch(r"  (\d+):(\d\d)-(\d+):(\d\d)  (frame|transcript) +\d\.\d\d", line) for line in lines]
    return [(60 * int(m[1]) + int(m[2]), 60 * int(m[3]) + int(m[4])) for m in found if m]


def test_live_session_from_stdin(model, make_clip):
    """Typed at the prompt as a user would: /stats until the clip is in, then a question
    about all of it and one about its last second only."""
    clip = make_clip("examples-live.mp4", duration=3.0, fps=5, size=(64, 48))
    child = subprocess.Popen([sys.executable, str(EXAMPLES / "live_session.py"), str(clip.path), "--model", model,
                              "--no-asr"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, bufsize=1)
    try:
        deadline = time.monotonic() + 120
        while True:  # the three sampled frames (0, 1 and 2 s) reach the memory
            child.stdin.write("/stats\n")
            stats = ast.literal_eval(child.stdout.readline())
            if stats["frames_processed"] == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert stats["frames_processed"] == 3 and stats["source_error"] is None
        out, err = child.communicate("what is on screen?\n/last 1 and now?\n/stats\n\n", timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0, err
    lines = out.splitlines()
    assert ast.literal_eval(lines[-1])["questions"] == 2
    first = lines.index(next(line for line in lines if line.startswith("  ")))  # evidence lines: 2 spaces in
    second = next(i for i in range(first + 1, len(lines)) if not lines[i].startswith("  "))
    whole, recent = evidence_times(lines[first:second]), evidence_times(lines[second:])
    assert whole and all(0 <= start <= end <= 2 for start, end in whole)  # the clip's frames, at their times
    assert recent and all(1 <= start <= end <= 2 for start, end in recent)  # only the last second
    assert "error" not in err


def test_server_with_two_streaming_clients(model, make_clip):
    left = make_clip("examples-left.mp4", duration=4.0, fps=5, size=(64, 48))
    right = make_clip("examples-right.mp4", duration=3.0, fps=5, size=(64, 48))
    done = run(str(EXAMPLES / "server_two_clients.py"), str(left.path), str(right.path), "what is shown?",
               "--model", model, "--no-asr", "--every", "1")
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    sent = dict(re.fullmatch(r"\[(\w+)\] sent (\d+) frames, .*", line).groups() for line in out if " sent " in line)
    assert sorted(sent.values()) == ["3", "4"]  # one stream a clip, every sampled frame delivered
    for stream, count in sent.items():  # each answered once it had all its frames, evidence as `vstream ask` prints it
        own = [line.removeprefix(f"[{stream}] ") for line in out if line.startswith(f"[{stream}] ")]
        final = next(i for i, line in enumerate(own) if line.startswith("final: "))
        spans = evidence_times(own[final + 1:])
        last = int(count) - 1  # the stream's last frame time, in seconds
        assert spans and all(0 <= start <= end <= last for start, end in spans)
