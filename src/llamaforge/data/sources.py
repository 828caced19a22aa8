"""Read local data files into rows that remember where they came from (``file:line``).

Supported: JSON (a list of objects, ``{"data": [...]}``, or JSON Lines saved as .json), JSONL,
CSV/TSV, Parquet, Arrow, and a Hugging Face ``datasets`` folder written by ``save_to_disk``
(its Arrow files are read with pyarrow; ``datasets`` itself is not needed).

Readers never raise for one bad row: a row that cannot be decoded (invalid UTF-8, invalid
JSON on a JSONL line) comes back with ``error`` set, so the pipeline can stop (strict) or skip
and count it (lenient). Only a file that cannot be read at all raises ``DataError``.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

# Reasons a row is bad; the pipeline's report counts rows per reason.
MISSING_FIELD = "missing field"
WRONG_TYPE = "wrong type"
ROLES_OUT_OF_ORDER = "roles out of order"
UNKNOWN_ROLE = "unknown role"
EMPTY_CONVERSATION = "empty conversation"
EMPTY_RESPONSE = "empty response"
EMPTY_TEXT = "empty text"
INVALID_UTF8 = "invalid UTF-8"
INVALID_JSON = "invalid JSON"
INVALID_CSV = "invalid CSV row"
INVALID_CONVERSATION = "invalid conversation"
ZERO_TRAINABLE = "zero trainable tokens"

SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".md")
_PRESET_SPLITS = {
    "test": "test",
    "validation": "validation",
    "valid": "validation",
    "dev": "validation",
}
_SURROGATE = re.compile("[\ud800-\udfff]")
_WS = re.compile(r"[ \t\n\r]*")


class BadRow(Exception):
    """One row cannot become a training example; ``reason`` is one of the module's constants."""

    def __init__(self, reason: str, detail: str = "", *, field: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.field = reason, detail, field

    def __reduce__(self) -> tuple:  # crosses process boundaries (data.num_workers)
        return (_bad_row, (self.reason, self.detail, self.field))


def _bad_row(reason: str, detail: str, field: str | None) -> BadRow:
    return BadRow(reason, detail, field=field)


class DataError(UserError):
    """A data problem with its place: ``file:line: reason: detail``."""

    def __init__(self, where: str, reason: str, detail: str = "") -> None:
        text = f"{where}: {reason}" + (f": {detail}" if detail else "")
        super().__init__(text)
        self.where, self.reason, self.detail = where, reason, detail

    def __reduce__(self) -> tuple:  # crosses process boundaries (data.num_workers)
        return (type(self), (self.where, self.reason, self.detail))


@dataclass
class Row:
    """One source record: its fields, its place, an optional preset split and read error."""

    data: dict[str, Any]
    where: str
    split: str | None = None
    error: BadRow | None = field(default=None, repr=False)


def read_rows(path: str | os.PathLike, *, columns: Mapping[str, str] | None = None) -> list[Row]:
    """Read every row of a local file or ``save_to_disk`` folder, renaming mapped columns."""
    p = Path(path)
    if not p.exists():
        raise DataError(str(path), "not found", _not_found_hint(str(path)))
    rows = _read_folder(p) if p.is_dir() else _read_file(p)
    if columns:
        for row in rows:
            row.data = rename_columns(row.data, columns)
    return rows


def source_files(path: str | os.PathLike) -> list[Path]:
    """The files whose bytes define a source's rows (for cache keys)."""
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    return [p]


def rename_columns(data: dict[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """Rename the user's columns to ours: ``columns`` maps our name -> the user's column."""
    out = dict(data)
    for ours, theirs in columns.items():
        if theirs in data:
            out.pop(theirs, None)
            out[ours] = data[theirs]
    return out


def utf8_problem(value: Any) -> str | None:
    """Describe the first undecodable byte / lone surrogate in any string inside ``value``."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        if m is None:
            return None
        code = ord(m.group())
        if 0xDC80 <= code <= 0xDCFF:
            return f"byte 0x{code - 0xDC00:02x} at character {m.start() + 1} is not valid UTF-8"
        return f"unpaired surrogate U+{code:04X} at character {m.start() + 1}"
    if isinstance(value, Mapping):
        return next(
            filter(None, (utf8_problem(k) or utf8_problem(v) for k, v in value.items())), None
        )
    if isinstance(value, list | tuple):
        return next(filter(None, map(utf8_problem, value)), None)
    return None


def _not_found_hint(path: str) -> str:
    """Explain what a missing data path could have been."""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return (
            "no such local file or folder (Hugging Face hub names need a network: load it once "
            "with datasets.load_dataset(...).save_to_disk(DIR) and point data.path at DIR)"
        )
    return f"no such file or folder (supported: {', '.join(SUFFIXES)}, or a save_to_disk folder)"


def _read_file(p: Path) -> list[Row]:
    """Dispatch on the file suffix."""
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(p, _read_bytes(p))
    if suffix == ".json":
        return _read_json(p, _read_bytes(p))
    if suffix in (".csv", ".tsv"):
        return _read_csv(p, _read_bytes(p), "\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return _read_parquet(p)
    if suffix == ".arrow":
        return _table_rows(_read_arrow(p), str(p))
    if suffix in (".txt", ".md"):
        return _read_text(p, _read_bytes(p))
    raise DataError(str(p), "unsupported file type", f"use one of {', '.join(SUFFIXES)}")


def _read_text(p: Path, data: bytes) -> list[Row]:
    """Plain text: one {"text"} row per paragraph (blank-line separated), line of its start."""
    rows, start, lines = [], 1, []
    for n, raw in enumerate([*data.split(b"\n"), b""], start=1):
        if raw.strip():
            start = start if lines else n
            lines.append(raw)
            continue
        if lines:
            text, error = _decode_line(b"\n".join(lines))
            rows.append(Row({} if error else {"text": text}, f"{p}:{start}", error=error))
            lines = []
    return rows


def _read_bytes(p: Path) -> bytes:
    """File bytes without a UTF-8 byte-order mark."""
    data = p.read_bytes()
    return data[len(codecs.BOM_UTF8) :] if data.startswith(codecs.BOM_UTF8) else data


def _decode_line(raw: bytes) -> tuple[str, BadRow | None]:
    """Decode one line strictly; on failure keep the text (escaped) and say where it broke."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        detail = f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not valid UTF-8"
        return raw.decode("utf-8", "surrogateescape"), BadRow(INVALID_UTF8, detail)


def _read_jsonl(p: Path, data: bytes, first_line: int = 1) -> list[Row]:
    """One JSON object per line; blank lines are skipped."""
    rows = []
    for n, raw in enumerate(data.split(b"\n"), start=first_line):
        if not raw.strip():
            continue
        rows.append(_jsonl_row(raw, f"{p}:{n}"))
    return rows


def _jsonl_row(raw: bytes, where: str) -> Row:
    """Parse one JSONL line into a row (or a row carrying its error)."""
    text, error = _decode_line(raw)
    if error is not None:
        return Row({}, where, error=error)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Row({}, where, error=BadRow(INVALID_JSON, f"{e.msg} at column {e.colno}"))
    return _object_row(obj, where)


def _object_row(obj: Any, where: str) -> Row:
    """A parsed JSON value as a row: objects only, strings must be clean Unicode."""
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        return Row({}, where, error=BadRow(WRONG_TYPE, f"row is a JSON {kind}, expected an object"))
    problem = utf8_problem(obj)
    if problem is not None:
        return Row({}, where, error=BadRow(INVALID_UTF8, problem))
    return Row(obj, where)


def _read_json(p: Path, data: bytes) -> list[Row]:
    """A JSON list of objects, an object with a "data" list, or JSON Lines in a .json file."""
    text = data.decode("utf-8", "surrogateescape")
    pos = _skip_ws(text, 0)
    if text.startswith("[", pos):
        rows, end = _json_array(p, text, pos)
        _expect_end(p, text, end)
        return rows
    if not text.startswith("{", pos):
        raise DataError(f"{p}:{_line_of(text, pos)}", INVALID_JSON, "expected a list or an object")
    first, end = _decode_value(p, text, pos)
    if _skip_ws(text, end) < len(text):  # more values follow: JSON Lines in a .json file
        return _read_jsonl(p, data)
    return _json_data_member(p, text, pos, first)


def _json_data_member(p: Path, text: str, pos: int, obj: dict[str, Any]) -> list[Row]:
    """Rows of the top-level object's "data" list, with the line of each element."""
    if not isinstance(obj.get("data"), list):
        raise DataError(
            str(p), "unsupported JSON layout", 'expected a list of rows or {"data": [rows]}'
        )
    pos += 1
    while True:  # walk the members to find where "data"'s list starts
        pos = _skip_ws(text, pos)
        key, pos = _decode_value(p, text, pos)
        pos = _skip_ws(text, _skip_ws(text, pos) + 1)  # past ':'
        if key == "data":
            return _json_array(p, text, pos)[0]
        pos = _skip_ws(text, _decode_value(p, text, pos)[1]) + 1  # past ','


def _json_array(p: Path, text: str, pos: int) -> tuple[list[Row], int]:
    """Parse the array at ``pos`` element by element, keeping each element's line."""
    rows: list[Row] = []
    pos, line, counted = _skip_ws(text, pos + 1), 1 + text.count("\n", 0, pos), pos
    if text.startswith("]", pos):
        return rows, pos + 1
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        obj, end = _decode_value(p, text, pos)
        rows.append(_element_row(obj, text, pos, end, f"{p}:{line}", line))
        pos = _skip_ws(text, end)
        if text.startswith("]", pos):
            return rows, pos + 1
        if not text.startswith(",", pos):
            raise DataError(f"{p}:{_line_of(text, pos)}", INVALID_JSON, "expected ',' or ']'")
        pos = _skip_ws(text, pos + 1)


def _element_row(obj: Any, text: str, start: int, end: int, where: str, line: int) -> Row:
    """A JSON array element as a row; undecodable bytes are reported with their own line."""
    m = _SURROGATE.search(text, start, end)
    if m is not None and 0xDC80 <= ord(m.group()) <= 0xDCFF:
        bad_line = line + text.count("\n", start, m.start())
        detail = f"byte 0x{ord(m.group()) - 0xDC00:02x} on line {bad_line} is not valid UTF-8"
        return Row({}, where, error=BadRow(INVALID_UTF8, detail))
    return _object_row(obj, where)


def _decode_value(p: Path, text: str, pos: int) -> tuple[Any, int]:
    """One JSON value at ``pos``; a syntax error names its line (the file is unusable)."""
    try:
        return json.JSONDecoder().raw_decode(text, pos)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}", INVALID_JSON, f"{e.msg} at column {e.colno}") from None


def _expect_end(p: Path, text: str, pos: int) -> None:
    """Only whitespace may follow the top-level value."""
    pos = _skip_ws(text, pos)
    if pos < len(text):
        raise DataError(f"{p}:{_line_of(text, pos)}", INVALID_JSON, "extra data after the list")


def _skip_ws(text: str, pos: int) -> int:
    """Index of the next non-whitespace character."""
    return _WS.match(text, pos).end()


def _line_of(text: str, pos: int) -> int:
    """1-based line number of a character offset."""
    return text.count("\n", 0, pos) + 1


def _read_csv(p: Path, data: bytes, delimiter: str) -> list[Row]:
    """A header row, then one row per record (quoted fields may span lines)."""
    text = data.decode("utf-8", "surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return []
    rows, start = [], reader.line_num + 1
    for values in reader:
        if any(v.strip() for v in values):
            rows.append(_csv_row(header, values, f"{p}:{start}"))
        start = reader.line_num + 1
    return rows


def _csv_row(header: list[str], values: list[str], where: str) -> Row:
    """Zip one CSV record with the header, checking its width and its bytes."""
    if len(values) != len(header):
        detail = f"{len(values)} fields, the header has {len(header)}"
        return Row({}, where, error=BadRow(INVALID_CSV, detail))
    data = dict(zip(header, values, strict=True))
    for name, value in data.items():
        problem = utf8_problem(value)
        if problem is not None:
            return Row({}, where, error=BadRow(INVALID_UTF8, f"column {name!r}: {problem}"))
    return Row(data, where)


def _read_parquet(p: Path) -> list[Row]:
    """Every row of a Parquet file, placed as ``file[index]``."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(str(p), "unreadable Parquet file", str(e)) from e
    return _table_rows(table, str(p))


def _read_arrow(p: Path) -> Any:
    """An Arrow IPC stream (what ``datasets`` writes) or IPC file, as a table."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(p)) as source:
            return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        try:
            with pa.memory_map(str(p)) as source:
                return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid as e:
            raise DataError(str(p), "unreadable Arrow file", str(e)) from e


def _table_rows(table: Any, name: str) -> list[Row]:
    """Rows of a pyarrow table; binary values stay bytes (a wrong type for text fields)."""
    return [_object_row(obj, f"{name}[{i}]") for i, obj in enumerate(table.to_pylist())]


def _read_folder(p: Path) -> list[Row]:
    """A ``save_to_disk`` folder: one Dataset, or a DatasetDict of split folders."""
    if (p / "dataset_dict.json").is_file():
        splits = json.loads((p / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        rows = []
        for name in splits:
            preset = _PRESET_SPLITS.get(name)
            for row in _read_dataset_folder(p / name):
                row.split = preset
                rows.append(row)
        return rows
    return _read_dataset_folder(p)


def _read_dataset_folder(p: Path) -> list[Row]:
    """One saved Dataset: the Arrow files that state.json lists (else every *.arrow, sorted)."""
    state = p / "state.json"
    if state.is_file():
        files = [p / f["filename"] for f in json.loads(state.read_text("utf-8"))["_data_files"]]
    else:
        files = sorted(p.glob("*.arrow"))
    if not files:
        raise DataError(str(p), "no data", "folder has no dataset_dict.json, state.json or *.arrow")
    return [row for f in files for row in _table_rows(_read_arrow(f), str(f))]
