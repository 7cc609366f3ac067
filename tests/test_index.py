"""``KeyIndex``, the FAISS index the feature bank and the transcript memory share: exact
until trained, trains once ``train_size`` keys have arrived, resets, and restores only
an index that matches it."""

from __future__ import annotations

import numpy as np
import pytest

from vstream.errors import ConfigError, MemoryStateError
from vstream.memory.index import KeyIndex


def keys(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def brute(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    distances = ((queries[:, None, :] - data[None]) ** 2).sum(-1)
    return np.argsort(distances, axis=1)[:, :k]


def test_exact_until_trained_then_trained_on_every_key():
    index = KeyIndex(8, "IVF2,Flat", train_size=100, params="nprobe=2")
    data, queries = keys(150), keys(5, seed=1)
    index.add(data[:60])
    assert not index.trained and len(index) == 60 and len(index.pending) == 60
    np.testing.assert_array_equal(index.search(queries, 4)[1], brute(data[:60], queries, 4))
    index.add(data[60:])  # crosses train_size: trains on all 150 and takes them
    assert index.trained and len(index) == 150 and len(index.pending) == 0
    np.testing.assert_array_equal(index.search(queries, 4)[1], brute(data, queries, 4))  # nprobe=2: every list
    index.reset()
    assert index.trained and len(index) == 0


def test_inner_product_and_reset_while_pending():
    index = KeyIndex(8, "IVF2,Flat", metric="ip", train_size=100)
    data = keys(10)
    index.add(data)
    scores, ids = index.search(data[:1], 3)
    products = data @ data[0]
    assert ids[0, 0] == np.argmax(products) and scores[0, 0] == pytest.approx(float(products.max()), 1e-5)
    index.reset()
    index.add(data[:2])
    assert len(index) == 2


@pytest.mark.parametrize("factory, params, message", [
    ("Nope", "", "BankConfig.index 'Nope' is not a FAISS factory string"),
    ("Flat", "nprobe=4", "BankConfig.index_params 'nprobe=4' do not apply"),
])
def test_bad_strings_name_the_config(factory, params, message):
    with pytest.raises(ConfigError, match=message):
        KeyIndex(8, factory, params=params, owner="BankConfig")


def test_failed_training_changes_nothing():
    index = KeyIndex(8, "IVF64,Flat", train_size=10, owner="TranscriptConfig")
    with pytest.raises(ConfigError, match="raise TranscriptConfig.train_size"):
        index.add(keys(10))
    assert not index.trained and len(index) == 0


def test_restore_checks_the_saved_index(tmp_path):
    saved = KeyIndex(8, "Flat")
    saved.add(keys(5))
    with open(tmp_path / "index.faiss", "wb") as f:
        saved.write(f)
    fresh = KeyIndex(8, "Flat")
    fresh.restore(tmp_path / "index.faiss", np.empty((0, 8), np.float32), trained=True, ntotal=5)
    assert len(fresh) == 5
    # another width, metric, kind, size
    for index, ntotal in ((KeyIndex(4, "Flat"), 5), (KeyIndex(8, "Flat", metric="ip"), 5), (KeyIndex(8, "HNSW8"), 5),
                          (KeyIndex(8, "Flat"), 4)):
        with pytest.raises(MemoryStateError, match=r"index has \(width, metric, kind, trained, size\)"):
            index.restore(tmp_path / "index.faiss", np.empty((0, index.dim), np.float32), True, ntotal)
    with pytest.raises(MemoryStateError, match="saved as pending"):
        KeyIndex(8, "Flat").restore(tmp_path / "index.faiss", keys(2), trained=True, ntotal=5)
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(MemoryStateError, match="not a readable FAISS index"):
        KeyIndex(8, "Flat").restore(tmp_path / "junk.faiss", np.empty((0, 8), np.float32), True, 0)
