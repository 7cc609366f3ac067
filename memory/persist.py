"""Atomic, checked snapshots of a memory on disk.

A save folder holds numbered snapshots and a pointer to the current one::

    path/
      CURRENT              {"snapshot": "snap-…"}   replaced atomically (os.replace)
      snap-…/manifest.json format, version, size and BLAKE2b digest of every file
      snap-…/…             the files the memory wrote

A save writes a new snapshot folder, fsyncs it, and only then swaps ``CURRENT``; older
snapshots are removed afterwards. A process killed at any point leaves ``CURRENT``
naming a complete snapshot (the previous one until the swap). A load checks the
format, the version, and every file's size and digest before any of it is parsed, so
a damaged or truncated save is refused with a ``MemoryStateError`` instead of being
half-read. Nothing is pickled: tensors are safetensors, arrays ``.npy`` without
pickle, the rest JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from vstream.errors import MemoryStateError

FORMAT = "vstream-memory"
FORMAT_VERSION = 2  # 2: STAR keeps its timeline and each centroid's representative frame
_CURRENT = "CURRENT"
_MANIFEST = "manifest.json"
_CHUNK = 1 << 22


def _digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON and fsync it."""
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path) -> dict:
    """Read a JSON object, or raise ``MemoryStateError`` naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MemoryStateError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MemoryStateError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def save_snapshot(path: str | os.PathLike, write: Callable[[Path], dict]) -> Path:
    """Save atomically into the folder ``path``.

    ``write(folder)`` writes the memory's files into the empty ``folder`` and returns
    a JSON-able description (kept in the manifest as ``"memory"``). Returns the new
    snapshot folder.
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise MemoryStateError(f"cannot save a memory to {root}: it exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    name = f"snap-{time.time_ns()}-{os.getpid()}"
    folder = root / name
    folder.mkdir()
    description = write(folder)
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync(file)
        files[file.relative_to(folder).as_posix()] = {"size": file.stat().st_size, "blake2b": _digest(file)}
    write_json(folder / _MANIFEST, {"format": FORMAT, "version": FORMAT_VERSION, "files": files,
                                    "memory": description})
    for sub in sorted({p.parent for p in folder.rglob("*")} | {folder}):
        _fsync(sub)
    pointer = root / f"{_CURRENT}.tmp-{os.getpid()}"
    write_json(pointer, {"snapshot": name})
    os.replace(pointer, root / _CURRENT)
    _fsync(root)
    for old in root.iterdir():  # earlier snapshots and leftovers of killed saves
        if old.name in (name, _CURRENT) or not old.name.startswith(("snap-", _CURRENT)):
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return folder


def open_snapshot(path: str | os.PathLike) -> tuple[Path, dict]:
    """Find and verify the current snapshot of the save folder ``path``.

    Returns ``(snapshot folder, the manifest's "memory" description)``. Raises
    ``MemoryStateError`` if the save is missing, of another format or version, or any
    file is missing, truncated or altered.
    """
    root = Path(path)
    if not (root / _CURRENT).is_file():
        raise MemoryStateError(f"no saved memory at {root}: {_CURRENT} is missing")
    name = read_json(root / _CURRENT).get("snapshot")
    if not (isinstance(name, str) and name.startswith("snap-") and "/" not in name and (root / name).is_dir()):
        raise MemoryStateError(f"{root / _CURRENT}: names no snapshot folder of {root} ({name!r})")
    folder = root / name
    manifest = read_json(folder / _MANIFEST)
    if manifest.get("format") != FORMAT:
        raise MemoryStateError(f"{folder}: not a vstream memory (format {manifest.get('format')!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise MemoryStateError(f"{folder}: written by memory format version {manifest.get('version')!r}; "
                               f"this vstream reads version {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(manifest.get("memory"), dict):
        raise MemoryStateError(f"{folder / _MANIFEST}: no file list or memory description")
    for relative, entry in files.items():
        file = folder / relative
        if not (isinstance(entry, dict) and file.resolve().is_relative_to(folder.resolve()) and file.is_file()):
            raise MemoryStateError(f"{folder}: file {relative!r} is missing")
        if file.stat().st_size != entry.get("size"):
            raise MemoryStateError(f"{file}: {file.stat().st_size} bytes, the manifest says {entry.get('size')} "
                                   "(truncated or altered)")
        if _digest(file) != entry.get("blake2b"):
            raise MemoryStateError(f"{file}: contents do not match the manifest's digest (damaged)")
    return folder, manifest["memory"]
