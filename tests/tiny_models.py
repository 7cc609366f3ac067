"""Tiny random checkpoints, built locally (no network) and saved the way real ones are,
so tests load them through vstream's normal loading path.

- ``tiny_tokenizer``: a byte-level BPE trained on a few sentences, as a
  ``PreTrainedTokenizerFast`` (optionally with a chat template);
- ``tiny_llama``: a 2-layer LLaMA causal LM with that tokenizer;
- ``tiny_clip``: a CLIP vision tower (32 px, 4 px patches: an 8×8 grid) and its image
  processor;
- ``tiny_flash_vstream``: a checkpoint in the released Flash-VStream-7b layout
  (``model_type`` ``"vstream"``, LLaMA keys, ``model.mm_projector.*``,
  ``model.attention_model.*`` and the tower copy ``model.vision_tower.vision_tower.*``),
  its ``mm_vision_tower`` naming a tiny CLIP folder;
- ``tiny_llava_onevision``: LLaVA-OneVision with a tiny SigLIP tower and a tiny Qwen2;
- ``tiny_qwen2_vl``: Qwen2-VL or Qwen2.5-VL (4 px patches merged 2×2, a 2-layer LLM with
  M-RoPE), its tokenizer with Qwen's vision tokens and its image processor.

Every builder writes into the folder it is given and returns it (the Flash-VStream one
also returns the tensors it wrote, to compare against what loads).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SENTENCES = [
    "the red square moves left across the screen",
    "a blue circle appears in the video at the start",
    "what happens at the end of the clip",
    "Question: what does the speaker say about the red square?",
    "Video memory: abstract temporal retrieved spatial",
    "You answer questions about a video using its memory and a transcript.",
]
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# ChatML whose messages hold a string (as Qwen2's tokenizer template) ...
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# ... and ChatML whose messages hold typed parts (as LLaVA-OneVision's processor template)
CHATML_PARTS = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                "{% for part in m['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}"
                "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}
VISION = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 32, "patch_size": 4}


def tiny_tokenizer(chat_template: str | None = CHATML, eos: str = "</s>", extra: tuple[str, ...] = ()):
    """A ``PreTrainedTokenizerFast`` (~300 tokens) with ``SPECIAL`` and ``extra`` as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL + list(extra),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(SENTENCES, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token=eos, unk_token="<unk>",
                                        pad_token="<pad>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_llama(folder: Path, chat_template: str | None = CHATML, seed: int = 0) -> Path:
    """A 2-layer LLaMA causal LM and its tokenizer, saved with ``save_pretrained``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded(seed)
    tokenizer = tiny_tokenizer(chat_template)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **LLAMA)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A CLIP vision tower (8×8 patch grid, width 48) and its ``CLIPImageProcessor``."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    _seeded(seed)
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(folder)
    size = VISION["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return Path(folder)


def flash_vstream_config(tower: str, vocab_size: int, **overrides) -> dict:
    """config.json of a tiny Flash-VStream checkpoint: the released fields, tiny sizes."""
    config = {
        "architectures": ["VStreamLlamaForCausalLM"], "model_type": "vstream", "vocab_size": vocab_size,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "float32", "use_cache": True, **LLAMA,
        "mm_vision_tower": tower, "mm_hidden_size": VISION["hidden_size"], "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "use_mm_proj": True, "image_aspect_ratio": "pad",
        "compress_type": "mean", "compress_size": 4, "compress_long_memory_size": 2, "compress_Turing_memory_size": 1,
        "compress_Turing_hidden_dim": 16, "compress_Turing_update_ratio": 0.3,
        "video_current_memory_length": 1, "video_long_memory_length": 6, "video_Turing_memory_length": 5,
        "video_short_memory_length": 10, "video_max_frames": 7, "video_sample_type": "weighted_kmeans",
        "video_fps": 1,
    }
    config.update(overrides)
    return config


def tiny_flash_vstream(folder: Path, tower: Path | str, drop: tuple[str, ...] = (), shards: int = 1,
                       extra: dict[str, torch.Tensor] | None = None, bin_file: bool = False, seed: int = 0,
                       **config_overrides) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint in the released Flash-VStream-7b layout: ``config.json``, the tokenizer
    (no chat template: the release uses Vicuna's prompt) and ``model.safetensors`` (or
    ``shards`` shards with an index, or ``pytorch_model.bin`` with ``bin_file``), without
    the keys in ``drop`` and with the tensors in ``extra``. Returns the folder and every
    tensor written, by key."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _seeded(seed)
    tokenizer = tiny_tokenizer(chat_template=None)
    config = flash_vstream_config(str(tower), len(tokenizer), **config_overrides)
    llama = LlamaForCausalLM(LlamaConfig(**{k: config[k] for k in (*LLAMA, "vocab_size")}))
    tensors = dict(llama.state_dict())
    hidden, mm, turing = config["hidden_size"], config["mm_hidden_size"], config["compress_Turing_hidden_dim"]
    layers = {"mm_projector.0": (hidden, mm), "mm_projector.2": (hidden, hidden),
              "attention_model.q_proj": (turing, mm), "attention_model.k_proj": (turing, mm),
              "attention_model.v_proj": (turing, mm), "attention_model.out_proj": (mm, turing)}
    for name, shape in layers.items():
        tensors[f"model.{name}.weight"] = torch.randn(shape) / shape[1] ** 0.5
        tensors[f"model.{name}.bias"] = torch.randn(shape[0]) * 0.1
    tensors["model.attention_model.out_ln.weight"] = torch.ones(mm)
    tensors["model.attention_model.out_ln.bias"] = torch.zeros(mm)
    # the training run saved the CLIP tower it had loaded; the model loads it by name instead
    for key, value in CLIPVisionModel.from_pretrained(tower).state_dict().items():
        tensors[f"model.vision_tower.vision_tower.{key}"] = value
    tensors.update(extra or {})
    tensors = {k: v.contiguous() for k, v in tensors.items() if k not in drop}
    keys = sorted(tensors)
    if bin_file:
        torch.save(tensors, folder / "pytorch_model.bin")
    elif shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in keys[i::shards]}
            save_file(part, folder / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)
    return folder, tensors


def sharpened_flash_vstream(root: Path, tower: Path | str, **config_overrides) -> Path:
    """A tiny Flash-VStream checkpoint (``root/flash``) whose output layer is 20 times
    sharper than its random start (the start written once to ``root/base``): what it
    predicts then depends on its prompt enough to learn from in a few steps (at the random
    start every answer costs about ln(vocabulary)). What the training tests train."""
    _, written = tiny_flash_vstream(Path(root) / "base", tower)
    folder, _ = tiny_flash_vstream(Path(root) / "flash", tower, extra={"lm_head.weight": written["lm_head.weight"] * 20},
                                   **config_overrides)
    return folder


def tiny_llava_onevision(folder: Path, seed: int = 0) -> Path:
    """LLaVA-OneVision with a SigLIP tower (8×8 patch grid, width 48) and a 2-layer
    Qwen2, its tokenizer (ChatML template over typed parts, as the processor's) and its
    image processor, saved with ``save_pretrained``."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        Qwen2Config,
        SiglipVisionConfig,
    )

    _seeded(seed)
    tokenizer = tiny_tokenizer(CHATML_PARTS, eos="<|im_end|>")
    text = Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **LLAMA)
    vision = SiglipVisionConfig(**VISION, vision_use_head=False)
    size = VISION["image_size"]
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=[[size, size], [size, 2 * size], [2 * size, size]],
                                  vision_feature_layer=-1, vision_feature_select_strategy="full")
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    LlavaOnevisionImageProcessorPil(size={"height": size, "width": size}, image_grid_pinpoints=config.image_grid_pinpoints,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return Path(folder)


QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def tiny_qwen2_vl(folder: Path, version: str = "2", seed: int = 0) -> Path:
    """Qwen2-VL (``version`` "2") or Qwen2.5-VL ("2.5"): a 2-block ViT of 4 px patches
    merged 2×2 into the LLM's width (32), a 2-layer LLM with M-RoPE (sections 2/1/1 of its
    8-wide heads), the tokenizer (ChatML, Qwen's vision tokens) and the image processor,
    saved with ``save_pretrained``."""
    import transformers

    _seeded(seed)
    tokenizer = tiny_tokenizer(CHATML, eos="<|im_end|>", extra=QWEN_VISION_TOKENS)
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tokenizer.convert_tokens_to_ids(list(QWEN_VISION_TOKENS))))
    text = {**LLAMA, "vocab_size": len(tokenizer),
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}}
    patches = {"patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
    if version == "2":
        vision = {**patches, "depth": 2, "embed_dim": 32, "hidden_size": LLAMA["hidden_size"], "num_heads": 4,
                  "mlp_ratio": 2}
        config, model = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    else:
        vision = {**patches, "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
                  "out_hidden_size": LLAMA["hidden_size"], "window_size": 16, "fullatt_block_indexes": [1],
                  "tokens_per_second": 2}
        config, model = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    tokens = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}
    model(config(text_config={**text, **tokens}, vision_config=vision, **ids, **tokens)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformers.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                       size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64}).save_pretrained(folder)
    return Path(folder)


