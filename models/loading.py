"""``load_model``: a model name to the adapter that answers with it.

- ``None``: the embedded default, SmolLM2-135M-Instruct, through the text-only path;
- a hub id or folder whose transformers ``model_type`` has an adapter
  (``list_models()``): that adapter;
- any other causal LM: the text-only path;
- anything else: ``ModelLoadError`` naming the architecture and the supported ones.

``heads`` attaches model heads by spec (``vstream.models.heads.attach_head``), e.g.
``load_model(name, heads=["visual_experts:weights=experts/"])``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vstream.device import resolve_device, resolve_dtype
from vstream.errors import ModelLoadError

from . import flash_vstream, llava_onevision, qwen2_vl  # noqa: F401  (the adapters register themselves)
from .base import ChatModel, adapter_for, list_models
from .heads import attach_head
from .llm import load_pretrained
from .text_only import TextOnlyModel


def load_model(name: str | None = None, dtype: torch.dtype | str | None = None, device: str = "auto",
               heads: Sequence[str] = ()) -> ChatModel:
    """Load the model ``name`` (hub id or folder; None = the embedded default) on
    ``device`` (``"auto"``: CUDA when present; see ``vstream.device``) in ``dtype``
    (None or ``"auto"``: float16 on CUDA, float32 on the CPU), with the model heads
    named in ``heads`` attached."""
    where = resolve_device(device, "load_model device")
    model = _load_adapter(name, resolve_dtype(dtype, where, "load_model dtype"), str(where))
    for spec in heads:
        attach_head(model, spec)
    return model


def _load_adapter(name: str | None, dtype: torch.dtype, device: str) -> ChatModel:
    if name is None:
        return TextOnlyModel.from_pretrained(None, dtype, device)
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    flash_vstream.register_config()  # "vstream" is no transformers model type: teach AutoConfig
    config = load_pretrained(AutoConfig, name, "model config")
    adapter = adapter_for(config.model_type)
    if adapter is not None:
        return adapter.from_pretrained(name, dtype, device)
    architectures = getattr(config, "architectures", None) or []
    generates = not architectures or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and generates:  # not an encoder such as BertModel
        return TextOnlyModel.from_pretrained(name, dtype, device)
    raise ModelLoadError(f"{name!r} is a {config.model_type!r} model, which vstream cannot answer with: "
                         f"supported are the video-language models {', '.join(list_models()) or '(none)'} "
                         "and any causal language model (text-only)")
