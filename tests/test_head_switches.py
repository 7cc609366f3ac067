"""Choosing heads by name: one spec string names a component with its settings
(``parse_spec``); ``--encoder biglittle:...`` / ``SessionConfig.encoder`` build the
big.LITTLE encoder; ``--head visual_experts...`` / ``load_model(heads=...)`` attach
visual experts to a chat model, whose answers then route memory tokens to them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama, tiny_llava_onevision, tiny_vision_tower

from vstream import synth
from vstream.cli import main
from vstream.config import parse_spec
from vstream.encoders import create_encoder
from vstream.encoders.biglittle import BigLittleEncoder
from vstream.errors import ConfigError, ModelLoadError
from vstream.models import GenerationConfig, heads, load_model
from vstream.models.heads import Head, attach_head, create_head
from vstream.models.heads.visual_experts import VisualExperts
from vstream.models.prompt import user_pieces
from vstream.session import Session, SessionConfig

torch.set_num_threads(1)
SHORT = GenerationConfig(max_new_tokens=4)
EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("head-switches")
    return {"llama": str(tiny_llama(root / "llama")), "onevision": str(tiny_llava_onevision(root / "onevision")),
            "big": tiny_vision_tower(root / "big", "clip", 32), "little": tiny_vision_tower(root / "little", "clip", 16)}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return synth.write_clip(tmp_path_factory.mktemp("head-clip") / "scenes.mp4", duration=6.0, fps=2, size=(64, 48),
                            scenes=[(0.0, (200, 30, 30)), (3.0, (30, 200, 30))], audio=False)


def perturb(experts: VisualExperts) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in experts.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("spec, expected", [
    ("pixels", ("pixels", {})),
    ("pixels:grid=8", ("pixels", {"grid": 8})),
    ("biglittle:big=org/big,little=/models/little,keep_ratio=0.25",
     ("biglittle", {"big": "org/big", "little": "/models/little", "keep_ratio": 0.25})),
    ("visual_experts:layers=[0, 1],weights=out/experts", ("visual_experts", {"layers": [0, 1], "weights": "out/experts"})),
    ("x:flag=true,name=a b", ("x", {"flag": True, "name": "a b"})),
])
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec, message", [
    (":grid=8", "no component name"), ("pixels:grid", "not key=value"), ("pixels:grid=8,grid=4", "given twice"),
    ("pixels:=3", "not key=value"),
])
def test_parse_spec_refuses(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(spec)


def test_encoder_spec_strings():
    assert create_encoder("pixels:grid=8").grid == 8
    with pytest.raises(ConfigError, match="unknown field.*nope"):
        create_encoder("pixels:nope=1")
    with pytest.raises(ConfigError, match="pass no others"):
        create_encoder("pixels:grid=8", grid=4)


def test_biglittle_encoder_chosen_by_session_config(folders, clip):
    spec = f"biglittle:big={folders['big']},little={folders['little']},keep_ratio=0.5"
    assert isinstance(create_encoder(spec), BigLittleEncoder)
    config = SessionConfig(asr=False, encoder=spec, generation=SHORT)
    with Session(folders["llama"], config) as session:
        assert isinstance(session.encoder, BigLittleEncoder) and session.encoder.config.keep_ratio == 0.5
        stats = session.ingest(str(clip.path), progress=False)
        assert stats.frames_processed == 6 and session.encoder.dim == 32  # the big tower's width
        assert session.ask("what colour comes first?").evidence


def test_biglittle_from_the_command_line(folders, clip, capsys):
    spec = f"biglittle:big={folders['big']},little={folders['little']},keep_ratio=0.25"
    assert main(["ask", str(clip.path), "what is shown?", "--model", folders["llama"], "--encoder", spec,
                 "--no-asr", "--quiet", "--max-new-tokens", "3", "--json"]) == 0
    assert '"answer"' in capsys.readouterr().out
    assert main(["ask", str(clip.path), "q?", "--model", folders["llama"], "--encoder", "biglittle:keep_ratio=2",
                 "--no-asr", "--quiet"]) == 1
    assert "BigLittleConfig.big must name" in capsys.readouterr().err


def test_load_model_attaches_visual_experts(folders, tmp_path):
    model = load_model(folders["llama"], heads=["visual_experts:layers=[1]"])
    (head,) = model.heads
    assert isinstance(head, VisualExperts) and head.layers == [1]
    head.save_experts(tmp_path / "experts")
    again = load_model(folders["llama"], heads=[f"visual_experts:weights={tmp_path / 'experts'}"])
    assert again.heads[0].layers == [1]
    with pytest.raises(ModelLoadError, match="no saved visual experts"):
        load_model(folders["llama"], heads=[f"visual_experts:weights={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="unknown head 'nope'"):
        load_model(folders["llama"], heads=["nope"])
    with pytest.raises(ConfigError, match="carries its own config"):
        load_model(folders["llama"], heads=[f"visual_experts:weights={tmp_path / 'experts'},layers=[0]"])


def test_text_only_answers_do_not_touch_the_experts(folders, clip):
    """A text-only model puts no memory tokens in the prompt: even trained experts
    leave its answers exactly as the base model's."""
    config = SessionConfig(asr=False, generation=GenerationConfig(max_new_tokens=8))
    with Session(folders["llama"], config) as base:
        base.ingest(str(clip.path), progress=False)
        expected = base.ask("what happens?").text
    model = load_model(folders["llama"], heads=["visual_experts"])
    perturb(model.heads[0])
    with Session(model, config) as session:
        session.ingest(str(clip.path), progress=False)
        assert session.ask("what happens?").text == expected


