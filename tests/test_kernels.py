"""Every kernel against its PyTorch reference, on odd shapes, on CPU in Triton's
interpreter; the dispatch rules; and every input the wrappers refuse."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import math
import threading

import pytest
import torch
from helpers import merge_case, merge_state

from vstream.errors import KernelError
from vstream.kernels import (
    backend_for,
    dispatch,
    kmeans_step,
    kmeans_step_reference,
    nearest,
    nearest_reference,
    pool_grid,
    pool_grid_reference,
    semantic_attention,
    semantic_attention_reference,
    temporal_merge,
    temporal_merge_reference,
    use_backend,
    ward_costs,
    ward_costs_reference,
)

torch.set_num_threads(1)

# fp32: the kernels sum in another order than torch; bf16: one bf16 ulp of the output
# (2^-7 relative), after float32 sums that differ in their last bits.
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


@pytest.fixture
def triton():
    """Run the test body's kernel calls in Triton (the interpreter on CPU)."""
    pytest.importorskip("triton")
    with use_backend("triton"):
        assert backend_for(torch.zeros(1)) == "triton"
        yield


def close(actual, expected, dtype):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


def gen(seed):
    return torch.Generator().manual_seed(seed)


# -- pool -----------------------------------------------------------------------------

POOL_CASES = [  # (G, S, D): sizes 1, 4, 8, G and a non-divisor of G
    (16, 1, 48), (16, 4, 96), (16, 8, 130), (16, 16, 48), (16, 5, 130),
    (27, 1, 130), (27, 4, 48), (27, 8, 96), (27, 27, 48), (27, 5, 130),
    (5, 1, 96), (5, 4, 130), (5, 5, 48), (5, 3, 96),
    (1, 1, 130),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid, size, dim", POOL_CASES)
def test_pool_matches_reference(triton, grid, size, dim, dtype):
    x = torch.randn(2, grid * grid, dim, generator=gen(grid * 100 + size)).to(dtype)
    expected = x if size == grid else pool_grid_reference(x, size)
    close(pool_grid(x, size), expected, dtype)


def test_pool_reference_windows():
    # The adaptive windows: cell i covers rows floor(i*G/S) to ceil((i+1)*G/S).
    grid, size = 27, 8
    x = torch.randn(1, grid * grid, 3, generator=gen(1))
    image = x.view(grid, grid, 3)
    bounds = [(i * grid // size, -(-(i + 1) * grid // size)) for i in range(size)]
    expected = torch.stack([image[r0:r1, c0:c1].mean((0, 1)) for r0, r1 in bounds for c0, c1 in bounds])
    torch.testing.assert_close(pool_grid_reference(x, size)[0], expected)


def test_pool_unbatched_and_strided(triton):
    x = torch.randn(130, 49, generator=gen(2)).T  # [49, 130], not contiguous
    out = pool_grid(x, 3)
    assert out.shape == (9, 130)
    close(out, pool_grid_reference(x.unsqueeze(0), 3)[0], torch.float32)


def test_pool_full_size_returns_input():
    x = torch.randn(3, 16, 8)
    assert pool_grid(x, 4) is x


@pytest.mark.parametrize(
    "x, size, needle",
    [
        (torch.zeros(2, 15, 8), 2, "square"),
        (torch.zeros(2, 16, 8), 0, "size"),
        (torch.zeros(2, 16, 8), 5, "size"),
        (torch.zeros(2, 16, 8), 2.0, "size"),
        (torch.zeros(2, 16, 8, dtype=torch.int64), 2, "x: expected float32"),
        (torch.zeros(16), 2, "x: expected a 2-d or 3-d"),
        ([[0.0]], 1, "torch.Tensor"),
    ],
)
def test_pool_refuses(x, size, needle):
    with pytest.raises(KernelError, match=needle):
        pool_grid(x, size)


# -- nearest --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, m, dim",
    [(37, 19, 130), (1, 1, 7), (1, 150, 20), (37, 150, 20), (1, 1, 700), (37, 19, 600)],
)
def test_nearest_matches_reference(triton, n, m, dim):
    x = torch.randn(n, dim, generator=gen(n + m))
    y = torch.randn(m, dim, generator=gen(dim))
    index, dist = nearest(x, y)
    ref_index, ref_dist = nearest_reference(x, y)
    assert index.dtype == torch.int64 and dist.dtype == torch.float32
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-4, atol=1e-3)


def test_nearest_bf16(triton):
    x = torch.randn(37, 130, generator=gen(3)).bfloat16()
    y = torch.randn(19, 130, generator=gen(4)).bfloat16()
    # Distances, not indices: a near tie may fall either way under another sum order.
    torch.testing.assert_close(nearest(x, y)[1], nearest_reference(x, y)[1], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("width", [2, 600])  # 600: the kernel that splits d
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_nearest_ties_go_to_lowest_index(backend, width):
    if backend == "triton":
        pytest.importorskip("triton")
    y = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]).repeat(40, 1)  # 160 rows
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    x, y = (torch.nn.functional.pad(t, (0, width - 2)) for t in (x, y))
    with use_backend(backend):
        index, dist = nearest(x, y)
    assert index.tolist() == [1, 1, 1]  # [0.5, 0.5] is as near to rows 1 and 2
    assert dist.tolist() == [1.0, 0.0, 0.5]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_nearest_no_queries(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    with use_backend(backend):
        index, dist = nearest(torch.zeros(0, 4), torch.zeros(3, 4))
    assert index.shape == dist.shape == (0,)
    assert index.dtype == torch.int64 and dist.dtype == torch.float32


@pytest.mark.parametrize(
    "x, y, needle",
    [
        (torch.zeros(3), torch.zeros(2, 3), "x: expected a 2-d"),
        (torch.zeros(2, 3), torch.zeros(2, 3, 1), "y: expected a 2-d"),
        (torch.zeros(2, 3), torch.zeros(2, 4), "y: expected rows of x's width d=3"),
        (torch.zeros(2, 3), torch.zeros(0, 3), "y: expected at least one row"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float16), "y: expected the dtype of x"),
        (torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int32), "x: expected float32"),
        (torch.zeros(2, 3), torch.zeros(2, 3, device="meta"), "one device"),
    ],
)
def test_nearest_refuses(x, y, needle):
    with pytest.raises(KernelError, match=needle):
        nearest(x, y)


