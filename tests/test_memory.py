"""The STAR memory: behaviour on streams of known structure, bounds, determinism,
streaming vs offline, the abstract update's formula, and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vstream.errors import ConfigError, MemoryStateError
from vstream.kernels import pool_grid, pool_grid_reference, use_backend
from vstream.memory import BankConfig, SemanticAttention, StarConfig, StarMemory, create_memory, list_memories

torch.set_num_threads(1)

DIM = 24
GRID = 8  # input patch grid side: 64 patches per frame


def small_config(**fields) -> StarConfig:
    """A small STAR layout: 4×4 base grid, so tests stay fast."""
    sizes = {"base_grid": 4, "spatial_grid": 4, "temporal_grid": 2, "abstract_grid": 1, "retrieved_grid": 4,
             "temporal_length": 8, "abstract_length": 6, "abstract_chunk": 5, "retrieved_length": 3,
             "bank": BankConfig(grid=4, ram_mb=0.05)}
    sizes.update(fields)
    return StarConfig(**sizes)


def scene_stream(lengths: list[int], seed: int = 0, noise: float = 0.05, dim: int = DIM):
    """Frames ``[T, GRID*GRID, dim]`` made of scenes of the given lengths: each scene a
    random patch pattern plus small per-frame noise. Returns (frames, times, scene of
    each frame)."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(len(lengths), GRID * GRID, dim, generator=generator) * 3
    scene = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    frames = patterns[scene] + noise * torch.randn(len(scene), GRID * GRID, dim, generator=generator)
    times = [0.5 * i for i in range(len(scene))]
    return frames, times, scene


def scene_of(t: float, scene: torch.Tensor) -> int:
    return int(scene[round(t / 0.5)])


def temporal_state(memory: StarMemory):
    """(weight, set of scenes in its span) per centroid."""
    n = memory.centroid_count
    return memory.weights[:n].tolist(), list(zip(memory.time_start[:n].tolist(), memory.time_end[:n].tolist()))


# -- behaviour --------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [[40, 5, 12, 70, 8, 25, 3, 60], [3, 8, 5, 12, 25, 40, 60, 70],
                                     [70, 60, 40, 25, 12, 8, 5, 3]])
def test_temporal_weights_are_scene_lengths_and_retrieval_finds_heaviest_scenes(lengths):
    frames, times, scene = scene_stream(lengths)
    with StarMemory(small_config()) as memory:
        for frame, t in zip(frames, times):
            memory.add(frame, t)
        weights, spans = temporal_state(memory)
        assert sorted(weights) == sorted(lengths)
        for weight, (start, end) in zip(weights, spans):  # each centroid is one whole scene
            first, last = scene_of(start, scene), scene_of(end, scene)
            assert first == last and lengths[first] == weight
        out = memory.tokens()
        retrieved = sorted({scene_of(start, scene) for kind, (start, _) in zip(out.kinds, out.spans)
                            if kind == "retrieved"})
        heaviest = sorted(sorted(range(len(lengths)), key=lambda i: -lengths[i])[:3])
        assert retrieved == heaviest


def test_retrieved_frame_is_the_member_nearest_its_centroid():
    """The heaviest cluster's retrieved frame is, of the frames that went into it, the one
    nearest to its centroid: found here by brute force over the bank, knowing which
    frames each cluster holds from where the scenes are (three scenes, three clusters)."""
    frames, times, scene = scene_stream([30, 50, 20], noise=0.3)
    config = small_config(temporal_length=3, retrieved_length=1)
    with StarMemory(config) as memory:
        memory.extend(frames, times)
        out = memory.tokens()
        heaviest = int(torch.argmax(memory.weights))
        assert float(memory.weights[heaviest]) == 50.0  # the middle scene, all of it
        centroid = memory.centroids[heaviest]
        bank_frames = pool_grid(memory.bank.features(range(len(memory.bank))), config.temporal_grid)
        distances = (bank_frames.reshape(len(bank_frames), -1) - centroid).square().sum(dim=1)
        members = torch.nonzero(scene == 1).flatten()
        expected = int(members[torch.argmin(distances[members])])
        got = next(span for kind, span in zip(out.kinds, out.spans) if kind == "retrieved")
        assert got == (times[expected], times[expected])


