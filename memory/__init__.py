"""Memory stage (``vstream.memory``): bounded memories of a stream of frame features.

- ``StarMemory`` / ``StarConfig``: the STAR memory of Flash-VStream (spatial,
  temporal, abstract, retrieved), O(1) per frame.
- ``FlashMemory`` / ``FlashConfig``: the 2025 Flash-VStream memory (context synopsis
  and detail), behind the same interface.
- ``FeatureBank`` / ``BankConfig``: every frame's pooled features, time and JPEG
  thumbnail, a FAISS index over them, RAM-capped with spill files on disk.
- ``SceneRuns`` (``memory.timeline()``): each scene's runs on the timeline, when it
  was on screen and how many separate times.
- ``create_memory(name, ...)``, ``list_memories()``, ``load_memory(path)``: policies by
  name; any saved memory back from disk.
"""

from vstream.memory.abstract import SemanticAttention, replay_abstract
from vstream.memory.bank import FeatureBank
from vstream.memory.base import StreamMemory, create_memory, list_memories, load_memory, register_memory
from vstream.memory.config import BankConfig, FlashConfig, StarConfig
from vstream.memory.flash import FlashMemory
from vstream.memory.star import StarMemory
from vstream.memory.timeline import SceneRuns
from vstream.memory.tokens import KINDS, FrameHit, MemoryTokens

__all__ = [
    "KINDS",
    "BankConfig",
    "FeatureBank",
    "FlashConfig",
    "FlashMemory",
    "FrameHit",
    "MemoryTokens",
    "SceneRuns",
    "SemanticAttention",
    "StarConfig",
    "StarMemory",
    "StreamMemory",
    "create_memory",
    "list_memories",
    "load_memory",
    "register_memory",
    "replay_abstract",
]
