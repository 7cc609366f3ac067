"""``vstream train``'s ``memory_attention`` (the abstract memory's q/k, trained through
the abstract memory rebuilt from each record's stored frames) and ``multigranular`` (the
PUMA head, trained on interleaved image-text documents): for each, the held-out loss
falls, a resumed run ends as an uninterrupted one bit for bit, and the trained weights
load (``--head memory_attention:weights=OUT``; ``--generation-head OUT``) and change
what the model gives."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import write_jsonl
from PIL import Image
from safetensors.torch import load_file
from tiny_models import sharpened_flash_vstream, tiny_clip, tiny_llama

from vstream.cli import main
from vstream.data import (
    AbstractInputs,
    Entry,
    InterleavedDocument,
    RecordFeatures,
    read_document_features,
    read_features,
    write_features,
)
from vstream.errors import ConfigError, DataError, ModelLoadError
from vstream.extract import extract_features
from vstream.memory import MemoryTokens, replay_abstract
from vstream.models import load_model
from vstream.models.heads.multigranular import MultigranularHead, hidden_size_of
from vstream.session import Session, SessionConfig
from vstream.train import TrainConfig, train

torch.set_num_threads(1)
ANSWERS = ("the red square moves left", "a blue circle appears")
QUESTION = "What happens in the video?"
WIDTH, SLOTS, ALPHA = 48, 16, 0.3  # the tiny checkpoint's tower width, abstract slots (and chunk) and rate
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    """A tiny Flash-VStream checkpoint with a sharpened output layer (as in test_train) and
    16 abstract slots updated 16 frames at a time: a memory that is mostly abstract, so
    what the abstract attention picks matters to the answer."""
    root = tmp_path_factory.mktemp("train-parts-models")
    return str(sharpened_flash_vstream(root, tiny_clip(root / "clip"), video_Turing_memory_length=SLOTS))


def frames_of(kind: int, seed: int) -> torch.Tensor:
    """48 frames ``[48, 1, 48]`` at the abstract grid: 16 of noise that fill the slots,
    then two chunks of 16, each with 5 frames of the answer's pattern among noise."""
    noise = torch.Generator().manual_seed(seed)
    frames = torch.randn(3 * SLOTS, 1, WIDTH, generator=noise)
    pattern = 3 * torch.randn(WIDTH, generator=torch.Generator().manual_seed(200 + kind))
    for chunk in (SLOTS, 2 * SLOTS):
        frames[chunk + torch.randperm(SLOTS, generator=noise)[:5], 0] = pattern
    return frames


@pytest.fixture
def stream_data(flash, tmp_path):
    """32 video records whose features hold the abstract memory's inputs; the stored
    abstract tokens are what the checkpoint's own attention made of them."""
    attention = load_model(flash, device="cpu").memory_attention()
    features, records = tmp_path / "features", []
    for i in range(32):
        record_id, frames = f"clip{i:02d}", frames_of(i % 2, i)
        with torch.no_grad():
            slots = replay_abstract(attention, frames, SLOTS, SLOTS, ALPHA).reshape(-1, WIDTH)
        spatial = torch.randn(1, WIDTH, generator=torch.Generator().manual_seed(1000 + i))
        memory = MemoryTokens(torch.cat([slots, spatial]), ["abstract"] * SLOTS + ["spatial"],
                              [(0.0, 47.0)] * SLOTS + [(47.0, 47.0)])
        write_features(features, RecordFeatures(record_id, memory, [], f"{record_id}.mp4",
                                                AbstractInputs(frames, SLOTS, SLOTS, ALPHA)))
        records.append({"id": record_id, "video": f"{record_id}.mp4",
                        "conversations": [{"from": "human", "value": f"<video>\n{QUESTION}"},
                                          {"from": "gpt", "value": ANSWERS[i % 2]}]})
    path = tmp_path / "train.jsonl"
    write_jsonl(path, records)
    return path, features


def config(model, data, out, **fields) -> TrainConfig:
    path, features = data
    settings = {"model": model, "data": str(path), "features": str(features), "out": str(out), "held_out": 0.25,
                "epochs": 2, "learning_rate": 3e-2, "accumulate": 2, "checkpoint_every": 3, "device": "cpu",
                "train": ["memory_attention"]}
    return TrainConfig(**{**settings, **fields})


