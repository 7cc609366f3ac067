"""The VLM adapters on tiny random checkpoints built locally and loaded through
``load_model``: Flash-VStream in its released layout (every key mapped, the memory sizes
of its config, frames to an answer with evidence) and LLaVA-OneVision (its own tower
feeds the memory without a second copy, its projector reaches the LLM, its chat
template builds the prompt); wrong architectures and broken checkpoints fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
from tiny_models import CHATML, tiny_clip, tiny_flash_vstream, tiny_llava_onevision
from transformers import AutoImageProcessor

from vstream.errors import ModelLoadError
from vstream.memory import BankConfig, MemoryTokens, StarConfig, StarMemory
from vstream.models import Context, GenerationConfig, list_models, load_model
from vstream.models.base import _PLACEHOLDER
from vstream.models.flash_vstream import FlashVStreamModel, vision_tower_name
from vstream.models.llava_onevision import LlavaOnevisionModel
from vstream.models.prompt import SYSTEM_PROMPT, user_pieces

torch.set_num_threads(1)
TIMES = [10.0 + 1.5 * i for i in range(12)]  # seconds


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    clip = tiny_clip(root / "clip")
    flash, written = tiny_flash_vstream(root / "flash", clip)
    return {"root": root, "clip": clip, "flash": flash, "written": written,
            "onevision": tiny_llava_onevision(root / "onevision")}


@pytest.fixture(scope="module")
def flash(folders):
    return load_model(str(folders["flash"]))


@pytest.fixture(scope="module")
def onevision(folders):
    return load_model(str(folders["onevision"]))


def frames(n: int = len(TIMES), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (36, 48, 3), dtype=np.uint8) for _ in range(n)]


def remember(model, memory: StarMemory, images, times=TIMES) -> StarMemory:
    memory.extend(model.frame_encoder.encode(images), list(times))
    return memory


def check_answer(model, memory: StarMemory) -> None:
    """Stream an answer from the memory: tokens arrive, evidence lies within the frames' times."""
    stream = model.stream(Context(memory=memory.tokens(), duration=TIMES[-1]), "what moves across the screen?",
                          GenerationConfig(max_new_tokens=6))
    pieces = list(stream)
    answer = stream.result()
    assert pieces and answer.text == "".join(pieces).strip()
    assert answer.evidence and all(e.kind == "frame" for e in answer.evidence)
    assert all(TIMES[0] <= e.start <= e.end <= TIMES[-1] for e in answer.evidence)
    scores = [e.score for e in answer.evidence]
    assert scores == sorted(scores, reverse=True)
    assert {"prompt", "first_token", "answer"} <= set(answer.timings)


def test_adapters_are_registered():
    assert {"vstream", "llava_onevision"} <= set(list_models())


# -- Flash-VStream ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", [{"shards": 1}, {"shards": 2}, {"bin_file": True}],
                         ids=["safetensors", "sharded", "bin"])
def test_flash_vstream_maps_every_key_of_the_released_layout(tmp_path, folders, layout):
    folder, written = tiny_flash_vstream(tmp_path / "flash", folders["clip"], **layout)
    model = load_model(str(folder))
    assert isinstance(model, FlashVStreamModel) and model.reads_memory_tokens
    llama = model.lm.state_dict()
    projector = {f"model.mm_projector.{k}": v for k, v in model.projector.state_dict().items()}
    attention = {f"model.attention_model.{k}": v for k, v in model.memory_attention().state_dict().items()}
    loaded = {**llama, **projector, **attention}
    unused = {k for k in written
              if k.startswith(("model.vision_tower.", "model.attention_model.v_proj", "model.attention_model.out_"))}
    assert set(loaded) == set(written) - unused
    for key, value in loaded.items():
        torch.testing.assert_close(value, written[key], rtol=0, atol=0, msg=key)
    assert list(projector) == ["model.mm_projector.0.weight", "model.mm_projector.0.bias",
                               "model.mm_projector.2.weight", "model.mm_projector.2.bias"]
    assert isinstance(model.projector[1], torch.nn.GELU)


