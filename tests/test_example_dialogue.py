"""The multi-image dialogue example runs: synthetic media, two turns, evidence sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tiny_models import tiny_llama

EXAMPLE = Path(__file__).parent.parent / "examples" / "multi_image_dialogue.py"


def test_multi_image_dialogue(tmp_path):
    model = tiny_llama(tmp_path / "llama")
    done = subprocess.run([sys.executable, str(EXAMPLE), "--model", str(model), "--duration", "3",
                           "--max-new-tokens", "4"], capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0] == "media: Video 1, Image 2, Image 3, Image 4"
    assert sum(line.startswith("Q: ") for line in out) == 2 and sum(line.startswith("A: ") for line in out) == 2
    sources = {line.split()[-1] for line in out if line.startswith("    ")}
    assert sources and sources <= {"1", "2", "3", "4"}  # every evidence line ends with its medium's number
    assert any(line.endswith("video 1") for line in out) and any(" image " in line for line in out)
