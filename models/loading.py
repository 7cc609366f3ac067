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

from . import flash_vstream, flash_vstream_qwen, llava_onevision, qwen2_vl  # noqa: F401  (adapters register)
from .base import ChatModel, adapter_for, list_models
from .heads import attach_head
from .llm import load_pretrained
from .text_only import TextOnlyModel


def describe_models(cache_dir: str | None = None) -> list[dict]:
    """What ``vstream models`` lists: per supported architecture (each adapter's
    transformers ``model_type``, then ``"causal-lm"`` for the text-only path) its adapter,
    frame encoder, memory and prompt layout, and ``installed``: the checkpoints of that
    type in the local Hugging Face cache (``cache_dir``: another cache folder)."""
    found = _cached_model_types(cache_dir)
    rows = []
    for model_type in list_models():
        adapter = adapter_for(model_type)
        rows.append({"model_type": model_type, "adapter": adapter.__name__, "vision_tower": adapter.vision_tower_text,
                     "memory": adapter.memory_text, "prompt": adapter.prompt_text,
                     "installed": sorted(repo for repo, (kind, _) in found.items() if kind == model_type)})
    causal = sorted(repo for repo, (kind, architectures) in found.items()
                    if kind not in list_models() and _reads_text(kind, architectures))
    rows.append({"model_type": "causal-lm", "adapter": TextOnlyModel.__name__,
                 "vision_tower": TextOnlyModel.vision_tower_text, "memory": TextOnlyModel.memory_text,
                 "prompt": TextOnlyModel.prompt_text, "installed": causal})
    return rows


def _reads_text(model_type: str, architectures: list[str] | None) -> bool:
    """Whether a checkpoint of ``model_type`` and ``architectures`` is a causal LM the
    text-only path answers with (not an encoder such as BertModel)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    generates = not architectures or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and generates


def _cached_model_types(cache_dir: str | None) -> dict[str, tuple[str, list[str] | None]]:
    """Model repos of the Hugging Face cache -> ``(model_type, architectures)`` of their
    newest cached ``config.json``; an empty dict without a cache."""
    import json

    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return {}
    found = {}
    for repo in cache.repos:
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            config = revision.snapshot_path / "config.json"
            try:
                fields = json.loads(config.read_text(encoding="utf-8"))
                found[repo.repo_id] = (fields["model_type"], fields.get("architectures"))
                break
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return found


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

    # "vstream" and "flash_vstream_qwen2_vl" are no transformers model types: teach AutoConfig
    flash_vstream.register_config()
    flash_vstream_qwen.register_config()
    config = load_pretrained(AutoConfig, name, "model config")
    adapter = adapter_for(config.model_type)
    if adapter is not None:
        return adapter.from_pretrained(name, dtype, device)
    if _reads_text(config.model_type, getattr(config, "architectures", None)):
        return TextOnlyModel.from_pretrained(name, dtype, device)
    raise ModelLoadError(f"{name!r} is a {config.model_type!r} model, which vstream cannot answer with: "
                         f"supported are the video-language models {', '.join(list_models()) or '(none)'} "
                         "and any causal language model (text-only)")
