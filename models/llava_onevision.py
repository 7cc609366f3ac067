"""LLaVA-OneVision, read training-free, and the interface every such VLM family shares.

A transformers VLM already holds what the memory path needs, so nothing loads twice:

- its vision tower feeds the memory: ``frame_encoder`` is a ``VisionEncoder`` over the
  loaded tower (``VisionEncoder``'s preprocessing and feature code, hooked on the tower
  in place): one base-resolution view per frame (``image_size`` square, the view
  LLaVA-OneVision gives video frames), the hidden state ``config.vision_feature_layer``
  (LLaVA-OneVision: -1 of a SigLIP tower already cut one layer short, i.e. SigLIP's
  penultimate layer), ``grid = image_size // patch_size``;
- its projector maps memory tokens into its LLM: ``project`` runs
  ``multi_modal_projector`` on the pooled memory tokens, then appends its
  ``image_newline``: each run of the memory reads as one video of its video path.
  LLaVA-OneVision pools video features 2×2 after projecting; the memory pools before
  (the projector is per token, so only its non-linearity sees averaged inputs). With
  that pooling left out and the memory keeping whole frames, a prompt reaches the LLM as
  its own video path gives it (tests/test_models.py checks the logits);
- its chat template builds the prompt: the tokenizer's, else the processor's
  (``chat_template.json``), rendered with typed parts (``[{"type": "text", ...}]``, as
  processor templates want) or plain strings (as LLM templates want), whichever keeps
  the user turn; with no template at all, ChatML (its Qwen2 LLM's format);
- generation runs through the whole model on ``inputs_embeds`` (no ``pixel_values``:
  the visual tokens are already in the embeddings).

A new family is one file: subclass ``VisionLanguageModel``, set ``model_class`` (the
transformers class of the whole model) and ``fallback_template``, override
``vision_tower()`` / ``projector()`` / ``feature_layer()`` where the model keeps them
elsewhere, and register it: ``@register_model("llava_next_video")``. The tower is read
by ``VisionEncoder``, so its ``model_type`` must be one ``VisionEncoder`` knows (for
LLaVA-NeXT-Video: one more entry in its tables of VLMs and of anyres processors).
Qwen2-VL (``qwen2_vl.py``) overrides ``make_frame_encoder()``, ``project()``,
``embed()`` and ``positions()``: its tower has no fixed grid and ends in a merger
already in the LLM's space, and its LLM places visual tokens with 3-D rotary positions.
"""

from __future__ import annotations

import json

import torch

from vstream.encoders.vision import VisionConfig, VisionEncoder
from vstream.errors import ConfigError, EncoderError, ModelLoadError

from .base import _PLACEHOLDER, ChatModel, Turns, chat_messages, register_model
from .llm import load_pretrained


class VisionLanguageModel(ChatModel):
    """A transformers VLM whose own tower, projector and chat template serve the memory.

    Args:
        lm: the whole VLM (``forward`` takes ``inputs_embeds``).
        tokenizer: its tokenizer, with its chat template when it has one.
        name: what it was loaded from (hub id or folder).
    """

    model_class = ""  # transformers class of the whole model
    fallback_template = ""  # "{system}"/"{user}" format of a chat when no template is found
    reads_memory_tokens = True

    def __init__(self, lm, tokenizer, name: str):
        super().__init__(lm, tokenizer, name)
        try:
            self.frame_encoder = self.make_frame_encoder()
        except (ConfigError, EncoderError) as exc:
            raise ModelLoadError(f"{name!r}: cannot read its vision tower: {exc}") from exc

    @classmethod
    def from_pretrained(cls, name: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        lm, tokenizer = cls.load_parts(name, dtype)
        return cls(lm.to(device), tokenizer, name)

    @classmethod
    def load_parts(cls, name: str, dtype: torch.dtype, **lm_kwargs):
        """The whole model (``model_class``; ``lm_kwargs`` go to its ``from_pretrained``) and
        its tokenizer, with the processor's chat template when the tokenizer has none."""
        import transformers

        lm = load_pretrained(getattr(transformers, cls.model_class), name, "vision-language model", dtype=dtype,
                             **lm_kwargs)
        tokenizer = load_pretrained(transformers.AutoTokenizer, name, "tokenizer")
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = _processor_template(name)
        return lm, tokenizer

    # -- where the model keeps its parts (override for other layouts) ------------------------

    def vision_tower(self):
        return self.lm.model.vision_tower

    def projector(self):
        return self.lm.model.multi_modal_projector

    def feature_layer(self) -> int:
        layer = self.lm.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ModelLoadError(f"{self.name!r}: vision_feature_layer {layer!r} concatenates several layers; "
                                 "the memory holds one layer's features")
        return layer

    def make_frame_encoder(self):
        tower = self.vision_tower()
        config = VisionConfig(model=self.name, layer=self.feature_layer(), device=str(tower.device),
                              dtype=str(tower.dtype).removeprefix("torch."))
        return VisionEncoder(config, tower=tower)

    # -- the ChatModel hooks --------------------------------------------------------------

    def memory_projector(self) -> torch.nn.Module:
        return self.projector()

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Memory tokens ``[n, D]`` (tower features) -> LLM input embeddings ``[n, H]``."""
        projector = self.projector()
        weight = next(projector.parameters())
        return projector(features.to(weight.device, weight.dtype))

    def render(self, system: str, history: Turns = ()) -> str:
        """The chat through the model's template: messages as plain strings (LLM
        templates), else as typed parts (processor templates), whichever renders the
        user turn once; else ``fallback_template``, whose one user turn then quotes the
        earlier turns of ``history``."""
        from jinja2 import TemplateError

        if getattr(self.tokenizer, "chat_template", None):
            for wrap in (lambda text: text, lambda text: [{"type": "text", "text": text}]):
                messages = chat_messages(system, history, wrap)
                try:
                    chat = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                except TemplateError:
                    continue
                if chat.count(_PLACEHOLDER) == 1 and chat.count(system) == 1:
                    return chat
        if self.fallback_template:
            earlier = "".join(f"User: {question}\nAssistant: {answer}\n" for question, answer in history)
            return self.fallback_template.format(system=system, user=earlier + _PLACEHOLDER)
        return super().render(system, history)


def _processor_template(name: str) -> str | None:
    """The processor's chat template (``chat_template.json``) of a checkpoint, if any."""
    from transformers.utils import cached_file

    try:
        path = cached_file(name, "chat_template.json", _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    if path is None:
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file).get("chat_template")


@register_model("llava_onevision")
class LlavaOnevisionModel(VisionLanguageModel):
    """LLaVA-OneVision (SigLIP tower, 2-layer GELU projector, Qwen2 LLM)."""

    model_class = "LlavaOnevisionForConditionalGeneration"
    fallback_template = ("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                         "<|im_start|>assistant\n")
    vision_tower_text = "its own SigLIP tower (vision_feature_layer), one base-resolution view per frame"
    prompt_text = ("each run of memory tokens after its time marker, through its projector, then its image_newline "
                   "(each run as one video of its video path)")

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """A run of memory tokens ``[n, D]`` -> ``[n + 1, H]``: through the projector, then the
        model's ``image_newline``, as its video path ends every video (each run of the
        memory is read as one video)."""
        tokens = super().project(features)
        return torch.cat([tokens, self.lm.model.image_newline[None].to(tokens.device, tokens.dtype)])