def test_flash_vstream_reads_its_memory_as_one_block_and_other_vlms_with_time_markers(flash, folders):
    """The released Flash-VStream-7b saw one contiguous block of memory tokens; a model's
    question turn holds no text inside its memory (others get a time marker per run)."""
    dim = flash.lm.config.hidden_size
    memory = MemoryTokens(torch.zeros(4, dim), ["spatial", "spatial", "temporal", "temporal"],
                          [(0, 1), (0, 1), (2, 3), (4, 5)])
    pieces = flash.stream(Context(memory=memory, duration=5.0), "What?")._pieces
    block = [i for i, p in enumerate(pieces) if p.features is not None]
    assert len(block) == 3 and block == list(range(block[0], block[-1] + 1))
    assert pieces[block[-1] + 2].text == "Memory times: spatial 0:00:00-0:00:01; temporal 0:00:02-0:00:03, 0:00:04-0:00:05\n"
    marked = load_model(str(folders["onevision"])).stream(Context(memory=memory, duration=5.0), "What?")._pieces
    assert sum(p.text.startswith(" <") for p in marked) == 3
    flash.timed_memory = True  # the switch: markers for the released checkpoint too
    try:
        switched = flash.stream(Context(memory=memory, duration=5.0), "What?")._pieces
    finally:
        flash.timed_memory = False
    assert [p.text for p in switched if p.text.startswith(" <")] == [p.text for p in marked if p.text.startswith(" <")]
    assert not any("Memory times" in p.text for p in switched)


def test_flash_vstream_memory_follows_the_checkpoint_config(flash, folders):
    config = flash.memory_config()
    assert (config.base_grid, config.spatial_grid, config.retrieved_grid, config.bank.grid) == (4, 4, 4, 4)
    assert (config.spatial_length, config.temporal_length, config.temporal_grid) == (1, 6, 2)
    assert (config.abstract_length, config.abstract_chunk, config.abstract_grid) == (5, 5, 1)
    assert (config.abstract_alpha, config.abstract_hidden, config.retrieved_length) == (0.3, 16, 3)
    attention = flash.memory_attention()
    assert (attention.dim, attention.hidden) == (48, 16)
    # the tower named by mm_vision_tower, at mm_vision_select_layer
    encoder = flash.frame_encoder
    assert (encoder.grid, encoder.dim, encoder.config.layer) == (8, 48, -2)
    assert encoder.config.model == str(folders["clip"])


def test_flash_vstream_answers_from_frames_end_to_end(flash):
    memory = remember(flash, StarMemory(flash.memory_config(), flash.memory_attention()), frames())
    assert memory.attention is flash.memory_attention()
    tokens = memory.tokens()
    assert tokens.counts() == {"abstract": 5, "temporal": 6 * 4, "retrieved": 3 * 16, "spatial": 16}
    assert flash.project(tokens.tokens).shape == (len(tokens), flash.lm.config.hidden_size)
    check_answer(flash, memory)


def test_flash_vstream_prompt_is_vicuna_without_a_chat_template(flash):
    before, after = flash.render("SYSTEM").split("\x00vstream-user-turn\x00")
    assert (before, after) == ("SYSTEM USER: ", " ASSISTANT:")


