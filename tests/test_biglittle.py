"""The big.LITTLE encoder on tiny random towers written with ``save_pretrained``: the
two ends (``keep_ratio`` 1 and 0) against ``VisionEncoder``, the order after the
scatter, scoring and top-k, and the configs it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_vision_tower as write_tower

from vstream.encoders.biglittle import BigLittleConfig, BigLittleEncoder, merge
from vstream.encoders.registry import FrameEncoder
from vstream.encoders.vision import VisionConfig, VisionEncoder
from vstream.errors import ConfigError, EncoderError

torch.set_num_threads(1)

# 32×32 images in 4×4 patches -> an 8×8 grid. Big: CLIP, D = 32; little: CLIP or SigLIP, d = 16.


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {
        "big": write_tower(root / "big", "clip", 32),
        "little_clip": write_tower(root / "little_clip", "clip", 16, seed=1),
        "little_siglip": write_tower(root / "little_siglip", "siglip", 16, seed=2),
        "big_siglip": write_tower(root / "big_siglip", "siglip", 32, seed=3),
        "other_grid": write_tower(root / "other_grid", "clip", 16, image_size=48, seed=4),
    }


def images(count: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 3 * i, 48, 3), dtype=np.uint8) for i in range(count)]


def encoder(towers, big="big", little="little_clip", **fields) -> BigLittleEncoder:
    return BigLittleEncoder(BigLittleConfig(big=towers[big], little=towers[little], **fields))


@pytest.mark.parametrize("big,little", [("big", "little_clip"), ("big_siglip", "little_siglip")])
def test_keep_all_equals_the_big_tower(towers, big, little):
    frames = images()
    model = encoder(towers, big, little, keep_ratio=1.0)
    assert isinstance(model, FrameEncoder) and (model.grid, model.dim, model.kept_count) == (8, 32, 64)
    features = model.encode(frames)
    assert features.shape == (3, 64, 32) and features.dtype == torch.float32
    reference = VisionEncoder(VisionConfig(model=towers[big], layer=-2)).encode(frames)
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("little", ["little_clip", "little_siglip"])
def test_keep_none_equals_the_projected_little_tower(towers, little):
    frames = images()
    model = encoder(towers, little=little, keep_ratio=0.0)
    little_features = VisionEncoder(VisionConfig(model=towers[little], layer=-2)).encode(frames)
    with torch.no_grad():
        expected = model.projection(little_features)
    torch.testing.assert_close(model.encode(frames), expected, atol=1e-5, rtol=1e-5)
    weight = model.projection.weight  # [32, 16], orthonormal columns: an isometry
    torch.testing.assert_close(weight.T @ weight, torch.eye(16), atol=1e-5, rtol=1e-5)


def test_same_width_projection_is_identity(towers):
    model = encoder(towers, little="big_siglip", keep_ratio=0.0)
    assert isinstance(model.projection, torch.nn.Identity)
    reference = VisionEncoder(VisionConfig(model=towers["big_siglip"])).encode(images(2))
    torch.testing.assert_close(model.encode(images(2)), reference, atol=1e-5, rtol=1e-5)


def test_merge_puts_kept_rows_at_their_patch_positions():
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(2, 10, 4, generator=generator)
    kept = torch.stack([torch.randperm(10, generator=generator)[:3] for _ in range(2)])
    kept_features = torch.randn(2, 3, 4, generator=generator)
    merged = merge(context, kept_features, kept)
    for b in range(2):
        for j in range(3):
            torch.testing.assert_close(merged[b, kept[b, j]], kept_features[b, j])
        others = [p for p in range(10) if p not in kept[b].tolist()]
        torch.testing.assert_close(merged[b, others], context[b, others])


def test_order_restored_after_shuffled_big_pass(towers):
    """The big pass on all patches in a random order, scattered back, is the big tower."""
    frames = images(2)
    model = encoder(towers, keep_ratio=1.0)
    generator = torch.Generator().manual_seed(1)
    shuffled = torch.stack([torch.randperm(64, generator=generator) for _ in range(2)])
    with torch.no_grad():
        pixels = model._pixels(model.big, frames)
        context = torch.zeros(2, 64, 32)
        merged = model._run_big(pixels, context, shuffled)
    torch.testing.assert_close(merged, model.encode(frames), atol=1e-5, rtol=1e-5)


def test_partial_keep_uses_big_features_on_kept_patches_only(towers):
    frames = images(2)
    model = encoder(towers, keep_ratio=0.25)
    assert model.kept_count == 16
    kept = model.select(model.scores(frames))
    features = model.encode(frames)
    little = encoder(towers, keep_ratio=0.0).encode(frames)
    for b in range(2):
        mask = torch.zeros(64, dtype=torch.bool)
        mask[kept[b]] = True
        torch.testing.assert_close(features[b, ~mask], little[b, ~mask])
        assert not torch.allclose(features[b, mask], little[b, mask], atol=1e-3)


@pytest.mark.parametrize("little,scorer", [("little_clip", "attention"), ("little_siglip", "attention"),
                                           ("little_clip", "linear")])
def test_scores_and_top_k(towers, little, scorer):
    frames = images(3)
    model = encoder(towers, little=little, scorer=scorer, keep_ratio=0.1)
    scores = model.scores(frames)
    assert scores.shape == (3, 64) and scores.dtype == torch.float32 and bool((scores >= 0).all())
    torch.testing.assert_close(scores.sum(dim=-1), torch.ones(3))
    kept = model.select(scores)
    assert kept.shape == (3, 6) and bool((kept.diff(dim=-1) > 0).all())  # round(0.1 * 64), patch order
    for b in range(3):
        threshold = scores[b, kept[b]].min()
        dropped = [p for p in range(64) if p not in kept[b].tolist()]
        assert bool((scores[b, dropped] <= threshold).all())
    assert (model.scorer is None) == (scorer == "attention")


def test_registered_and_empty_batch(towers):
    from vstream.encoders.registry import create_encoder

    model = create_encoder("biglittle", big=towers["big"], little=towers["little_clip"])
    assert isinstance(model, BigLittleEncoder)
    assert model.encode([]).shape == (0, 64, 32)


@pytest.mark.parametrize("fields", [{"keep_ratio": 1.5}, {"keep_ratio": -0.1}, {"keep_ratio": True},
                                    {"scorer": "random"}, {"layer": 0}, {"big": ""}, {"dtype": "int8"}])
def test_bad_configs(fields):
    with pytest.raises(ConfigError):
        BigLittleConfig(**{"big": "a/b", "little": "c/d", **fields})


def test_grids_must_match(towers):
    with pytest.raises(EncoderError, match="patch grid"):
        encoder(towers, little="other_grid")


def test_config_round_trip():
    config = BigLittleConfig(big="a/b", little="c/d", keep_ratio=0.5, scorer="linear")
    assert BigLittleConfig.from_json(config.to_json()) == config


def cosine_to_big(enc: BigLittleEncoder, frames) -> float:
    reference = enc.big.encode(frames)
    return float(torch.nn.functional.cosine_similarity(enc.encode(frames), reference, dim=-1).mean())


def blocks(count: int, seed: int) -> list[np.ndarray]:
    """Frames of 4×4 flat colour blocks: structure a patch's neighbours share, as in real footage."""
    rng = np.random.default_rng(seed)
    return [np.kron(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), np.ones((10, 12, 1), np.uint8))
            for _ in range(count)]


