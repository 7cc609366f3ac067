"""Shared fixtures: synthetic clips written once per test session, and a thread check."""

from __future__ import annotations

import os
import threading
import time

import pytest

from vstream import synth

# Triton kernels run on CPU through the interpreter; it must be chosen before triton
# loads (nothing above imports it).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Child Pythons (python -m vstream, python -c, scripts) must not put their working
# directory, the checkout root, on sys.path: its kernels/ folder would stand in for the
# installed `kernels` package (kernels/__init__.py guards that case too; see test_install.py).
os.environ["PYTHONSAFEPATH"] = "1"
# Ray clusters in tests stay on loopback: Ray reads this when it is imported, and without it
# rewrites a loopback node address to the machine's other interface (docs/design.md).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# One decoder for the suite, not the faster-by-measurement one (timing decides it, and
# tests then take different paths run to run); the measured choice and PyAV have tests
# of their own (test_files.py), which name the decoder.
os.environ["VSTREAM_DECODER"] = "decord"


@pytest.fixture(scope="session")
def make_clip(tmp_path_factory):
    """``make_clip(name, **write_clip_kwargs) -> ClipInfo``, written once per session."""
    folder = tmp_path_factory.mktemp("clips")
    made: dict[str, synth.ClipInfo] = {}

    def make(name: str, **kwargs) -> synth.ClipInfo:
        if name not in made:
            made[name] = synth.write_clip(folder / name, **kwargs)
        return made[name]

    return make


@pytest.fixture
def no_leaked_threads():
    """Fail the test if a decoder thread outlives it."""
    yield
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        alive = [t.name for t in threading.enumerate() if t.name.startswith("vstream-decode")]
        if not alive:
            return
        time.sleep(0.05)
    pytest.fail(f"decoder threads left running: {alive}")