def test_many_scenes_merge_into_fewer_centroids_keeping_every_frame():
    frames, times, _ = scene_stream([7, 3, 9, 4, 11, 2, 6, 8, 5, 10, 3, 12], seed=3)
    with StarMemory(small_config()) as memory:
        memory.extend(frames, times)
        assert memory.centroid_count == 8
        assert float(memory.weights.sum()) == len(times)  # weights carry over through every merge


def test_token_layout_default_config():
    frames, times, _ = scene_stream([30, 20], dim=16)
    with StarMemory() as memory:
        memory.add(frames[0], times[0])
        assert memory.tokens().counts() == {"abstract": 1, "temporal": 16, "retrieved": 64, "spatial": 64}
        assert memory.token_count() == 145
        memory.extend(frames[1:], times[1:])
        out = memory.tokens()
        assert len(out) == StarConfig().num_tokens == 681
        assert out.counts() == {"abstract": 25, "temporal": 400, "retrieved": 192, "spatial": 64}
        assert out.kinds == ["abstract"] * 25 + ["temporal"] * 400 + ["retrieved"] * 192 + ["spatial"] * 64
        assert out.tokens.shape == (681, 16) and out.tokens.dtype == torch.float32
        assert out.spans[-1] == (times[-1], times[-1])  # spatial: the newest frame
        temporal = [span for kind, span in zip(out.kinds, out.spans) if kind == "temporal"]
        assert min(s for s, _ in temporal) == 0.0 and max(e for _, e in temporal) == times[-1]


def test_siglip_grids_in_bfloat16_pool_adaptively():
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(30, 27 * 27, 16, generator=generator).to(torch.bfloat16)
    with StarMemory() as memory:
        memory.extend(frames[:29], [float(i) for i in range(29)])
        memory.add(frames[29], 29.0)
        out = memory.tokens()
        assert len(out) == 681 and out.tokens.dtype == torch.float32
        expected = torch.nn.functional.adaptive_avg_pool2d(
            frames[29].float().reshape(27, 27, 16).permute(2, 0, 1), 8).permute(1, 2, 0).reshape(64, 16)
        torch.testing.assert_close(out.tokens[-64:], expected, rtol=1e-2, atol=1e-2)


def test_token_count_is_fixed_and_the_history_goes_to_the_spill_file():
    config = small_config()
    generator = torch.Generator().manual_seed(1)
    with StarMemory(config) as memory:
        counts = []
        for block in range(12):  # 12 × 250 frames of drifting content
            frames = torch.randn(250, GRID * GRID, DIM, generator=generator) + block
            memory.extend(frames, [block * 250 + i for i in range(250)])
            counts.append(len(memory.tokens()))
            # every frame so far is on disk (float16 at the bank's 4×4 grid), so RAM need not hold it
            assert memory.bank.spill_path.stat().st_size == memory.frames_seen * 16 * DIM * 2
        assert set(counts) == {config.num_tokens}
        assert len(memory.bank) == memory.frames_seen == 3000
        oldest = memory.bank.features([0])[0]  # read back from the file, long out of the RAM ring
        torch.testing.assert_close(oldest, pool_grid(torch.randn(250, GRID * GRID, DIM,
                                   generator=torch.Generator().manual_seed(1))[0], 4), atol=2e-3, rtol=2e-3)


def test_same_stream_gives_the_same_memory_and_seed_only_moves_the_abstract_slots():
    frames, times, _ = scene_stream([20, 30, 15, 25], noise=0.5)

    def build(seed):
        with StarMemory(small_config(seed=seed)) as memory:
            memory.extend(frames, times)
            return memory.tokens()

    first, again, other = build(0), build(0), build(1)
    assert torch.equal(first.tokens, again.tokens) and first.spans == again.spans
    abstract = [k == "abstract" for k in first.kinds]
    assert not torch.equal(first.tokens[abstract], other.tokens[abstract])
    rest = [not a for a in abstract]
    assert torch.equal(first.tokens[rest], other.tokens[rest])


def test_streaming_and_offline_agree():
    frames, times, _ = scene_stream([13, 22, 9, 31, 17], noise=0.4)
    with StarMemory(small_config()) as streamed, StarMemory(small_config()) as offline, \
            StarMemory(small_config()) as chunked:
        for frame, t in zip(frames, times):
            streamed.add(frame, t)
        offline.extend(frames, times)
        for start in range(0, len(times), 7):
            chunked.extend(frames[start:start + 7], times[start:start + 7])
        a, b, c = streamed.tokens(), offline.tokens(), chunked.tokens()
        assert a.kinds == b.kinds == c.kinds and a.spans == b.spans == c.spans
        torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.tokens, c.tokens, rtol=0, atol=1e-5)


