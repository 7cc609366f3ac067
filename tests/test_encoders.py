"""Frame encoders: the registry, the pixel encoder on synthetic scenes (alone and feeding
the memory), and the vision encoder on tiny random checkpoints of every supported
architecture, written with ``save_pretrained`` and loaded through the normal path."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vstream import open_source
from vstream.encoders.pixels import PixelConfig, PixelEncoder
from vstream.encoders.registry import FrameEncoder, create_encoder, list_encoders
from vstream.encoders.vision import SUPPORTED_MODEL_TYPES, VisionConfig, VisionEncoder
from vstream.errors import ConfigError, EncoderError
from vstream.memory import BankConfig, StarConfig, StarMemory

torch.set_num_threads(1)

# -- tiny checkpoints ---------------------------------------------------------------------
# Every tower: hidden 32, 2 layers, 32×32 images in 4×4 patches -> an 8×8 grid, D = 32.

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "image_size": 32, "patch_size": 4}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 64}
LM = {**TEXT, "num_key_value_heads": 2}  # a 1-layer Llama / Qwen2
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def tiny_qwen2_tokenizer(transformers):
    """A byte-level Qwen2 tokenizer with no merges (256 byte tokens, then specials) and a
    ChatML chat template that places ``<image>`` / ``<video>`` where the content says."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"):
        vocab[special] = len(vocab)
    tokenizer = transformers.Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]})
    tokenizer.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
        "{% elif part['type'] == 'video' %}<video>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
        "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tokenizer


def write_tiny_llava_onevision(folder) -> None:
    """A tiny random LLaVA-OneVision checkpoint: SigLIP tower (8×8 grid, D = 32), 2-layer
    GELU projector, 1-layer Qwen2 LM (vocab 264), its PIL anyres image processor and a
    byte-level tokenizer with a chat template. No processor_config.json: the full
    ``LlavaOnevisionProcessor`` needs the video processor, which needs torchvision."""
    import transformers

    torch.manual_seed(0)
    tokenizer = tiny_qwen2_tokenizer(transformers)
    vision = transformers.SiglipVisionConfig(**TOWER, vision_use_head=False)
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=transformers.Qwen2Config(**{**LM, "vocab_size": 264}),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), image_grid_pinpoints=PINPOINTS)
    transformers.LlavaOnevisionForConditionalGeneration(config).save_pretrained(folder)
    transformers.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=PINPOINTS).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_tiny(kind: str, folder) -> None:
    """Write the tiny checkpoint of ``kind`` (a model_type) to ``folder``."""
    import transformers

    if kind == "llava_onevision":
        return write_tiny_llava_onevision(folder)
    torch.manual_seed(0)
    clip_vision = transformers.CLIPVisionConfig(**TOWER)
    clip_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    if kind == "clip":
        text = {**TEXT, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=clip_vision.to_dict(),
                                                               projection_dim=16))
        processor = clip_processor
    elif kind == "siglip":
        vision = transformers.SiglipVisionConfig(**TOWER)
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=TEXT, vision_config=vision.to_dict()))
        processor = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    elif kind == "siglip2_vision_model":
        sizes = {key: value for key, value in TOWER.items() if key != "image_size"}
        model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**sizes, num_patches=64))
        processor = transformers.Siglip2ImageProcessorPil(patch_size=4, max_num_patches=64)
    elif kind == "llava":
        config = transformers.LlavaConfig(vision_config=clip_vision, text_config=transformers.LlamaConfig(**LM),
                                          image_token_index=60)
        model, processor = transformers.LlavaForConditionalGeneration(config), clip_processor
    elif kind == "llava_next":
        config = transformers.LlavaNextConfig(vision_config=clip_vision, text_config=transformers.LlamaConfig(**LM),
                                              image_token_index=60, image_grid_pinpoints=PINPOINTS)
        model = transformers.LlavaNextForConditionalGeneration(config)
        processor = transformers.LlavaNextImageProcessorPil(size={"shortest_edge": 32}, image_grid_pinpoints=PINPOINTS,
                                                            crop_size={"height": 32, "width": 32})
    elif kind == "bert":
        model, processor = transformers.BertModel(transformers.BertConfig(**TEXT)), None
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)


