"""Who talks to a stream server: principals, their tokens and their limits.

A principal is who opened a stream; only it (or an ``admin``) may send to the stream,
ask about it, close it or resume its saved memory. A server knows its principals by:

- named tokens (``--tokens FILE``): a JSON object ``{name: {"sha256": hex of the token,
  "admin": false, "max_streams": 4, "max_fps": 30, "questions_per_minute": 60,
  "disk_gb": 10}}``, every field but ``sha256`` optional. The file holds hashes only; it
  is read once and no token or hash is ever logged.
- CURVE keys: a client let in by its public key is the principal ``curve:<key>``.
- otherwise one principal, ``default``, for the shared ``--token`` or for everyone when
  there is none: every client may reach every stream, as before principals.

``Principals.separate`` says whether there is more than one principal, that is whether
ownership is enforced.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

from vstream.errors import ConfigError, ProtocolError

DEFAULT = "default"
NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Principal:
    """One principal and its limits (None: the server's own limit, or none).

    Attributes:
        name: how it is named in logs, stream ownership and saved memories.
        admin: may reach every principal's streams.
        max_streams: streams it may hold open at once.
        max_fps: frames a second across all its streams.
        questions_per_minute: questions it may ask a minute (a minute's worth at once).
        disk_gb: GB of saved memories it may hold; over it, it may not open streams.
    """

    name: str
    admin: bool = False
    max_streams: int | None = None
    max_fps: float | None = None
    questions_per_minute: float | None = None
    disk_gb: float | None = None


def token_hash(token: str) -> str:
    """What a tokens file holds for ``token``: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


class Principals:
    """Identifies the principal of a request from its token or CURVE key.

    Args:
        token: the shared token (the principal ``default``), or None.
        tokens: name -> ``Principal`` fields and ``sha256`` (a tokens file's content).
        curve: the server lets clients in by CURVE key.
    """

    def __init__(self, token: str | None = None, tokens: dict | None = None, curve: bool = False):
        self._shared = token
        self._hashes: list[tuple[bytes, Principal]] = []
        for name, entry in (tokens or {}).items():
            self._hashes.append(_entry(name, entry))
        self.curve = curve
        self.separate = bool(self._hashes) or curve

    @classmethod
    def load_tokens(cls, path) -> dict:
        """The content of a tokens file, checked (see the module docstring)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tokens file {path}: cannot read it as JSON ({type(exc).__name__})") from None
        if not isinstance(data, dict) or not data:
            raise ConfigError(f"tokens file {path}: must be a JSON object of name -> {{\"sha256\": ...}}")
        try:
            cls(tokens=data)  # each entry checked as a server will read it
        except ConfigError as exc:
            raise ConfigError(f"tokens file {path}: {exc}") from None
        return data

    def identify(self, given: str | None, curve_key: str | None = None) -> Principal:
        """The principal whose token is ``given`` (or whose CURVE key let it in).

        Raises:
            ProtocolError: ``auth``, a missing or wrong token.
        """
        if self._hashes:
            if not isinstance(given, str):
                raise ProtocolError("missing token", "auth")
            digest = token_hash(given).encode()
            found = None
            for expected, principal in self._hashes:  # every entry compared: the time says nothing
                if hmac.compare_digest(digest, expected):
                    found = principal
            if found is None:
                raise ProtocolError("wrong token", "auth")
            return found
        if self._shared is not None and not (
                isinstance(given, str) and hmac.compare_digest(given.encode(), self._shared.encode())):
            raise ProtocolError("wrong token" if given is not None else "missing token", "auth")
        if self.curve and curve_key:
            return Principal(f"curve:{curve_key}")
        return Principal(DEFAULT)


def _entry(name, entry) -> tuple[bytes, Principal]:
    if not (isinstance(name, str) and NAME.fullmatch(name)):
        raise ConfigError(f"principal name {str(name)[:70]!r}: 1-64 of A-Z a-z 0-9 _ . @ -")
    if not isinstance(entry, dict):
        raise ConfigError(f"principal {name}: must be an object with 'sha256'")
    known = {f.name for f in fields(Principal)} - {"name"} | {"sha256"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ConfigError(f"principal {name}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    digest = entry.get("sha256")
    if not (isinstance(digest, str) and HEX.fullmatch(digest)):
        raise ConfigError(f"principal {name}: 'sha256' must be 64 lowercase hex digits (sha256sum of the token)")
    limits = {key: value for key, value in entry.items() if key != "sha256"}
    for key, value in limits.items():
        ok = isinstance(value, bool) if key == "admin" else (
            isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)
        if not ok:
            raise ConfigError(f"principal {name}: {key} must be {'true or false' if key == 'admin' else 'a number > 0'}")
    if "max_streams" in limits:
        limits["max_streams"] = int(limits["max_streams"])
    return digest.encode(), Principal(name, **limits)