def test_memory_attention_trains_and_loads_as_a_head_a_session_uses(flash, stream_data, tmp_path, make_clip):
    report = train(config(flash, stream_data, tmp_path / "run"), progress=False)
    assert report.held_out_samples >= 4
    assert report.held_out_after < report.held_out_before - 0.015
    saved = load_file(str(tmp_path / "run" / "memory_attention.safetensors"))
    assert sorted(saved) == ["k_proj.bias", "k_proj.weight", "q_proj.bias", "q_proj.weight"]

    base = load_model(flash, device="cpu")
    tuned = load_model(flash, device="cpu", heads=[f"memory_attention:weights={tmp_path / 'run'}"])
    assert all(torch.equal(tuned.memory_attention().state_dict()[k], v) for k, v in saved.items())
    assert not torch.equal(base.memory_attention().q_proj.weight, saved["q_proj.weight"])
    # a session on the model reads a video with the trained attention: another abstract memory, another answer
    clip = make_clip("train-parts.mp4", duration=6.0, fps=10.0, scenes=[(0.0, (200, 30, 30)), (2.0, (30, 30, 200)),
                                                                         (4.0, (30, 200, 30))], noise=0.2)
    memories, costs = [], []
    for model in (base, tuned):
        with Session(model, SessionConfig(asr=False, ocr=False, fps=6.0)) as session:
            session.ingest(str(clip.path), progress=False)
            memories.append(session.memory.tokens())
            pieces = model.question_pieces(session.context(QUESTION), QUESTION)
            with torch.no_grad():
                costs.append([float(model.answer_loss(pieces, answer)) for answer in ANSWERS])
    abstract = [m.tokens[[k == "abstract" for k in m.kinds]] for m in memories]
    assert len(abstract[0]) == SLOTS and not torch.allclose(abstract[0], abstract[1])
    others = [m.tokens[[k != "abstract" for k in m.kinds]] for m in memories]
    assert torch.equal(others[0], others[1])  # only the abstract memory changed
    assert costs[0] != costs[1]  # and with it what the model makes of each answer


