"""LLaVA-style conversation files (JSON arrays and JSON Lines), read as a stream."""

from __future__ import annotations

import json
import tracemalloc

import pytest
from helpers import write_jsonl

from vstream.data import ConversationRecord, Turn, read_conversations, read_json_records
from vstream.data import conversations as module
from vstream.errors import DataError

VIDEO = {"id": "v_1", "video": "academic/v_1.mp4",
         "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                           {"from": "gpt", "value": "A man parks a red car."},
                           {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "At the station."}]}
IMAGES = {"id": 7, "image": ["a.jpg", "b.jpg"],
          "conversations": [{"from": "system", "value": "Be brief."},
                            {"from": "human", "value": "<image>\n<image>\nSame place?"},
                            {"from": "gpt", "value": "Yes."}]}
TEXT = {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}


@pytest.mark.parametrize("layout", ["array", "lines", "array-compact"])
def test_both_layouts_give_the_records_with_media_and_turns(tmp_path, layout):
    path = tmp_path / "data.json"
    records = [VIDEO, IMAGES, TEXT]
    path.write_text({"array": json.dumps(records, indent=2), "array-compact": json.dumps(records),
                     "lines": "\n".join(json.dumps(r) for r in records) + "\n"}[layout])
    got = list(read_conversations(path, media_root=tmp_path / "media"))
    assert got[0] == ConversationRecord("v_1", "video", (tmp_path / "media" / "academic/v_1.mp4",), (
        Turn("user", "<video>\nWhat happens?"), Turn("assistant", "A man parks a red car."),
        Turn("user", "Where?"), Turn("assistant", "At the station.")))
    assert got[1].id == "7" and got[1].media == "image" and [p.name for p in got[1].paths] == ["a.jpg", "b.jpg"]
    assert got[1].turns[0] == Turn("system", "Be brief.")
    assert got[2].media is None and got[2].paths == ()


def test_a_large_file_is_read_one_record_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(module, "CHUNK", 4096)  # records cross chunk boundaries all the time
    path = tmp_path / "big.json"
    count = 20_000
    with open(path, "w") as out:
        out.write("[\n")
        for i in range(count):
            record = {**VIDEO, "id": f"v_{i}"}  # one video name: pathlib interns each new name
            out.write(json.dumps(record) + (",\n" if i < count - 1 else "\n"))
        out.write("]\n")
    size = path.stat().st_size
    ids = (record.id for record in read_conversations(path))
    first = next(ids)  # imports and caches settle before memory is measured
    tracemalloc.start()
    last, seen = first, 1
    for last in ids:
        seen += 1
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (first, last, seen) == ("v_0", f"v_{count - 1}", count)
    assert peak < size / 20, (peak, size)  # a bounded buffer, not the file (5 MB)


@pytest.mark.parametrize("content, message", [
    ('[{"id": 1, "conversations": []}, {"id": 2', "ends inside the JSON array|record 1 is not valid JSON"),
    ('[{"id": 1}, 5]', "record 1 is a JSON int"),
    ('{"id": "a"}\n{"id": nope}\n', "record 1 is not valid JSON"),
    ('[{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}] x',
     "text after the end"),
])
def test_broken_json_names_the_file_and_the_record(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as raised:
        list(read_json_records(path))
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("change, message", [
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"field 'conversations'\[0\]\['from'\] must be one of"),
    ({"conversations": [{"from": "human", "value": 3}]}, r"\['value'\] must be a string"),
    ({"conversations": [{"from": "gpt", "value": "<video> no"}]}, "must start with 'human'"),
    ({"conversations": [{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "x"}]},
     "<video> appears 0 time"),
    ({"image": "x.jpg"}, "both 'video' and 'image'"),
    ({"video": ""}, "field 'video' must be a path"),
    ({"id": None}, "field 'id'"),
    ({"conversations": "hi"}, "non-empty list"),
])
def test_a_record_that_does_not_fit_names_its_index_id_and_field(tmp_path, change, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(TEXT) + "\n" + json.dumps({**VIDEO, **change}) + "\n")
    with pytest.raises(DataError, match=message) as raised:
        list(read_conversations(path))
    assert f"{path}: record 1 (id " in str(raised.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="cannot read it"):
        list(read_json_records(tmp_path / "absent.json"))
    (tmp_path / "empty.json").write_text("")
    assert list(read_json_records(tmp_path / "empty.json")) == []
    (tmp_path / "empty-array.json").write_text("[ ]")
    assert list(read_json_records(tmp_path / "empty-array.json")) == []


def test_vstream_data_check_counts_records_and_names_the_first_bad_one(tmp_path, capsys):
    from vstream.cli import main

    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in (VIDEO, IMAGES, TEXT)) + "\n")
    assert main(["data", "check", str(good)]) == 0
    assert "3 records (1 video, 1 image, 1 text), 9 turns" in capsys.readouterr().out
    (tmp_path / "academic").mkdir()
    (tmp_path / "academic" / "v_1.mp4").write_bytes(b"")
    assert main(["data", "check", str(good), "--missing"]) == 1  # a.jpg and b.jpg are not there
    captured = capsys.readouterr()
    assert "2 media file(s) missing" in captured.out and "b.jpg" in captured.err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TEXT) + "\n" + json.dumps({**TEXT, "conversations": [{"from": "bot", "value": "x"}]}))
    assert main(["data", "check", str(bad)]) == 1
    assert "record 1 (id 't')" in capsys.readouterr().err


