"""Config plumbing every stage shares: JSON round trip and value checks for the
config dataclasses, and the cache folder. Importable without torch."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, fields
from pathlib import Path

from vstream.errors import ConfigError


def cache_dir() -> Path:
    """Where vstream keeps models it converted once (whisper, the embedded LLM):
    ``$VSTREAM_CACHE``, default ``~/.cache/vstream``."""
    return Path(os.environ.get("VSTREAM_CACHE") or Path.home() / ".cache" / "vstream")


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE`` set to 1/true/yes/on), read at each call."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_first(fetch, remote: bool = True):
    """How every model loader finds its files: ``fetch(True)`` reads a local folder or the
    Hugging Face cache only (``local_files_only=True``); only when that raises ``OSError``,
    ``remote`` is true (not a local folder) and the hub is not switched off
    (``hub_offline``) is ``fetch(False)`` allowed to download. A cached model never waits
    on the network."""
    try:
        return fetch(True)
    except OSError:
        if not remote or hub_offline():
            raise
        return fetch(False)


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
