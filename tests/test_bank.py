"""FeatureBank: RAM ring + write-through spill file, FAISS search, save/load, bounded RAM."""

from __future__ import annotations

import gc
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from vstream.errors import ConfigError, MemoryStateError
from vstream.memory.bank import FeatureBank, all_finite
from vstream.memory.config import BankConfig

torch.set_num_threads(1)

G, D = 2, 8
T = G * G


def frame_bytes(dtype: str = "float32", grid: int = G, dim: int = D) -> int:
    return grid * grid * dim * np.dtype(dtype).itemsize


def config(frames_in_ram: int = 3, dtype: str = "float32", **kwargs) -> BankConfig:
    """A tiny BankConfig whose RAM ring holds exactly ``frames_in_ram`` frames."""
    ram_mb = frames_in_ram * frame_bytes(dtype, kwargs.get("grid", G)) / 2**20
    return BankConfig(grid=G, dtype=dtype, ram_mb=ram_mb, device="cpu", **kwargs)


def frames(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, T, D, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def bank():
    with FeatureBank(D, config()) as b:
        yield b


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_features_round_trip_in_ram_and_spilled(dtype):
    x = frames(10)
    with FeatureBank(D, config(3, dtype)) as b:
        assert b.ram_frames == 3
        assert b.add(x[0], 0.0) == range(1)
        assert b.add(x[1:5], [1.0, 2.0, 2.0, 3.5]) == range(1, 5)
        assert b.add(x[5:10], torch.arange(5, 10, dtype=torch.float64)) == range(5, 10)
        assert len(b) == 10
        np.testing.assert_array_equal(b.times, [0, 1, 2, 2, 3.5, 5, 6, 7, 8, 9])
        assert b.times.dtype == np.float64 and not b.times.flags.writeable
        stored = x.to(getattr(torch, dtype)).float()
        got = b.features(range(10))  # 0..6 come from the spill file, 7..9 from the ring
        assert got.dtype == torch.float32 and got.shape == (10, T, D)
        assert torch.equal(got, stored)
        assert torch.equal(b.features(torch.tensor([9, 0, 8, 0])), stored[[9, 0, 8, 0]])
        assert b.features([]).shape == (0, T, D)
        assert os.path.getsize(b.spill_path) == 10 * frame_bytes(dtype)


def test_batch_larger_than_ring_keeps_newest():
    x = frames(7)
    with FeatureBank(D, config(3)) as b:
        b.add(x, np.arange(7.0))
        assert torch.equal(b.features(range(7)), x)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite_reads_the_exponent_bits(dtype):
    info = np.finfo(dtype)
    values = np.array([0.0, -0.0, 1.0, info.max, -info.max, info.tiny, info.tiny / 4], dtype)  # subnormal too
    assert all_finite(values) and all_finite(torch.from_numpy(values)) and all_finite(values[::2])
    for bad in (np.inf, -np.inf, np.nan):
        spoiled = values.copy()
        spoiled[3] = bad
        assert not all_finite(spoiled) and not all_finite(torch.from_numpy(spoiled))
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.bfloat16))  # no numpy twin: torch decides


def test_ram_ring_allocated_once_and_index_grows_by_one_key_per_frame():
    with FeatureBank(D, config(5)) as b:
        cache = b.ram_frames * frame_bytes()
        assert b.ram_frames == 5 and b.ram_bytes() == cache  # allocated up front
        b.add(frames(20), np.arange(20.0))
        at_n = b.ram_bytes()
        b.add(frames(20, seed=1), np.arange(20.0, 40.0))
        assert at_n == cache + 20 * 4 * D
        assert b.ram_bytes() - at_n == 20 * 4 * D


def test_ram_frames_from_budget():
    one = frame_bytes("float16", 8, 64)  # 8 KiB
    assert FeatureBank(64, BankConfig(ram_mb=1, device="cpu")).ram_frames == 2**20 // one
    assert FeatureBank(64, BankConfig(ram_mb=1e-6, device="cpu")).ram_frames == 1


def test_search_finds_planted_frame_with_its_time(bank):
    x = frames(12)
    bank.add(x, np.linspace(0.0, 22.0, 12))
    ids, scores = bank.search(x[7].mean(0) + 1e-3, k=3)
    assert ids.shape == scores.shape == (1, 3) and ids.dtype == torch.int64
    assert ids[0, 0] == 7 and bank.times[ids[0, 0]] == 14.0
    assert scores[0, 0] < 1e-4 and torch.all(scores[0, 1:] >= scores[0, :-1])
    keys = x.mean(1)
    expect = ((keys[None] - keys[:, None]) ** 2).sum(-1).topk(3, largest=False)
    ids, scores = bank.search(keys, 3)
    assert torch.equal(ids, expect.indices)
    torch.testing.assert_close(scores, expect.values, atol=1e-5, rtol=1e-5)


