"""``lora``: low-rank adapters on the LLM's projections (LoRA, through ``peft``), trained
by ``vstream train`` (``"train": ["lora"]``) and put in place at load.

    load_model(name, heads=["lora:weights=run/"])      # --head lora:weights=run/

``vstream train`` writes ``lora.safetensors`` (peft's adapter state: ``lora_A`` and
``lora_B`` of each target) and ``lora.json`` (rank, alpha, target module names); this
head injects the same adapters into the model's LLM (``peft.inject_adapter_in_model``:
in place, the model keeps its class) and loads them, refusing weights that do not fit.
It changes no routing: the adapted projections run in every forward.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from vstream.errors import ConfigError, ModelLoadError
from vstream.models.heads import Head, register_head, trained_weights

WEIGHTS, META = "lora.safetensors", "lora.json"


def add_lora(lm, rank: int, alpha: float, targets: list[str]) -> list:
    """Inject fresh LoRA adapters into ``lm`` in place; returns their parameters (what trains)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("LoRA needs peft (pip install vstream[train])") from None
    try:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0), lm)
    except ValueError as exc:  # no module of those names
        raise ConfigError(f"LoRA targets {targets}: {exc}") from None
    return [p for name, p in lm.named_parameters() if "lora_" in name]


def save_lora(lm, folder, rank: int, alpha: float, targets: list[str]) -> Path:
    """Write ``lm``'s adapters and their settings into ``folder``; returns the folder."""
    from peft import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(lm).items()}
    save_file(state, str(folder / WEIGHTS))
    (folder / META).write_text(json.dumps({"rank": rank, "alpha": alpha, "targets": targets}, indent=2))
    return folder


@register_head("lora")
class LoraAdapters(Head):
    """The LoRA adapters saved in ``folder``, injected into a model's LLM."""

    def __init__(self, folder: str):
        super().__init__(None)
        self.folder = folder

    @classmethod
    def attach(cls, chat_model, weights: str | None = None) -> LoraAdapters:
        state = trained_weights("lora", weights, WEIGHTS)
        folder = Path(weights)
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
            rank, alpha, targets = meta["rank"], meta["alpha"], meta["targets"]
        except FileNotFoundError:
            raise ModelLoadError(f"{folder / META}: no LoRA settings beside {WEIGHTS}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{folder / META}: cannot read the LoRA settings ({type(exc).__name__}: {exc})") from None
        from peft import set_peft_model_state_dict

        add_lora(chat_model.lm, rank, alpha, targets)
        result = set_peft_model_state_dict(chat_model.lm, state)
        unexpected = getattr(result, "unexpected_keys", [])
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if unexpected or missing:
            raise ModelLoadError(f"{folder / WEIGHTS}: adapters of another model: unexpected {unexpected[:3]}, "
                                 f"missing {missing[:3]}")
        return cls(weights)
