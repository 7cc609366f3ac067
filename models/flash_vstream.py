"""Flash-VStream: a CLIP vision tower, an MLP projector, a LLaMA causal LM and the STAR
memory's trained semantic attention, loaded from the released checkpoint layout
(``IVGSZ/Flash-VStream-7b``: ``config.json`` with ``model_type`` ``"vstream"``,
safetensors or ``pytorch_model*.bin`` shards).

The checkpoint's keys and where each goes:

| key prefix | goes to |
|---|---|
| ``model.embed_tokens.``, ``model.layers.``, ``model.norm.``, ``lm_head.`` | ``LlamaForCausalLM`` (``lm``), built from the config's LLaMA fields |
| ``model.mm_projector.`` (``0.``, ``2.`` for ``mlp2x_gelu``; none for ``linear``) | ``projector``: ``Linear(mm_hidden_size, hidden)`` → GELU → ``Linear(hidden, hidden)`` |
| ``model.attention_model.q_proj.``, ``.k_proj.`` | ``SemanticAttention(mm_hidden_size, compress_Turing_hidden_dim)`` |
| ``model.attention_model.v_proj.``, ``.out_proj.``, ``.out_ln.`` | unused: the abstract update needs q and k only (``attention2``, the path that used them, is marked deprecated upstream) |
| ``model.vision_tower.`` | unused: the training run's copy of the tower; the tower is loaded by name (``mm_vision_tower``) through ``VisionEncoder``, as the reference does |
| ``*.rotary_emb.inv_freq`` | unused: buffers older transformers saved; recomputed |

Any other key, or a missing LLaMA, projector or q/k key, is a ``ModelLoadError`` naming
a few. The LLaMA weights load through transformers' ``from_pretrained`` (sharded,
memory-mapped, in the requested dtype); the projector and q/k are read with
``safetensors.safe_open`` (or ``torch.load(weights_only=True, mmap=True)`` for ``.bin``
shards: tensors only, never pickled code).

``memory_config()`` is the ``StarConfig`` the checkpoint was trained with; a field the
config does not have keeps the StarConfig default:

| StarConfig | checkpoint config |
|---|---|
| ``base_grid``, ``spatial_grid``, ``retrieved_grid``, ``bank.grid`` | ``compress_size`` (every frame is mean-pooled to it first) |
| ``spatial_length`` | ``video_current_memory_length`` |
| ``temporal_length`` / ``temporal_grid`` | ``video_long_memory_length`` / ``compress_long_memory_size`` |
| ``abstract_length``, ``abstract_chunk`` / ``abstract_grid`` | ``video_Turing_memory_length`` (slots, and frames per update, as ``attention_feature`` chunks) / ``compress_Turing_memory_size`` |
| ``abstract_alpha`` / ``abstract_hidden`` | ``compress_Turing_update_ratio`` / ``compress_Turing_hidden_dim`` |
| ``retrieved_length`` | hard-coded 3 upstream (``key_length``): the default, at most ``temporal_length`` |

Not supported (refused at load): ``mm_use_4_vision_tokens`` (2×2 patches concatenated)
and ``mm_vision_select_feature`` other than ``"patch"``. The prompt is Vicuna v1's
(``<system> USER: <turn> ASSISTANT:``, the release's ``conv_vicuna_v1``) unless the
tokenizer carries a chat template.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
from torch import nn

from vstream.config import resolve_model_folder
from vstream.errors import ModelLoadError
from vstream.memory import SemanticAttention, StarConfig

from .base import _PLACEHOLDER, ChatModel, Turns, register_model
from .llm import load_pretrained

MODEL_TYPE = "vstream"
_PROJECTOR, _ATTENTION = "model.mm_projector.", "model.attention_model."
_UNUSED = (r"^model\.vision_tower\.", r"^model\.attention_model\.(v_proj|out_proj|out_ln)\.(weight|bias)$",
           r"rotary_emb\.inv_freq$")
_VICUNA = "{system} {earlier}USER: {user} ASSISTANT:"  # earlier turns: "USER: q ASSISTANT: a</s>" each
_MEMORY_FIELDS = {  # StarConfig field -> checkpoint config field
    "spatial_length": "video_current_memory_length",
    "temporal_length": "video_long_memory_length",
    "temporal_grid": "compress_long_memory_size",
    "abstract_length": "video_Turing_memory_length",
    "abstract_chunk": "video_Turing_memory_length",
    "abstract_grid": "compress_Turing_memory_size",
    "abstract_alpha": "compress_Turing_update_ratio",
    "abstract_hidden": "compress_Turing_hidden_dim",
}
_CLIP_HUB = "openai/"  # where a training run's local "./ckpt/clip-vit-large-patch14" comes from


@functools.cache
def _classes():
    """The config and LM classes, made on first use (importing transformers' LLaMA takes
    seconds): ``FlashVStreamConfig``, a ``LlamaConfig`` known to ``AutoConfig`` as
    ``"vstream"``, and a ``LlamaForCausalLM`` that leaves the multimodal keys to us."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    class FlashVStreamConfig(LlamaConfig):
        model_type = MODEL_TYPE

    class FlashVStreamLlama(LlamaForCausalLM):
        config_class = FlashVStreamConfig
        _keys_to_ignore_on_load_unexpected = (re.escape(_PROJECTOR), rf"^{re.escape(_ATTENTION)}(q|k)_proj\.", *_UNUSED)

    AutoConfig.register(MODEL_TYPE, FlashVStreamConfig, exist_ok=True)
    return FlashVStreamConfig, FlashVStreamLlama


