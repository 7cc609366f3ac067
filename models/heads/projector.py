"""``projector``: trained weights of a model's memory projector, put in place at load.

    load_model(name, heads=["projector:weights=run/"])      # --head projector:weights=run/

``vstream train`` with ``"train": ["projector"]`` writes ``projector.safetensors`` (the
state dict of the model's ``memory_projector()``: Flash-VStream's ``mm_projector``,
LLaVA-OneVision's ``multi_modal_projector``) into its output folder; this head loads it
into the model it is attached to, checking every tensor's name and shape. It changes no
forward: the answers change because the weights did.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from vstream.errors import ConfigError
from vstream.models.heads import Head, load_in_place, register_head, trained_weights

WEIGHTS = "projector.safetensors"


def save_projector(chat_model, folder) -> Path:
    """Write ``chat_model``'s memory projector weights into ``folder``; returns the file."""
    module = _projector(chat_model)
    path = Path(folder) / WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def _projector(chat_model):
    module = chat_model.memory_projector()
    if module is None:
        raise ConfigError(f"{chat_model.name or 'the model'} has no memory projector "
                          "(its memory tokens are already LLM embeddings)")
    return module


@register_head("projector")
class ProjectorWeights(Head):
    """The memory projector weights of ``folder``/projector.safetensors, in place."""

    def __init__(self, folder: str):
        super().__init__(None)
        self.folder = folder

    @classmethod
    def attach(cls, chat_model, weights: str | None = None) -> ProjectorWeights:
        load_in_place(_projector(chat_model), trained_weights("projector", weights, WEIGHTS), Path(weights) / WEIGHTS,
                      "projector")
        return cls(weights)