@pytest.mark.parametrize(("change", "named"), [
    ({"drop": ("model.mm_projector.2.bias",)}, "model.mm_projector.2.bias"),
    ({"drop": ("model.attention_model.k_proj.weight",)}, "model.attention_model.k_proj.weight"),
    ({"drop": ("model.layers.1.mlp.up_proj.weight",)}, "model.layers.1.mlp.up_proj.weight"),
    ({"extra": {"model.mm_projector.4.weight": torch.zeros(32, 32)}}, "model.mm_projector.4.weight"),
    ({"extra": {"model.memory_bank.weight": torch.zeros(2)}}, "model.memory_bank.weight"),
    ({"extra": {"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}}, "wrongly shaped model.layers.0.mlp.up_proj"),
    ({"extra": {"model.mm_projector.0.weight": torch.zeros(32, 40)}}, "size mismatch for 0.weight"),
    ({"mm_projector_type": "mlp2x_relu"}, "mlp2x_relu"),
    ({"mm_hidden_size": 40}, "mm_hidden_size"),
])
def test_flash_vstream_broken_checkpoints_fail_naming_the_problem(folders, tmp_path, change, named):
    folder, _ = tiny_flash_vstream(tmp_path / "broken", folders["clip"], **change)
    with pytest.raises(ModelLoadError, match=named.replace(".", r"\.")):
        load_model(str(folder))


def test_flash_vstream_finds_its_tower(tmp_path, folders):
    class Config:
        mm_vision_tower = "./ckpt/clip-vit-large-patch14"

    assert vision_tower_name(Config, tmp_path) == "openai/clip-vit-large-patch14"  # a training run's local copy
    (tmp_path / "ckpt" / "clip-vit-large-patch14").mkdir(parents=True)
    assert vision_tower_name(Config, tmp_path) == str(tmp_path / "ckpt" / "clip-vit-large-patch14")
    Config.mm_vision_tower = str(folders["clip"])
    assert vision_tower_name(Config, tmp_path) == str(folders["clip"])
    Config.mm_vision_tower = "google/siglip-base-patch16-224"
    assert vision_tower_name(Config, tmp_path) == "google/siglip-base-patch16-224"


# -- LLaVA-OneVision --------------------------------------------------------------------


def small_memory() -> StarMemory:
    return StarMemory(StarConfig(temporal_length=6, abstract_length=5, abstract_chunk=5, bank=BankConfig(ram_mb=4)))


def test_llava_onevision_answers_from_frames_end_to_end(onevision, folders):
    assert isinstance(onevision, LlavaOnevisionModel) and onevision.reads_memory_tokens
    vlm = onevision.lm.model
    assert onevision.frame_encoder.tower is vlm.vision_tower  # its own tower, not a second copy
    assert (onevision.frame_encoder.grid, onevision.frame_encoder.dim) == (8, 48)
    memory = remember(onevision, small_memory(), frames())
    tokens = memory.tokens()
    projected = onevision.project(tokens.tokens)
    assert projected.shape == (len(tokens) + 1, onevision.lm.config.text_config.hidden_size)
    torch.testing.assert_close(projected[-1], vlm.image_newline)  # a run ends as its video path ends a video
    projected = projected[:-1]
    # the checkpoint's projector, applied by hand from its file: linear_2(gelu(linear_1(x)))
    (weights,) = folders["onevision"].glob("*.safetensors")
    w = safetensors.torch.load_file(weights)
    hidden = torch.nn.functional.gelu(tokens.tokens @ w["multi_modal_projector.linear_1.weight"].T
                                      + w["multi_modal_projector.linear_1.bias"])
    expected = hidden @ w["multi_modal_projector.linear_2.weight"].T + w["multi_modal_projector.linear_2.bias"]
    torch.testing.assert_close(projected, expected, rtol=1e-4, atol=1e-5)
    check_answer(onevision, memory)


def test_llava_onevision_tower_features_are_the_vision_encoders(onevision, folders):
    from vstream.encoders.vision import VisionConfig, VisionEncoder

    alone = VisionEncoder(VisionConfig(model=str(folders["onevision"]), layer=-1, device="cpu"))
    images = frames(3, seed=1)
    torch.testing.assert_close(onevision.frame_encoder.encode(images), alone.encode(images))


def test_llava_onevision_memory_tokens_reach_the_llm(onevision):
    def first_logits(memory: StarMemory) -> torch.Tensor:
        pieces = user_pieces(Context(memory=memory.tokens(), duration=TIMES[-1]), "what is shown?", visual=True)
        embeds = onevision.embed(pieces).embeds
        with torch.inference_mode():
            return onevision.lm(inputs_embeds=embeds).logits[0, -1]

    one = first_logits(remember(onevision, small_memory(), frames(seed=2)))
    same = first_logits(remember(onevision, small_memory(), frames(seed=2)))
    other = first_logits(remember(onevision, small_memory(), frames(seed=3)))
    torch.testing.assert_close(one, same)
    assert (one - other).abs().max() > 1e-4


def test_llava_onevision_reads_the_memory_as_its_own_video_path_reads_frames(onevision, monkeypatch):
    """Three frames into a memory that keeps them whole, the session's prompt (each run
    after its time marker) through vstream, against the model's own code given the same
    text with each run as one ``<video>`` of its frame (its image processor's base view,
    its tower, feature layer, projector, newline and placeholder scatter): the same
    logits. Its 2×2 pooling after the projector is left out on its side: the memory pools
    before projecting (here not at all), the one deliberate difference."""
    images = frames(3, seed=4)
    config = StarConfig(base_grid=8, spatial_grid=8, spatial_length=3, temporal_length=0, abstract_length=0,
                        retrieved_length=0, bank=BankConfig(grid=8))
    memory = remember(onevision, StarMemory(config), images, TIMES[:3])
    pieces = onevision.question_pieces(Context(memory=memory.tokens(), duration=TIMES[2]), "what is shown?")
    runs = [piece for piece in pieces if piece.features is not None]
    assert [piece.evidence[0] for piece in runs] == TIMES[:3]  # one run a frame, in time order
    with torch.inference_mode():
        ours = onevision.lm(inputs_embeds=onevision.embed(pieces).embeds).logits

    tokenizer, video = onevision.tokenizer, onevision.lm.config.video_token_id
    before, after = onevision.render(SYSTEM_PROMPT).split(_PLACEHOLDER)
    ids = tokenizer(before, add_special_tokens=False).input_ids
    for piece in pieces:
        ids += [video] * (64 + 1) if piece.features is not None else tokenizer(
            piece.text, add_special_tokens=False).input_ids
    ids += tokenizer(after, add_special_tokens=False).input_ids
    processor = AutoImageProcessor.from_pretrained(onevision.name)
    base = processor(images=images, return_tensors="pt").pixel_values[:, 0]  # each frame's base view
    monkeypatch.setattr(type(onevision.lm.model), "apply_pooling", lambda self, features: features)
    with torch.inference_mode():
        theirs = onevision.lm(input_ids=torch.tensor([ids]), pixel_values_videos=base[:, None]).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_llava_onevision_prompt_through_its_chat_template(onevision):
    chat = onevision.render("SYSTEM")  # its template takes typed parts, as a processor's does
    assert chat.startswith("<|im_start|>system\nSYSTEM<|im_end|>\n<|im_start|>user\n\x00vstream-user-turn\x00")
    assert chat.endswith("<|im_start|>assistant\n")
    template = onevision.tokenizer.chat_template
    try:
        onevision.tokenizer.chat_template = CHATML  # an LLM's template, over plain strings
        assert onevision.render("SYSTEM") == chat
        onevision.tokenizer.chat_template = None  # no template anywhere: ChatML, its Qwen2's format
        assert onevision.render("SYSTEM") == chat
    finally:
        onevision.tokenizer.chat_template = template


# -- wrong models -----------------------------------------------------------------------


def test_wrong_architecture_is_refused_by_name(folders):
    with pytest.raises(ModelLoadError, match="'clip_vision_model'.*llava_onevision, qwen2_5_vl, qwen2_vl, vstream"):
        load_model(str(folders["clip"]))  # a vision tower alone cannot answer


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_model(str(tmp_path / "absent"))


def test_an_encoder_only_language_model_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="'bert' model, which vstream cannot answer with"):
        load_model(str(tmp_path))


def test_streamed_text_is_the_decoded_answer(tmp_path, monkeypatch):
    """The answer streams by decoding a short window per token; the pieces still add up
    to the whole answer decoded at once."""
    from tiny_models import tiny_llama

    from vstream.models import base

    model = load_model(str(tiny_llama(tmp_path / "llama")))
    produced = []

    def recording(*args, **kwargs):
        for token in base_generate(*args, **kwargs):
            produced.append(token)
            yield token

    base_generate = base.generate_tokens
    monkeypatch.setattr(base, "generate_tokens", recording)
    for seed in range(3):
        produced.clear()
        stream = model.stream(Context(), "say something", GenerationConfig(max_new_tokens=40, temperature=1.0,
                                                                           seed=seed, attribute=False))
        pieces = list(stream)
        whole = model.tokenizer.decode(produced, skip_special_tokens=True)
        assert "".join(pieces) == whole.rstrip("\ufffd") and len(produced) > 5


def test_the_text_only_path_feeds_the_model_as_its_own_tokenizer_would(tmp_path):
    """The whole prompt (system, scene notes, transcript, question) through vstream's
    piece-by-piece embeddings gives the logits of the model on its tokenizer's ids for the
    same text in one piece, and a greedy answer equal to the model's own ``generate``."""
    from tiny_models import tiny_llama

    from vstream.models.base import _PLACEHOLDER
    from vstream.models.prompt import SYSTEM_PROMPT, user_pieces
    from vstream.types import TranscriptSegment

    model = load_model(str(tiny_llama(tmp_path / "llama")))
    context = Context(scenes=[(0.0, 30.0, "view A, red"), (30.0, 41.0, "view B, recurs")],
                      transcript=[(TranscriptSegment(1.0, 3.5, "the red square moves left"), 0.9)], duration=41.0)
    pieces = user_pieces(context, "what moves?", visual=False)
    before, after = model.render(SYSTEM_PROMPT).split(_PLACEHOLDER)
    ids = model.tokenizer(before + "".join(p.text for p in pieces) + after, add_special_tokens=False,
                          return_tensors="pt").input_ids
    embedded = model.embed(pieces)
    with torch.inference_mode():
        ours = model.lm(inputs_embeds=embedded.embeds).logits
        theirs = model.lm(input_ids=ids).logits
        generated = model.lm.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=sorted(model.stop),
                                      pad_token_id=model.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    assert embedded.positions is None and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    answer = model.stream(context, "what moves?", GenerationConfig(max_new_tokens=12, attribute=False)).result()
    expected = model.tokenizer.decode([t for t in generated if t not in model.stop], skip_special_tokens=True)
    assert answer.text == expected.strip().rstrip("\ufffd")  # the stream gives whole characters only