# -- k-means --------------------------------------------------------------------------


def kmeans_case(name, dtype):
    """points, weights, centroids for the edge cases the memory meets."""
    g = gen(5)
    if name == "single point":
        return torch.randn(1, 20, generator=g).to(dtype), torch.tensor([3.0]), torch.randn(4, 20, generator=g).to(dtype)
    dim = 700 if name == "wide" else 130  # 700: the assignment splits d
    points = torch.randn(40, dim, generator=g)
    centroids = torch.randn(7, dim, generator=g)
    weights = torch.rand(40, generator=g) + 0.5
    centroids[6] += 100.0  # far from every point: an empty cluster
    if name == "zero-weight cluster":
        centroids[0] = points[0] + 1e-3  # points[0] alone, with weight 0
        weights[0] = 0.0
    return points.to(dtype), weights, centroids.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["empty cluster", "zero-weight cluster", "single point", "wide"])
def test_kmeans_step_matches_reference(triton, name, dtype):
    points, weights, centroids = kmeans_case(name, dtype)
    new, mass, assign = kmeans_step(points, weights, centroids)
    ref_new, ref_mass, ref_assign = kmeans_step_reference(points, weights, centroids)
    assert torch.equal(assign, ref_assign)
    close(new, ref_new, dtype)
    torch.testing.assert_close(mass, ref_mass)
    empty = ref_mass == 0
    assert empty.any() and torch.equal(new[empty], centroids[empty])  # kept where no weight
    assert mass.dtype == torch.float32 and mass.sum().item() == pytest.approx(weights.sum().item())
    assert torch.equal(kmeans_step(points, weights, centroids)[0], new)  # repeatable, bit for bit


