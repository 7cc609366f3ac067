"""Kernels stage (``vstream.kernels``): Triton kernels of the memory's compression steps,
each beside its PyTorch reference, and the dispatch between them.

- ``pool_grid(x, size)``: average-pool a ``G x G`` patch grid to ``size x size`` tokens.
- ``nearest(x, y)``: for each row of ``x``, the index of and squared distance to the
  nearest row of ``y``.
- ``kmeans_step(points, weights, centroids)``: one weighted k-means (Lloyd) step.
- ``semantic_attention(memory, queries, keys, values, alpha)``: the abstract memory's
  update ``(1 - alpha) M + alpha softmax(Q K^T / sqrt(h)) V``.

Each has a ``*_reference`` twin in plain PyTorch. ``backend_for`` picks Triton on CUDA
tensors and the reference elsewhere; ``use_backend`` and the ``VSTREAM_KERNELS``
environment variable override the choice.
"""

from .attention import semantic_attention, semantic_attention_reference
from .dispatch import backend_for, use_backend
from .kmeans import kmeans_step, kmeans_step_reference
from .nearest import nearest, nearest_reference
from .pool import pool_grid, pool_grid_reference

__all__ = [
    "backend_for",
    "kmeans_step",
    "kmeans_step_reference",
    "nearest",
    "nearest_reference",
    "pool_grid",
    "pool_grid_reference",
    "semantic_attention",
    "semantic_attention_reference",
    "use_backend",
]