def test_the_kernels_keep_what_the_references_keep():
    """The same stream in batches of 7 (the first one straddles the filling of the temporal
    slots) through the Triton kernels (the interpreter here) and the torch references:
    the same clusters, spans, runs and read-out spans; tokens within float32."""
    pytest.importorskip("triton")
    frames, times, _ = scene_stream([13, 22, 9, 31, 17, 9, 40], noise=0.4)
    frames = pool_grid_reference(frames, 4)  # at the base grid already: the interpreter pools less
    memories = {}
    for backend in ("reference", "triton"):
        memory = memories[backend] = StarMemory(small_config())
        with use_backend(backend):
            for start in range(0, len(times), 7):
                memory.extend(frames[start:start + 7], times[start:start + 7])
    reference, kernels = memories["reference"], memories["triton"]
    assert temporal_state(kernels) == temporal_state(reference) and sum(reference.weights.tolist()) == len(times)
    assert [s.runs for s in kernels.timeline()] == [s.runs for s in reference.timeline()]
    a, b = kernels.tokens(), reference.tokens()
    assert a.kinds == b.kinds and a.spans == b.spans
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=1e-4)
    for memory in memories.values():
        memory.close()


def test_abstract_update_is_chunked_semantic_attention():
    """M <- (1 - a) M + a softmax(q(M) k(E)^T / sqrt(h)) E over a chunk of 3 frames,
    written out here from the projection weights, not through the kernels."""
    config = small_config(abstract_length=4, abstract_chunk=3, abstract_alpha=0.2, abstract_hidden=8)
    frames, times, _ = scene_stream([5, 6], noise=1.0)
    frames = frames[:10]
    with StarMemory(config) as memory:
        memory.extend(frames[:9], times[:9])  # 4 fill the slots, 3 update, 2 wait
        pooled = frames.double().mean(dim=1)  # 1×1 grid: the mean patch
        slots, entries = pooled[:4], pooled[4:7]
        weights = {name: value.double() for name, value in memory.attention.state_dict().items()}
        q = slots @ weights["q_proj.weight"].T + weights["q_proj.bias"]  # [4, 8]
        k = entries @ weights["k_proj.weight"].T + weights["k_proj.bias"]  # [3, 8]
        expected = torch.empty(4, DIM, dtype=torch.float64)
        for i in range(4):
            scores = [float(q[i] @ k[j]) / math.sqrt(8) for j in range(3)]
            top = max(scores)
            share = [math.exp(s - top) for s in scores]
            read = sum(share[j] / sum(share) * entries[j] for j in range(3))
            expected[i] = 0.8 * slots[i] + 0.2 * read
        assert not torch.allclose(expected, 0.8 * slots + 0.2 * entries.mean(dim=0), atol=1e-3)  # not uniform
        torch.testing.assert_close(memory.slots.reshape(4, DIM).double(), expected, rtol=1e-5, atol=1e-5)
        assert memory.pending_count == 2
        out = memory.tokens()
        spans = [s for kind, s in zip(out.kinds, out.spans) if kind == "abstract"]
        assert spans == [(times[i], times[6]) for i in range(4)]


def test_attention_loads_flash_vstream_weight_names():
    checkpoint = {"q_proj.weight": torch.randn(32, DIM), "q_proj.bias": torch.randn(32),
                  "k_proj.weight": torch.randn(32, DIM), "k_proj.bias": torch.randn(32),
                  "v_proj.weight": torch.randn(DIM, DIM), "out_ln.weight": torch.ones(DIM)}
    attention = SemanticAttention(DIM, 32)
    result = attention.load_state_dict(checkpoint, strict=False)
    assert sorted(result.unexpected_keys) == ["out_ln.weight", "v_proj.weight"] and not result.missing_keys
    assert torch.equal(attention.q_proj.weight, checkpoint["q_proj.weight"])
    frames, times, _ = scene_stream([40])
    with StarMemory(small_config(abstract_hidden=32), attention=attention) as memory:
        memory.extend(frames, times)
        assert memory.attention is attention