def test_kmeans_step_reference_is_the_weighted_mean():
    points = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
    weights = torch.tensor([1.0, 3.0, 2.0])
    centroids = torch.tensor([[1.0, 0.0], [10.0, 9.0], [-50.0, -50.0]])
    new, mass, assign = kmeans_step(points, weights, centroids)
    assert assign.tolist() == [0, 0, 1]
    assert new.tolist() == [[1.5, 0.0], [10.0, 10.0], [-50.0, -50.0]]
    assert mass.tolist() == [4.0, 2.0, 0.0]


@pytest.mark.parametrize(
    "points, weights, centroids, needle",
    [
        (torch.zeros(4, 3), torch.ones(5), torch.zeros(2, 3), r"weights: expected shape \[4\]"),
        (torch.zeros(4, 3), torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.zeros(2, 3), "non-negative"),
        (torch.zeros(4, 3), torch.ones(4, dtype=torch.int64), torch.zeros(2, 3), "weights: expected a floating"),
        (torch.zeros(4, 3), torch.ones(4), torch.zeros(2, 4), "centroids: expected rows"),
        (torch.zeros(4, 3), torch.ones(4), torch.zeros(0, 3), "at least one centroid"),
        (torch.zeros(4, 3), torch.ones(4), torch.zeros(2, 3).bfloat16(), "centroids: expected the dtype"),
        (torch.zeros(4), torch.ones(4), torch.zeros(2, 3), "points: expected a 2-d"),
    ],
)
def test_kmeans_step_refuses(points, weights, centroids, needle):
    with pytest.raises(KernelError, match=needle):
        kmeans_step(points, weights, centroids)


# -- semantic attention ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 7, 25, 40])
def test_semantic_attention_matches_reference(triton, t, dtype):
    g = gen(t)
    memory, queries = torch.randn(25, 130, generator=g), torch.randn(25, 32, generator=g)
    keys, values = torch.randn(t, 32, generator=g), torch.randn(t, 130, generator=g)
    args = [a.to(dtype) for a in (memory, queries, keys, values)]
    close(semantic_attention(*args, 0.2), semantic_attention_reference(*args, 0.2), dtype)


def test_semantic_attention_one_key_is_a_moving_average():
    memory, values = torch.randn(25, 16, generator=gen(6)), torch.randn(1, 16, generator=gen(7))
    out = semantic_attention(memory, torch.randn(25, 8), torch.randn(1, 8), values, 0.25)
    torch.testing.assert_close(out, 0.75 * memory + 0.25 * values)


@pytest.mark.parametrize(
    "shapes, alpha, needle",
    [
        ([(25, 16), (25, 8), (0, 8), (0, 16)], 0.2, r"T >= 1"),
        ([(25, 16), (24, 8), (3, 8), (3, 16)], 0.2, r"queries: expected shape \[25, 8\]"),
        ([(25, 16), (25, 8), (3, 8), (3, 15)], 0.2, r"values: expected shape \[3, 16\]"),
        ([(25, 16), (25, 8), (3, 8), (3,)], 0.2, "values: expected a 2-d"),
        ([(25, 16), (25, 8), (3, 8), (3, 16)], 0.0, "alpha"),
        ([(25, 16), (25, 8), (3, 8), (3, 16)], 1.5, "alpha"),
        ([(25, 16), (25, 8), (3, 8), (3, 16)], float("nan"), "alpha"),
    ],
)
def test_semantic_attention_refuses(shapes, alpha, needle):
    with pytest.raises(KernelError, match=needle):
        semantic_attention(*[torch.zeros(s) for s in shapes], alpha)


