"""Models stage (``vstream.models``): language models that answer from a stream's
memory, with the evidence behind each answer.

- ``load_model(name)``: the adapter for a hub id or folder (None: the embedded
  SmolLM2-135M-Instruct, text only); ``list_models()``: model types with an adapter.
- ``ChatModel.stream(context, question)`` / ``.answer(...)``: an ``Answer`` (text,
  ``Evidence`` best first, timings), token by token if iterated.
- ``Context``: what the model reads (memory tokens, scene notes, transcript lines).
- ``GenerationConfig``: greedy by default; temperature, top-p, seed.
"""

from vstream.models.base import Answer, AnswerStream, ChatModel, list_models, register_model
from vstream.models.generation import GenerationConfig
from vstream.models.loading import load_model
from vstream.models.prompt import Context, Evidence
from vstream.models.text_only import TextOnlyModel, describe_order, describe_scenes

__all__ = [
    "Answer",
    "AnswerStream",
    "ChatModel",
    "Context",
    "Evidence",
    "GenerationConfig",
    "TextOnlyModel",
    "describe_order",
    "describe_scenes",
    "list_models",
    "load_model",
    "register_model",
]
