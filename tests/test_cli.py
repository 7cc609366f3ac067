"""The vstream command, run as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

import vstream


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vstream", *args], capture_output=True, text=True, timeout=120)


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"vstream {vstream.__version__}"


def test_probe_prints_streams_duration_fps_resolution_and_audio_rate(make_clip):
    clip = make_clip("cfr.mkv", duration=6.0, fps=30)
    text = run("probe", str(clip.path))
    assert text.returncode == 0, text.stderr
    assert "h264 160x120 @ 30.000 fps" in text.stdout and "48000 Hz" in text.stdout
    info = json.loads(run("probe", str(clip.path), "--json").stdout)
    assert info["video"]["width"] == 160 and info["audio"]["sample_rate"] == 48000
    assert abs(info["duration"] - 6.0) < 0.1
    assert "decoder:  decord (pinned)" in text.stdout  # the suite pins decord (conftest.py)
    assert (info["decoder"], info["decoder_choice"], info["decoder_rates"]) == ("decord", "pinned", {})


def test_probe_shows_the_decoder_chosen_by_measurement_and_the_rates(make_clip, monkeypatch):
    clip = make_clip("cfr.mkv", duration=6.0, fps=30)
    monkeypatch.setenv("VSTREAM_DECODER", "auto")
    text = run("probe", str(clip.path))
    assert text.returncode == 0, text.stderr
    shown = re.search(r"decoder:  (decord|pyav) \(measured sampling 1 frame a second: "
                      r"decord (\d+) frames/s, pyav (\d+) frames/s", text.stdout)
    assert shown and int(shown[2]) > 0 and int(shown[3]) > 0, text.stdout
    info = json.loads(run("probe", str(clip.path), "--json").stdout)
    assert info["decoder_choice"] == "measured" and set(info["decoder_rates"]) == {"decord", "pyav"}
    faster = max(info["decoder_rates"], key=info["decoder_rates"].get)  # measured in each run: runs may differ
    assert info["decoder"] == faster or info["decoder"] == "pyav"  # decord must win by 5 % to be chosen


def test_frames_lists_sampled_frames_and_audio(make_clip):
    clip = make_clip("cfr.mp4", duration=6.0, fps=30)
    result = run("frames", str(clip.path), "--fps", "2", "--json", "--chunk-seconds", "0.5")
    assert result.returncode == 0, result.stderr
    items = [json.loads(line) for line in result.stdout.splitlines()]
    assert [i["index"] for i in items if i["kind"] == "frame"] == list(range(0, 180, 15))
    audio = [i for i in items if i["kind"] == "audio"]
    assert abs(sum(a["end"] - a["start"] for a in audio) - 6.0) < 0.05 and audio[0]["peak_hz"] == 440.0
    assert "sampled=12" in result.stderr


def test_synth_writes_a_clip_that_probes(tmp_path):
    out = tmp_path / "made.webm"
    assert run("synth", str(out), "--duration", "2", "--width", "96", "--height", "64").returncode == 0
    assert vstream.probe(str(out)).video.width == 96
    noisy = run("synth", str(tmp_path / "noisy.mp4"), "--duration", "1", "--width", "96", "--height", "64",
                "--noise", "0.01")
    assert noisy.returncode == 0 and vstream.probe(str(tmp_path / "noisy.mp4")).audio is not None
    bad = run("synth", str(tmp_path / "bad.mp4"), "--noise", "-1")
    assert bad.returncode == 1 and "noise must be a number in [0, 1]" in bad.stderr


def test_errors_are_one_line_and_exit_1(tmp_path):
    result = run("probe", str(tmp_path / "missing.mkv"))
    assert result.returncode == 1
    assert result.stderr.startswith("vstream: error: source") and "no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_contact_sheet_example(make_clip, tmp_path):
    clip = make_clip("cfr.mp4", duration=6.0, fps=30)
    script = Path(__file__).parent.parent / "examples" / "contact_sheet.py"
    out = tmp_path / "sheet.png"
    result = subprocess.run([sys.executable, str(script), str(clip.path), str(out), "--fps", "1", "--columns", "3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (3 * 160, 2 * (120 + 14))  # 6 frames of 160x120, labelled