def test_semantic_attention_refuses_mixed_dtypes():
    args = [torch.zeros(4, 8), torch.zeros(4, 2), torch.zeros(3, 2).half(), torch.zeros(3, 8)]
    with pytest.raises(KernelError, match="keys: expected the dtype of memory"):
        semantic_attention(*args, 0.5)


# -- ward costs -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, dim", [(1, 7), (25, 130), (26, 1030), (5, 2048)])
def test_ward_costs_match_reference_and_pick_the_same_cluster(triton, k, dim, dtype):
    g = gen(k + dim)
    centroids, x = torch.randn(k, dim, generator=g).to(dtype), torch.randn(dim, generator=g).to(dtype)
    weights = torch.randint(1, 50, (k,), generator=g).double()
    got, want = ward_costs(centroids, weights, x, 1.0), ward_costs_reference(centroids, weights, x, 1.0)
    assert got.dtype == torch.float64 and int(got.argmin()) == int(want.argmin())
    close(got, want, dtype)


def test_ward_costs_reference_is_wards_formula():
    """Joining x (weight 2) with a centroid at distance 3 (weight 4) adds 4·2/6 · 9 = 12."""
    centroids = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    costs = ward_costs_reference(centroids, torch.tensor([4.0, 1.0], dtype=torch.float64), torch.zeros(2), 2.0)
    assert costs.tolist() == [12.0, 0.0]


@pytest.mark.parametrize("weights, x, needle", [
    (torch.ones(3), torch.zeros(4), "weights: expected \\[3\\] float64"),
    (torch.ones(3, dtype=torch.float64), torch.zeros(5), "x: expected \\[4\\]"),
])
def test_ward_costs_refuse(weights, x, needle):
    with pytest.raises(KernelError, match=needle):
        ward_costs(torch.zeros(3, 4), weights, x, 1.0)


# -- temporal merge ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_temporal_merge_joins_the_cheapest_pair_by_hand(backend):
    """Centroids at 0 and 1 (weight 1) and 10 (weight 3), on a line. A frame at 10.5 joins
    the heavy one (cost 3/4 · 0.25 < 1/2 · 1, the cheapest pair); a frame at 100 costs more
    than joining 0 and 1 (1/2), which join at 0.5 while the frame takes the freed slot."""
    if backend == "triton":
        pytest.importorskip("triton")
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    state = merge_state(line, [1.0, 1.0, 3.0], spread=0.0)
    state[3][2] = torch.tensor([11.0, 0.0])  # the heavy one's representative, 1 from it
    frames = torch.tensor([[10.5, 0.0], [100.0, 0.0]])
    with use_backend(backend):
        decisions = temporal_merge(*state, frames)
    centroids, weights, pair_costs, representatives = state
    # frame 0 joined slot 2 (at 10.125) and is nearer to it than 11; frame 1 freed slot 1
    # (0 and 1 joined at 0.5; 0's representative 0 and 1's are equally near: 0 stays)
    assert decisions.tolist() == [[2, -1, 1], [0, 1, 0]]
    assert centroids.tolist() == [[0.5, 0.0], [100.0, 0.0], [10.125, 0.0]]
    assert weights.tolist() == [2.0, 1.0, 4.0]
    assert representatives.tolist() == [[0.0, 0.0], [100.0, 0.0], [10.5, 0.0]]
    expected = [[math.inf, 2 / 3 * 99.5**2, 8 / 6 * 9.625**2],
                [2 / 3 * 99.5**2, math.inf, 4 / 5 * 89.875**2],
                [8 / 6 * 9.625**2, 4 / 5 * 89.875**2, math.inf]]
    torch.testing.assert_close(pair_costs, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("k, dim", [(1, 7), (5, 130), (25, 300)])
def test_temporal_merge_matches_reference(triton, k, dim):
    state, frames = merge_case(k, dim)
    expected, again = [t.clone() for t in state], [t.clone() for t in state]
    want = temporal_merge_reference(*expected, frames)
    got = temporal_merge(*state, frames)
    assert got.tolist() == want.tolist()
    if k > 1:
        assert set(want[:, 2].tolist()) == {0, 1} and max(want[:, 1].tolist()) >= 0  # both kinds happened
    for actual, reference in zip(state, expected):
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-4)
    assert temporal_merge(*again, frames).tolist() == got.tolist()  # run to run, the same


