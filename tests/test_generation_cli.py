"""``vstream ask --show``: evidence frames and generated pictures per answer; and the
multi-granular generation example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import tiny_llama

from vstream.cli import main
from vstream.models import load_model
from vstream.models.heads.multigranular import MultigranularHead, hidden_size_of

EXAMPLES = Path(__file__).parent.parent / "examples"

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(tiny_llama(tmp_path_factory.mktemp("generation-cli") / "llama"))


@pytest.fixture(scope="module")
def clip(make_clip):
    return make_clip("generation.mp4", duration=4.0, fps=5, size=(64, 48), audio=False)


def ask(clip, llama, *flags: str) -> int:
    return main(["ask", str(clip.path), "what is shown?", "and then?", "--model", llama, "--no-asr", "--quiet",
                 "--encoder", "pixels", "--max-new-tokens", "4", *flags])  # the heads here regress 8-wide features


def test_show_saves_evidence_frames_and_a_generated_picture_per_answer(clip, llama, tmp_path, capsys):
    assert ask(clip, llama, "--show", str(tmp_path / "shown")) == 0
    assert "saved" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "shown").iterdir())
    for number in (1, 2):
        evidence = [n for n in names if n.startswith(f"q{number}-evidence-") and n.endswith("s.jpg")]
        generated = [n for n in names if n.startswith(f"q{number}-generated-16-") and n.endswith("s.png")]
        assert evidence and len(generated) == 1
        seconds = float(evidence[0].removeprefix(f"q{number}-evidence-").removesuffix("s.jpg"))
        assert 0 <= seconds <= 4.0
        with Image.open(tmp_path / "shown" / generated[0]) as picture:
            assert max(picture.size) <= 96  # the retrieval decoder draws a stored thumbnail


def test_show_with_a_trained_head_folder_and_a_level(clip, llama, tmp_path):
    model = load_model(llama)
    MultigranularHead(hidden_size_of(model), feature_dim=8, levels=[1, 64]).save(tmp_path / "head")
    assert ask(clip, llama, "--json", "--show", str(tmp_path / "shown"), "--show-level", "1",
               "--generation-head", str(tmp_path / "head")) == 0
    assert len([p for p in (tmp_path / "shown").iterdir() if "-generated-1-" in p.name]) == 2


def test_show_errors_are_one_line(clip, llama, tmp_path, capsys):
    assert ask(clip, llama, "--show", str(tmp_path / "a"), "--generation-head", str(tmp_path / "none")) == 1
    assert "no saved multigranular head" in capsys.readouterr().err
    assert ask(clip, llama, "--show", str(tmp_path / "b"), "--decoder", str(tmp_path / "no" / "decoder")) == 1
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ask(clip, llama, "--show", str(tmp_path / "c"), "--show-level", "32")


def test_multigranular_generation_example(llama, tmp_path):
    out = tmp_path / "sheet.png"
    done = subprocess.run([sys.executable, str(EXAMPLES / "multigranular_generation.py"), "--model", llama,
                           "--steps", "3", "--seconds", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    assert "step 3: loss" in done.stdout
    with Image.open(out) as sheet:
        assert sheet.size == (48 + 3 * 96, 14 + 4 * 96)
