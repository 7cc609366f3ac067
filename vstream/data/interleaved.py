"""Interleaved image-text documents (OmniCorpus), read as a stream.

OmniCorpus (``OpenGVLab/OmniCorpus-CC``, ``-CC-210M``, ``-YT`` on the Hugging Face hub)
ships Parquet files whose rows are documents (the schema of the CC dataset card's
``dataset_info``): ``texts`` and ``images``, two lists of strings read in step, position
``i`` of a document being a paragraph (``texts[i]``, ``images[i]`` null) or an image
(``images[i]`` its URL, ``texts[i]`` null); ``metadata``, a list of per-image structs
(null at text positions); and ``general_metadata`` (``id``, ``url``, ``domain`` and
quality scores). The maintainers' own JSON Lines shards hold the same fields, and their
loader (``OBELICSDataset.parse_sample`` in their ``mllm_openflamingo``) checks the same
rules: equal lengths, one of the two at each position. That the hub's Parquet keeps the
nulls in place (rather than shorter lists) is inferred from that loader and a
maintainer's answer, not checked against a downloaded file; a document whose lists do
not line up is refused by name.

Parquet is read one row group batch at a time (``pyarrow``, the ``data`` extra: ``pip
install vstream[data]``), JSON Lines one record at a time: no file is read whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vstream.data.conversations import read_json_records
from vstream.errors import DataError

BATCH_ROWS = 64  # Parquet rows decoded at a time


@dataclass(frozen=True)
class Entry:
    """One position of a document: ``kind`` ``text`` or ``image``, and its ``value`` (the
    paragraph, or the image's URL or path)."""

    kind: str
    value: str


@dataclass(frozen=True)
class InterleavedDocument:
    """A document: its ``id`` (``general_metadata.id``, else ``<file stem>-<row>``), its
    ``url`` (None when unknown) and its ``entries`` in order."""

    id: str
    url: str | None
    entries: tuple[Entry, ...]

    @property
    def images(self) -> list[str]:
        return [entry.value for entry in self.entries if entry.kind == "image"]

    def image_texts(self) -> list[tuple[int, str]]:
        """``(image number, text)`` for each image next to a paragraph: the paragraph just
        before it (what a reader has read when the image comes, the order a model
        generates in), else the one just after (a caption below it). Images numbered
        in the document's order, as ``images``; an image between two images is left out."""
        pairs, number = [], 0
        for i, entry in enumerate(self.entries):
            if entry.kind != "image":
                continue
            neighbours = [self.entries[j] for j in (i - 1, i + 1) if 0 <= j < len(self.entries)]
            text = next((n.value for n in neighbours if n.kind == "text" and n.value.strip()), None)
            if text is not None:
                pairs.append((number, text.strip()))
            number += 1
        return pairs


def read_interleaved(path) -> Iterator[InterleavedDocument]:
    """The documents of an OmniCorpus file (``.parquet``, or JSON Lines / a JSON array),
    one at a time; ``DataError`` naming the file, the row and the field of one that does
    not fit."""
    path = Path(path)
    rows = _parquet_rows(path) if path.suffix == ".parquet" else read_json_records(path)
    for index, row in rows:
        yield _document(row, f"{path}: row {index}", f"{path.stem}-{index}")


def is_interleaved(path) -> bool:
    """Whether ``path`` holds interleaved documents rather than conversation records: a
    Parquet file, or a JSON file whose first record has ``texts`` and ``images``."""
    path = Path(path)
    if path.suffix == ".parquet":
        return True
    first = next(read_json_records(path), None)
    return first is not None and {"texts", "images"} <= set(first[1])


def image_path(value: str, root) -> Path:
    """The local file of an image entry ``value`` (a path, relative to ``root``);
    ``DataError`` for a URL, which must be downloaded first."""
    if "://" in value:
        raise DataError(f"image {value!r} is a URL: download the documents' images first and name the local "
                        "files in the data (vstream reads no network)")
    return Path(root) / value


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        from pyarrow import parquet
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install vstream[data])") from None
    try:
        file = parquet.ParquetFile(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowIOError is an OSError, ArrowInvalid a ValueError
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    names = file.schema_arrow.names
    missing = {"texts", "images"} - set(names)
    if missing:
        raise DataError(f"{path}: no column(s) {', '.join(sorted(missing))}: not interleaved documents")
    columns = [name for name in ("texts", "images", "general_metadata") if name in names]
    batches = file.iter_batches(batch_size=BATCH_ROWS, columns=columns)
    index = 0
    while True:
        try:
            batch = next(batches, None)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read the rows after row {index - 1} ({exc}): truncated?") from None
        if batch is None:
            return
        for row in batch.to_pylist():
            yield index, row
            index += 1


def _document(row: dict, where: str, fallback_id: str) -> InterleavedDocument:
    texts, images = row.get("texts"), row.get("images")
    for name, values in (("texts", texts), ("images", images)):
        if not isinstance(values, list) or not all(v is None or isinstance(v, str) for v in values):
            raise DataError(f"{where}: field {name!r} must be a list of strings and nulls")
    if len(texts) != len(images):
        raise DataError(f"{where}: 'texts' has {len(texts)} entries and 'images' {len(images)}; "
                        "they are read in step and must be as long")
    entries = []
    for i, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            held = "both a text and an image" if text is not None else "neither a text nor an image"
            raise DataError(f"{where}: position {i} holds {held}")
        entries.append(Entry("text", text) if text is not None else Entry("image", image))
    meta = row.get("general_metadata") or {}
    if not isinstance(meta, dict):
        raise DataError(f"{where}: field 'general_metadata' must be an object")
    return InterleavedDocument(str(meta.get("id") or fallback_id), meta.get("url"), tuple(entries))
