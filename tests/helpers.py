"""Helpers shared by several test files."""

import json

import numpy as np
import torch

from vstream.kernels import ward_costs_reference


def first_at_or_after(times: np.ndarray, fps: float | None) -> list[int]:
    """Brute force, independent of FrameSampler: for each instant k/fps, the first frame
    at or after it, once each; every frame when ``fps`` is None."""
    if fps is None:
        return list(range(len(times)))
    picked = []
    for k in range(int(times[-1] * fps) + 1):
        later = np.flatnonzero(times >= k / fps - 1e-6)
        if len(later) and (not picked or later[0] != picked[-1]):
            picked.append(int(later[0]))
    return picked


def wait_processed(client, stream: str, n: int, timeout: float = 20.0) -> dict:
    """A server stream's stats once its memory holds ``n`` frames (``client``: a
    ``vstream.client.Client``)."""
    import time

    deadline = time.monotonic() + timeout
    while (stats := client.stats(stream))["frames_processed"] < n:
        assert time.monotonic() < deadline, f"stream {stream}: only {stats['frames_processed']} of {n} frames processed"
        time.sleep(0.05)
    return stats


def merge_state(centroids: torch.Tensor, weights: list[float], spread: float = 0.3, seed: int = 0):
    """A full temporal memory: ``centroids`` with ``weights``, each representative a point
    ``spread`` away, and the pair costs they imply."""
    k = centroids.shape[0]
    weights = torch.tensor(weights, dtype=torch.float64)
    representatives = centroids + spread * torch.randn(centroids.shape, generator=torch.Generator().manual_seed(seed))
    pair_costs = torch.full((k, k), torch.inf, dtype=torch.float64)
    for slot in range(k):
        costs = ward_costs_reference(centroids, weights, centroids[slot], float(weights[slot]))
        costs[slot] = torch.inf
        pair_costs[slot], pair_costs[:, slot] = costs, costs
    return [centroids.contiguous(), weights, pair_costs, representatives.contiguous()]


def merge_case(k: int, dim: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A full temporal memory of ``k`` centroids of ``dim`` (``merge_state``, weights 2 to 8)
    and 8 frames for ``temporal_merge``: 6 near centroids (alternately nearer to one than
    its representative and farther: replaced and kept), then 2 far from all (pair joins).
    No exact ties: no centroid holds one frame before a frame joins it."""
    g = torch.Generator().manual_seed(k * 1000 + dim)
    centroids = 4.0 * torch.randn(k, dim, generator=g)
    state = merge_state(centroids, torch.randint(2, 9, (k,), generator=g).tolist(), seed=k)
    noise = torch.tensor([0.05, 0.6] * 3)[:, None]
    near = centroids[torch.randint(0, k, (6,), generator=g)] + noise * torch.randn(6, dim, generator=g)
    far = 40.0 * torch.randn(2, dim, generator=g)
    return state, torch.cat([near, far])


SCENE_COLOURS = ((255, 40, 40), (40, 220, 60), (30, 60, 250), (240, 240, 40))


def scene_frames(count: int, scenes: int = 4, seed: int = 0) -> list[np.ndarray]:
    """``count`` 48×64 frames, two of each of ``scenes`` scenes in turn (a colour block of
    ``SCENE_COLOURS`` on noise)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        image = rng.integers(0, 40, (48, 64, 3), dtype=np.uint8)
        image[4:40, 8:56] = SCENE_COLOURS[(i // 2) % scenes]
        images.append(image)
    return images


def write_jsonl(path, records) -> None:
    """``records`` as JSON Lines at ``path``."""
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