def test_mminstruct_records_without_ids_and_their_question_types(tmp_path, capsys):
    """MMInstruct's JSON Lines: LLaVA-style records, ids optional, each question's type read
    from the instruction the data engine appended."""
    from vstream.cli import main
    from vstream.data import read_mminstruct

    records = [
        {"image": "a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nIs the sign red? Please answer with 'Yes' or 'No'."},
            {"from": "gpt", "value": "Yes"},
            {"from": "human", "value": "Which shape is it?\nA. circle\nB. square Choose the correct option."},
            {"from": "gpt", "value": "B"}]},
        {"id": "q7", "image": "b.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the scene. Provide an extensive response."},
            {"from": "gpt", "value": "A long answer."}]},
        {"image": "c.jpg", "conversations": [
            {"from": "human", "value": "<image>\nHow many cars? Answer concisely."}, {"from": "gpt", "value": "3"},
            {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "Traffic."}]},
    ]
    path = tmp_path / "qa_en.jsonl"
    write_jsonl(path, records)
    read = list(read_mminstruct(path))
    assert [r.conversation.id for r in read] == ["qa_en-0", "q7", "qa_en-2"]
    assert [r.types for r in read] == [("judgement", "multiple_choice"), ("long_vqa",), ("short_vqa", "other")]
    assert read[0].conversation.paths == (tmp_path / "a.jpg",)
    assert main(["data", "check", str(path), "--format", "mminstruct"]) == 0
    out = capsys.readouterr().out
    assert "3 records (0 video, 3 image, 0 text)" in out
    assert "questions by type: judgement 1, long_vqa 1, multiple_choice 1, other 1, short_vqa 1" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.jpg", "conversations": [{"from": "robot", "value": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: record 0 \(id 'bad-0'\).*'from'"):
        list(read_mminstruct(bad))


def omnicorpus_rows() -> list[dict]:
    """Two documents in OmniCorpus-CC's schema (its dataset card's ``dataset_info``)."""
    meta = {"aesthetic_prob": 0.5, "bytes": 1000, "d_hash": "ab", "d_hash_dup_count": 0, "height": 64,
            "img_url_sha": "cd", "p_hash": "ef", "p_hash_dup_count": 0, "unsafe_prob": 0.0, "width": 64}
    general = {"domain": ["news"], "fluency_prob": 0.9, "id": "doc-1", "non_advertisement_prob": 0.9,
               "politics_prob": 0.0, "porn_prob": 0.0, "toxic_prob": 0.0, "url": "https://example.org/a"}
    return [
        {"general_metadata": general, "texts": ["A red square.", None, "It moves left."],
         "images": [None, "https://example.org/a.jpg", None], "metadata": [None, meta, None]},
        {"general_metadata": {**general, "id": "doc-2", "url": "https://example.org/b"},
         "texts": [None, "Two images.", None], "images": ["https://x/1.png", None, "https://x/2.png"],
         "metadata": [meta, None, meta]},
    ]


def test_omnicorpus_documents_read_from_parquet_and_json_lines(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vstream.data import interleaved as module
    from vstream.data import read_interleaved

    rows = omnicorpus_rows() * 50  # 100 documents: two batches of 64 rows
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00010.parquet", row_group_size=32)
    documents = list(read_interleaved(tmp_path / "train-00000-of-00010.parquet"))
    assert len(documents) == 100 and module.BATCH_ROWS < 100
    first, second = documents[:2]
    assert (first.id, first.url) == ("doc-1", "https://example.org/a")
    assert [(e.kind, e.value) for e in first.entries] == [
        ("text", "A red square."), ("image", "https://example.org/a.jpg"), ("text", "It moves left.")]
    assert second.images == ["https://x/1.png", "https://x/2.png"] and second.entries[1].value == "Two images."
    (tmp_path / "shard.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "general_metadata"})
                                                  + "\n" for r in omnicorpus_rows()))
    from_json = list(read_interleaved(tmp_path / "shard.jsonl"))
    assert [d.id for d in from_json] == ["shard-0", "shard-1"] and from_json[0].entries == first.entries


@pytest.mark.parametrize("texts, images, needle", [
    (["a", None], [None], r"'texts' has 2 entries and 'images' 1"),
    (["a", "b"], [None, "x.jpg"], r"position 1 holds both a text and an image"),
    ([None], [None], r"position 0 holds neither a text nor an image"),
    ("a", [None], r"field 'texts' must be a list"),
])
def test_omnicorpus_documents_that_do_not_line_up_are_named(tmp_path, texts, images, needle):
    from vstream.data import read_interleaved

    (tmp_path / "bad.jsonl").write_text(json.dumps({"texts": ["ok"], "images": [None]}) + "\n"
                                        + json.dumps({"texts": texts, "images": images}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: " + needle):
        list(read_interleaved(tmp_path / "bad.jsonl"))


def test_a_parquet_file_that_is_not_one_or_lacks_the_columns_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vstream.data import read_interleaved

    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="fake.parquet: not a readable Parquet file"):
        list(read_interleaved(tmp_path / "fake.parquet"))
    pq.write_table(pa.table({"texts": [["a"]]}), tmp_path / "half.parquet")
    with pytest.raises(DataError, match=r"half.parquet: no column\(s\) images"):
        list(read_interleaved(tmp_path / "half.parquet"))
