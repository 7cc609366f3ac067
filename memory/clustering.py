"""Weighted k-means with a seeded k-means++ start, on the kernels' Lloyd step.

Used by the Flash policy to re-cluster its centroids (weighted by the frames they
stand for) together with newly arrived frames. Deterministic for a given seed: the
start draws from a seeded ``torch.Generator``, and empty clusters are re-seeded with
the worst-served point, never a random one.
"""

from __future__ import annotations

import torch

from vstream.kernels import kmeans_step, nearest


def kmeans_plus_plus(points: torch.Tensor, weights: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Indices ``[k]`` of starting centroids among ``points`` ``[N, d]`` (k <= N): the
    first drawn by weight, each next one by weight × squared distance to the nearest
    one already chosen."""
    generator = torch.Generator().manual_seed(seed)
    mass = weights.double().cpu()
    chosen = [int(torch.multinomial(mass, 1, generator=generator))]
    _, squared = nearest(points, points[chosen])
    for _ in range(1, k):
        score = mass * squared.double().cpu()
        score[chosen] = 0.0
        if float(score.sum()) <= 0.0:  # every remaining point sits on a chosen one
            pick = next(i for i in range(points.shape[0]) if i not in chosen)
        else:
            pick = int(torch.multinomial(score, 1, generator=generator))
        chosen.append(pick)
        _, to_pick = nearest(points, points[pick : pick + 1])
        squared = torch.minimum(squared, to_pick)
    return torch.tensor(chosen, dtype=torch.long, device=points.device)


def weighted_kmeans(points: torch.Tensor, weights: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Cluster ``points`` ``[N, d]`` with ``weights`` ``[N]`` into at most ``k`` clusters.

    Returns the cluster of each point, ``[N]`` int64 in ``[0, k)``. With ``N <= k``
    every point is its own cluster.
    """
    n = points.shape[0]
    if n <= k:
        return torch.arange(n, device=points.device)
    centroids = points[kmeans_plus_plus(points, weights, k, seed)]
    previous = None
    for _ in range(iters):
        centroids, mass, assign = kmeans_step(points, weights, centroids)
        empty = torch.nonzero(mass == 0).flatten().tolist()
        if empty:  # move each empty centroid onto the point its centroid serves worst
            _, squared = nearest(points, centroids)
            worst = torch.argsort(weights.float() * squared, descending=True)[: len(empty)]
            centroids[empty] = points[worst]
        elif previous is not None and torch.equal(assign, previous):
            break
        previous = assign
    assign, _ = nearest(points, centroids)
    return assign
