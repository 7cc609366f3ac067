"""``projector``: trained weights of a model's memory projector, put in place at load.

    load_model(name, heads=["projector:weights=run/"])      # --head projector:weights=run/

``vstream train`` with ``"train": ["projector"]`` writes ``projector.safetensors`` (the
state dict of the model's ``memory_projector()``: Flash-VStream's ``mm_projector``,
LLaVA-OneVision's ``multi_modal_projector``) into its output folder; this head loads it
into the model it is attached to, checking every tensor's name and shape. It changes no
forward: the answers change because the weights did.
"""

from __future__ import annotations

from vstream.errors import ConfigError
from vstream.models.heads import ModuleWeights, register_head


@register_head("projector")
class ProjectorWeights(ModuleWeights):
    """The memory projector weights of ``folder``/projector.safetensors, in place."""

    file, what = "projector.safetensors", "projector"

    @classmethod
    def module_of(cls, chat_model):
        module = chat_model.memory_projector()
        if module is None:
            raise ConfigError(f"{chat_model.name or 'the model'} has no memory projector "
                              "(its memory tokens are already LLM embeddings)")
        return module