def reference_features(kind: str, folder, images, layer: int = -2) -> torch.Tensor:
    """The tower run by hand on the checkpoint's own processor output, the whole model
    loaded with its own class: ``hidden_states[layer]``, CLS dropped. For the anyres
    models the first view (the base view) of each image."""
    import transformers

    processor = transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")
    model = transformers.AutoModel.from_pretrained(folder).eval()
    tower = model.vision_tower if hasattr(model, "vision_tower") else model.vision_model if hasattr(
        model, "vision_model") else model
    if kind == "siglip2_vision_model":  # square input: the whole max_num_patches grid
        images = [np.asarray(Image.fromarray(image).resize((32, 32), Image.BICUBIC)) for image in images]
    inputs = processor(images=images, return_tensors="pt", input_data_format="channels_last")
    pixel_values = inputs.pop("pixel_values")
    if pixel_values.ndim == 5:  # anyres: [B, views, 3, H, W]
        pixel_values = pixel_values[:, 0]
    extra = {k: v for k, v in inputs.items() if k in ("pixel_attention_mask", "spatial_shapes")}
    with torch.no_grad():
        hidden = tower(pixel_values=pixel_values, output_hidden_states=True, **extra).hidden_states[layer]
    return hidden[:, 1:] if hidden.shape[1] == 65 else hidden