def test_inner_product_metric_orders_descending():
    with FeatureBank(D, config(metric="ip")) as b:
        x = frames(9)
        b.add(x, range(9))
        q = torch.randn(4, D)
        ids, scores = b.search(q, 9)
        expect = (q @ x.mean(1).T).sort(dim=1, descending=True)
        assert torch.equal(ids, expect.indices)
        torch.testing.assert_close(scores, expect.values)


def test_k_larger_than_n_and_empty_bank(bank):
    ids, scores = bank.search(torch.randn(2, D), 5)
    assert ids.shape == scores.shape == (2, 0)
    assert len(bank) == 0 and bank.times.shape == (0,)
    bank.add(frames(3), [0, 1, 2])
    ids, _ = bank.search(torch.randn(2, D), 50)
    assert ids.shape == (2, 3) and sorted(ids[0].tolist()) == [0, 1, 2]
    assert bank.search(torch.randn(D), 0)[0].shape == (1, 0)


def test_explicit_keys_replace_the_mean_key(bank):
    x = frames(4)
    keys = torch.eye(D)[:4] * 10
    bank.add(x, [0, 1, 2, 3], keys=keys)
    assert bank.search(keys[2], 1)[0].item() == 2
    assert bank.search(keys[2], 1)[1].item() == 0.0
    with FeatureBank(D, config()) as default:
        default.add(x, [0, 1, 2, 3])
        assert default.search(bank.features([2]).mean(1), 1)[0].item() == 2
        assert default.search(bank.features([2]).mean(1), 1)[1].item() < 1e-10


def test_trained_index_is_exact_before_and_after_training():
    cfg = config(index="IVF4,Flat", index_params="nprobe=4", train_size=16)
    x = frames(30)
    with FeatureBank(D, cfg) as b:
        b.add(x[:10], range(10))
        assert b.search(x[6].mean(0), 1)[0].item() == 6  # untrained: exact over the pending keys
        assert b.ram_bytes() == b.ram_frames * frame_bytes() + 16 * D * 4
        b.add(x[10:20], range(10, 20))  # crosses train_size: trains on all 20 keys
        b.add(x[20:], range(20, 30))
        ids, scores = b.search(x.mean(1), 1)
        assert ids[:, 0].tolist() == list(range(30))
        assert torch.all(scores < 1e-5)


def test_bad_index_strings_are_config_errors():
    with pytest.raises(ConfigError, match="'Bogus'.*could not parse"):
        FeatureBank(D, config(index="Bogus"))
    with pytest.raises(ConfigError, match="'bogus=3'"):
        FeatureBank(D, config(index_params="bogus=3"))
    with pytest.raises(ConfigError, match="dim"):
        FeatureBank(0, config())
    with FeatureBank(D, config(index="IVF16,Flat", train_size=4)) as b:
        with pytest.raises(ConfigError, match="train_size"):  # 4 keys cannot train 16 lists
            b.add(frames(4), range(4))
        assert len(b) == 0


BAD_ADDS = [
    ("features", lambda: (torch.randn(T * D), 0.0, None)),
    ("features", lambda: (torch.randn(1, 1, T, D), 0.0, None)),
    ("features", lambda: (torch.randn(1, T + 1, D), 0.0, None)),
    ("features", lambda: (torch.randn(1, T, D + 1), 0.0, None)),
    ("features", lambda: (torch.ones(1, T, D, dtype=torch.int32), 0.0, None)),
    ("features", lambda: (np.ones((1, T, D), np.float32), 0.0, None)),
    ("features", lambda: (torch.full((1, T, D), float("nan")), 0.0, None)),
    ("features", lambda: (torch.full((1, T, D), float("inf")), 0.0, None)),
    ("times", lambda: (torch.randn(2, T, D), 0.0, None)),
    ("times", lambda: (torch.randn(2, T, D), [0.0, float("nan")], None)),
    ("times", lambda: (torch.randn(1, T, D), "soon", None)),
    ("times", lambda: (torch.randn(2, T, D), [2.0, 1.0], None)),
    ("keys", lambda: (torch.randn(2, T, D), [0, 1], torch.randn(2, D + 1))),
    ("keys", lambda: (torch.randn(2, T, D), [0, 1], torch.randn(3, D))),
    ("keys", lambda: (torch.randn(2, T, D), [0, 1], torch.full((2, D), float("inf")))),
]


