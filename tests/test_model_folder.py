"""One model-folder resolver (``vstream.config.resolve_model_folder``): a local folder, then
the Hugging Face cache, then the hub when online; every loader finds its files through it.

No network: each test lays out a temporary Hugging Face cache (``models--owner--name/refs/main``
naming a snapshot folder) and switches the hub off (``HF_HUB_OFFLINE=1``)."""

from __future__ import annotations

import shutil
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from tiny_models import tiny_clip, tiny_flash_vstream, tiny_llama

from vstream.config import resolve_model_folder
from vstream.errors import EncoderError, ModelLoadError

torch.set_num_threads(1)
REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_snapshot(cache: Path, repo: str, folder: Path | None = None, files: dict[str, bytes] | None = None) -> Path:
    """Lay out ``repo`` in the Hugging Face cache ``cache`` as the hub client leaves it:
    ``refs/main`` names the revision whose ``snapshots/<revision>/`` holds the files (a copy
    of ``folder``, and ``files`` by relative path). Returns the snapshot folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / REVISION
    if folder is not None:
        shutil.copytree(folder, snapshot)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in (files or {}).items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, the default one for this test, with the hub offline."""
    folder = tmp_path / "hf-cache"
    folder.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the client's own switch, read at its import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return folder


def test_a_local_folder_is_itself(tmp_path, cache):
    (tmp_path / "model").mkdir()
    assert resolve_model_folder(tmp_path / "model") == tmp_path / "model"
    assert resolve_model_folder(str(tmp_path / "model")) == tmp_path / "model"


def test_a_cached_hub_id_is_its_snapshot_without_the_network(cache):
    snapshot = cache_snapshot(cache, "some-org/some-model", files={"config.json": b"{}", "model.safetensors": b"x"})
    assert resolve_model_folder("some-org/some-model") == snapshot
    elsewhere = cache.parent / "other-cache"
    other = cache_snapshot(elsewhere, "some-org/some-model", files={"config.json": b"{}", "unet/weights.bin": b"x"})
    assert resolve_model_folder("some-org/some-model", cache_dir=elsewhere) == other  # weights in a subfolder count


def test_a_hub_id_neither_local_nor_cached_offline_is_an_error_naming_it(cache):
    with pytest.raises(ModelLoadError) as missing:
        resolve_model_folder("some-org/absent-model", "language model")
    message = str(missing.value)
    assert "language model 'some-org/absent-model'" in message and str(cache) in message
    assert "HF_HUB_OFFLINE is set" in message and "hf download some-org/absent-model" in message
    cache_snapshot(cache, "some-org/config-only", files={"config.json": b"{}"})  # a config lookup left only this
    with pytest.raises(ModelLoadError, match="'some-org/config-only'.* in the Hugging Face cache without its weights"):
        resolve_model_folder("some-org/config-only")
    with pytest.raises(EncoderError, match="text model 'some-org/absent-model'"):  # the caller's stage's error
        resolve_model_folder("some-org/absent-model", "text model", error=EncoderError)


def test_paths_that_are_not_model_folders_are_refused_by_name(tmp_path, cache):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"'.*weights\.bin' is a file; expected a model folder or a hub id"):
        resolve_model_folder(tmp_path / "weights.bin")
    for name in (str(tmp_path / "absent"), "./absent", "~/absent-model-folder", "a/b/c", "org--x/y"):
        with pytest.raises(ModelLoadError, match="no such folder"):
            resolve_model_folder(name)


def test_every_loader_reads_a_cached_hub_id_offline(tmp_path, cache):
    """The language model, a Flash-VStream checkpoint whose config names its vision tower
    by hub id, the vision encoder and the text embedder: each named by hub id, found in
    the cache, never on the network."""
    from vstream.encoders import create_encoder
    from vstream.encoders.text import TextConfig, TextEmbedder
    from vstream.models import load_model
    from vstream.models.flash_vstream import FlashVStreamModel

    cache_snapshot(cache, "tiny-org/llama", tiny_llama(tmp_path / "llama"))
    model = load_model("tiny-org/llama", device="cpu")
    assert model.lm.config.num_hidden_layers == 2
    cache_snapshot(cache, "tiny-org/clip", tiny_clip(tmp_path / "clip"))
    assert create_encoder("tiny-org/clip", device="cpu").grid == 8
    flash, _ = tiny_flash_vstream(tmp_path / "flash", tower="tiny-org/clip")
    cache_snapshot(cache, "tiny-org/flash-vstream", flash)
    assert isinstance(load_model("tiny-org/flash-vstream", device="cpu"), FlashVStreamModel)
    cache_snapshot(cache, "tiny-org/bert", _tiny_bert(tmp_path / "bert"))
    assert TextEmbedder(TextConfig(model="tiny-org/bert", device="cpu")).dim == 16
    with pytest.raises(ModelLoadError, match="cannot load model config 'tiny-org/absent': .*HF_HUB_OFFLINE is set"):
        load_model("tiny-org/absent", device="cpu")


def _tiny_bert(folder: Path) -> Path:
    """A random 1-layer BERT (width 16) with a WordPiece tokenizer: a text embedder's model."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir()
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\ncar\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(folder)
    return folder


def test_online_a_repository_is_fetched_in_safetensors_else_its_pickles(tmp_path, monkeypatch):
    """With the hub on, what is not cached is downloaded, never other frameworks' weights,
    and the PyTorch pickles only when the repository has no safetensors (the hub client
    stands in for the network here: it records what it is asked for)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    repositories = {"org/pickles": {"config.json": b"{}", "pytorch_model.bin": b"x", "tf_model.h5": b"x"},
                    "org/both": {"config.json": b"{}", "model.safetensors": b"x", "pytorch_model.bin": b"x"}}
    asked = []

    def snapshot_download(repo_id, cache_dir=None, local_files_only=False, allow_patterns=None, ignore_patterns=()):
        asked.append((repo_id, local_files_only, tuple(ignore_patterns or ())))
        if local_files_only:
            raise LocalEntryNotFoundError(f"{repo_id} is not cached")
        if repo_id not in repositories:
            raise LocalEntryNotFoundError(f"cannot reach the hub to locate {repo_id}")  # as without a network
        folder = tmp_path / repo_id.replace("/", "--")
        folder.mkdir(exist_ok=True)
        for name, data in repositories[repo_id].items():
            if not any(fnmatch(name, pattern) for pattern in ignore_patterns or ()):
                (folder / name).write_bytes(data)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    both = resolve_model_folder("org/both")
    assert sorted(p.name for p in both.iterdir()) == ["config.json", "model.safetensors"]
    assert [(repo, local) for repo, local, _ in asked] == [("org/both", True), ("org/both", False)]
    asked.clear()
    pickles = resolve_model_folder("org/pickles")
    assert sorted(p.name for p in pickles.iterdir()) == ["config.json", "pytorch_model.bin"]  # no TensorFlow file
    assert [(repo, local, "*.bin" in ignored) for repo, local, ignored in asked] == [
        ("org/pickles", True, False), ("org/pickles", False, True), ("org/pickles", False, False)]
    with pytest.raises(ModelLoadError, match=r"cannot load language model 'org/absent': .*hub to locate org/absent"):
        resolve_model_folder("org/absent", "language model")
