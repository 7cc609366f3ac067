"""Several images and videos asked about together (``Dialogue``): labels and order in the
prompt, placeholders, replayed turns, evidence sources, image and video media, with a
text-only model and with a VLM that reads memory tokens; closing leaves no threads."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_clip, tiny_flash_vstream, tiny_llama, tiny_llava_onevision

from vstream.dialogue import Dialogue
from vstream.errors import ConfigError, DecodeError, SourceError, VStreamError
from vstream.models import ChatModel, GenerationConfig, load_model
from vstream.models.prompt import MEDIA_SYSTEM_PROMPT, Evidence, label_question, media_pieces
from vstream.session import Session, SessionConfig
from vstream.types import Frame

torch.set_num_threads(1)

CONFIG = SessionConfig(asr=False, encoder="pixels", generation=GenerationConfig(max_new_tokens=4))  # colour notes
RED = np.full((32, 32, 3), (220, 30, 30), np.uint8)
BLUE = np.full((32, 32, 3), (30, 60, 220), np.uint8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dialogue-models")
    return {"llama": load_model(str(tiny_llama(root / "llama"))),
            "onevision": load_model(str(tiny_llava_onevision(root / "onevision")))}


@pytest.fixture(scope="module")
def clip(make_clip):
    return make_clip("dialogue.mp4", duration=4.0, fps=2, size=(64, 48), audio=False,
                     scenes=[(0.0, (200, 30, 30)), (2.0, (30, 200, 30))])


def prompt_text(dialogue: Dialogue, question: str) -> str:
    """The user turn as text, each run of visual tokens shown as ``[n]``."""
    pieces = media_pieces(dialogue.media(question), question, dialogue.model.reads_memory_tokens)
    return "".join(p.text if p.features is None else f"[{p.features.shape[0]}]" for p in pieces)


def writer_threads() -> int:
    return sum(t.name == "vstream-session-writer" for t in threading.enumerate())


def test_media_are_labelled_and_listed_in_order_before_the_question(models, clip):
    with Dialogue(models["llama"], CONFIG) as dialogue:
        assert [dialogue.add_video(clip.path), dialogue.add_image(RED), dialogue.add_image(Image.fromarray(BLUE))] \
            == [1, 2, 3]
        assert dialogue.labels == ["Video 1", "Image 2", "Image 3"]
        text = prompt_text(dialogue, "which one is blue?")
    video, image_2, image_3 = text.index("Video 1:\n"), text.index("Image 2: "), text.index("Image 3: ")
    assert 0 == video < image_2 < image_3 < text.index("Question: which one is blue?")
    assert text.endswith("Question: which one is blue?")
    assert "What the video shows:\n[0:00:00-" in text[video:image_2]  # a video keeps its time markers
    assert "[0:" not in text[image_2:]  # an image has no time


def test_placeholders_put_each_medium_where_the_question_refers_to_it(models, clip):
    with Dialogue(models["llama"], CONFIG) as dialogue:
        dialogue.add_image(RED)
        dialogue.add_video(clip.path)
        text = prompt_text(dialogue, "Is <image> the first view of <video>?")
        assert text.startswith("Question: Is Image 1: view A, red\n the first view of Video 2:\nWhat the video shows:\n")
        assert text.endswith("\n?")
        dialogue.ask("Is <image> the first view of <video>?")
        assert dialogue.history[0][0] == "Is Image 1 the first view of Video 2?"  # replayed with labels


@pytest.mark.parametrize("question, message", [
    ("what is <image>?", r"the question has 1 placeholder\(s\) \(<image>\) but 2 media were added \(Image 1, Video 2\)"),
    ("<image> <video> <image>", r"3 placeholder\(s\) \(<image>, <video>, <image>\) but 2 media"),
    ("is <video> like <image>?", "placeholder 1 of the question is <video> but medium 1 is Image 1"),
])
def test_placeholders_that_do_not_match_the_media_are_refused(models, clip, question, message):
    with Dialogue(models["llama"], CONFIG) as dialogue:
        dialogue.add_image(RED)
        dialogue.add_video(clip.path)
        with pytest.raises(ConfigError, match=message):
            dialogue.ask(question)
        assert dialogue.history == []


def test_label_question():
    assert label_question("no placeholder", []) == "no placeholder"
    assert label_question("<video> then <image>", ["video", "image"]) == "Video 1 then Image 2"
    with pytest.raises(ConfigError, match=r"but 0 media were added \(none\)"):
        label_question("<image>", [])


def test_earlier_turns_are_replayed_and_bounded(models, monkeypatch):
    model = models["llama"]
    seen = []
    embed = model.embed

    def spy(pieces, system, history):
        seen.append((system, list(history)))
        return embed(pieces, system, history)

    monkeypatch.setattr(model, "embed", spy)
    with Dialogue(model, CONFIG, max_turns=2) as dialogue:
        dialogue.add_image(RED)
        answers = [dialogue.ask(f"question {i}").text for i in range(4)]
        assert dialogue.history == [("question 2", answers[2]), ("question 3", answers[3])]
    assert [history for _, history in seen] == [[], [("question 0", answers[0])],
                                                 [("question 0", answers[0]), ("question 1", answers[1])],
                                                 [("question 1", answers[1]), ("question 2", answers[2])]]
    assert all(system == MEDIA_SYSTEM_PROMPT for system, _ in seen)
    chat = model.render(MEDIA_SYSTEM_PROMPT, [("q1", "a1")])
    assert "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\n" in chat


def test_turns_in_every_chat_format(models, tmp_path):
    turn = "\x00vstream-user-turn\x00"
    bare = load_model(str(tiny_llama(tmp_path / "bare", chat_template=None)))
    assert bare.render("sys") == f"sys\n\nUser: {turn}\nAssistant:"  # as before turns existed
    assert bare.render("sys", [("q1", "a1")]) == f"sys\n\nUser: q1\nAssistant: a1\nUser: {turn}\nAssistant:"
    flash = load_model(str(tiny_flash_vstream(tmp_path / "flash", tiny_clip(tmp_path / "clip"))[0]))
    assert flash.render("sys") == f"sys USER: {turn} ASSISTANT:"  # Vicuna v1, as the release
    assert flash.render("sys", [("q1", "a1")]) == f"sys USER: q1 ASSISTANT: a1</s>USER: {turn} ASSISTANT:"
    onevision = models["onevision"].render("SYSTEM", [("q1", "a1")])  # a processor template: typed parts
    assert onevision.endswith(f"user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\n{turn}"
                              "<|im_end|>\n<|im_start|>assistant\n")
    with Dialogue(models["llama"], CONFIG, max_turns=0) as dialogue:
        dialogue.add_image(RED)
        dialogue.ask("what?")
        assert dialogue.history == []  # max_turns 0: every question stands alone
    with pytest.raises(ConfigError, match="max_turns must be an int >= 0"):
        Dialogue(models["llama"], CONFIG, max_turns=-1)


def test_a_vlm_reads_each_image_as_its_frame_and_names_the_medium_of_its_evidence(models, clip):
    with Dialogue(models["onevision"], CONFIG) as dialogue:
        dialogue.add_video(clip.path)
        dialogue.add_image(RED)
        video, image = dialogue.media("what is red?")
        assert set(video.context.memory.kinds) == {"abstract", "temporal", "retrieved", "spatial"}
        assert image.context.memory.kinds == ["spatial"] * 64  # the one frame at the memory's 8x8 grid
        assert "Image 2:[64]\nQuestion: what is red?" in prompt_text(dialogue, "what is red?")
        stream = dialogue.stream("what is red?")
        text = "".join(stream)
        answer = stream.result()
    assert text.strip() == answer.text and dialogue.history == []  # closed: the turns went with the media
    assert {e.source for e in answer.evidence} == {"video 1", "image 2"}
    assert all((e.start, e.end) == (0.0, 0.0) for e in answer.evidence if e.source == "image 2")
    scores = [e.score for e in answer.evidence]
    assert scores == sorted(scores, reverse=True)
    assert all(item["source"] in ("video 1", "image 2") for item in answer.to_dict()["evidence"])


def test_evidence_source_is_optional():
    single = Evidence(1.0, 2.0, "frame", 0.5)
    assert single.source is None and single.line() == "0:01-0:02  frame      0.50"
    assert Evidence(0.0, 0.0, "frame", 0.25, "image 2").line() == "0:00-0:00  frame      0.25  image 2"


def test_a_session_fed_by_the_caller_is_a_video(models):
    with Session(models["onevision"], CONFIG) as session:
        for i in range(3):
            session.push_frame(Frame(RED if i < 2 else BLUE, t=float(i), index=i), wait=True)
        session.wait()
        with Dialogue(models["onevision"], CONFIG) as dialogue:
            assert dialogue.add_video(session) == 1
            dialogue.add_image(BLUE)
            assert dialogue.ask("which is blue?").evidence
        assert session.ask("and now?").text is not None  # the dialogue leaves the caller's session open
        with Dialogue(models["llama"], CONFIG) as other, pytest.raises(ConfigError, match="another model"):
            other.add_video(session)


def test_image_inputs(models, tmp_path):
    Image.fromarray(RED).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with Dialogue(models["llama"], CONFIG) as dialogue:
        assert dialogue.add_image(tmp_path / "red.png") == 1
        assert dialogue.add_image(str(tmp_path / "red.png")) == 2
        with pytest.raises(SourceError, match="no such image file"):
            dialogue.add_image(tmp_path / "missing.png")
        with pytest.raises(DecodeError, match="cannot read it as an image"):
            dialogue.add_image(tmp_path / "broken.png")
        with pytest.raises(ConfigError, match=r"uint8 array.*got float64 \(4, 4\)"):
            dialogue.add_image(np.zeros((4, 4)))
        with pytest.raises(SourceError):
            dialogue.add_video(tmp_path / "missing.mp4")
        assert dialogue.labels == ["Image 1", "Image 2"]  # a failed add adds nothing


def test_asking_needs_media_and_a_question(models):
    with Dialogue(models["llama"], CONFIG) as dialogue:
        with pytest.raises(ConfigError, match="add an image or a video"):
            dialogue.ask("what?")
        dialogue.add_image(RED)
        with pytest.raises(ConfigError, match="non-empty string"):
            dialogue.ask("  ")


def test_reset_and_close_leave_no_threads(models, clip):
    before = writer_threads()
    dialogue = Dialogue(models["llama"], CONFIG)
    dialogue.add_video(clip.path)
    dialogue.add_image(RED)
    dialogue.ask("what?")
    assert writer_threads() == before + 2  # one session, one writer, per medium
    dialogue.reset()
    assert writer_threads() == before and dialogue.labels == [] and dialogue.history == []
    dialogue.add_image(BLUE)
    assert dialogue.labels == ["Image 1"]
    dialogue.close()
    dialogue.close()
    assert writer_threads() == before
    with pytest.raises(VStreamError, match="closed"):
        dialogue.add_image(RED)
    assert isinstance(dialogue.model, ChatModel)


def test_vstream_exports_dialogue():
    import vstream

    assert vstream.Dialogue is Dialogue


def test_vstream_ask_over_several_media(models, clip, tmp_path, capsys):
    from vstream.cli import main

    images = []
    for name, colour in (("red.png", (220, 30, 30)), ("blue.jpg", (30, 30, 220))):
        Image.new("RGB", (48, 32), colour).save(tmp_path / name)
        images.append(str(tmp_path / name))
    argv = ["ask", *images, str(clip.path), "Which image is red?", "And the video?", "--model", models["llama"].name,
            "--no-asr", "--quiet", "--max-new-tokens", "3"]
    assert main([*argv, "--json"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(answers) == 2  # two turns of one dialogue
    sources = {e["source"] for answer in answers for e in answer["evidence"]}
    assert sources <= {"image 1", "image 2", "video 3"} and sources
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Q: Which image is red?" in out and "Q: And the video?" in out
    assert main([*argv, "--last", "5"]) == 1
    assert "not for several media" in capsys.readouterr().err
