"""The Flash policy (context synopsis + detail memory) behind the StreamMemory interface."""

from __future__ import annotations

import pytest
import torch
from test_memory import scene_of, scene_stream

from vstream.memory import BankConfig, FlashConfig, FlashMemory, create_memory
from vstream.memory.clustering import kmeans_plus_plus, weighted_kmeans

torch.set_num_threads(1)


def flash_config(**fields) -> FlashConfig:
    sizes = {"base_grid": 4, "synopsis_grid": 2, "synopsis_length": 12, "synopsis_chunk": 5, "detail_length": 3,
             "detail_grid": 4, "bank": BankConfig(grid=4, ram_mb=0.05)}
    sizes.update(fields)
    return FlashConfig(**sizes)


LENGTHS = [40, 5, 12, 70, 8, 25, 3, 60]


def test_clusters_never_mix_scenes_and_weights_add_up_to_scene_lengths():
    frames, times, scene = scene_stream(LENGTHS)
    with FlashMemory(flash_config()) as memory:
        for frame, t in zip(frames, times):
            memory.add(frame, t)
        out = memory.tokens()
        assert out.counts() == {"synopsis": 12 * 4, "detail": 3 * 16}
        n = memory.centroid_count
        per_scene = [0.0] * len(LENGTHS)
        for weight, start, end in zip(memory.weights[:n].tolist(), memory.time_start[:n].tolist(),
                                      memory.time_end[:n].tolist()):
            assert scene_of(start, scene) == scene_of(end, scene)
            per_scene[scene_of(start, scene)] += weight
        assert memory.pending_count == len(times) % 5
        pending = [scene_of(float(t), scene) for t in memory.pending_times[: memory.pending_count]]
        for s in pending:
            per_scene[s] += 1
        assert per_scene == [float(n) for n in LENGTHS]


def test_synopsis_is_in_time_order_and_details_come_from_the_heaviest_clusters():
    frames, times, scene = scene_stream(LENGTHS)
    config = flash_config(synopsis_length=8, detail_length=3, synopsis_chunk=8)
    with FlashMemory(config) as memory:
        memory.extend(frames[:216], times[:216])  # 27 whole chunks: nothing pending
        assert memory.pending_count == 0
        out = memory.tokens()
        # 8 scenes, 8 clusters: each cluster is one whole scene, so in time order the synopsis
        # is scene 0, 1, ..., 7, each the mean of its frames pooled by hand to 2×2
        blocks = frames[:216].reshape(216, 2, 4, 2, 4, -1).mean(dim=(2, 4)).reshape(216, 4, -1)
        expected = torch.cat([blocks[scene[:216] == i].mean(dim=0) for i in range(8)])
        synopsis = [kind == "synopsis" for kind in out.kinds]
        torch.testing.assert_close(out.tokens[synopsis], expected, rtol=1e-4, atol=1e-4)
        spans = [span for span, is_synopsis in zip(out.spans, synopsis) if is_synopsis][::4]
        first = [times[int(torch.nonzero(scene[:216] == i)[0])] for i in range(8)]
        last = [times[int(torch.nonzero(scene[:216] == i)[-1])] for i in range(8)]
        assert spans == list(zip(first, last))
        detail = {scene_of(s, scene) for kind, (s, _) in zip(out.kinds, out.spans) if kind == "detail"}
        heaviest = set(sorted(range(len(LENGTHS)), key=lambda i: -LENGTHS[i])[:3])
        assert detail == heaviest


def test_a_read_between_reclusterings_does_not_change_the_state():
    frames, times, _ = scene_stream([30, 20, 25], noise=0.5)
    with FlashMemory(flash_config()) as read_often, FlashMemory(flash_config()) as read_once:
        for frame, t in zip(frames, times):
            read_often.add(frame, t)
            read_often.tokens()
        read_once.extend(frames, times)
        a, b = read_often.tokens(), read_once.tokens()
        assert a.spans == b.spans
        torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=1e-5)
        assert float(read_once.weights.sum()) + read_once.pending_count == len(times)


def test_same_stream_same_memory():
    frames, times, _ = scene_stream([30, 20, 25, 14], noise=1.0)

    def build():
        with create_memory("flash", flash_config()) as memory:
            memory.extend(frames, times)
            return memory.tokens()

    first, second = build(), build()
    assert torch.equal(first.tokens, second.tokens) and first.spans == second.spans


def test_weighted_kmeans_respects_weights_and_is_seeded():
    generator = torch.Generator().manual_seed(0)
    blobs = torch.cat([torch.randn(20, 6, generator=generator) * 0.1 + 5 * i for i in range(4)])
    weights = torch.ones(80)
    assign = weighted_kmeans(blobs, weights, 4, iters=20, seed=0)
    for i in range(4):
        assert len(set(assign[20 * i: 20 * (i + 1)].tolist())) == 1
    assert torch.equal(kmeans_plus_plus(blobs, weights, 4, seed=3), kmeans_plus_plus(blobs, weights, 4, seed=3))
    heavy = torch.zeros(80)
    heavy[5] = 1.0  # all the mass on one point: it must be the first start
    assert int(kmeans_plus_plus(blobs, heavy, 1, seed=0)[0]) == 5
    assert torch.equal(weighted_kmeans(blobs[:3], weights[:3], 4, iters=5, seed=0), torch.arange(3))


def test_identical_points_do_not_break_the_start():
    points = torch.zeros(10, 4)
    chosen = kmeans_plus_plus(points, torch.ones(10), 3, seed=0)
    assert len(set(chosen.tolist())) == 3
    assign = weighted_kmeans(points, torch.ones(10), 3, iters=5, seed=0)
    assert assign.shape == (10,) and len(set(assign.tolist())) == 1 and 0 <= int(assign[0]) < 3
    # two distinct points, many copies each: never split a copy from its twins, never mix the two
    twins = torch.cat([torch.zeros(6, 4), torch.ones(4, 4)])
    assign = weighted_kmeans(twins, torch.ones(10), 3, iters=5, seed=0)
    assert len(set(assign[:6].tolist())) == 1 and len(set(assign[6:].tolist())) == 1 and assign[0] != assign[6]


@pytest.mark.parametrize("fields, message", [
    ({"detail_length": 200}, "detail_length .200. must be <= synopsis_length"),
    ({"cluster_dim": 0}, "cluster_dim must be an int >= 1"),
])
def test_flash_config_errors(fields, message):
    from vstream.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        FlashConfig(**fields)


def test_flash_config_round_trips():
    config = flash_config(seed=4)
    assert FlashConfig.from_json(config.to_json()) == config
    assert FlashConfig().num_tokens == 120 * 16 + 60 * 64
