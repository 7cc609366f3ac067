"""Flash-VStream-Qwen: a tiny checkpoint in the released layout (a Qwen2-VL config renamed
``flash_vstream_qwen2_vl`` with ``flash_memory_config``, weights under transformers 4.45's
names) loads, runs a Flash memory at its settings, feeds the merger what the model's own
image path feeds it, and places the memory as the reference's ``calc_am_rope`` does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import scene_frames
from safetensors.torch import load_file
from tiny_models import tiny_flash_vstream_qwen

from vstream.errors import ModelLoadError
from vstream.memory import FlashConfig, FlashMemory
from vstream.models import load_model
from vstream.models.prompt import Piece
from vstream.session import Session, SessionConfig
from vstream.types import Frame

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_flash_vstream_qwen(tmp_path_factory.mktemp("flash_qwen") / "model")


@pytest.fixture(scope="module")
def model(folder):
    return load_model(str(folder), device="cpu")


def test_loads_the_released_layout_with_its_memory_settings(folder, model):
    saved = load_file(folder / "model.safetensors")
    assert torch.equal(model.lm.model.visual.merger.mlp[0].weight, saved["visual.merger.mlp.0.weight"])
    assert torch.equal(model.lm.model.language_model.layers[1].mlp.up_proj.weight,
                       saved["model.layers.1.mlp.up_proj.weight"])
    config = model.memory_config()
    assert isinstance(config, FlashConfig)
    # lengths 8 and 4 halved, as the reference's memory halves them; synopsis at half resolution
    assert (config.synopsis_length, config.detail_length) == (4, 2)
    assert (config.synopsis_grid, config.detail_grid, config.base_grid) == (16, 32, 32)
    encoder = model.frame_encoder
    assert (encoder.grid, encoder.dim) == (32, 64)  # 32x32 patches before the merger, full and half views


def test_the_half_view_is_the_tower_on_the_frame_at_half_size(model):
    """A frame of 2×2 pixel blocks: at half size (its pixels averaged 2×2) it is exactly
    every other pixel, so the model's own processor and tower on that 64×64 image give the
    half view's patches, which the features carry pooled 2×2 (each repeated over the 2×2
    full patches it covers)."""
    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = blocks.repeat(2, axis=0).repeat(2, axis=1)  # 128×128: the encoder's size, no resampling
    features = model.frame_encoder.encode([image])[0].reshape(32, 32, 64)
    half = features[..., 32:]
    torch.testing.assert_close(half[0::2, 0::2], half[1::2, 1::2])  # one patch over each 2x2 block
    batch = model.image_processor(images=[blocks], size={"shortest_edge": 64 * 64, "longest_edge": 64 * 64},
                                  return_tensors="pt")
    with torch.inference_mode():
        states = model.lm.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).last_hidden_state
    theirs = states.reshape(8, 8, 2, 2, 32).permute(0, 2, 1, 3, 4).reshape(16, 16, 32)  # windows -> raster
    torch.testing.assert_close(half[0::2, 0::2], theirs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(features[0::2, 0::2, :32], theirs, atol=1e-2)  # not the full view


@pytest.mark.parametrize(("field", "value", "said"), [
    ("flash_memory_temporal_method", "dbscan", "dbscan"),
    ("flash_memory_spatial_length", 7, "even ints"),
    ("flash_memory_spatial_length", 12, "detail_length"),  # more detail frames than centroids
    (None, "120 frames", "expected an object"),
])
def test_refuses_a_memory_config_it_does_not_run(tmp_path, field, value, said):
    import json

    folder = tiny_flash_vstream_qwen(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    if field is None:
        config["vision_config"]["flash_memory_config"] = value
    else:
        config["vision_config"]["flash_memory_config"][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=said):
        load_model(str(folder), device="cpu")


def test_a_frame_reaches_the_llm_as_the_models_own_image_path_gives_it(model):
    """A frame's features through the memory's raster layout and ``project`` (the merger on
    its full view) equal what Qwen2-VL's own ``get_image_features`` gives for that frame at
    the same size: the detail memory feeds the LLM exactly the full-resolution frame."""
    from PIL import Image

    image = scene_frames(1, scenes=3)[0]
    features = model.frame_encoder.encode([image])[0]  # [32*32, 64], raster order, full view first
    ours = model.project(features)
    side = model.frame_encoder.side
    square = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC))
    batch = model.image_processor(images=[square], size={"shortest_edge": side * side, "longest_edge": side * side},
                                  return_tensors="pt")
    with torch.inference_mode():
        theirs = model.lm.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    theirs = getattr(theirs, "pooler_output", theirs)
    theirs = torch.cat(list(theirs)) if isinstance(theirs, (list, tuple)) else theirs
    assert ours.shape == (256, 32)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-4, atol=1e-4)


def test_positions_follow_calc_am_rope(model):
    """Two detail frames (at 1 s and 3 s) and two centroids (spans 0-2 s and 3-5 s): from the
    block's first position p, detail tokens at p + (frame, h, w) on a 16x16 grid, centroid
    tokens at p + 512 + (frame, h, w) on an 8x8 grid (frame = the span's middle), the text
    after from p + 512 + max(2 centroids, 8 rows) (reference: visual start + spatial size +
    the placeholder grid's extent)."""
    detail, synopsis = torch.zeros(1024, 64), torch.zeros(256, 64)
    pieces = [Piece(text="Video:"), Piece(features=detail, evidence=(1.0, 1.0, "frame")),
              Piece(features=detail, evidence=(3.0, 3.0, "frame")),
              Piece(features=synopsis, evidence=(0.0, 2.0, "frame")),
              Piece(features=synopsis, evidence=(3.0, 5.0, "frame")), Piece(text="Question: what?")]
    embedded = model.embed(pieces)
    positions, vision = embedded.positions[:, 0], embedded.visual[0]
    assert int(vision.sum()) == 2 * 256 + 2 * 64
    at = positions[:, vision]
    p = int(at[1, 0])  # the first token's row is 0
    grid = torch.arange(256)
    for i, frame in enumerate((1, 3)):
        block = at[:, i * 256:(i + 1) * 256]
        assert block[0].tolist() == [p + frame] * 256
        assert block[1].tolist() == (p + grid // 16).tolist() and block[2].tolist() == (p + grid % 16).tolist()
    small = torch.arange(64)
    for i, frame in enumerate((1, 4)):  # middles 1.0 and 4.0
        block = at[:, 512 + i * 64:512 + (i + 1) * 64]
        assert block[0].tolist() == [p + 512 + frame] * 64
        assert block[1].tolist() == (p + 512 + small // 8).tolist()
        assert block[2].tolist() == (p + 512 + small % 8).tolist()
    after = positions[:, int(vision.nonzero().max()) + 1]  # the vision end token
    assert after.tolist() == [p + 512 + 8] * 3
    assert int(positions[0, int(vision.nonzero().min()) - 1]) == p - 1  # the vision start token just before


def test_a_session_runs_the_flash_memory_and_answers(model, tmp_path):
    """Seven frames of three scenes into the session's memory: a Flash memory holding 4
    centroids and 2 detail frames (6 items: 4·64 + 2·256 LLM tokens between the vision
    marks); the answer is the same twice, its first token the argmax of one forward over
    the prompt with its positions; saved and loaded, the memory gives the same tokens."""
    config = SessionConfig(asr=False, ocr=False, device="cpu")
    with Session(model, config) as session:
        for t, image in enumerate(scene_frames(7, scenes=3)):
            session.push_frame(Frame(image, float(t), t), wait=True)
        session.wait()
        assert isinstance(session.memory, FlashMemory)
        assert session.memory.tokens().counts() == {"synopsis": 4 * 256, "detail": 2 * 1024}
        first, again = session.ask("what is shown?"), session.ask("what is shown?")
        pieces = model.question_pieces(session.context("what is shown?"), "what is shown?")
        session.save(tmp_path / "saved")
        before = session.memory.tokens().tokens
    memory = [p for p in pieces if p.features is not None]
    assert [p.features.shape[0] for p in memory] == [1024, 1024, 256, 256, 256, 256]  # detail first
    embedded = model.embed(pieces)
    assert int(embedded.visual.sum()) == 2 * 256 + 4 * 64
    assert first.text == again.text and first.evidence
    with torch.inference_mode():
        logits = model.lm(inputs_embeds=embedded.embeds, position_ids=embedded.positions).logits[0, -1]
    top = int(logits.argmax())
    assert top in model.stop or first.text.startswith(model.tokenizer.decode([top], skip_special_tokens=True).strip())
    with Session.load(tmp_path / "saved", model, config) as restored:
        assert isinstance(restored.memory, FlashMemory)
        torch.testing.assert_close(restored.memory.tokens().tokens, before)