def test_calibration_fits_the_projection_and_scorer_and_helps_on_new_frames(towers, tmp_path):
    enc = encoder(towers, keep_ratio=0.25)
    train, held_out = blocks(12, seed=5), blocks(4, seed=6)
    before = cosine_to_big(enc, held_out)
    fit = enc.calibrate(train)
    assert fit["mse_after"] < 0.5 * fit["mse_before"]  # least squares beats the seeded orthogonal map
    assert enc.config.scorer == "linear" and enc.scorer is not None
    after = cosine_to_big(enc, held_out)
    assert after > before + 0.1  # on frames it was not fitted to
    # the scorer ranks patches by how badly the projection stands in for them
    with torch.inference_mode():
        little = enc._run_little(enc._pixels(enc.little, train))[0]
        error = ((enc.projection(little) - enc.big.encode(train)) ** 2).sum(-1)
        predicted = enc.scorer(little).squeeze(-1)
    chosen = error.gather(1, predicted.topk(enc.kept_count, dim=1).indices)
    assert float(chosen.mean()) > 1.15 * float(error.mean())  # the big tower goes where the error is
    enc.save_calibration(tmp_path / "calibration")
    again = encoder(towers, keep_ratio=0.25, calibration=str(tmp_path / "calibration"))
    torch.testing.assert_close(again.encode(held_out), enc.encode(held_out))


def test_calibration_files_are_checked(towers, tmp_path):
    with pytest.raises(EncoderError, match="nothing fitted"):
        encoder(towers).save_calibration(tmp_path / "none")
    with pytest.raises(EncoderError, match="no readable calibration"):
        encoder(towers, calibration=str(tmp_path / "missing"))
    fitted = encoder(towers)
    fitted.calibrate(images(4))
    fitted.save_calibration(tmp_path / "c")
    with pytest.raises(EncoderError, match="these are 16 and 16"):  # fitted for a 32-wide big tower
        encoder(towers, big="little_clip", little="little_siglip", calibration=str(tmp_path / "c"))
    other = encoder(towers, little="little_siglip")  # same widths: loads
    other.load_calibration(tmp_path / "c")
    (tmp_path / "c" / "calibration.safetensors").write_bytes(b"junk")
    with pytest.raises(EncoderError, match="no readable calibration"):
        other.load_calibration(tmp_path / "c")
