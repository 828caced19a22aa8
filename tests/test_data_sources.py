"""Reading JSON / JSONL / CSV / Parquet / Arrow / save_to_disk folders with file:line places."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaforge.data.sources import (
    INVALID_CSV,
    INVALID_JSON,
    INVALID_UTF8,
    WRONG_TYPE,
    DataError,
    read_rows,
    rename_columns,
    source_files,
)

FIX = Path(__file__).parent / "fixtures" / "data"


def _lines(rows):
    """The line part of each row's place."""
    return [int(r.where.rsplit(":", 1)[1]) for r in rows]


def test_json_list_keeps_line_of_each_element():
    rows = read_rows(FIX / "alpaca.json")
    assert len(rows) == 12 and all(r.error is None for r in rows)
    assert rows[0].data["instruction"] == "Add 1 and 1."
    text = (FIX / "alpaca.json").read_text().splitlines()
    for row, line in zip(rows, _lines(rows), strict=True):
        assert text[line - 1].strip() == "{"  # each element opens on its reported line
        assert row.where.startswith(str(FIX / "alpaca.json"))


def test_json_data_member_and_jsonl_in_json(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(
        '{"version": 2, "meta": {"a": [1, 2]},\n "data": [\n  {"text": "a"},\n  {"text": "b"}\n]}'
    )
    rows = read_rows(p)
    assert [r.data["text"] for r in rows] == ["a", "b"] and _lines(rows) == [3, 4]
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert _lines(read_rows(p)) == [1, 3]


def test_json_syntax_error_names_the_line(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[\n {"text": "a"},\n {"text": "b" oops}\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: invalid JSON"):
        read_rows(p)
    p.write_text('{"rows": []}')
    with pytest.raises(DataError, match="data"):
        read_rows(p)


def test_jsonl_lines_and_bad_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": \n[1, 2]\n{"text": "d"}\n')
    rows = read_rows(p)
    assert _lines(rows) == [1, 3, 4, 5]
    assert [r.error.reason if r.error else None for r in rows] == [
        None,
        INVALID_JSON,
        WRONG_TYPE,
        None,
    ]


def test_csv_row_lines_with_multiline_fields():
    rows = read_rows(FIX / "dialogsum.csv")
    assert len(rows) == 10
    assert _lines(rows)[:3] == [2, 4, 6]
    assert rows[1].data == {
        "dialogue": "#Person1#: Hi Bob.\n#Person2#: Hello.",
        "summary": "Bob greets.",
        "topic": "greeting",
    }


def test_csv_wrong_width(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b\n1,2\n1,2,3\n")
    rows = read_rows(p)
    assert rows[0].error is None and rows[1].error.reason == INVALID_CSV
    assert rows[1].where.endswith("d.csv:3")


def test_invalid_utf8_jsonl_names_line_and_column():
    rows = read_rows(FIX / "bad" / "invalid_utf8.jsonl")
    bad = [r for r in rows if r.error]
    assert len(bad) == 1 and bad[0].where.endswith("invalid_utf8.jsonl:3")
    assert bad[0].error.reason == INVALID_UTF8
    assert "0xe9" in bad[0].error.detail and "column 25" in bad[0].error.detail


def test_invalid_utf8_csv_and_json(tmp_path):
    rows = read_rows(FIX / "bad" / "invalid_utf8.csv")
    assert [r.error.reason if r.error else None for r in rows] == [None, INVALID_UTF8, None]
    assert rows[1].where.endswith("invalid_utf8.csv:3") and "'output'" in rows[1].error.detail
    p = tmp_path / "d.json"
    p.write_bytes(b'[\n {"text": "ok"},\n {"text":\n   "caf\xe9"}\n]')
    rows = read_rows(p)
    assert rows[0].error is None and rows[1].error.reason == INVALID_UTF8
    assert rows[1].where.endswith("d.json:3") and "line 4" in rows[1].error.detail
    p.write_text('[{"text": "\\udc80"}]')  # an escaped lone surrogate is not encodable either
    assert read_rows(p)[0].error.reason == INVALID_UTF8


def test_bom_is_ignored(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"\xef\xbb\xbftext\nhello\n")
    assert read_rows(p)[0].data == {"text": "hello"}


def test_column_mapping():
    assert rename_columns({"q": 1, "a": 2, "x": 3}, {"instruction": "q", "output": "a"}) == {
        "instruction": 1,
        "output": 2,
        "x": 3,
    }
    rows = read_rows(FIX / "dialogsum.csv", columns={"output": "summary"})
    assert "output" in rows[0].data and "summary" not in rows[0].data


def test_parquet_and_arrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"instruction": ["a", "b"], "output": ["x", None], "blob": [b"1", b"2"]})
    pq.write_table(table, tmp_path / "d.parquet")
    rows = read_rows(tmp_path / "d.parquet")
    assert [r.data["output"] for r in rows] == ["x", None]
    assert rows[1].where == f"{tmp_path / 'd.parquet'}[1]"
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    assert [r.data["instruction"] for r in read_rows(tmp_path / "d.arrow")] == ["a", "b"]


def test_save_to_disk_dataset_and_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": f"i{k}", "output": f"o{k}"} for k in range(6)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "one"))
    got = read_rows(tmp_path / "one")
    assert [r.data for r in got] == rows and got[0].where.endswith(".arrow[0]")
    dd = datasets.DatasetDict({"train": ds, "test": ds.select(range(2))})
    dd.save_to_disk(str(tmp_path / "dict"))
    got = read_rows(tmp_path / "dict")
    assert [r.split for r in got] == [None] * 6 + ["test"] * 2
    assert all(f.is_file() for f in source_files(tmp_path / "dict"))


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="save_to_disk"):
        read_rows("tatsu-lab/alpaca")
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(tmp_path / "d.xml")


def test_rows_are_json_values():
    rows = read_rows(FIX / "messages.jsonl")
    assert json.loads(json.dumps(rows[1].data)) == rows[1].data
    assert rows[1].data["messages"][0]["role"] == "system"


def test_plain_text_paragraphs_keep_their_line(tmp_path):
    from llamaforge.data.sources import read_rows

    p = tmp_path / "book.txt"
    p.write_bytes(b"First line.\nStill first.\n\n\nSecond \xff para.\n\nThird.\n")
    rows = read_rows(p)
    assert [r.where for r in rows] == [f"{p}:1", f"{p}:5", f"{p}:7"]
    assert rows[0].data == {"text": "First line.\nStill first."} and rows[0].error is None
    assert rows[1].error is not None and "0xff" in rows[1].error.detail
    assert rows[2].data == {"text": "Third."}