def test_temporal_merge_refuses():
    state = merge_state(torch.zeros(3, 4), [1.0, 1.0, 1.0])
    with pytest.raises(KernelError, match="weights: expected a contiguous \\[3\\] torch.float64"):
        temporal_merge(state[0], state[1].float(), state[2], state[3], torch.zeros(2, 4))
    with pytest.raises(KernelError, match="frames: expected a contiguous \\[2, 4\\]"):
        temporal_merge(*state, torch.zeros(4, 2).t())
    with pytest.raises(KernelError, match="frames: expected"):
        temporal_merge(*state, torch.zeros(2, 5))
    with pytest.raises(KernelError, match="no centroid"):
        temporal_merge(*merge_state(torch.zeros(0, 4), []), torch.zeros(1, 4))
    assert temporal_merge(*state, torch.zeros(0, 4)).shape == (0, 3)


def test_kernels_take_strided_inputs(triton):
    g = gen(8)
    x, y = torch.randn(130, 37, generator=g).T, torch.randn(600, 19, generator=g).T[:, :130]
    assert torch.equal(nearest(x, y)[0], nearest_reference(x, y)[0])
    weights = torch.rand(74, generator=g)[::2]
    args = (x, weights, y[:5])
    for actual, expected in zip(kmeans_step(*args), kmeans_step_reference(*args), strict=True):
        close(actual, expected, torch.float32)
    memory, values = torch.randn(130, 25, generator=g).T, torch.randn(130, 7, generator=g).T
    queries, keys = torch.randn(25, 32, generator=g), torch.randn(7, 32, generator=g)
    close(semantic_attention(memory, queries, keys, values, 1.0),
          semantic_attention_reference(memory, queries, keys, values, 1.0), torch.float32)


# -- dispatch -------------------------------------------------------------------------


def test_dispatch_picks_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("VSTREAM_KERNELS", raising=False)
    assert backend_for(torch.zeros(2)) == "reference"


def test_use_backend_overrides_and_nests(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("VSTREAM_KERNELS", raising=False)
    x = torch.zeros(2)
    with use_backend("triton"):
        assert backend_for(x) == "triton"
        with use_backend("reference"):
            assert backend_for(x) == "reference"
        seen = []
        worker = threading.Thread(target=lambda: seen.append(backend_for(x)))
        worker.start()
        worker.join()
        assert seen == ["reference"]  # the override belongs to this thread's context
        assert backend_for(x) == "triton"
    assert backend_for(x) == "reference"


def test_environment_override(monkeypatch):
    pytest.importorskip("triton")
    x = torch.zeros(2)
    monkeypatch.setenv("VSTREAM_KERNELS", "triton")
    assert backend_for(x) == "triton"
    with use_backend(None):
        assert backend_for(x) == "reference"  # None: the automatic choice, env ignored
    monkeypatch.setenv("VSTREAM_KERNELS", "cuda")
    with pytest.raises(KernelError, match="VSTREAM_KERNELS.*'triton', 'reference'"):
        backend_for(x)


def test_unknown_backend_lists_known_ones():
    with pytest.raises(KernelError, match="'triton', 'reference'"), use_backend("cuda"):
        pass


def test_without_triton_every_call_takes_the_reference(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with use_backend("triton"):
        assert backend_for(torch.zeros(2)) == "reference"
        assert pool_grid(torch.ones(1, 4, 3), 1).tolist() == [[[1.0, 1.0, 1.0]]]


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        backend_for(torch.zeros(2))
