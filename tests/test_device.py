"""``--device`` / ``SessionConfig.device``: every stage goes where it is told, a clear
error when CUDA is asked for and absent, and (on a CUDA machine) a whole session on the
GPU, checked by the devices of the model, the encoder's features and the memory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import merge_case, scene_frames, write_jsonl
from tiny_models import tiny_llama

from vstream import kernels
from vstream.cli import main
from vstream.device import resolve_device, resolve_dtype
from vstream.encoders import create_encoder
from vstream.errors import ConfigError
from vstream.memory import StarConfig, StarMemory
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


def compiled_on_cuda() -> None:
    """Skip unless kernels run compiled on a CUDA device (the suite's conftest picks
    Triton's interpreter for the CPU tests; benchmarks/gpu.sh runs this file with
    TRITON_INTERPRET=0)."""
    if not CUDA:
        pytest.skip("no CUDA device: the GPU path runs in the device check script")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        pytest.skip("TRITON_INTERPRET is set: compiled kernels are checked with TRITON_INTERPRET=0")


def kernel_cases(device: str) -> dict:
    """Each kernel's call at the shapes the memories run it with, inputs on ``device``."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    points = randn(128, 64)
    weights = torch.rand(128, generator=g).to(device)
    return {
        "pool": lambda k: k.pool_grid(randn(8, 256, 1024), 8),
        "pool_siglip": lambda k: k.pool_grid(randn(8, 729, 1152), 8),
        "nearest": lambda k: k.nearest(randn(1, 16384), randn(16, 16384)),
        "kmeans": lambda k: k.kmeans_step(points, weights, points[:120].clone()),
        "attention": lambda k: k.semantic_attention(randn(25, 1024), randn(25, 32), randn(25, 32), randn(25, 1024), 0.2),
        "ward": lambda k: k.ward_costs(randn(25, 16384), torch.rand(25, generator=g).double().to(device) * 50 + 1,
                                       randn(16384), 1.0),
    }


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["pool", "pool_siglip", "nearest", "kmeans", "attention", "ward"])
def test_compiled_kernels_on_cuda_match_their_references(name):
    compiled_on_cuda()
    with kernels.use_backend("triton"):
        got = kernel_cases("cuda")[name](kernels)
    with kernels.use_backend("reference"):
        want = kernel_cases("cuda")[name](kernels)
    for a, b in zip(*((x,) if isinstance(x, torch.Tensor) else x for x in (got, want)), strict=True):
        assert a.is_cuda
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_temporal_merge_on_cuda_matches_the_reference_at_the_real_shape():
    """25 centroids of 16,384: the one-program kernel on the GPU against the torch
    reference on the CPU, the same decisions and state."""
    compiled_on_cuda()
    state, frames = merge_case(25, 16384)
    expected = [t.clone() for t in state]
    want = kernels.temporal_merge_reference(*expected, frames)
    on_gpu = [t.cuda() for t in state]
    got = kernels.temporal_merge(*on_gpu, frames.cuda())
    assert got.is_cuda and got.tolist() == want.tolist()
    for actual, reference in zip(on_gpu, expected):
        torch.testing.assert_close(actual.cpu(), reference, rtol=1e-5, atol=1e-3)


