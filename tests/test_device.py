"""``--device`` / ``SessionConfig.device``: every stage goes where it is told, a clear
error when CUDA is asked for and absent, and (on a CUDA machine) a whole session on the
GPU, checked by the devices of the model, the encoder's features and the memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_llama

from vstream.cli import main
from vstream.device import resolve_device, resolve_dtype
from vstream.encoders import create_encoder
from vstream.errors import ConfigError
from vstream.models import load_model
from vstream.session import Session, SessionConfig
from vstream.types import Frame

torch.set_num_threads(1)
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: the GPU path runs in the device check script")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(tiny_llama(tmp_path_factory.mktemp("device-models") / "llama"))


def test_auto_is_cuda_when_present_and_precision_follows():
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "", 0])
def test_bad_device_specs_are_refused_by_name(spec):
    with pytest.raises(ConfigError, match="auto, cpu, cuda, cuda:N"):
        resolve_device(spec, "SessionConfig.device")
    with pytest.raises(ConfigError, match="SessionConfig.device"):
        SessionConfig(device=spec)


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
def test_cuda_asked_for_and_absent_is_one_clear_error(llama, capsys):
    with pytest.raises(ConfigError, match="torch sees no CUDA device"):
        load_model(llama, device="cuda")
    with pytest.raises(ConfigError, match="PixelConfig.device is 'cuda'"):
        create_encoder("pixels", device="cuda")
    with pytest.raises(ConfigError, match="no CUDA device"):
        Session(llama, SessionConfig(asr=False, encoder="pixels", ocr=False, device="cuda:1"))
    code = main(["ask", str(Path(__file__).parent / "data" / "speech.mp4"), "what?", "--model", llama, "--no-asr", "--device", "cuda"])
    assert code == 1 and "torch sees no CUDA device" in capsys.readouterr().err


def test_a_cpu_session_keeps_every_stage_on_the_cpu(llama, tmp_path):
    check_session_devices(llama, "cpu", tmp_path)


@pytest.mark.cuda
@needs_cuda
def test_a_cuda_session_runs_every_stage_on_the_gpu(llama, tmp_path):
    check_session_devices(llama, "cuda", tmp_path)


def check_session_devices(llama: str, device: str, tmp_path) -> None:
    """The model's weights, the encoder's features and the memory's tensors are on
    ``device``, before and after a save and load; the model in float16 on CUDA."""
    config = SessionConfig(asr=False, encoder="pixels", ocr=False, device=device)
    frames = [Frame(np.full((48, 64, 3), 40 * t, np.uint8), float(t), t) for t in range(6)]
    with Session(llama, config) as session:
        for frame in frames:
            session.push_frame(frame, wait=True)
        session.wait()
        assert session.ask("what is shown?").text is not None
        parameter = next(session.model.lm.parameters())
        assert parameter.device.type == device
        assert parameter.dtype == (torch.float16 if device == "cuda" else torch.float32)
        assert session.encoder.encode([frames[0].image]).device.type == device
        assert session.memory.device.type == device and session.memory.centroids.device.type == device
        assert session.memory.config.bank.device == ("cpu" if device == "cpu" else "auto")  # faiss-gpu where installed
        session.save(tmp_path / "saved")
    with Session.load(tmp_path / "saved", llama, config) as loaded:
        assert loaded.memory.centroids.device.type == device
        assert len(loaded.memory) == len(frames)