@pytest.mark.parametrize(("name", "make"), BAD_ADDS)
def test_bad_add_is_refused_and_changes_nothing(bank, name, make):
    bank.add(frames(1), 0.0)
    with pytest.raises(MemoryStateError, match=name):
        bank.add(*make())
    assert len(bank) == 1 and os.path.getsize(bank.spill_path) == frame_bytes()


def test_float16_overflow_is_refused():
    with FeatureBank(D, config(dtype="float16")) as b, pytest.raises(MemoryStateError, match="float16"):
        b.add(torch.full((T, D), 1e6), 0.0)


def test_time_earlier_than_the_last_is_refused(bank):
    bank.add(frames(2), [1.0, 5.0])
    with pytest.raises(MemoryStateError, match=r"4\.0 s comes after .* 5\.0 s"):
        bank.add(frames(1), 4.0)
    bank.add(frames(1), 5.0)  # equal times are fine
    assert len(bank) == 3


@pytest.mark.parametrize("call", [
    lambda b: b.search(torch.randn(2, D + 1), 1),
    lambda b: b.search(torch.randn(2, 1, D), 1),
    lambda b: b.search(torch.full((D,), float("nan")), 1),
    lambda b: b.search(torch.randn(D), -1),
    lambda b: b.search(torch.randn(D), 1.5),
    lambda b: b.features([3]),
    lambda b: b.features([-1]),
    lambda b: b.features(torch.tensor([0.0])),
    lambda b: b.features([[0]]),
    lambda b: b.features(0),
], ids=["search-D", "search-rank", "search-nan", "search-k-neg", "search-k-float", "features-past-end",
        "features-negative", "features-float-ids", "features-2d", "features-scalar"])
def test_bad_lookups_are_refused(bank, call):
    bank.add(frames(3), [0, 1, 2])
    with pytest.raises(MemoryStateError):
        call(bank)


