"""Multi-granular generation (PUMA): the feature pyramid, the generation head, image
decoders, and the bank's thumbnails they draw on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import tiny_llama

from vstream.errors import ConfigError, MemoryStateError, ModelLoadError
from vstream.memory import BankConfig, FeatureBank, StarConfig, StarMemory
from vstream.models import load_model
from vstream.models.heads import create_head, list_heads
from vstream.models.heads.multigranular import (
    LEVELS,
    MultigranularConfig,
    MultigranularHead,
    hidden_size_of,
    pyramid,
    request,
)
from vstream.models.image_decoders import DiffusionConfig, DiffusionDecoder, RetrievalDecoder, create_decoder

torch.set_num_threads(1)
D = 8  # the pixel encoder's width


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(str(tiny_llama(tmp_path_factory.mktemp("multigranular") / "llama")))


def images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct pictures ``[24, 32, 3]`` uint8: random 3x4 colour blocks of 8x8 pixels (JPEG keeps them)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (3, 4, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1) for _ in range(count)]


def closest(thumbnail, pictures: list[np.ndarray]) -> int:
    """Index of the picture a (lossy) thumbnail is of."""
    return int(np.argmin([np.abs(np.asarray(thumbnail, np.int16) - p).mean() for p in pictures]))


def star(grid: int = 4, **bank) -> StarMemory:
    """A small STAR memory whose bank keeps ``grid``x``grid`` frames."""
    return StarMemory(StarConfig(base_grid=grid, spatial_grid=grid, temporal_grid=2, temporal_length=4,
                                 abstract_length=2, abstract_chunk=2, retrieved_length=1, retrieved_grid=grid,
                                 bank=BankConfig(grid=grid, device="cpu", **bank)))


def filled(count: int = 12, grid: int = 4, seed: int = 0) -> tuple[StarMemory, torch.Tensor, list[np.ndarray]]:
    """A memory holding ``count`` random frames (16x16 patches, one a second) with thumbnails."""
    features = torch.randn(count, 256, D, generator=torch.Generator().manual_seed(seed))
    pictures = images(count, seed)
    memory = star(grid)
    memory.extend(features, [float(t) for t in range(count)], thumbnails=pictures)
    return memory, features, pictures


# -- pyramid ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 3, 8, 1024])
def test_each_level_is_the_2x2_block_mean_of_the_next_finer(dim):
    x = torch.randn(2, 256, dim, generator=torch.Generator().manual_seed(dim))
    levels = pyramid(x)
    assert sorted(levels) == list(LEVELS)
    assert torch.equal(levels[256], x)
    for fine, coarse in zip(LEVELS[:0:-1], LEVELS[-2::-1]):
        g = int(fine**0.5)
        blocks = levels[fine].reshape(2, g // 2, 2, g // 2, 2, dim).mean(dim=(2, 4)).reshape(2, coarse, dim)
        torch.testing.assert_close(levels[coarse], blocks)
    torch.testing.assert_close(levels[1][:, 0], x.mean(dim=1))
    assert pyramid(x[0])[16].shape == (16, dim)  # unbatched in, unbatched out


def test_finer_grids_pool_to_16_and_coarser_give_the_levels_they_can():
    assert sorted(pyramid(torch.randn(32 * 32, 4))) == list(LEVELS)
    assert sorted(pyramid(torch.randn(64, 4))) == [1, 4, 16, 64]
    assert sorted(pyramid(torch.randn(1, 4))) == [1]


@pytest.mark.parametrize("patches", [15, 27 * 27, 12 * 12, 24 * 24])
def test_bad_grids_are_refused(patches):
    with pytest.raises(ConfigError, match="grid"):
        pyramid(torch.randn(patches, 4))


# -- the head ----------------------------------------------------------------------------------


def test_head_is_registered_and_its_config_is_checked():
    assert "multigranular" in list_heads()
    assert isinstance(create_head("multigranular", 32, feature_dim=D), MultigranularHead)
    for bad in ({"levels": [3]}, {"levels": []}, {"head": "conv"}, {"lr": 0}, {"cosine_weight": 0, "mse_weight": 0}):
        with pytest.raises(ConfigError):
            MultigranularConfig(**bad)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_queries_and_regression_have_the_level_shapes(model, kind):
    hidden = hidden_size_of(model)
    head = MultigranularHead(hidden, feature_dim=D, head=kind, levels=[1, 16, 64])
    assert {k: tuple(q.shape) for k, q in head.net.queries.items()} == {"1": (1, hidden), "16": (16, hidden),
                                                                        "64": (64, hidden)}
    for level in (1, 16, 64):
        out = head.generate(model, None, request(3.0), level)
        assert out.shape == (1, level, D) and out.dtype == torch.float32 and not out.requires_grad
    with pytest.raises(ConfigError, match="level"):
        head.generate(model, None, request(3.0), 4)
    with pytest.raises(ModelLoadError, match="hidden size"):
        MultigranularHead(hidden + 1, feature_dim=D).generate(model, None, "x", 1)


def test_training_reaches_the_mean_frame_and_leaves_the_llm_unchanged(model):
    """The best a head can do without telling requests apart is the mean frame; training
    must get near that from an untrained head's far worse loss. (The tiny random LLM's
    hidden states hardly differ between requests, ~0.5 % of their norm, so this test
    does not ask the head to tell frames apart.)"""
    memory, _, _ = filled(6)
    levels = [1, 4, 16]
    truth = [pyramid(memory.bank.features([i])[0]) for i in range(6)]

    def loss(predict) -> float:  # over every frame and level, on the requests training uses
        return float(np.mean([head.loss(predict(i, n), truth[i][n].unsqueeze(0)) for i in range(6) for n in levels]))

    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    head = MultigranularHead(hidden_size_of(model), feature_dim=D, levels=levels, lr=1e-2)
    mean_frame = {n: torch.stack([frame[n] for frame in truth]).mean(dim=0, keepdim=True) for n in levels}
    best_constant = loss(lambda i, n: mean_frame[n])
    untrained = loss(lambda i, n: head.generate(model, None, request(float(i)), n))
    assert untrained > 1.6 * best_constant
    for _ in range(40):
        head.train_step(model, memory, frames=2)
    assert loss(lambda i, n: head.generate(model, None, request(float(i)), n)) < 1.25 * best_constant
    after = model.lm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ConfigError, match="wide"):
        MultigranularHead(hidden_size_of(model), feature_dim=D + 1).train_step(model, memory)
    with pytest.raises(ConfigError, match="coarser"):
        MultigranularHead(hidden_size_of(model), feature_dim=D, levels=[64]).train_step(model, memory)
    memory.close()


def test_save_load_round_trip_and_damaged_files(model, tmp_path):
    head = MultigranularHead(hidden_size_of(model), feature_dim=D, head="linear", levels=[4, 16], seed=3)
    head.save(tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["multigranular.json",
                                                                    "multigranular.safetensors"]
    loaded = MultigranularHead.from_folder(tmp_path / "head")
    assert loaded.config == head.config and loaded.hidden_size == head.hidden_size
    assert torch.equal(loaded.generate(model, None, request(1.0), 16), head.generate(model, None, request(1.0), 16))

    with pytest.raises(ModelLoadError, match="no saved multigranular head"):
        MultigranularHead.from_folder(tmp_path / "missing")
    damaged = {
        "multigranular.safetensors": lambda p: p.write_bytes(p.read_bytes()[:40]),
        "multigranular.json": lambda p: p.write_text("{not json"),
    }
    for name, damage in damaged.items():
        folder = head.save(tmp_path / f"damaged-{name}")
        damage(folder / name)
        with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
            MultigranularHead.from_folder(folder)
    folder = head.save(tmp_path / "other-levels")
    meta = json.loads((folder / "multigranular.json").read_text())
    meta["config"]["levels"] = [1]
    (folder / "multigranular.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="weights"):
        MultigranularHead.from_folder(folder)


# -- thumbnails in the bank ------------------------------------------------------------------


def test_thumbnails_are_small_jpegs_nearest_in_time_and_optional():
    memory, _, pictures = filled(5)
    thumb = memory.thumbnail_at(2.4)
    assert thumb.format == "JPEG" and max(thumb.size) <= 96
    assert closest(thumb, pictures) == 2  # the frame at 2 s
    assert memory.frame_at(2.5) == 2 and memory.frame_at(-3) == 0 and memory.frame_at(99) == 4
    memory.add(torch.randn(256, D), 5.0)  # no image: no thumbnail
    assert memory.thumbnail_at(5.0) is None and memory.thumbnail_at(4.0) is not None
    with pytest.raises(MemoryStateError, match="thumbnails"):
        memory.extend(torch.randn(2, 256, D), [6.0, 7.0], thumbnails=images(1))
    memory.close()
    big = np.zeros((480, 640, 3), np.uint8)
    with StarMemory(StarConfig(bank=BankConfig(device="cpu", thumbnail_size=64))) as sized:
        sized.add(torch.randn(256, D), 0.0, thumbnail=big)
        assert sized.thumbnail_at(0).size == (64, 48)
    with StarMemory(StarConfig(bank=BankConfig(device="cpu", thumbnails=False))) as off:
        off.add(torch.randn(256, D), 0.0, thumbnail=big)
        assert off.thumbnail_at(0) is None


def test_thumbnail_ram_is_bounded_and_older_thumbnails_come_from_disk():
    config = BankConfig(grid=2, device="cpu", thumbnail_ram_frames=4)
    pictures = images(40)
    with FeatureBank(D, config) as bank:
        bank.add(torch.randn(20, 4, D), np.arange(20.0), thumbnails=pictures[:20])
        at_n = bank.ram_bytes()
        bank.add(torch.randn(20, 4, D), np.arange(20.0, 40.0), thumbnails=pictures[20:])
        at_2n = bank.ram_bytes()
        # the ring and four thumbnails; the index grows by one key per frame, as before
        assert abs((at_2n - 20 * 4 * D) - at_n) < 4 * 2000
        assert sum(map(len, bank._thumbnail_ring)) <= 4 * 2000
        old, new = bank.thumbnails([0, 39])
        assert closest(old, pictures) == 0 and closest(new, pictures) == 39


def test_thumbnails_round_trip_through_memory_save_and_load(tmp_path):
    memory, _, _ = filled(7)
    memory.add(torch.randn(256, D), 7.0)  # one frame without a thumbnail
    expected = [memory.thumbnail_at(t) for t in range(8)]
    memory.save(tmp_path / "saved")
    loaded = StarMemory.load(tmp_path / "saved")
    got = [loaded.thumbnail_at(t) for t in range(8)]
    assert got[7] is None and expected[7] is None
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got[:7], expected[:7]))
    loaded.add(torch.randn(256, D), 8.0, thumbnail=images(1)[0])  # continues after the restored bytes
    assert loaded.thumbnail_at(8.0) is not None and np.array_equal(np.asarray(loaded.thumbnail_at(1)),
                                                                    np.asarray(expected[1]))
    memory.close()
    loaded.close()


def test_a_bank_saved_before_thumbnails_still_loads(tmp_path):
    with FeatureBank(D, BankConfig(grid=2, device="cpu")) as bank:
        bank.add(torch.randn(3, 4, D), [0.0, 1.0, 2.0], thumbnails=images(3))
        bank.save(tmp_path)
    for name in ("thumbnails.npy", "thumbnails.bin"):
        (tmp_path / name).unlink()
    with FeatureBank.load(tmp_path) as old:
        assert old.thumbnails([0, 1, 2]) == [None, None, None]
        old.add(torch.randn(4, D), 3.0, thumbnails=images(1))
        assert old.thumbnails([3])[0] is not None


# -- decoders ----------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [1, 4, 16, 64, 256])
def test_retrieval_decoder_returns_the_thumbnail_of_the_nearest_frame(level):
    memory, features, pictures = filled(12, grid=4)
    decoder = create_decoder("retrieval", memory)
    side = min(int(level**0.5), 4)  # finer than the bank's 4x4: compared at 4x4

    def by_hand(grid_16: torch.Tensor) -> torch.Tensor:  # [..., 256, D] -> [..., side*side, D] block means
        g = 16 // side
        return grid_16.reshape(-1, side, g, side, g, D).mean(dim=(2, 4)).reshape(-1, side * side, D)

    stored = by_hand(features)  # what the bank holds, pooled by hand (before its float16 rounding)
    noise = torch.Generator().manual_seed(level)
    for i in (0, 5, 11):
        # a query that is no stored frame: frame i with noise, or a blend of two frames
        for query_16 in (features[i] + 0.5 * torch.randn(256, D, generator=noise),
                         0.65 * features[i] + 0.35 * features[(i + 3) % 12]):
            query = pyramid(query_16)[level].unsqueeze(0)
            expected = int(((stored - by_hand(query_16)) ** 2).sum(dim=(1, 2)).argmin())
            assert expected == i  # these queries stay nearest their own frame at every level
            assert decoder.nearest(query) == [expected]
            (picture,) = decoder.decode(query)
            assert closest(picture, pictures) == i
    assert decoder.nearest(torch.stack([pyramid(features[i])[level] for i in (3, 3)])) == [3, 3]
    with pytest.raises(ConfigError, match="square"):
        decoder.decode(torch.randn(1, 5, D))
    with pytest.raises(ConfigError, match="wide"):
        decoder.decode(torch.randn(1, 4, D + 1))
    memory.close()


def test_retrieval_decoder_needs_thumbnails():
    with star() as memory:
        memory.add(torch.randn(256, D), 0.0)
        with pytest.raises(ConfigError, match="no thumbnail"):
            RetrievalDecoder(memory).decode(torch.randn(1, 4, D))


@pytest.fixture(scope="module")
def diffusion_folder(tmp_path_factory):
    """A tiny random diffusers decoder: UNet (cross-attention width 16), VAE, DDIM scheduler."""
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path_factory.mktemp("decoder")
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4).save_pretrained(folder / "unet")
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=4, sample_size=16).save_pretrained(folder / "vae")
    diffusers.DDIMScheduler().save_pretrained(folder / "scheduler")
    return folder


def test_diffusion_decoder_draws_seeded_pictures_of_the_unet_size(diffusion_folder):
    decoder = DiffusionDecoder.from_pretrained(str(diffusion_folder), DiffusionConfig(steps=3, seed=1))
    features = torch.randn(2, 16, D)  # D != 16: through the seeded projection
    pictures = decoder.decode(features)
    assert len(pictures) == 2 and all(p.size == (16, 16) and p.mode == "RGB" for p in pictures)
    again = create_decoder(str(diffusion_folder), config=DiffusionConfig(steps=3, seed=1)).decode(features)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pictures, again))
    other = DiffusionDecoder.from_pretrained(diffusion_folder, DiffusionConfig(steps=3, seed=2)).decode(features)
    assert not np.array_equal(np.asarray(other[0]), np.asarray(pictures[0]))
    assert decoder.decode(torch.randn(1, 1, 16))[0].size == (16, 16)  # D == cross_attention_dim: as is


def test_diffusion_decoder_uses_a_stored_projection_and_refuses_bad_folders(diffusion_folder, tmp_path):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "projected"
    shutil.copytree(diffusion_folder, folder)
    save_file({"weight": torch.randn(16, D), "bias": torch.zeros(16)}, folder / "projection.safetensors")
    decoder = DiffusionDecoder.from_pretrained(folder, DiffusionConfig(steps=2))
    assert decoder.projection.in_features == D and len(decoder.decode(torch.randn(1, 4, D))) == 1
    with pytest.raises(ConfigError, match="wide"):
        decoder.decode(torch.randn(1, 4, D + 1))
    with pytest.raises(ModelLoadError, match="no such folder"):
        DiffusionDecoder.from_pretrained(str(tmp_path / "missing" / "decoder"))
    shutil.rmtree(folder / "vae")
    with pytest.raises(ModelLoadError, match="missing vae"):
        DiffusionDecoder.from_pretrained(folder)
