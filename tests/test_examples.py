"""The examples run: offline QA over a folder, and a live session asked from stdin."""

from __future__ import annotations

import json
import subprocess
import sys
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


def test_live_session_from_stdin(model, make_clip):
    clip = make_clip("examples-live.mp4", duration=3.0, fps=5, size=(64, 48))
    done = run(str(EXAMPLES / "live_session.py"), str(clip.path), "--model", model, "--no-asr",
               stdin="/stats\nwhat is on screen?\n/last 2 and now?\n\n")
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0].startswith("{'frames_in':")
    assert len(out) >= 3


def test_server_with_two_streaming_clients(model, make_clip):
    left = make_clip("examples-left.mp4", duration=4.0, fps=5, size=(64, 48))
    right = make_clip("examples-right.mp4", duration=4.0, fps=5, size=(64, 48))
    done = run(str(EXAMPLES / "server_two_clients.py"), str(left.path), str(right.path), "what is shown?",
               "--model", model, "--no-asr", "--every", "1")
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert sum("sent 4 frames" in line for line in out) == 2
    assert sum("final:" in line for line in out) == 2