def test_a_vlm_routes_its_memory_tokens_to_the_experts(folders, clip):
    model = load_model(folders["onevision"])
    head = attach_head(model, "visual_experts")  # LLaVA-OneVision's Qwen2 language model
    seen = []
    routing = head.routing
    head.routing = lambda visual: (seen.append(visual.clone()), routing(visual))[1]
    config = SessionConfig(asr=False, generation=GenerationConfig(max_new_tokens=6))
    with Session(model, config) as session:
        session.ingest(str(clip.path), progress=False)
        fresh = session.ask("what colour comes first?")
        context = session.context("what colour comes first?")
        runs = sum(piece.features is not None for piece in model.question_pieces(context, "what colour comes first?"))
        # exactly the memory tokens route as visual, each run with the image_newline that ends it
        assert seen and int(seen[-1].sum()) == len(context.memory) + runs
        # fresh experts are copies of the text FFNs: the answer is the base model's
        head.remove()
        model.heads.clear()
        assert session.ask("what colour comes first?").text == fresh.text
        # trained (here: moved) experts change what the memory tokens contribute
        experts = attach_head(model, "visual_experts")
        perturb(experts)
        embedded = model.embed(user_pieces(session.context("what colour comes first?"), "what colour comes first?",
                                           visual=True))
        with torch.inference_mode():
            plain = model.lm(inputs_embeds=embedded.embeds).logits[0, -1]
            with experts.routing(embedded.visual):
                routed = model.lm(inputs_embeds=embedded.embeds).logits[0, -1]
        assert not torch.allclose(plain, routed)


def test_heads_that_do_not_attach_say_so(folders, monkeypatch):
    class PlainHead(Head):
        name = "test_plain_head"

    monkeypatch.setitem(heads._HEADS, PlainHead.name, PlainHead)
    model = load_model(folders["llama"])
    with pytest.raises(ConfigError, match="does not attach"):
        attach_head(model, "test_plain_head")
    assert isinstance(create_head("test_plain_head"), PlainHead)


def test_head_flag_on_the_command_line(folders, clip, tmp_path, capsys):
    model = load_model(folders["llama"], heads=["visual_experts"])
    model.heads[0].save_experts(tmp_path / "experts")
    argv = ["ask", str(clip.path), "what is shown?", "--model", folders["llama"], "--no-asr", "--quiet",
            "--max-new-tokens", "3", "--json"]
    assert main([*argv, "--head", f"visual_experts:weights={tmp_path / 'experts'}"]) == 0
    assert '"answer"' in capsys.readouterr().out
    assert main([*argv, "--head", "visual_experts:weights=/no/such/folder"]) == 1
    assert "no saved visual experts" in capsys.readouterr().err


def run_example(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_visual_experts_example(folders, tmp_path, clip):
    out = run_example("visual_experts.py", "--model", folders["onevision"], "--out", str(tmp_path / "experts"),
                      "--steps", "3", "--lr", "0.05", "--seconds", "3")
    losses = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("step ")]
    assert len(losses) == 2 and losses[1] < losses[0]  # training moved the experts toward the target
    assert "before:" in out and "after:" in out
    argv = ["ask", str(clip.path), "what is shown?", "--model", folders["onevision"], "--no-asr", "--quiet",
            "--max-new-tokens", "3", "--head", f"visual_experts:weights={tmp_path / 'experts'}", "--json"]
    assert main(argv) == 0


def test_biglittle_example(folders, tmp_path):
    out = run_example("biglittle_encoder.py", "--big", folders["big"], "--little", folders["little"], "--model",
                      folders["llama"], "--frames", "6", "--repeats", "1", "--calibration", str(tmp_path / "c"))
    ratios = [line for line in out.splitlines() if line.startswith("keep ")]
    assert len(ratios) == 4 and "cosine to the big tower 1.000" in ratios[0]  # keep 1 is the big tower
    assert "calibrated on 3 frames" in out and (tmp_path / "c" / "calibration.safetensors").is_file()
    assert "answer with biglittle:" in out and "calibration=" in out


def test_generation_head_forwards_route_through_attached_heads(folders, clip):
    """The multigranular head's forward sees the memory tokens as an answer does: moved
    visual experts change the features it generates."""
    from vstream.models.heads.multigranular import MultigranularHead, hidden_size_of, request

    model = load_model(folders["onevision"])
    with Session(model, SessionConfig(asr=False, generation=SHORT)) as session:
        session.ingest(str(clip.path), progress=False)
        context = session.context("show")
        head = MultigranularHead(hidden_size_of(model), feature_dim=session.memory.dim)
        plain = head.generate(model, context, request(2.0), 4)
        experts = attach_head(model, "visual_experts")
        assert torch.equal(head.generate(model, context, request(2.0), 4), plain)  # fresh experts: the base
        perturb(experts)
        assert not torch.allclose(head.generate(model, context, request(2.0), 4), plain)