ARCHITECTURES = ["clip", "siglip", "siglip2_vision_model", "llava", "llava_next", "llava_onevision"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``checkpoints(kind) -> folder``, each written once."""
    made = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = tmp_path_factory.mktemp(kind)
            write_tiny(kind, made[kind])
        return made[kind]

    return get


def random_images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [(48, 64), (40, 40), (37, 53), (64, 32), (30, 90)]
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(count)]


# -- vision encoder -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_vision_features_are_the_towers_hidden_state(kind, checkpoints):
    folder = checkpoints(kind)
    encoder = create_encoder(str(folder))
    assert isinstance(encoder, VisionEncoder) and isinstance(encoder, FrameEncoder)
    assert (encoder.grid, encoder.dim, encoder.model_type in SUPPORTED_MODEL_TYPES) == (8, 32, True)
    images = random_images(3)
    features = encoder.encode(images)
    assert features.shape == (3, 64, 32) and features.dtype == torch.float32
    torch.testing.assert_close(features, reference_features(kind, folder, images), atol=1e-5, rtol=1e-5)


def test_vision_other_layer_bfloat16_and_batches(checkpoints):
    folder = checkpoints("clip")
    images = random_images(5)
    last = VisionEncoder(VisionConfig(model=str(folder), layer=-1)).encode(images)
    torch.testing.assert_close(last, reference_features("clip", folder, images, layer=-1), atol=1e-5, rtol=1e-5)
    full = VisionEncoder(VisionConfig(model=str(folder)))
    whole = full.encode(images)
    split = VisionEncoder(VisionConfig(model=str(folder), batch_size=2)).encode(images)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
    half = VisionEncoder(VisionConfig(model=str(folder), dtype="bfloat16"))
    assert half.tower.dtype == torch.bfloat16
    features = half.encode(images)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, whole, atol=0.1, rtol=0.05)
    assert full.encode([]).shape == (0, 64, 32)
    assert len(full.tower.encoder.layers) == 1  # cut after the penultimate layer


@pytest.mark.parametrize("kind", ["llava", "llava_onevision"])
def test_vlm_tower_loads_from_the_older_hub_layout(kind, checkpoints, tmp_path):
    """Hub checkpoints written before transformers 5 name the tower's weights
    ``vision_tower.vision_model.*``; they give the same features."""
    folder = checkpoints(kind)
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    weights = load_file(folder / "model.safetensors")
    renamed = {key.replace("vision_tower.", "vision_tower.vision_model.", 1): value for key, value in weights.items()}
    assert any(key.startswith("vision_tower.vision_model.") for key in renamed)
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    images = random_images(2)
    torch.testing.assert_close(create_encoder(str(tmp_path)).encode(images), create_encoder(str(folder)).encode(images))


def test_vision_features_feed_the_memory(checkpoints):
    encoder = create_encoder(str(checkpoints("siglip")))
    config = StarConfig(temporal_length=4, abstract_length=4, abstract_chunk=2, retrieved_length=1,
                        bank=BankConfig(ram_mb=1.0))
    with StarMemory(config) as memory:
        memory.extend(encoder.encode(random_images(6)), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
        assert memory.tokens().tokens.shape[1] == 32


def test_vision_load_errors(checkpoints, tmp_path, monkeypatch):
    with pytest.raises(EncoderError, match="does not exist"):
        VisionEncoder(VisionConfig(model=str(tmp_path / "missing")))
    with pytest.raises(EncoderError, match="does not exist"):
        create_encoder("./missing-model")
    write_tiny("bert", tmp_path / "bert")
    with pytest.raises(EncoderError, match=r"'bert'.*supported: clip, clip_vision_model"):
        create_encoder(str(tmp_path / "bert"))
    folder = checkpoints("clip")
    no_weights, no_processor = tmp_path / "no_weights", tmp_path / "no_processor"
    shutil.copytree(folder, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copytree(folder, no_processor, ignore=shutil.ignore_patterns("preprocessor_config.json"))
    with pytest.raises(EncoderError, match="cannot load the vision tower"):
        create_encoder(str(no_weights))
    llava, renamed = checkpoints("llava"), tmp_path / "renamed"
    shutil.copytree(llava, renamed)
    weights = {key.replace("vision_tower.", "image_tower."): value
               for key, value in load_file(llava / "model.safetensors").items()}
    save_file(weights, renamed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EncoderError, match="lacks .* weight"):  # never a silently random tower
        create_encoder(str(renamed))
    with pytest.raises(EncoderError, match="image processor"):
        create_encoder(str(no_processor))
    with pytest.raises(EncoderError, match=r"layer 3 does not exist.*2 layers"):
        create_encoder(str(folder), layer=3)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no 25 s of retries without a network
    with pytest.raises(EncoderError, match="nobody/no-such-model"):
        create_encoder("nobody/no-such-model")


def test_vision_refuses_bad_images_by_index(checkpoints):
    encoder = create_encoder(str(checkpoints("clip")))
    good = random_images(1)[0]
    for bad, what in [(good.astype(np.float32), "float32"), (good[..., :2], r"\(48, 64, 2\)"),
                      (good[..., 0], r"\(48, 64\)"), ([1, 2], "list")]:
        with pytest.raises(EncoderError, match=f"image 1: .*{what}"):
            encoder.encode([good, bad, good])


def test_vision_config_checks_and_round_trips():
    config = VisionConfig(model="org/name", layer=-1, dtype="bfloat16", device="cpu", batch_size=4)
    assert VisionConfig.from_json(config.to_json()) == config
    for bad in [{"model": ""}, {"layer": 0}, {"layer": 1.5}, {"dtype": "int8"}, {"device": "tpu"},
                {"batch_size": 0}]:
        with pytest.raises(ConfigError):
            VisionConfig(**{"model": "org/name", **bad})
    with pytest.raises(ConfigError, match="unknown field"):
        VisionConfig.from_dict({"model": "org/name", "layers": 2})


# -- registry -----------------------------------------------------------------------------


def test_registry():
    assert list_encoders() == ["biglittle", "imagenet", "pixels", "vision"]
    encoder = create_encoder("pixels", grid=8, color_stats=False)
    assert isinstance(encoder, PixelEncoder) and isinstance(encoder, FrameEncoder)
    assert (encoder.grid, encoder.dim) == (8, 3)
    assert create_encoder("pixels", PixelConfig(grid=4)).grid == 4
    with pytest.raises(EncoderError, match="unknown encoder 'pixel'; known: biglittle, imagenet, pixels, vision"):
        create_encoder("pixel")
    with pytest.raises(ConfigError):
        create_encoder("pixels", PixelConfig(), grid=4)
    with pytest.raises(ConfigError):
        create_encoder("pixels", VisionConfig(model="org/name"))


def test_configs_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import vstream.encoders\n"
            "from vstream.encoders.pixels import PixelConfig; from vstream.encoders.vision import VisionConfig\n"
            "assert PixelConfig.from_json(PixelConfig(grid=8).to_json()) == PixelConfig(grid=8)\n"
            "assert VisionConfig(model='a/b').layer == -2\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    if "import of torch halted" in result.stderr and "vstream/encoders/__init__" in result.stderr.replace("\\", "/"):
        pytest.skip("vstream.encoders/__init__.py itself imports torch")
    assert result.returncode == 0, result.stderr


# -- pixel encoder ------------------------------------------------------------------------


def test_pixel_features():
    encoder = PixelEncoder()
    assert (encoder.grid, encoder.dim, encoder.config.thumbnail_size) == (16, 8, 64)
    features = encoder.encode(random_images(2) + [np.full((30, 50, 3), (255, 0, 0), np.uint8)])
    assert features.shape == (3, 256, 8) and features.dtype == torch.float32
    assert features[:, :, :3].abs().max() <= 1 and 0 <= features[:, :, 3:].min() and features[:, :, 3:].max() <= 1
    torch.testing.assert_close(features[2, 0], torch.tensor([1.0, -1, -1, 0, 0, 0, 0, 1]))  # flat red
    assert PixelEncoder(PixelConfig(color_stats=False)).encode(random_images(1)).shape == (1, 256, 3)
    assert encoder.encode(np.zeros((2, 9, 7, 3), np.uint8)).shape == (2, 256, 8)
    assert encoder.encode([]).shape == (0, 256, 8)
    with pytest.raises(EncoderError, match=r"image 0: .*float64"):
        encoder.encode([np.zeros((8, 8, 3))])
    with pytest.raises(EncoderError, match=r"image 2: .*\(0, 8, 3\)"):
        encoder.encode(random_images(2) + [np.zeros((0, 8, 3), np.uint8)])


def test_pixel_config_checks_and_round_trips():
    config = PixelConfig(grid=8, color_stats=False, image_size=64)
    assert PixelConfig.from_json(config.to_json()) == config
    for bad in [{"grid": 0}, {"grid": 8, "image_size": 60}, {"image_size": 8}, {"color_stats": 1}]:
        with pytest.raises(ConfigError):
            PixelConfig(**bad)


SCENES = [(0.0, (200, 40, 40)), (3.0, (40, 160, 60)), (6.0, (200, 40, 40)), (9.0, (40, 60, 200))]
LOOKS = [0, 1, 0, 2]  # the third scene repeats the first


@pytest.fixture(scope="module")
def scene_frames(make_clip):
    """Frames at 2 fps of a 12 s clip of four 3 s scenes (red, green, red again, blue),
    with the bar code and the moving square over them; and the look of each frame."""
    clip = make_clip("encoder_scenes.mp4", duration=12.0, fps=10, size=(160, 120), audio=False, scenes=SCENES)
    frames = list(open_source(clip.path, fps=2.0, audio=False))
    scene = np.searchsorted([start for start, _ in SCENES], [frame.t for frame in frames], side="right") - 1
    return frames, np.array(LOOKS)[scene], scene


def test_pixel_features_separate_scenes_and_find_repeats_and_cuts(scene_frames):
    frames, look, scene = scene_frames
    features = PixelEncoder().encode([frame.image for frame in frames]).flatten(1)
    distance = torch.cdist(features, features).numpy()
    same = (look[:, None] == look[None]) & ~np.eye(len(look), dtype=bool)
    assert distance[same].max() < distance[look[:, None] != look[None]].min()
    for i in np.flatnonzero(scene == 2):  # the repeat: its nearest earlier frame is in the first showing
        earlier = np.flatnonzero(scene < 2)
        assert scene[earlier[np.argmin(distance[i, earlier])]] == 0
    jumps = np.linalg.norm(np.diff(features.numpy(), axis=0), axis=1)
    cuts = sorted(frames[i + 1].t for i in np.argsort(-jumps)[:3])
    assert cuts == [3.0, 6.0, 9.0]


def test_pixel_features_let_the_memory_find_scenes(scene_frames):
    """Three centroids for three looks: the red scene's centroid holds both showings."""
    frames, _, scene = scene_frames
    features = PixelEncoder().encode([frame.image for frame in frames])
    times = [frame.t for frame in frames]
    config = StarConfig(temporal_length=3, abstract_length=3, abstract_chunk=3, retrieved_length=1,
                        bank=BankConfig(ram_mb=1.0))
    with StarMemory(config) as memory:
        for frame_features, t in zip(features, times):
            memory.add(frame_features, t)
        count = memory.centroid_count
        weights = memory.weights[:count].tolist()
        spans = list(zip(memory.time_start[:count].tolist(), memory.time_end[:count].tolist()))
        assert sorted(weights) == [6, 6, 12]
        red = spans[weights.index(12)]
        assert red[0] < 3.0 and red[1] >= 6.0
        repeat = int(np.flatnonzero(scene == 2)[0])
        hits = [hit.t for hit in memory.search(features[repeat].mean(0), k=len(times)) if hit.t < 6.0]
        assert hits[0] < 3.0  # the nearest frame before the repeat is from its first showing


@pytest.mark.parametrize("rgb, name", [((220, 30, 30), "red"), ((30, 170, 60), "green"), ((30, 60, 220), "blue"),
                                       ((230, 40, 200), "magenta"), ((230, 200, 40), "yellow"), ((128, 128, 128), "grey"),
                                       ((250, 250, 250), "white"), ((5, 5, 5), "black"), ((100, 20, 20), "dark red")])
def test_the_pixel_encoder_names_the_colour_of_its_features(rgb, name):
    from vstream.encoders.pixels import PixelEncoder

    encoder = PixelEncoder()
    features = encoder.encode([np.full((48, 64, 3), rgb, np.uint8)])
    assert encoder.describe(features.mean(dim=1).numpy()) == [name]


def test_main_colour_names_a_plain_screen_and_not_a_busy_picture():
    from vstream.encoders.pixels import colour_name, main_colour
    from vstream.synth import draw_frame

    magenta = draw_frame(7, 1.0, 160, 120, (230, 40, 200))  # bar code and white square over a quarter of it
    assert main_colour(magenta) == "magenta" and main_colour(np.zeros((90, 120, 3), np.uint8)) == "black"
    halves = np.zeros((64, 64, 3), np.uint8)
    halves[:, :30] = (220, 30, 30)
    halves[:, 30:] = (30, 60, 220)  # red 47 %, blue 53 %
    assert main_colour(halves) == "blue" and main_colour(halves, share=0.6) is None
    quarters = np.zeros((64, 64, 3), np.uint8)
    quarters[:32, :32], quarters[:32, 32:], quarters[32:, :32] = (220, 30, 30), (30, 170, 60), (230, 200, 40)
    assert main_colour(quarters) is None  # four colours, none over half
    assert colour_name(0.9, 0.2, 0.8) == "magenta" and colour_name(0.3, 0.05, 0.05) == "dark red"