def test_default_attention_estimates_the_dot_product_without_bias():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 512, generator=generator), torch.randn(200, 512, generator=generator)
    y = 0.7 * x + 0.3 * y  # correlated pairs: cosine ~0.92, dot products well away from 0
    exact = (x * y).sum(dim=1)
    with torch.no_grad():
        ratios = torch.stack([(attention.q_proj(x) * attention.k_proj(y)).sum(dim=1) / exact
                              for attention in (SemanticAttention(512, 32, seed=seed) for seed in range(40))])
    assert torch.equal(SemanticAttention(512, 32, seed=0).q_proj.weight, SemanticAttention(512, 32).k_proj.weight)
    # unbiased: over 40 projections x 200 pairs the ratio averages to 1 (its std there is ~0.003)
    assert abs(float(ratios.mean()) - 1) < 0.01
    # a 32-of-512 projection: relative error ~sqrt((1 + cos^2) / 32) / cos ~ 0.26 (std), median ~0.17
    median_error = (ratios - 1).abs().median(dim=1).values
    assert 0.10 < float(median_error.min()) and float(median_error.max()) < 0.25
    square = SemanticAttention(64, 64, seed=3)  # h = D: a rotation, so the dot product is exact
    with torch.no_grad():
        torch.testing.assert_close((square.q_proj(x[:, :64]) * square.k_proj(y[:, :64])).sum(dim=1),
                                   (x[:, :64] * y[:, :64]).sum(dim=1), rtol=1e-4, atol=1e-3)


def test_search_finds_frames_with_their_times():
    frames, times, scene = scene_stream([10, 20, 15])
    with StarMemory(small_config()) as memory:
        assert memory.search(torch.zeros(DIM)) == []
        memory.extend(frames, times)
        hits = memory.search(frames[12].mean(dim=0), k=4)
        assert len(hits) == 4 and hits[0].frame == 12 and hits[0].t == times[12]
        assert all(scene_of(hit.t, scene) == 1 for hit in hits)
        assert [hit.score for hit in hits] == sorted(hit.score for hit in hits)


def test_registry():
    assert list_memories() == ["flash", "star"]
    memory = create_memory("star", temporal_length=5, retrieved_length=2)
    assert isinstance(memory, StarMemory) and memory.config.temporal_length == 5
    with pytest.raises(ConfigError, match="unknown memory policy 'nope'; known: flash, star"):
        create_memory("nope")


# -- config -----------------------------------------------------------------------------


def test_config_round_trips_through_json():
    config = small_config(seed=7, retrieved_grid=2, bank=BankConfig(grid=2, index="HNSW16", metric="ip", ram_mb=3.5))
    again = StarConfig.from_json(config.to_json())
    assert again == config and isinstance(again.bank, BankConfig)


@pytest.mark.parametrize("fields, message", [
    ({"temporal_length": -1}, "temporal_length must be an int >= 0"),
    ({"base_grid": 0}, "base_grid must be an int >= 1"),
    ({"abstract_alpha": 0.0}, "abstract_alpha must be a number in"),
    ({"abstract_alpha": 1.5}, "abstract_alpha must be a number in"),
    ({"spatial_grid": 9}, "spatial_grid .9. must be <= base_grid"),
    ({"retrieved_length": 30}, "retrieved_length .30. must be <= temporal_length"),
    ({"bank": {"grid": 4, "metric": "cosine"}}, "metric must be one of l2, ip"),
    ({"bank": {"gird": 4}}, "unknown field.s. gird"),
])
def test_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        StarConfig(**fields)


def test_config_from_json_errors():
    with pytest.raises(ConfigError, match="not valid JSON"):
        StarConfig.from_json("{")
    with pytest.raises(ConfigError, match="unknown field.s. temporal_len"):
        StarConfig.from_json('{"temporal_len": 3}')


