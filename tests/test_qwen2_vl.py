"""Qwen2-VL and Qwen2.5-VL: loaded through ``load_model`` from tiny local checkpoints, their
own tower as the frame encoder, and memory tokens fed to the LLM as the model's own
code feeds an image (the same logits), with generation and evidence on top."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_qwen2_vl

from vstream.memory import BankConfig, StarConfig, StarMemory
from vstream.models import load_model
from vstream.models.base import _PLACEHOLDER
from vstream.models.prompt import SYSTEM_PROMPT, Context, Piece, user_pieces
from vstream.session import Session, SessionConfig
from vstream.types import Frame

torch.set_num_threads(1)
VERSIONS = ["2", "2.5"]


@pytest.fixture(scope="module", params=VERSIONS)
def qwen(request, tmp_path_factory):
    folder = tiny_qwen2_vl(tmp_path_factory.mktemp(f"qwen{request.param}") / "model", request.param)
    return load_model(str(folder), device="cpu")


def frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` 48×64 frames: a different colour block on noise each."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        image = rng.integers(0, 60, (48, 64, 3), dtype=np.uint8)
        image[8 * i : 8 * i + 20, 10:40] = [(90 * i) % 255, 200, 255 - 60 * i]
        images.append(image)
    return images


def test_loads_with_its_own_tower_as_the_frame_encoder(qwen):
    encoder = qwen.frame_encoder
    assert type(qwen).__name__ in ("Qwen2VLModel", "Qwen2_5VLModel")
    assert encoder.tower is qwen.lm.model.visual and (encoder.grid, encoder.dim) == (16, 32)
    features = encoder.encode(frames(2))
    assert features.shape == (2, 256, 32) and features.dtype == torch.float32
    assert not torch.allclose(features[0], features[1])  # each frame its own tokens


def test_memory_tokens_read_as_the_models_own_code_reads_images_and_video(qwen):
    """Three frames into a memory that keeps them whole (its spatial memory at the frame
    grid, nothing else), the prompt the model gets in a session, through vstream's
    embeddings and M-RoPE positions: the same logits as the model's own code (its image
    processor, tower, placeholder scatter and ``get_rope_index``) given the same token ids
    and the frames' pixels. Qwen2-VL reads each run as an image after its time marker;
    Qwen2.5-VL reads the memory as one video of the frames (each duplicated over the
    tower's 2-frame temporal patch, as an image is), its time axis in seconds."""
    images = frames(3)
    config = StarConfig(base_grid=16, spatial_grid=16, spatial_length=3, temporal_length=0, abstract_length=0,
                        retrieved_length=0, bank=BankConfig(grid=8))
    with StarMemory(config) as memory:
        memory.extend(qwen.frame_encoder.encode(images), [0.0, 1.0, 2.0])
        context = Context(memory=memory.tokens(), duration=3.0)
    pieces = user_pieces(context, "what is shown?", visual=True, timed=qwen.timed_memory)
    embedded = qwen.embed(pieces)
    with torch.inference_mode():
        ours = qwen.lm(inputs_embeds=embedded.embeds, position_ids=embedded.positions).logits

    # the same prompt as token ids, the memory as the model's image or video placeholders
    tokenizer, lm_config = qwen.tokenizer, qwen.lm.config
    video = not qwen.timed_memory
    pad = lm_config.video_token_id if video else lm_config.image_token_id
    before, after = qwen.render(SYSTEM_PROMPT).split(_PLACEHOLDER)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    prompt = ids(before)
    for i, piece in enumerate(pieces):
        if piece.features is None:
            prompt += ids(piece.text)
            continue
        first = i == 0 or pieces[i - 1].features is None
        last = i == len(pieces) - 1 or pieces[i + 1].features is None
        prompt += [lm_config.vision_start_token_id] * first + [pad] * piece.features.shape[0]
        prompt += [lm_config.vision_end_token_id] * last
    prompt += ids(after)
    input_ids = torch.tensor([prompt])
    side = qwen.frame_encoder.side
    square = [np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC)) for image in images]
    pixels = qwen.image_processor(images=square, size={"shortest_edge": side * side, "longest_edge": side * side},
                                  return_tensors="pt")
    assert pixels["image_grid_thw"].tolist() == [[1, 32, 32]] * 3
    if video:  # a video's temporal patches are laid out as its frames' images are, one after another
        visual = {"pixel_values_videos": pixels["pixel_values"], "video_grid_thw": torch.tensor([[3, 32, 32]]),
                  "second_per_grid_ts": torch.tensor([1.0])}
    else:
        visual = {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
    with torch.inference_mode():
        theirs = qwen.lm(input_ids=input_ids, mm_token_type_ids=(input_ids == pad).int() * (2 if video else 1),
                         **visual).logits
    assert ours.shape == theirs.shape and ours.shape[1] == len(prompt)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert int(embedded.positions.max()) + 1 < len(prompt)  # not 0..L-1: the grids fold the positions


def test_qwen2_5_places_a_long_memory_on_its_time_axis(qwen):
    """Qwen2.5-VL: runs 10 s apart sit ``tokens_per_second`` · 10 apart on the time axis, and
    the text after the block goes on past its latest time (the original Qwen2.5-VL rule),
    so no text position repeats a memory position."""
    if qwen.timed_memory:
        pytest.skip("Qwen2-VL reads runs as images, without a time axis")
    features = torch.zeros(4, 32)
    pieces = [Piece(text="Video:"), Piece(features=features, evidence=(0.0, 0.0, "frame")),
              Piece(features=features, evidence=(10.0, 10.0, "frame")), Piece(text="Question: when?")]
    positions = qwen.embed(pieces).positions[:, 0]
    vision = qwen.embed(pieces).visual[0]
    time_axis = positions[0][vision]
    start = int(time_axis[0])
    assert time_axis.tolist() == [start] * 4 + [start + 20] * 4  # tokens_per_second 2
    assert positions[1][vision].tolist() == [start, start, start + 1, start + 1] * 2  # a 2x2 grid each
    after = positions[:, int(vision.nonzero().max()) + 1]
    assert after.tolist() == [start + 21] * 3  # the vision end token, one past the block's latest position


def test_a_session_answers_with_evidence_and_positions_carry_through_generation(qwen):
    """A live session on the Qwen model: frames through its tower into the default
    memory, an answer token by token; the same answer twice (greedy), and a first token
    equal to the argmax of one forward over the prompt with its M-RoPE positions."""
    config = SessionConfig(asr=False, ocr=False, device="cpu")
    with Session(qwen, config) as session:
        for t, image in enumerate(frames(4)):
            session.push_frame(Frame(image, float(t), t), wait=True)
        session.wait()
        first = session.ask("what is shown?")
        again = session.ask("what is shown?")
        embedded = qwen.embed(user_pieces(session.context("what is shown?"), "what is shown?", visual=True,
                                          timed=qwen.timed_memory))
    assert first.text == again.text and first.evidence and all(e.kind in ("frame",) for e in first.evidence)
    with torch.inference_mode():
        logits = qwen.lm(inputs_embeds=embedded.embeds, position_ids=embedded.positions).logits[0, -1]
    top = qwen.tokenizer.decode([int(logits.argmax())], skip_special_tokens=True)
    assert first.text.startswith(top.strip()) or int(logits.argmax()) in qwen.stop


def test_vstream_models_lists_architectures_and_the_cached_checkpoints(tmp_path, capsys):
    """A Hugging Face cache holding a Qwen2-VL, a LLaMA and a BERT checkpoint: each listed
    under its architecture (BERT under none: it cannot answer), with how it reads the memory."""
    import json

    from vstream.cli import main

    for repo, model_type, architecture in (("org/qwen", "qwen2_vl", "Qwen2VLForConditionalGeneration"),
                                           ("org/llama", "llama", "LlamaForCausalLM"), ("org/bert", "bert", "BertModel")):
        folder = tmp_path / f"models--{repo.replace('/', '--')}"
        snapshot = folder / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [architecture]}))
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text("0" * 40)
    assert main(["models", "--cache-dir", str(tmp_path), "--json"]) in (0, None)
    rows = {row["model_type"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"llava_onevision", "qwen2_vl", "qwen2_5_vl", "vstream", "flash_vstream_qwen2_vl", "causal-lm"}
    assert rows["qwen2_vl"]["installed"] == ["org/qwen"] and rows["causal-lm"]["installed"] == ["org/llama"]
    assert "M-RoPE" in rows["qwen2_vl"]["prompt"] and "one block" in rows["vstream"]["prompt"]
    assert main(["models", "--cache-dir", str(tmp_path)]) in (0, None)
    assert "installed:    org/qwen" in capsys.readouterr().out