TOWER = {"intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "patch_size": 4}


def tiny_vision_tower(folder, kind: str, hidden: int, image_size: int = 32, seed: int = 0) -> str:
    """A CLIP or SigLIP vision tower of width ``hidden`` in 4×4 patches (an 8×8 grid at
    32×32) and its image processor: the towers the big.LITTLE tests pair up."""
    import transformers

    torch.manual_seed(seed)
    if kind == "clip":
        tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TOWER, hidden_size=hidden,
                                                                           image_size=image_size))
        processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                       crop_size={"height": image_size, "width": image_size})
    else:
        tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TOWER, hidden_size=hidden,
                                                                               image_size=image_size))
        processor = transformers.SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    tower.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def tiny_flash_vstream_qwen(folder: Path, temporal_length: int = 8, spatial_length: int = 4, seed: int = 0) -> Path:
    """Flash-VStream-Qwen in its released layout: the tiny Qwen2-VL, its config renamed to
    ``flash_vstream_qwen2_vl`` with ``vision_config.flash_memory_config`` (lengths
    ``temporal_length`` / ``spatial_length``, halved by the memory), its weights under
    transformers 4.45's names (``visual.``, ``model.``, ``lm_head.``)."""
    from safetensors.torch import load_file, save_file

    folder = tiny_qwen2_vl(folder, "2", seed)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"], config["architectures"] = "flash_vstream_qwen2_vl", ["FlashVStreamQwen2VLModel"]
    config["vision_config"]["flash_memory_config"] = {
        "flash_memory_temporal_length": temporal_length, "flash_memory_temporal_method": "kmeans_ordered",
        "flash_memory_temporal_poolsize": 2, "flash_memory_temporal_pca_dim": 32,
        "flash_memory_spatial_length": spatial_length, "flash_memory_spatial_method": "klarge_retrieve"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    weights = folder / "model.safetensors"
    renamed = {}
    for key, tensor in load_file(weights).items():
        key = key.replace("model.visual.", "visual.", 1).replace("model.language_model.", "model.", 1)
        renamed[key] = tensor
    save_file(renamed, weights, metadata={"format": "pt"})
    return folder