# -- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize("features, message", [
    (torch.zeros(GRID * GRID), r"add: features must be a Tensor \[P, D\]"),
    (torch.zeros(60, DIM), "60 patches per frame; expected a square grid"),
    (torch.zeros(9, DIM), "9 patches per frame; expected a square grid of at least 4×4"),
    (torch.zeros(GRID * GRID, DIM, dtype=torch.int64), "must be a float Tensor"),
    (torch.full((GRID * GRID, DIM), math.nan), "NaN or infinite"),
    ([[0.0] * DIM] * 4, r"add: features must be a Tensor \[P, D\], got list"),
])
def test_bad_features_are_refused_and_leave_the_memory_unchanged(features, message):
    frames, times, _ = scene_stream([12])
    with StarMemory(small_config()) as memory:
        memory.extend(frames, times)
        before = memory.tokens()
        with pytest.raises(MemoryStateError, match=message):
            memory.add(features, 100.0)
        assert memory.frames_seen == 12 and len(memory.bank) == 12
        assert torch.equal(memory.tokens().tokens, before.tokens)


def test_bad_times_and_widths_are_refused():
    frames, times, _ = scene_stream([5])
    with StarMemory(small_config()) as memory:
        memory.extend(frames, times)
        with pytest.raises(MemoryStateError, match=r"frame time 1.0 s: .* previous frame's \(2.0 s\)"):
            memory.add(frames[0], 1.0)
        with pytest.raises(MemoryStateError, match="frame time nan"):
            memory.add(frames[0], math.nan)
        with pytest.raises(MemoryStateError, match="width 8; this memory holds width 24"):
            memory.add(torch.zeros(GRID * GRID, 8), 10.0)
        with pytest.raises(MemoryStateError, match="3 frames but 2 times"):
            memory.extend(frames[:3], [10.0, 11.0])
        assert memory.frames_seen == 5


def test_empty_memory_reads_as_no_tokens():
    with StarMemory(small_config()) as memory:
        out = memory.tokens()
        assert len(out) == 0 and out.kinds == [] and out.counts() == {}


LONG_STREAM = textwrap.dedent("""
    import json, sys
    import torch
    from vstream.memory import BankConfig, StarConfig, StarMemory

    def rss_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randn(50, 64, 64, generator=generator)
    counts, rss = {}, {}
    with StarMemory(StarConfig(bank=BankConfig(ram_mb=1))) as memory:
        added = 0
        for stop in (25, 26, 27, 100, *range(1000, 36_001, 1000)):
            scenes = [(i // 30) % 50 for i in range(added, stop)]
            frames = patterns[scenes] + 0.1 * torch.randn(stop - added, 64, 64, generator=generator)
            memory.extend(frames, [float(i) for i in range(added, stop)])
            added = stop
            counts[stop] = len(memory.tokens())
            assert memory.token_count() == counts[stop]
            rss[stop] = rss_bytes()
        print(json.dumps({"counts": counts, "rss": rss, "weight": float(memory.weights.sum()),
                          "bank": len(memory.bank), "frame_bytes": memory.bank.bytes_per_frame,
                          "spill": memory.bank.spill_path.stat().st_size}))
""")


@pytest.mark.slow
def test_a_10_hour_stream_keeps_681_tokens_and_bounded_process_memory():
    """The default layout over 36,000 frames (10 h at 1 fps) of 8x8 x 64 features, in a
    process of its own: the token count never moves, and the process grows only by the
    index's keys (documented: one float32 [D] per frame), not by the 8 KiB of features a
    frame brings (278 MB over the run), which go to the spill file."""
    # glibc keeps freed batches in its heap and moves its mmap threshold as it goes, which swung
    # RSS by 50+ MiB between runs; a fixed threshold hands every large buffer back when freed, so
    # what RSS shows is what the memory holds
    allocator = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    child = subprocess.run([sys.executable, "-c", LONG_STREAM], capture_output=True, text=True, timeout=600, check=False,
                           env={**os.environ, "OMP_NUM_THREADS": "1", **allocator})
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout)
    counts, rss = {int(k): v for k, v in seen["counts"].items()}, {int(k): v for k, v in seen["rss"].items()}
    assert counts[25] == 681 and set(counts.values()) == {681}
    assert seen["weight"] == 36_000 and seen["bank"] == 36_000
    assert seen["frame_bytes"] == 64 * 64 * 2 and seen["spill"] == 36_000 * seen["frame_bytes"]
    early, late = range(2_000, 11_001, 1_000), range(27_000, 36_001, 1_000)
    growth = max(rss[s] for s in late) - max(rss[s] for s in early)
    index_growth = (late[-1] - early[0]) * 64 * 4
    assert growth < index_growth + 16 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB: {rss}"