@pytest.mark.parametrize("index", ["Flat", "IVF4,Flat"])
def test_save_load_round_trip_continues_ids(tmp_path, index):
    cfg = config(2, "float16", index=index, index_params="nprobe=4" if "IVF" in index else "", train_size=12)
    x, q = frames(10), torch.randn(5, D)
    with FeatureBank(D, cfg) as b:
        b.add(x, np.arange(10.0) / 2)
        b.save(tmp_path)
        expect_ids, expect_scores = b.search(q, 4)
        expect_features = b.features(range(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bank.json", "features.bin", "index.faiss", "kept.npy", "pending.npy", "thumbnails.bin", "thumbnails.npy",
        "times.npy"]
    assert os.path.getsize(tmp_path / "features.bin") == 10 * frame_bytes("float16")
    with FeatureBank.load(tmp_path) as loaded:
        assert len(loaded) == 10 and loaded.config == cfg
        np.testing.assert_array_equal(loaded.times, np.arange(10.0) / 2)
        assert torch.equal(loaded.features(range(10)), expect_features)
        ids, scores = loaded.search(q, 4)
        assert torch.equal(ids, expect_ids) and torch.equal(scores, expect_scores)
        assert loaded.add(frames(5, seed=1), [5, 6, 7, 8, 9]) == range(10, 15)  # IVF: trains here
        assert loaded.search(frames(5, seed=1)[3].mean(0), 1)[0].item() == 13
    with FeatureBank.load(tmp_path, config(5, "float16", index=index, train_size=12)) as roomy:
        assert roomy.ram_frames == 5 and torch.equal(roomy.features(range(10)), expect_features)
    with pytest.raises(MemoryStateError, match="grid"):
        FeatureBank.load(tmp_path, BankConfig(grid=4, dtype="float16", index=index, device="cpu"))


def test_save_needs_an_empty_directory(bank, tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(MemoryStateError, match="empty"):
        bank.save(tmp_path)
    with pytest.raises(MemoryStateError, match="empty"):
        bank.save(tmp_path / "missing")


def _truncate(folder):
    with open(folder / "features.bin", "r+b") as f:
        f.truncate(3 * frame_bytes() - 1)


def _edit_json(change):
    def edit(folder):
        meta = json.loads((folder / "bank.json").read_text())
        change(meta)
        (folder / "bank.json").write_text(json.dumps(meta))
    return edit


DAMAGE = {
    "truncated-features": ("features.bin", _truncate),
    "missing-features": ("features.bin", lambda f: (f / "features.bin").unlink()),
    "json-garbage": ("bank.json", lambda f: (f / "bank.json").write_text("{not json")),
    "json-list": ("bank.json", lambda f: (f / "bank.json").write_text("[]")),
    "json-missing-field": ("bank.json", _edit_json(lambda m: m.pop("n"))),
    "json-wrong-type": ("bank.json", _edit_json(lambda m: m.update(n="4"))),
    "json-bool-as-int": ("bank.json", _edit_json(lambda m: m.update(dim=True))),
    "json-bad-config": ("bank.json", _edit_json(lambda m: m["config"].update(metric="cosine"))),
    "json-n-mismatch": ("times.npy", _edit_json(lambda m: m.update(n=3, kept=3))),
    "json-version": ("bank.json", _edit_json(lambda m: m.update(version=99))),
    "times-pickle": ("times.npy", lambda f: np.save(f / "times.npy", np.array([0.0, {}, 2, 3], dtype=object),
                                                    allow_pickle=True)),
    "times-decreasing": ("times.npy", lambda f: np.save(f / "times.npy", np.array([0.0, 2, 1, 3]))),
    "times-float32": ("times.npy", lambda f: np.save(f / "times.npy", np.arange(4, dtype=np.float32))),
    "times-nan": ("times.npy", lambda f: np.save(f / "times.npy", np.array([0.0, 1, np.nan, 3]))),
    "index-garbage": ("index.faiss", lambda f: (f / "index.faiss").write_bytes(b"\x00garbage" * 40)),
    "index-missing": ("index.faiss", lambda f: (f / "index.faiss").unlink()),
    "thumbnails-missing": ("thumbnails.npy", lambda f: (f / "thumbnails.npy").unlink()),
    "thumbnails-decreasing": ("thumbnails.npy", lambda f: np.save(f / "thumbnails.npy", np.array([0, 5, 3, 9]))),
    "thumbnails-truncated": ("thumbnails.bin", lambda f: (f / "thumbnails.bin").write_bytes(b"x")),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_load_refuses_damaged_files(tmp_path, case):
    with FeatureBank(D, config()) as b:
        b.add(frames(4), [0, 1, 2, 3])
        b.save(tmp_path)
    name, damage = DAMAGE[case]
    damage(tmp_path)
    with pytest.raises(MemoryStateError, match=name.replace(".", r"\.")):
        FeatureBank.load(tmp_path)


def test_load_refuses_non_finite_features_and_cleans_up(tmp_path):
    spill = tmp_path / "spill"
    saved = tmp_path / "saved"
    saved.mkdir()
    with FeatureBank(D, config()) as b:
        b.add(frames(2), [0, 1])
        b.save(saved)
    with open(saved / "features.bin", "r+b") as f:
        f.write(np.full(T * D, np.nan, np.float32).tobytes())
    with pytest.raises(MemoryStateError, match="non-finite"):
        FeatureBank.load(saved, config(spill_dir=str(spill)))
    assert list(spill.iterdir()) == []


def test_close_removes_temporary_spill_folder():
    b = FeatureBank(D, config())
    b.add(frames(5), range(5))
    folder = b.spill_path.parent
    assert folder.is_dir()
    b.close()
    b.close()
    assert not folder.exists() and b.ram_bytes() == 0
    with pytest.raises(MemoryStateError, match="closed"):
        b.add(frames(1), 9.0)
    with pytest.raises(MemoryStateError, match="closed"):
        b.features([0])


def test_garbage_collection_removes_spill_folder():
    b = FeatureBank(D, config())
    b.add(frames(5), range(5))
    folder = b.spill_path.parent
    del b
    gc.collect()
    assert not folder.exists()


def test_given_spill_dir_keeps_the_folder_and_other_files(tmp_path):
    (tmp_path / "other").write_text("keep")
    with FeatureBank(D, config(spill_dir=str(tmp_path))) as a, FeatureBank(D, config(spill_dir=str(tmp_path))) as b:
        a.add(frames(4), range(4))
        b.add(frames(4, seed=1), range(4))
        assert a.spill_path != b.spill_path and a.spill_path.parent == tmp_path
        assert torch.equal(a.features([0]), frames(4)[:1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_concurrent_add_and_search():
    def reader(b):
        for _ in range(200):
            n = len(b)
            ids, _ = b.search(torch.randn(D), 3)
            assert min(3, n) <= ids.shape[1] <= 3
            if n:
                assert b.features([n - 1, 0]).shape == (2, T, D)

    with FeatureBank(D, config()) as b, ThreadPoolExecutor(1) as pool:
        done = pool.submit(reader, b)
        for i in range(200):
            b.add(frames(1, seed=i)[0], float(i))
        done.result()
        assert len(b) == 200


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm to read RSS")
def test_spilled_features_do_not_count_toward_rss():
    grid, dim, n, batch = 8, 64, 3000, 100  # 8 KiB a frame in float16: 24 MiB in all

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    x = torch.randn(batch, grid * grid, dim).half()
    with FeatureBank(dim, BankConfig(grid=grid, dtype="float16", ram_mb=1, device="cpu")) as b:
        b.add(x, np.zeros(batch))
        before = rss()
        for i in range(1, n // batch):
            b.add(x, np.full(batch, float(i)))
        grown = rss() - before
        assert len(b) == n
        assert grown < 6 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB while 24 MiB were spilled"
        assert torch.equal(b.features([5]), x[5:6].float())


def capped(frames_on_disk: int, **kwargs) -> BankConfig:
    """A tiny BankConfig whose disk cap holds exactly ``frames_on_disk`` frames (no thumbnails)."""
    return config(8, thumbnails=False, disk_gb=frames_on_disk * frame_bytes() / 2**30, **kwargs)


def test_disk_cap_thins_ten_hours_with_age_and_stays_under_it():
    """10 hours at 1 fps into a cap of 600 frames: the spill never grows past the cap, the
    newest stretch keeps every frame, older frames thin out with age but every hour keeps
    frames, and the pinned frames, the first and the newest always stay."""
    pinned = [5, 17_000, 30_001]
    seen = []  # what the bank asked to keep, and when

    def keep(times):
        seen.append(len(times))
        return [i for i in pinned if i < len(times)]

    hours, batch = 10, 8
    x = frames(batch)
    with FeatureBank(D, capped(600), keep=keep) as b:
        assert b.disk_frames == 600
        for start in range(0, hours * 3600, batch):
            b.add(x, np.arange(start, start + batch, dtype=np.float64))
            assert b.disk_bytes() <= 600 * frame_bytes()
        assert os.path.getsize(b.spill_path) <= 600 * frame_bytes()
        kept, n = b.kept_ids(), len(b)
        times = b.times[kept]
        assert seen and len(kept) <= 600 and n == hours * 3600
        assert {0, n - 1, *pinned} <= set(kept.tolist())
        # every frame of the newest stretch, then gaps that grow with age
        exact = n - kept[np.flatnonzero(np.diff(kept) > 1)[-1] + 1]
        assert 40 <= exact <= 400, exact
        gaps = np.diff(times)
        assert np.median(gaps[times[1:] < 3600]) > 10 * np.median(gaps[times[1:] > 9 * 3600])
        assert all(((times >= h * 3600) & (times < (h + 1) * 3600)).any() for h in range(hours))
        thinned = int(np.setdiff1d(np.arange(n), kept)[0])
        with pytest.raises(MemoryStateError, match=f"frame {thinned} .*thinned"):
            b.features([thinned])
        assert b.thumbnails([thinned]) == [None]
        assert torch.equal(b.features([n - 1])[0], x[-1].float())


def test_thinned_bank_saves_only_kept_frames_and_loads_them(tmp_path):
    x = frames(400, seed=3)
    with FeatureBank(D, capped(100)) as b:
        for start in range(0, 400, 4):
            b.add(x[start : start + 4], np.arange(start, start + 4, dtype=np.float64))
        kept = b.kept_ids()
        expect = b.features(kept)
        b.save(tmp_path)
    assert len(kept) <= 100
    assert os.path.getsize(tmp_path / "features.bin") == len(kept) * frame_bytes()
    with FeatureBank.load(tmp_path) as loaded:
        assert len(loaded) == 400
        np.testing.assert_array_equal(loaded.kept_ids(), kept)
        assert torch.equal(loaded.features(kept), expect)
        assert torch.equal(expect, x[kept])  # the kept frames are the frames that were added
        loaded.add(frames(50, seed=4), np.arange(400, 450, dtype=np.float64))  # thins again, within the cap
        assert len(loaded.kept_ids()) <= 100 and loaded.disk_bytes() <= 100 * frame_bytes()
    with pytest.raises(MemoryStateError, match="larger cap"):
        FeatureBank.load(tmp_path, capped(50))


def test_disk_cap_too_small_is_a_config_error():
    with pytest.raises(ConfigError, match="disk_gb"):
        FeatureBank(D, capped(4))