@pytest.mark.cuda
def test_a_star_memory_on_cuda_keeps_what_the_cpu_keeps():
    """A stream of 12 recurring scenes into a STAR memory on the GPU (kernels) and on the
    CPU (references): the same clusters (weights, spans, runs), centroids within float32."""
    compiled_on_cuda()
    g = torch.Generator().manual_seed(3)
    scenes = torch.randn(12, 256, 1024, generator=g)
    memories = {device: StarMemory(StarConfig()) for device in ("cpu", "cuda")}
    for first in range(0, 240, 8):
        times = [float(t) for t in range(first, first + 8)]
        features = scenes[[(t // 10) % 12 for t in range(first, first + 8)]] + 0.2 * torch.randn(8, 256, 1024, generator=g)
        for device, memory in memories.items():
            memory.extend(features.to(device), times)
    cpu, gpu = memories["cpu"], memories["cuda"]
    assert gpu.centroids.is_cuda and gpu.weights.is_cuda
    assert gpu.weights.tolist() == cpu.weights.tolist() and sum(cpu.weights.tolist()) == 240
    assert gpu.time_start.tolist() == cpu.time_start.tolist() and gpu.time_end.tolist() == cpu.time_end.tolist()
    assert [scene.runs for scene in gpu.timeline()] == [scene.runs for scene in cpu.timeline()]
    torch.testing.assert_close(gpu.centroids.cpu(), cpu.centroids, rtol=1e-4, atol=1e-4)
    for memory in memories.values():
        memory.close()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "flash_vstream_qwen", "llava_onevision"])
def test_a_vlm_reads_its_memory_on_cuda_as_on_the_cpu(kind, tmp_path):
    """The real-checkpoint adapters (tiny checkpoints in their layouts) in float32 on the
    GPU and on the CPU: the same frames give memories of the same kinds and sizes, and the
    question's first-token logits agree (tower, memory, projector or merger, M-RoPE
    positions, all on the device)."""
    import tiny_models

    folder = {"qwen2_vl": lambda f: tiny_models.tiny_qwen2_vl(f, "2"),
              "qwen2_5_vl": lambda f: tiny_models.tiny_qwen2_vl(f, "2.5"),
              "flash_vstream_qwen": tiny_models.tiny_flash_vstream_qwen,
              "llava_onevision": tiny_models.tiny_llava_onevision}[kind](tmp_path / kind)
    logits, counts = {}, {}
    for device in ("cpu", "cuda"):
        model = load_model(str(folder), dtype="float32", device=device)
        with Session(model, SessionConfig(asr=False, ocr=False, device=device)) as session:
            for t, image in enumerate(scene_frames(7, seed=7)):
                session.push_frame(Frame(image, float(t), t), wait=True)
            session.wait()
            context = session.context("what is shown?")
            counts[device] = context.memory.counts()
            embedded = model.embed(model.question_pieces(context, "what is shown?"))
            with torch.inference_mode():
                kwargs = {} if embedded.positions is None else {"position_ids": embedded.positions}
                logits[device] = model.lm(inputs_embeds=embedded.embeds, **kwargs).logits[0, -1].float().cpu()
            assert session.ask("what is shown?").text is not None
    assert counts["cuda"] == counts["cpu"]
    torch.testing.assert_close(logits["cuda"], logits["cpu"], rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@needs_cuda
def test_training_runs_in_bfloat16_on_cuda_and_the_held_out_loss_falls(tmp_path):
    """``vstream train`` on the GPU (precision ``auto``: bfloat16 autocast): a projector
    trained on stored memories of two kinds of clip, the held-out loss falls and the
    weights are saved in float32."""
    from safetensors.torch import load_file
    from tiny_models import sharpened_flash_vstream, tiny_clip

    from vstream.data import RecordFeatures, write_features
    from vstream.memory import MemoryTokens
    from vstream.train import TrainConfig, train

    flash = sharpened_flash_vstream(tmp_path, tiny_clip(tmp_path / "clip"))
    answers = ("the red square moves left", "a blue circle appears")
    records, features = [], tmp_path / "features"
    for i in range(40):
        pattern = torch.randn(8, 48, generator=torch.Generator().manual_seed(100 + i % 2))
        tokens = pattern + 0.3 * torch.randn(8, 48, generator=torch.Generator().manual_seed(i))
        write_features(features, RecordFeatures(f"clip{i:02d}", MemoryTokens(tokens, ["spatial"] * 8,
                                                                              [(float(i), float(i))] * 8),
                                                [], f"clip{i:02d}.mp4"))
        records.append({"id": f"clip{i:02d}", "video": f"clip{i:02d}.mp4",
                        "conversations": [{"from": "human", "value": "<video>\nWhat happens in the video?"},
                                          {"from": "gpt", "value": answers[i % 2]}]})
    data = tmp_path / "train.jsonl"
    write_jsonl(data, records)
    config = TrainConfig(model=str(flash), data=str(data), features=str(features), out=str(tmp_path / "run"),
                         held_out=0.25, epochs=3, learning_rate=3e-3, accumulate=2, checkpoint_every=4, device="cuda")
    report = train(config, progress=False)
    assert report.held_out_after < report.held_out_before - 0.05
    weights = load_file(tmp_path / "run" / "projector.safetensors")
    assert weights and all(tensor.dtype == torch.float32 for tensor in weights.values())
