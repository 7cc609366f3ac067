"""Config plumbing every stage shares: JSON round trip and value checks for the
config dataclasses, the cache folder, and where a model's files are
(``resolve_model_folder``: a local folder, the Hugging Face cache, then the hub).
Importable without torch."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import asdict, fields
from pathlib import Path

from vstream.errors import ConfigError, ModelLoadError, VStreamError


def cache_dir() -> Path:
    """Where vstream keeps models it converted once (whisper, the embedded LLM):
    ``$VSTREAM_CACHE``, default ``~/.cache/vstream``."""
    return Path(os.environ.get("VSTREAM_CACHE") or Path.home() / ".cache" / "vstream")


def offline_variables() -> list[str]:
    """The variables that switch the Hugging Face hub off (``HF_HUB_OFFLINE``,
    ``TRANSFORMERS_OFFLINE``) set to 1/true/yes/on, read at each call: empty when online."""
    return [name for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
            if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")]


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
"""A Hugging Face hub repository id: ``owner/name`` (or a canonical ``name``)."""
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")
"""The PyTorch weight files a model folder holds, safetensors preferred."""
OTHER_FORMATS = ["*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.ot", "*.tflite", "*.gguf", "*.ckpt", "*.mlmodel",
                 "onnx/*", "openvino/*", "coreml/*"]
"""Files of a hub repository no PyTorch loader reads (TensorFlow, Flax, ONNX, GGUF...): never downloaded."""


def resolve_model_folder(name_or_path: str | os.PathLike, what: str = "model", cache_dir: str | os.PathLike | None = None,
                         allow_patterns: list[str] | None = None, error: type[VStreamError] = ModelLoadError) -> Path:
    """The local folder of a model, how every model loader finds its files:

    1. ``name_or_path`` itself when it is a folder;
    2. for a hub id (``owner/name``), its snapshot in the Hugging Face cache
       (``cache_dir``, default ``HF_HUB_CACHE``) when it holds weights: a cached
       model never waits on the network;
    3. else, unless the hub is switched off (``offline_variables``), the snapshot downloaded:
       safetensors only when the repository has them (``.bin`` otherwise), never other
       frameworks' files (``OTHER_FORMATS``); ``allow_patterns``: only these files (a
       loader that reads part of a repository).

    ``what`` names the model in errors ("language model", "text model"...).

    Raises:
        error (``ModelLoadError`` unless the caller's stage has its own): a path that is not
        a folder, a name that is neither a folder nor a hub id, a hub id that is not
        cached while the hub is offline (naming the variable that says so), or one the
        hub cannot give.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise error(f"{what} {name!r} is a file; expected a model folder or a hub id")
    if name.startswith((".", "/", "~")) or not HUB_ID.fullmatch(name) or "--" in name or ".." in name:
        raise error(f"{what} {name!r}: no such folder (the path does not exist and is not a hub id 'owner/name')")
    from huggingface_hub import constants, snapshot_download

    cached = _cached_snapshot(name, cache_dir)
    if cached is not None and _holds_weights(cached):
        return cached
    offline = offline_variables()
    if offline:
        where = cache_dir or constants.HF_HUB_CACHE
        state = "is in the Hugging Face cache without its weights" if cached else "is not in the Hugging Face cache"
        switched_off = f"{' and '.join(offline)} {'are' if len(offline) > 1 else 'is'} set"
        raise error(f"cannot load {what} {name!r}: not a local folder, and it {state} ({where}), and the hub is "
                    f"offline ({switched_off}, so it was not asked); download it once with a network "
                    f"(hf download {name}) or pass a local folder")
    try:
        folder = Path(snapshot_download(name, cache_dir=cache_dir, allow_patterns=allow_patterns,
                                        ignore_patterns=[*OTHER_FORMATS, *WEIGHT_FILES[1:]]))
        if not any(folder.rglob(WEIGHT_FILES[0])):  # no safetensors: the PyTorch pickles, then
            folder = Path(snapshot_download(name, cache_dir=cache_dir, allow_patterns=allow_patterns,
                                            ignore_patterns=OTHER_FORMATS))
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"cannot load {what} {name!r}: not a local folder, not in the Hugging Face cache, and the hub "
                    f"did not give it: {first_line}") from exc
    return folder


def _cached_snapshot(name: str, cache_dir: str | os.PathLike | None) -> Path | None:
    """The cached snapshot folder of hub id ``name`` (the revision ``main`` points to), or None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, cache_dir=cache_dir, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or not a valid repo id
        return None


def _holds_weights(folder: Path) -> bool:
    """Whether a snapshot holds weight files (in any subfolder): a partial download
    (only ``config.json``, from a config lookup) does not."""
    return any(next(folder.rglob(pattern), None) is not None for pattern in WEIGHT_FILES)


def package_folder(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (the packages that
    ship model files may import what is not installed, or be slow to import), or None."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def check_int(owner: str, name: str, value: object, minimum: int) -> None:
    """Refuse ``value`` unless it is an int (not a bool) >= ``minimum``."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ConfigError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


def check_number(owner: str, name: str, value: object, low: float, high: float | None = None,
                 include_low: bool = False) -> None:
    """Refuse ``value`` unless it is a number in ``(low, high]`` (or ``> low``);
    ``[low, high]`` with ``include_low``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= low if include_low else value > low) and (high is None or value <= high)
    if not ok:
        opening = "[" if include_low else "("
        bound = f"in {opening}{low}, {high}]" if high is not None else (f">= {low}" if include_low else f"> {low}")
        raise ConfigError(f"{owner}.{name} must be a number {bound}, got {value!r}")


def check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    """Refuse ``value`` unless it is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{owner}.{name} must be one of {', '.join(choices)}; got {value!r}")


class JsonConfig:
    """``to_dict`` / ``to_json`` / ``from_dict`` / ``from_json`` for a config dataclass;
    unknown keys are refused by name."""

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: object):
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{cls.__name__}: not valid JSON ({exc})") from None
        return cls.from_dict(data)


def parse_spec(spec: str) -> tuple[str, dict]:
    """A component named by one string, as faiss's index factory names an index:
    ``"name"`` or ``"name:key=value,key=value"`` -> ``("name", {key: value})``.

    A value is read as JSON when it is JSON (``0.25``, ``true``, ``[0, 1]``), as text
    otherwise (``big=openai/clip-vit-base-patch16``). Commas inside brackets belong to
    the value.

    Raises:
        ConfigError: an empty name, an option without ``=``, or an option given twice.
    """
    name, _, rest = str(spec).partition(":")
    if not name.strip():
        raise ConfigError(f"{spec!r}: no component name before ':'")
    options: dict = {}
    for option in _split_options(rest) if rest.strip() else []:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{spec!r}: option {option!r} is not key=value")
        if key in options:
            raise ConfigError(f"{spec!r}: option {key!r} given twice")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value.strip()
    return name.strip(), options


def _split_options(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]
