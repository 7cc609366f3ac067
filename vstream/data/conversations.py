"""LLaVA-style conversation records, read as a stream.

The format LLaVA's instruction data and LLaVA-Video-178K use (checked against the field
names of the released files: LLaVA's ``llava_instruct_*.json`` and the
``lmms-lab/LLaVA-Video-178K`` JSON files): a JSON array, or JSON Lines, of records

    {"id": "v_abc", "video": "academic/v_abc.mp4",
     "conversations": [{"from": "human", "value": "<video>\\nWhat happens?"},
                       {"from": "gpt", "value": "A man ..."}]}

with ``image`` (a path, or a list of paths) instead of ``video`` for images, or neither
for text only. ``from`` is ``human``, ``gpt`` or ``system``; each medium appears once in
the text as its placeholder (``<video>``, ``<image>``). The array files run to
gigabytes (LLaVA-Video-178K's full JSON is 1.75 GB), so ``read_json_records`` decodes
one record at a time from a bounded buffer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vstream.errors import DataError

CHUNK = 1 << 16  # bytes read at a time
MAX_RECORD_BYTES = 64 << 20  # a record larger than this is refused, not buffered
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
PLACEHOLDERS = {"video": "<video>", "image": "<image>"}


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` ``user``, ``assistant`` or ``system``, and its ``text``."""

    role: str
    text: str


@dataclass(frozen=True)
class ConversationRecord:
    """One conversation about a medium.

    Attributes:
        id: the record's id, as text.
        media: ``video``, ``image`` or None (text only).
        paths: the medium's files, resolved against the media folder given (one video;
            one or more images).
        turns: the messages in order, placeholders left in the text.
    """

    id: str
    media: str | None
    paths: tuple[Path, ...]
    turns: tuple[Turn, ...]


def read_json_records(path) -> Iterator[tuple[int, dict]]:
    """``(index, record)`` for each JSON object of a JSON array or JSON Lines file, read
    ``CHUNK`` bytes at a time: memory holds one record, never the file.

    Raises:
        DataError: not JSON, not objects, truncated, or a record over ``MAX_RECORD_BYTES``,
            naming the file and the record's index.
    """
    path = Path(path)
    decoder = json.JSONDecoder()
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 - closed in the finally below, after the generator ends
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        buffer, at_end, index = "", False, 0
        in_array = None  # True: a JSON array; False: JSON Lines

        def fill() -> bool:
            nonlocal buffer, at_end
            chunk = handle.read(CHUNK)
            at_end = not chunk
            buffer += chunk
            return bool(chunk)

        while True:
            buffer = buffer.lstrip()
            while not buffer and fill():
                buffer = buffer.lstrip()
            if in_array is None:
                if not buffer:
                    return  # an empty file has no records
                in_array = buffer[0] == "["
                buffer = buffer[1:] if in_array else buffer
                continue
            if in_array and buffer.startswith(","):
                buffer = buffer[1:]
                continue
            if in_array and buffer.startswith("]"):
                if buffer[1:].strip() or fill() and buffer[1:].strip():
                    raise DataError(f"{path}: text after the end of the JSON array")
                return
            if not buffer:
                if in_array:
                    raise DataError(f"{path}: ends inside the JSON array, after record {index - 1}: truncated?")
                return
            try:
                record, end = decoder.raw_decode(buffer)
            except json.JSONDecodeError as exc:
                if not at_end and len(buffer) < MAX_RECORD_BYTES and fill():
                    continue  # the record goes on in the next chunk
                if len(buffer) >= MAX_RECORD_BYTES:
                    raise DataError(f"{path}: record {index} is over {MAX_RECORD_BYTES >> 20} MiB") from None
                raise DataError(f"{path}: record {index} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: record {index} is a JSON {type(record).__name__}, not an object")
            yield index, record
            index += 1
            buffer = buffer[end:]
    finally:
        handle.close()


def read_conversations(path, media_root=None) -> Iterator[ConversationRecord]:
    """The conversation records of a LLaVA-style file (see the module docstring), checked
    one by one; media paths resolved against ``media_root`` (default: the file's folder).

    Raises:
        DataError: a record that does not fit the format, naming the file, the record
            (index and id) and the field.
    """
    path = Path(path)
    root = Path(media_root) if media_root is not None else path.parent
    for index, record in read_json_records(path):
        yield conversation_record(record, root, f"{path}: record {index} (id {record.get('id')!r})")


def conversation_record(record: dict, root: Path, where: str) -> ConversationRecord:
    """One decoded record as a ``ConversationRecord`` (``where`` names it in errors)."""
    if not isinstance(record.get("id"), (str, int)) or isinstance(record.get("id"), bool):
        raise DataError(f"{where}: field 'id' must be a string or an int")
    present = [kind for kind in PLACEHOLDERS if kind in record]
    if len(present) > 1:
        raise DataError(f"{where}: has both 'video' and 'image'; a record holds one kind of medium")
    media = present[0] if present else None
    paths: tuple[Path, ...] = ()
    if media is not None:
        value = record[media]
        names = value if isinstance(value, list) and media == "image" else [value]
        if not names or not all(isinstance(name, str) and name for name in names):
            raise DataError(f"{where}: field {media!r} must be a path" + (" or a list of paths" if media == "image"
                                                                          else ""))
        paths = tuple(root / name for name in names)
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of {{'from', 'value'}}")
    parsed = []
    for i, turn in enumerate(turns):
        field = f"field 'conversations'[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {field} must be an object with 'from' and 'value'")
        role, text = turn.get("from"), turn.get("value")
        if role not in ROLES:
            raise DataError(f"{where}: {field}['from'] must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(text, str):
            raise DataError(f"{where}: {field}['value'] must be a string")
        parsed.append(Turn(ROLES[role], text))
    asked = [t for t in parsed if t.role != "system"]
    if not asked or asked[0].role != "user" or not any(t.role == "assistant" for t in asked):
        raise DataError(f"{where}: field 'conversations' must start with 'human' and hold a 'gpt' answer")
    for kind, placeholder in PLACEHOLDERS.items():
        found = sum(t.text.count(placeholder) for t in parsed)
        expected = len(paths) if kind == media else 0
        if found != expected:
            raise DataError(f"{where}: {placeholder} appears {found} time(s) in 'conversations'; the record's "
                            f"{kind} needs {expected}")
    return ConversationRecord(str(record["id"]), media, paths, tuple(parsed))