def register_config() -> None:
    """Teach transformers' ``AutoConfig`` the model type ``"vstream"``."""
    _classes()


def _listing(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def _weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors preferred, then ``.bin``; single or sharded."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        if (folder / single).is_file():
            return [folder / single]
    raise ModelLoadError(f"{folder}: no model.safetensors or pytorch_model.bin (single or sharded)")


def read_tensors(files: list[Path], prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor whose key starts with ``prefix``, with the prefix stripped."""
    from safetensors import safe_open

    found = {}
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as reader:
                names = [k for k in list(reader.keys()) if k.startswith(prefix)]
                found.update({k[len(prefix):]: reader.get_tensor(k) for k in names})
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            found.update({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return found


def _projector(kind: str, mm_hidden: int, hidden: int, name: str) -> nn.Module:
    """The projector ``mm_projector_type`` names: ``linear`` or ``mlp<N>x_gelu``."""
    if kind == "linear":
        return nn.Linear(mm_hidden, hidden)
    depth = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not depth or int(depth.group(1)) < 1:
        raise ModelLoadError(f"{name}: mm_projector_type {kind!r} is not supported; expected 'linear' or 'mlp<N>x_gelu'")
    layers: list[nn.Module] = [nn.Linear(mm_hidden, hidden)]
    for _ in range(int(depth.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(hidden, hidden)]
    return nn.Sequential(*layers)


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, name: str) -> None:
    expected = set(module.state_dict())
    missing, extra = expected - set(state), set(state) - expected
    if missing or extra:
        problems = [f"missing {_listing(what + k for k in missing)}" if missing else "",
                    f"unexpected {_listing(what + k for k in extra)}" if extra else ""]
        raise ModelLoadError(f"{name} does not match the Flash-VStream layout: {'; '.join(p for p in problems if p)}")
    try:
        module.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:  # shapes that do not fit the config
        raise ModelLoadError(f"{name}: {what}* do not fit its config: {str(exc).splitlines()[-1].strip()}") from exc


def memory_config_from(config) -> StarConfig:
    """The ``StarConfig`` of a Flash-VStream config (the mapping in the module docstring)."""
    fields = {field: getattr(config, key) for field, key in _MEMORY_FIELDS.items() if hasattr(config, key)}
    size = getattr(config, "compress_size", None)
    if size is not None:
        fields.update(base_grid=size, spatial_grid=size, retrieved_grid=size, bank={"grid": size})
    fields["retrieved_length"] = min(StarConfig.retrieved_length, fields.get("temporal_length", StarConfig.temporal_length))
    return StarConfig(**fields)


def vision_tower_name(config, folder: Path) -> str:
    """The tower ``mm_vision_tower`` names: a folder (absolute, or inside the checkpoint),
    a hub id, or a training run's local ``.../clip-vit-*`` path, read as ``openai/clip-vit-*``."""
    name = getattr(config, "mm_vision_tower", None) or getattr(config, "vision_tower", None)
    if not name:
        raise ModelLoadError(f"{folder}: config.json names no vision tower (mm_vision_tower)")
    for candidate in (Path(name).expanduser(), folder / name):
        if candidate.is_dir():
            return str(candidate)
    base = Path(name).name
    if name.count("/") != 1 and base.startswith("clip-vit"):
        return _CLIP_HUB + base
    return name


@register_model(MODEL_TYPE)
class FlashVStreamModel(ChatModel):
    """Flash-VStream: ``frame_encoder`` (its CLIP tower) feeds the memory, ``project``
    (its MLP) maps memory tokens into the LLaMA, ``memory_attention`` is its trained q/k.

    Args:
        lm: the ``LlamaForCausalLM``.
        tokenizer: its tokenizer.
        projector: memory tokens ``[n, mm_hidden_size]`` -> ``[n, hidden_size]``.
        attention: the abstract memory's ``SemanticAttention`` (float32).
        frame_encoder: the vision tower (a ``FrameEncoder``).
        memory: the checkpoint's ``StarConfig``.
        name: what it was loaded from.
    """

    reads_memory_tokens = True
    # The released checkpoint was trained on the memory as one contiguous block in the
    # reference's order, with no text inside it: ~54 time markers among its 681 tokens
    # would be text it never saw there.
    timed_memory = False
    vision_tower_text = "CLIP ViT-L/14 named by mm_vision_tower (penultimate layer)"
    memory_text = "STAR at the checkpoint's sizes, with its trained abstract attention"
    prompt_text = "the 681 memory tokens as one block in the reference's order (abstract, temporal, retrieved, spatial)"

    def __init__(self, lm, tokenizer, projector: nn.Module, attention: SemanticAttention, frame_encoder,
                 memory: StarConfig, name: str = ""):
        super().__init__(lm, tokenizer, name)
        self.projector = projector.eval()
        self.attention = attention
        self.frame_encoder = frame_encoder
        self.memory = memory

    @classmethod
    def from_pretrained(cls, name: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        vision_tower: str | None = None) -> FlashVStreamModel:
        """Load a Flash-VStream checkpoint (hub id or folder); ``vision_tower`` overrides
        the tower its config names."""
        from transformers import AutoTokenizer

        config_class, lm_class = _classes()
        folder = resolve_model_folder(name, "Flash-VStream checkpoint")
        config = load_pretrained(config_class, str(folder), "Flash-VStream config")
        if getattr(config, "mm_use_4_vision_tokens", False):
            raise ModelLoadError(f"{name!r}: mm_use_4_vision_tokens (2×2 patches per token) is not supported")
        if getattr(config, "mm_vision_select_feature", "patch") != "patch":
            raise ModelLoadError(f"{name!r}: mm_vision_select_feature {config.mm_vision_select_feature!r} is not "
                                 "supported; the memory needs a square patch grid ('patch')")
        try:
            memory = memory_config_from(config)
        except ValueError as exc:
            raise ModelLoadError(f"{name!r}: its memory sizes are not a valid StarConfig: {exc}") from exc
        files = _weight_files(folder)
        lm, info = load_pretrained(lm_class, str(folder), "Flash-VStream language model", config=config, dtype=dtype,
                                   output_loading_info=True, ignore_mismatched_sizes=True)
        found = {"missing": info["missing_keys"], "unexpected": info["unexpected_keys"],
                 "wrongly shaped": [mismatch[0] for mismatch in info["mismatched_keys"]]}
        problems = [f"{what} {_listing(keys)}" for what, keys in found.items() if keys]
        if problems:
            raise ModelLoadError(f"{name!r} does not match the Flash-VStream layout: {'; '.join(problems)}")
        mm_hidden = config.mm_hidden_size
        projector = _projector(getattr(config, "mm_projector_type", "linear"), mm_hidden, config.hidden_size, repr(name))
        _load_strict(projector, read_tensors(files, _PROJECTOR), _PROJECTOR, repr(name))
        attention = SemanticAttention(mm_hidden, memory.abstract_hidden)
        qk = {k: v for k, v in read_tensors(files, _ATTENTION).items() if k.startswith(("q_proj.", "k_proj."))}
        _load_strict(attention, qk, _ATTENTION, repr(name))
        encoder = cls._vision_encoder(vision_tower or vision_tower_name(config, folder), config, dtype, device, name)
        if encoder.dim != mm_hidden:
            raise ModelLoadError(f"{name!r}: its vision tower gives {encoder.dim}-wide features but the projector "
                                 f"takes mm_hidden_size = {mm_hidden}")
        if encoder.grid < memory.base_grid:
            raise ModelLoadError(f"{name!r}: its vision tower's {encoder.grid}×{encoder.grid} patch grid is smaller "
                                 f"than the memory's compress_size {memory.base_grid}")
        tokenizer = load_pretrained(AutoTokenizer, str(folder), "tokenizer")
        return cls(lm.to(device), tokenizer, projector.to(device, dtype), attention, encoder, memory, name)

    @staticmethod
    def _vision_encoder(tower: str, config, dtype: torch.dtype, device: str, name: str):
        from vstream.encoders.vision import VisionConfig, VisionEncoder
        from vstream.errors import ConfigError, EncoderError

        try:
            return VisionEncoder(VisionConfig(model=tower, layer=getattr(config, "mm_vision_select_layer", -2),
                                              dtype=str(dtype).removeprefix("torch."), device=device))
        except (ConfigError, EncoderError) as exc:
            raise ModelLoadError(f"{name!r}: cannot load its vision tower {tower!r}: {exc}") from exc

    def memory_config(self) -> StarConfig:
        return self.memory

    def memory_attention(self) -> SemanticAttention:
        return self.attention

    def memory_projector(self) -> torch.nn.Module:
        return self.projector

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Memory tokens ``[n, mm_hidden_size]`` -> LLaMA input embeddings ``[n, hidden_size]``."""
        weight = next(self.projector.parameters())
        return self.projector(features.to(weight.device, weight.dtype))

    def render(self, system: str, history: Turns = ()) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return super().render(system, history)
        earlier = "".join(f"USER: {question} ASSISTANT: {answer}</s>" for question, answer in history)
        return _VICUNA.format(system=system, earlier=earlier, user=_PLACEHOLDER)