def test_memory_attention_resumes_bit_for_bit_and_honours_bfloat16(flash, stream_data, tmp_path):
    whole = train(config(flash, stream_data, tmp_path / "whole"), progress=False)
    cut = train(config(flash, stream_data, tmp_path / "cut"), progress=False, stop_after=4)
    assert cut.steps == 4 and cut.held_out_after is None
    resumed = train(config(flash, stream_data, tmp_path / "cut"), progress=False)
    assert resumed.steps == whole.steps and resumed.held_out_after == whole.held_out_after
    a, b = (load_file(str(tmp_path / name / "memory_attention.safetensors")) for name in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # mixed precision (what "auto" picks on CUDA), here on the CPU: still learns, weights stay float32
    half = train(config(flash, stream_data, tmp_path / "bf16", precision="bfloat16", epochs=1), progress=False)
    assert half.held_out_after < half.held_out_before - 0.005
    saved = load_file(str(tmp_path / "bf16" / "memory_attention.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values()) and not torch.equal(saved["q_proj.weight"],
                                                                                     a["q_proj.weight"])


def test_memory_attention_trains_on_top_of_an_earlier_runs_projector(flash, stream_data, tmp_path):
    """A projector trained first, attached frozen through ``heads``: the attention then
    learns on top of it, and the projector stays as the earlier run left it."""
    train(config(flash, stream_data, tmp_path / "projector", train=["projector"], epochs=1), progress=False)
    report = train(config(flash, stream_data, tmp_path / "attention", heads=[f"projector:weights={tmp_path / 'projector'}"]),
                   progress=False)
    assert report.held_out_after < report.held_out_before - 0.005
    assert not (tmp_path / "attention" / "projector.safetensors").exists()
    model = load_model(flash, device="cpu", heads=[f"projector:weights={tmp_path / 'projector'}",
                                                   f"memory_attention:weights={tmp_path / 'attention'}"])
    before = load_file(str(tmp_path / "projector" / "projector.safetensors"))
    assert all(torch.equal(model.memory_projector().state_dict()[k], v) for k, v in before.items())
    # one part's weights are refused as the other's, naming the file
    (tmp_path / "projector" / "projector.safetensors").rename(tmp_path / "projector" / "memory_attention.safetensors")
    with pytest.raises(ModelLoadError, match="memory_attention.safetensors: the weights are of another abstract"):
        load_model(flash, device="cpu", heads=[f"memory_attention:weights={tmp_path / 'projector'}"])
    with pytest.raises(ModelLoadError, match="projector.safetensors: no projector weights there"):
        load_model(flash, device="cpu", heads=[f"projector:weights={tmp_path / 'projector'}"])
    with pytest.raises(ConfigError, match="TrainConfig.heads must be a list of head specs"):
        config(flash, stream_data, tmp_path / "x", heads="projector")


def test_memory_attention_needs_the_frames_and_a_checkpoints_attention(flash, stream_data, tmp_path):
    _, features = stream_data
    for file in features.iterdir():  # features extracted before the frames were kept: the same, without them
        if file.name.startswith("clip03-"):
            old = read_features(features, "clip03")
            write_features(features, RecordFeatures("clip03", old.memory, [], old.source))
    assert read_features(features, "clip03").abstract is None
    with pytest.raises(DataError, match="'clip03'.*no abstract-memory inputs.*extract it again"):
        train(config(flash, stream_data, tmp_path / "old", held_out=0.0, epochs=1), progress=False)
    llama = tiny_llama(tmp_path / "llama")
    with pytest.raises(ConfigError, match="brings no abstract attention of its own"):
        train(config(str(llama), stream_data, tmp_path / "llama-run"), progress=False)


# -- the multi-granular head on interleaved documents ----------------------------------------------------------------


@pytest.fixture
def documents(tmp_path):
    """24 documents (JSON Lines, OmniCorpus fields), each a paragraph naming a colour
    before an image of it, then a closing paragraph; one more with an image only."""
    names = list(COLOURS)
    rows = []
    for i in range(24):
        colour = names[i % len(names)]
        image = Image.new("RGB", (40, 40), COLOURS[colour])
        image.paste((255, 255, 255), (4 * (i % 5), 10, 4 * (i % 5) + 12, 22))  # a small white mark, for variety
        image.save(tmp_path / f"img{i}.png")
        rows.append({"texts": [f"Here is a {colour} picture.", None, "That was all."],
                     "images": [None, f"img{i}.png", None], "general_metadata": {"id": f"doc{i}", "url": None}})
    rows.append({"texts": [None], "images": ["img0.png"], "general_metadata": {"id": "lonely"}})
    rows.append({"texts": ["No pictures here."], "images": [None], "general_metadata": {"id": "words"}})
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, rows)
    return path


def test_documents_are_extracted_once_per_image(flash, documents, tmp_path):
    report = extract_features(documents, tmp_path / "doc-features", flash, progress=False)
    assert report.documents and (report.extracted, report.without_images, len(report.failed)) == (25, 1, 0)
    stored = read_document_features(tmp_path / "doc-features", "doc2")
    assert stored.images.shape == (1, 64, WIDTH) and stored.sources[0].endswith("img2.png")  # the tower's 8×8 grid
    again = extract_features(documents, tmp_path / "doc-features", flash, progress=False)
    assert (again.extracted, again.skipped) == (0, 25)
    url = tmp_path / "url.jsonl"
    url.write_text(json.dumps({"texts": ["x", None], "images": [None, "https://example.com/a.jpg"]}) + "\n")
    failed = extract_features(url, tmp_path / "url-features", flash, progress=False)
    assert failed.failed and "is a URL: download the documents' images first" in failed.failed[0][1]


def test_the_multigranular_head_trains_on_documents_resumes_and_loads(flash, documents, tmp_path, capsys):
    extract_features(documents, tmp_path / "doc-features", flash, progress=False)
    settings = {"model": flash, "data": str(documents), "features": str(tmp_path / "doc-features"),
                "train": ["multigranular"], "held_out": 0.25, "epochs": 3, "learning_rate": 1e-2, "accumulate": 2,
                "checkpoint_every": 3, "device": "cpu"}
    whole = train(TrainConfig(**settings, out=str(tmp_path / "whole")), progress=False)
    assert whole.train_samples + whole.held_out_samples == 24  # the image with no paragraph beside it is no sample
    assert whole.held_out_samples >= 3 and whole.held_out_score is None
    assert whole.held_out_after < 0.95 * whole.held_out_before

    cut = train(TrainConfig(**settings, out=str(tmp_path / "cut")), progress=False, stop_after=4)
    assert cut.steps == 4
    resumed = train(TrainConfig(**settings, out=str(tmp_path / "cut")), progress=False)
    assert resumed.held_out_after == whole.held_out_after
    a, b = (load_file(str(tmp_path / name / "multigranular.safetensors")) for name in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    model = load_model(flash, device="cpu")
    trained = MultigranularHead.from_folder(tmp_path / "whole")  # what --generation-head OUT loads
    assert trained.config.levels == [1, 4, 16, 64] and trained.config.feature_dim == WIDTH
    untrained = MultigranularHead(hidden_size_of(model), feature_dim=WIDTH, levels=[1, 4, 16, 64])
    prompt = "Here is a red picture."
    made = [head.generate(model, None, prompt, 16) for head in (untrained, trained)]
    assert not torch.allclose(made[0], made[1])
    file = tmp_path / "train.json"
    file.write_text(TrainConfig(**{**settings, "epochs": 1}, out=str(tmp_path / "cli")).to_json())
    assert main(["train", str(file), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"--generation-head {tmp_path / 'cli'}" in out and "answer score" not in out
    with pytest.raises(ConfigError, match="multigranular trains on interleaved documents.*run of its own"):
        TrainConfig(**{**settings, "train": ["multigranular", "projector"]}, out=str(tmp_path / "x"))


def test_image_texts_pair_each_image_with_the_paragraph_beside_it():
    doc = InterleavedDocument("d", None, (Entry("image", "a.png"), Entry("text", "caption of a"),
                                          Entry("text", "before b"), Entry("image", "b.png"),
                                          Entry("image", "c.png"), Entry("image", "d.png")))
    assert doc.image_texts() == [(0, "caption of a"), (1, "before b")]  # c: between images; d: none beside it
