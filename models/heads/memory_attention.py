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

from vstream.errors import ConfigError
from vstream.models.heads import ModuleWeights, register_head


@register_head("memory_attention")
class MemoryAttentionWeights(ModuleWeights):
    """The abstract attention's q/k of ``folder``/memory_attention.safetensors, in place."""

    file, what = "memory_attention.safetensors", "abstract attention"

    @classmethod
    def module_of(cls, chat_model):
        """``chat_model``'s own abstract attention (a ``SemanticAttention``); ``ConfigError``
        for a model whose memory uses the default similarity projection (nothing of the
        checkpoint's to train or replace)."""
        module = chat_model.memory_attention()
        if module is None:
            raise ConfigError(f"{chat_model.name or 'the model'} brings no abstract attention of its own (its memory "
                              "uses the default similarity projection); memory_attention trains a checkpoint's "
                              "(Flash-VStream's attention_model)")
        return module
