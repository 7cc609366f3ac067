"""``memory_attention``: trained q/k of the abstract memory's semantic attention, put in
place at load.

    load_model(name, heads=["memory_attention:weights=run/"])   # --head memory_attention:weights=run/

``vstream train`` with ``"train": ["memory_attention"]`` writes ``memory_attention.safetensors``
(the state dict of the model's ``memory_attention()``: Flash-VStream's
``attention_model`` q and k) into its output folder; this head loads it into the model
it is attached to, checking every tensor's name and shape. Every session made on the
model afterwards builds its abstract memory with these weights (a session takes
``model.memory_attention()`` when it starts), so the answers change through what the
memory holds. It is a head, as the projector is, because the q/k ship with the
checkpoint (Flash-VStream's ``model.attention_model``), not with the memory settings:
the run's output goes with the model it was trained on, and ``--head`` is how every
trained part loads.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from vstream.errors import ConfigError
from vstream.models.heads import Head, load_in_place, register_head, trained_weights

WEIGHTS = "memory_attention.safetensors"


def model_attention(chat_model):
    """``chat_model``'s own abstract attention (a ``SemanticAttention``); ``ConfigError``
    for a model whose memory uses the default similarity projection (nothing of the
    checkpoint's to train or replace)."""
    module = chat_model.memory_attention()
    if module is None:
        raise ConfigError(f"{chat_model.name or 'the model'} brings no abstract attention of its own (its memory "
                          "uses the default similarity projection); memory_attention trains a checkpoint's "
                          "(Flash-VStream's attention_model)")
    return module


def save_memory_attention(chat_model, folder) -> Path:
    """Write ``chat_model``'s abstract attention (q and k) into ``folder``; returns the file."""
    path = Path(folder) / WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model_attention(chat_model).state_dict().items()},
              str(path))
    return path


@register_head("memory_attention")
class MemoryAttentionWeights(Head):
    """The abstract attention's q/k of ``folder``/memory_attention.safetensors, in place."""

    def __init__(self, folder: str):
        super().__init__(None)
        self.folder = folder

    @classmethod
    def attach(cls, chat_model, weights: str | None = None) -> MemoryAttentionWeights:
        load_in_place(model_attention(chat_model), trained_weights("memory_attention", weights, WEIGHTS),
                      Path(weights) / WEIGHTS, "abstract attention")
        return cls(weights)
