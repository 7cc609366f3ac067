"""MMInstruct's instruction records, with each question's type.

MMInstruct (``yuecao0119/MMInstruct-GPT4V`` on the Hugging Face hub: JSON Lines files
``jsons_all/qa_en.jsonl``, ``caption_en.jsonl``, ``caption_cn.jsonl`` and per-domain
files under ``jsons_per_domain/``) stores LLaVA-style records, ``image`` and
``conversations`` of ``{"from": "human" | "gpt", "value"}``, the first question after
``<image>`` (the field names as its own LLaVA training loader, ``train_dataset_for_llava.py``
in ``github.com/yuecao0119/MMInstruct``, reads them). No record field names the question
type: the data engine appends one instruction per type to the question
(``data_engine/end_prompt.json``: judgement ``Please answer with 'Yes' or 'No'.``,
multiple choice ``Choose the correct option.``, long VQA ``Provide an extensive
response.``, short VQA ``Answer concisely.``), so a question's type is read from its
ending; one without these endings is ``other`` (captions, free questions). Records may
come without an ``id``: such a record is named ``<file stem>-<index>``. What is inferred
here (the endings as the only mark of the type, ids optional) was read from the data
engine and loaders, not from the released files themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vstream.data.conversations import ConversationRecord, conversation_record, read_json_records

TYPES = {"judgement": "Please answer with 'Yes' or 'No'.", "multiple_choice": "Choose the correct option.",
         "long_vqa": "Provide an extensive response.", "short_vqa": "Answer concisely."}
OTHER = "other"


@dataclass(frozen=True)
class InstructRecord:
    """An MMInstruct record: its ``conversation`` and the ``types`` of its questions (one
    of ``TYPES``' keys or ``other`` per user turn, in order)."""

    conversation: ConversationRecord
    types: tuple[str, ...]


def question_type(question: str) -> str:
    """``judgement``, ``multiple_choice``, ``long_vqa``, ``short_vqa`` or ``other``: the type
    whose instruction ``question`` ends with."""
    text = question.strip()
    return next((kind for kind, ending in TYPES.items() if text.endswith(ending)), OTHER)


def read_mminstruct(path, media_root=None) -> Iterator[InstructRecord]:
    """The records of an MMInstruct file (JSON Lines or a JSON array), one at a time,
    paths resolved against ``media_root`` (default: the file's folder); a ``DataError``
    names the file, record and field of a record that does not fit."""
    root = Path(media_root) if media_root is not None else Path(path).parent
    for index, record in read_json_records(path):
        if "id" not in record:
            record = {**record, "id": f"{Path(path).stem}-{index}"}
        conversation = conversation_record(record, root, f"{path}: record {index} (id {record['id']!r})")
        types = tuple(question_type(turn.text) for turn in conversation.turns if turn.role == "user")
        yield InstructRecord(conversation, types)
