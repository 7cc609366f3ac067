"""The checkout root never shadows an installed package.

The root holds ``kernels/`` (installed as ``vstream.kernels``); Hugging Face's ``kernels``
package, which transformers imports, has the same top-level name. Whenever the root is
on ``sys.path`` (``python -m``, ``python -c``, a REPL or notebook started there,
``PYTHONPATH=.``), ``import kernels`` must still give the installed package and
transformers must still load models. These tests start Pythons exactly that way.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "tests" / "data" / "speech.mp4"

LOAD_AT_ROOT = """
import json, sys
import kernels
from transformers import AutoModelForCausalLM
import vstream.kernels
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(json.dumps({"root_on_path": any(p in ("", ".", sys.argv[2]) for p in sys.path),
                  "kernels": kernels.__file__, "has_cuda_properties": hasattr(kernels, "CUDAProperties"),
                  "vstream_kernels": vstream.kernels.__file__, "model": type(model).__name__}))
"""


def python_at_root(*args: str, **env: str) -> subprocess.CompletedProcess:
    """Run this venv's Python with the checkout root as working directory, root on sys.path."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", **env}
    environ.pop("PYTHONSAFEPATH", None)  # conftest sets it for the other tests' children
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environ, capture_output=True, text=True, check=False,
                          timeout=240)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("env", [{}, {"PYTHONPATH": "."}], ids=["cwd", "PYTHONPATH=."])
def test_python_c_at_the_root_imports_the_installed_kernels_and_loads_a_model(llama, env):
    done = python_at_root("-c", LOAD_AT_ROOT, str(llama), str(ROOT), **env)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["root_on_path"]  # the case under test: the root really was importable
    assert Path(seen["kernels"]).parent.parent.name == "site-packages" and seen["has_cuda_properties"]
    assert Path(seen["vstream_kernels"]) == ROOT / "kernels" / "__init__.py"
    assert seen["model"] == "LlamaForCausalLM"


def test_python_m_vstream_at_the_root_answers_with_a_model(llama):
    done = python_at_root("-m", "vstream", "ask", str(SPEECH), "What is said?", "--model", str(llama),
                          "--no-asr", "--max-new-tokens", "4", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert isinstance(answer["answer"], str) and answer["evidence"][0]["kind"] == "frame"


def test_kernels_is_not_importable_from_the_root_when_the_package_is_absent():
    # -S leaves site-packages (and so the installed `kernels`) off sys.path; the root is on it
    done = python_at_root("-S", "-c", "import kernels")
    assert done.returncode == 1
    assert "ModuleNotFoundError: No module named 'kernels' is installed" in done.stderr
    assert "vstream's kernels stage" in done.stderr


def test_no_script_folder_or_stage_folder_shadows_an_installed_module():
    """``python benchmarks/x.py`` puts benchmarks/ first on sys.path (pytest does the same
    with tests/): a file there named like an installed module (benchmarks/kernels.py
    once was) stands in for it. The root's stage folders must not collide either; only
    kernels/ does, and it guards itself (above)."""
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    scripts = [path for folder in ("benchmarks", "examples", "tests") for path in (ROOT / folder).glob("*.py")]
    assert len(scripts) > 40
    assert [str(path.relative_to(ROOT)) for path in scripts if path.stem in installed] == []
    stages = {path.name for path in ROOT.iterdir() if (path / "__init__.py").is_file()}
    assert stages == {"vstream", "encoders", "memory", "kernels", "models"}
    assert stages & installed == {"vstream", "kernels"}  # vstream is this package itself


@pytest.mark.parametrize("module", ["vstream", "vstream.kernels", "vstream.memory", "vstream.client"])
def test_a_stage_imports_without_the_decoders_or_transformers(module, tmp_path):
    """Importing one stage runs ``vstream/__init__`` first: it must not drag in PyAV,
    decord or transformers (the ingest and answer stages load on first use)."""
    code = (f"import sys, {module}\n"
            "print(sorted(m for m in ('av', 'decord', 'transformers', 'whisper') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    if module != "vstream":
        return
    lazy = subprocess.run([sys.executable, "-c", "import vstream; print(vstream.open_source.__module__)"],
                          capture_output=True, text=True, check=False, cwd=tmp_path, timeout=120)
    assert lazy.stdout.strip() == "vstream.ingest.open"  # and the names still work, loaded on first use
    every = ("import vstream\n"
             "exec(f'from vstream import {\", \".join(vstream.__all__)}')\n"
             "print(sorted(set(vstream.__all__) - set(dir(vstream))),\n"
             "      sorted({'open_source', 'probe', 'Frame', 'AudioChunk', 'Session', 'Dialogue'} - set(vstream.__all__)))")
    names = subprocess.run([sys.executable, "-c", every], capture_output=True, text=True, check=False, cwd=tmp_path,
                           timeout=120)
    assert names.returncode == 0, names.stderr  # `from vstream import X` for every public name
    assert names.stdout.split() == ["[]", "[]"]  # dir(vstream) lists them all; DESIGN.md's names are among them
