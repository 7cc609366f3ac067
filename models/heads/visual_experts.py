"""Visual experts (Mono-InternVL): a visual FFN beside the text FFN of each decoder layer.

Every chosen decoder layer of a transformers causal LM (LLaMA or Qwen2 family, alone or
as the language model of a VLM such as LLaVA-OneVision: ``model.get_decoder().layers``,
each with ``.mlp``) gets a visual FFN expert, a copy of
its text FFN. A modality mask ``m`` (True for visual / memory tokens) routes each token:

    h = FFN_text(h) · (1 − m) + FFN_visual(h) · m

Only the experts train (delta tuning); the base model is frozen. Both FFNs run on all
tokens of a call and ``torch.where`` picks per token, so a text token's output is
bit-identical to the base model's; a call without visual tokens skips the experts.

The mask is given per call and indexed by absolute position in the sequence:

    experts = create_head("visual_experts", lm, layers="all")
    with experts.visual_mask(mask):             # [B, L] bool, True = visual
        logits = lm(inputs_embeds=embeds).logits
        out = lm.generate(inputs_embeds=embeds, max_new_tokens=8)

A forward that continues a cache covers positions ``[past, past + n)``; positions past
the mask's end (tokens generated after the prompt) are text.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from vstream.config import JsonConfig
from vstream.errors import ConfigError, ModelLoadError
from vstream.models.heads import Head, register_head

SUPPORTED = ("llama", "qwen2")  # model_type of the families whose layers[i].mlp is a plain FFN
WEIGHTS = "visual_experts.safetensors"
META = "visual_experts.json"


@dataclass
class VisualExpertsConfig(JsonConfig):
    """layers: ``"all"`` or a list of decoder-layer indices (0-based) that get a visual
    expert; the others route every token to their text FFN. Default ``"all"``."""

    layers: str | list[int] = field(default="all")

    def __post_init__(self):
        if self.layers == "all":
            return
        ok = isinstance(self.layers, (list, tuple)) and len(self.layers) > 0 and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)
        if not ok or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"VisualExpertsConfig.layers must be 'all' or a non-empty list of distinct "
                              f"layer indices >= 0, got {self.layers!r}")
        self.layers = sorted(self.layers)


class _Routing:
    """The mask of the forward in progress, shared by the model's expert FFNs:
    ``given`` [B, L] bool for the whole sequence (set by ``visual_mask``), ``active``
    [B, n] bool for the n tokens of the current call (None: all text), and whether they
    are all visual. Worked out once per forward, so no layer checks the mask itself."""

    def __init__(self):
        self.given = None
        self.active = None
        self.all_visual = False


def _modality_ffn(text, visual, routing):
    import torch
    from torch import nn

    class ModalityFFN(nn.Module):
        """``text`` (frozen, the original FFN) and ``visual`` (the expert), picked per
        token by the active mask. Input and output ``[B, n, D]``."""

        def __init__(self):
            super().__init__()
            self.text = text
            self.visual = visual

        def forward(self, hidden):
            mask = routing.active
            if mask is None:
                return self.text(hidden)
            if routing.all_visual:
                return self.visual(hidden)
            return torch.where(mask.unsqueeze(-1), self.visual(hidden), self.text(hidden))

    return ModalityFFN()


def _signature(model) -> dict:
    config = model.config.get_text_config()
    return {"model_type": config.model_type,
            **{k: getattr(config, k, None) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "vocab_size")}}


@register_head("visual_experts")
class VisualExperts(Head):
    """Adds visual FFN experts to ``model`` in place (a ``LlamaForCausalLM`` /
    ``Qwen2ForCausalLM``) and freezes its own parameters. ``config`` is a
    ``VisualExpertsConfig`` (or a dict); keyword fields override it."""

    def __init__(self, model, config: VisualExpertsConfig | dict | None = None, **fields):
        config = VisualExpertsConfig.from_dict({**VisualExpertsConfig.from_dict(config or {}).to_dict(), **fields})
        super().__init__(config)
        config_of = getattr(model, "config", None)
        model_type = config_of.get_text_config().model_type if config_of is not None else type(model).__name__
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        from transformers import LlamaForCausalLM, Qwen2ForCausalLM

        # a checkpoint's own subclass (Flash-VStream-7b's LLaMA, model_type "vstream") has the same layers
        family = model_type in SUPPORTED or isinstance(model, (LlamaForCausalLM, Qwen2ForCausalLM))
        if not family or layers is None:
            raise ModelLoadError(f"visual experts support {', '.join(SUPPORTED)} causal LMs; "
                                 f"got {type(model).__name__} (model_type {model_type!r})")
        chosen = range(len(layers)) if config.layers == "all" else config.layers
        if any(i >= len(layers) for i in chosen):
            raise ConfigError(f"VisualExpertsConfig.layers {config.layers} out of range for a "
                              f"{len(layers)}-layer model")
        self.model = model
        self.layers = list(chosen)
        self._routing = _Routing()
        for p in model.parameters():
            p.requires_grad_(False)
        for i in self.layers:
            text = layers[i].mlp
            visual = copy.deepcopy(text)
            visual.requires_grad_(True)
            layers[i].mlp = _modality_ffn(text, visual, self._routing)
        self.decoder = decoder
        self._hooks = [decoder.register_forward_pre_hook(self._start, with_kwargs=True),
                       decoder.register_forward_hook(self._end)]

    @classmethod
    def attach(cls, chat_model, weights: str | None = None, **fields) -> VisualExperts:
        """Experts on ``chat_model``'s LM: loaded from the folder ``weights`` (saved by
        ``save_experts``), or new copies of the text FFNs (answers unchanged until trained)."""
        if weights is not None:
            if fields:
                raise ConfigError(f"visual_experts: weights={weights} carries its own config; drop {sorted(fields)}")
            return cls.from_folder(chat_model.lm, weights)
        return cls(chat_model.lm, fields)

    def routing(self, visual):
        """Route the answer's forwards by the prompt's memory-token mask."""
        return self.visual_mask(visual)

    def experts(self) -> dict:
        """The visual expert modules by layer index."""
        return {i: self.decoder.layers[i].mlp.visual for i in self.layers}

    def trainable_parameters(self) -> list:
        """The experts' parameters: the only ones that train."""
        return [p for expert in self.experts().values() for p in expert.parameters()]

    @contextlib.contextmanager
    def visual_mask(self, mask):
        """Route by ``mask`` [B, L] (bool; True = visual token, by position from the start
        of the sequence) for the forwards inside the block."""
        import torch

        mask = torch.as_tensor(mask)
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ConfigError(f"visual_mask must be a [B, L] bool tensor, got {mask.dtype} {tuple(mask.shape)}")
        previous, self._routing.given = self._routing.given, mask
        try:
            yield self
        finally:
            self._routing.given = previous

    def answer_loss(self, chat_model, context, question: str, target: str):
        """Mean cross-entropy of ``target`` (then end of text) as ``chat_model``'s answer
        to ``question`` about ``context`` (a ``Context``), with the memory tokens routed
        to the experts: the delta-tuning objective. ``chat_model.lm`` must be the model
        these experts were added to."""
        if chat_model.lm is not self.model:
            raise ConfigError("answer_loss: the chat model's LM is not the one these experts were added to")
        return chat_model.answer_loss(chat_model.question_pieces(context, question), target, routing=self.visual_mask)

    def _start(self, module, args, kwargs):
        import torch

        given = self._routing.given
        self._routing.active = None
        if given is None:
            return
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, count = tokens.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        if given.shape[0] != batch:
            raise ConfigError(f"visual_mask has batch {given.shape[0]}, the forward has batch {batch}")
        active = torch.zeros(batch, count, dtype=torch.bool)
        inside = given[:, past:past + count]
        active[:, :inside.shape[1]] = inside
        if not bool(active.any()):  # all text, as every generated token: the text FFNs alone
            return
        self._routing.all_visual = bool(active.all())
        self._routing.active = active.to(tokens.device)

    def _end(self, module, args, output):
        self._routing.active = None

    def remove(self):
        """Put the text FFNs back and drop the experts (the base stays frozen)."""
        for hook in self._hooks:
            hook.remove()
        for i in self.layers:
            self.decoder.layers[i].mlp = self.decoder.layers[i].mlp.text
        self.layers = []

    def save_experts(self, folder: str | Path) -> Path:
        """Write the experts alone: ``visual_experts.safetensors`` (keys
        ``layers.<i>.<param>``) and ``visual_experts.json`` (config, base signature)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"layers.{i}.{k}": v.detach().contiguous().clone()
                   for i, expert in self.experts().items() for k, v in expert.state_dict().items()}
        save_file(tensors, folder / WEIGHTS)
        meta = {"config": self.config.to_dict(), "base": _signature(self.model),
                "base_name": getattr(self.model.config, "_name_or_path", "")}
        (folder / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return folder

    def load_experts(self, folder: str | Path) -> None:
        """Load expert weights saved by ``save_experts``. Refuses a folder saved for a
        different base model (``ModelLoadError``) or other layers (``ConfigError``)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = read_meta(folder)
        if meta.get("base") != _signature(self.model):
            raise ModelLoadError(f"{folder}: experts saved for base {meta.get('base')}, "
                                 f"this model is {_signature(self.model)}")
        saved = VisualExpertsConfig.from_dict(meta.get("config", {}))
        if saved.layers != self.config.layers:
            raise ConfigError(f"{folder}: experts saved for layers {saved.layers}, these are {self.config.layers}")
        tensors = load_file(folder / WEIGHTS)
        for i, expert in self.experts().items():
            prefix = f"layers.{i}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                expert.load_state_dict(state)
            except RuntimeError as exc:
                raise ModelLoadError(f"{folder / WEIGHTS}: layer {i} does not fit: {exc}") from None

    @classmethod
    def from_folder(cls, model, folder: str | Path) -> VisualExperts:
        """Wrap ``model`` with the config saved in ``folder`` and load its experts."""
        head = cls(model, read_meta(Path(folder)).get("config", {}))
        head.load_experts(folder)
        return head


def read_meta(folder: Path) -> dict:
    """The JSON that ``save_experts`` wrote in ``folder``."""
    path = folder / META
    if not path.is_file() or not (folder / WEIGHTS).is_file():
        raise ModelLoadError(f"{folder}: no saved visual experts (expected {META} and {WEIGHTS})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
