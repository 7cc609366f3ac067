"""Kernels stage (``vstream.kernels``): Triton kernels of the memory's compression steps,
each beside its PyTorch reference, and the dispatch between them.

- ``pool_grid(x, size)``: average-pool a ``G x G`` patch grid to ``size x size`` tokens.
- ``nearest(x, y)``: for each row of ``x``, the index of and squared distance to the
  nearest row of ``y``.
- ``kmeans_step(points, weights, centroids)``: one weighted k-means (Lloyd) step.
- ``semantic_attention(memory, queries, keys, values, alpha)``: the abstract memory's
  update ``(1 - alpha) M + alpha softmax(Q K^T / sqrt(h)) V``.
- ``ward_costs(centroids, weights, x, w)``: the Ward cost of joining a point with each
  centroid.
- ``temporal_merge(centroids, weights, pair_costs, representatives, frames)``: STAR's
  temporal update for a batch of frames, one launch per batch.

Each has a ``*_reference`` twin in plain PyTorch. ``backend_for`` picks Triton on CUDA
tensors and the reference elsewhere; ``use_backend`` and the ``VSTREAM_KERNELS``
environment variable override the choice.

This folder installs as ``vstream.kernels``. When the checkout root is on ``sys.path``
(``python -m ...``, ``python -c``, a REPL or notebook started there, ``PYTHONPATH=.``), a
plain ``import kernels`` finds this folder before Hugging Face's ``kernels`` package,
which transformers imports; in that case this file hands the import over to the
installed package (or fails as if no ``kernels`` were installed) instead of posing as it.
"""

import sys

if __name__ != "vstream.kernels":
    import importlib.machinery
    import importlib.util
    import os

    def _import_installed(name: str, shadowing_root: str):
        """Import the top-level package ``name`` from ``sys.path`` without ``shadowing_root``."""
        path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != shadowing_root]
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError(
                f"No module named {name!r} is installed; {shadowing_root}/{name} is vstream's kernels stage, "
                f"imported as vstream.kernels", name=name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the import statement returns what sys.modules holds once this file ends
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise

    _import_installed(__name__, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
else:
    from .attention import semantic_attention, semantic_attention_reference
    from .dispatch import backend_for, use_backend
    from .kmeans import kmeans_step, kmeans_step_reference
    from .nearest import nearest, nearest_reference
    from .pool import pool_grid, pool_grid_reference
    from .ward import temporal_merge, temporal_merge_reference, update_pair_costs, ward_costs, ward_costs_reference

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
        "temporal_merge",
        "temporal_merge_reference",
        "update_pair_costs",
        "use_backend",
        "ward_costs",
        "ward_costs_reference",
    ]
