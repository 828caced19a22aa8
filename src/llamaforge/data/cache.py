"""On-disk cache of tokenized datasets, keyed by everything that changes the tokens.

The key hashes the source files' bytes, the tokenizer's identity, the code that renders
examples, and every data setting; a hit skips reading and tokenizing entirely. Entries are
single ``.npz`` files (flat int32 arrays + offsets, JSON metadata as bytes; never pickle),
written to a temporary file and renamed into place, so a crash leaves no half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io.atomic import write_file_atomic

CACHE_VERSION = 1
PROBE = "Hello, world! 123 4567 -- naïve café, 日本語, 🦙 <|im_end|> </s> [INST]\n\n\tend"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/llamaforge/data``, else ``~/.cache/llamaforge/data``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llamaforge" / "data"


def files_fingerprint(paths: Iterable[str | os.PathLike]) -> list[list[Any]]:
    """[name, size, sha256 of the bytes] per file: content changes change the key."""
    out = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out.append([str(p), os.path.getsize(p), h.hexdigest()])
    return out


def tokenizer_fingerprint(tok: Any) -> str:
    """A stable hash of a tokenizer's vocabulary, merges, specials and chat template."""
    own = getattr(tok, "fingerprint", None)
    if callable(own):
        return str(own())
    facts = {
        "class": type(tok).__name__,
        "vocab_size": tok.vocab_size,
        "ids": [tok.bos_id, tok.eos_id, tok.pad_id, getattr(tok, "add_bos", None)],
        "specials": sorted(tok.special_tokens.items()),
        "stop_ids": sorted(tok.stop_ids),
        "chat_template": tok.chat_template,
        "probe": tok.encode(PROBE),
    }
    h = hashlib.sha256(json.dumps(facts, sort_keys=True).encode())
    h.update(_vocabulary_bytes(tok))
    return h.hexdigest()[:32]


def _vocabulary_bytes(tok: Any) -> bytes:
    """The serialised vocabulary+merges when the backend exposes it, else every id decoded."""
    backend = getattr(tok, "backend", None)
    if backend is not None and hasattr(backend, "to_str"):
        return backend.to_str().encode()
    proto = getattr(tok, "model_proto", None)
    if isinstance(proto, bytes):
        return proto
    return "\x00".join(tok.decode([i], skip_special=False) for i in range(tok.vocab_size)).encode(
        "utf-8", "surrogatepass"
    )


def cache_key(parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the key parts."""
    blob = json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def cache_file(cache_dir: str | os.PathLike, key: str) -> Path:
    """Where the entry for ``key`` lives."""
    return Path(cache_dir) / f"{key}.npz"


def save_cached(
    cache_dir: str | os.PathLike, key: str, tables: Mapping[str, Sequence[dict]], meta: dict
) -> Path:
    """Write record tables (int lists -> arrays, other values -> JSON) atomically."""
    arrays: dict[str, np.ndarray] = {}
    meta = {**meta, "tables": {}}
    for name, records in tables.items():
        meta["tables"][name] = _pack_table(name, records, arrays)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = cache_file(cache_dir, key)
    write_file_atomic(path, lambda f: np.savez(f, **arrays))
    return path


def load_cached(
    cache_dir: str | os.PathLike, key: str
) -> tuple[dict[str, list[dict]], dict] | None:
    """(tables, meta) of a cache entry, or None when absent or unreadable."""
    path = cache_file(cache_dir, key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["__meta__"].tobytes())
            tables = {n: _unpack_table(n, spec, z) for n, spec in meta.pop("tables").items()}
    except (OSError, ValueError, KeyError):
        return None  # a damaged entry is rebuilt and overwritten
    return tables, meta


def _pack_table(name: str, records: Sequence[dict], arrays: dict[str, np.ndarray]) -> dict:
    """Flatten the int-list fields of same-shaped records; keep other fields as JSON."""
    fields = sorted(records[0]) if records else []
    spec: dict[str, Any] = {"n": len(records), "lists": [], "values": {}}
    for f in fields:
        column = [r[f] for r in records]
        if all(isinstance(v, list) for v in column):
            lengths = np.fromiter(map(len, column), dtype=np.int64, count=len(column))
            flat = [x for v in column for x in v]
            arrays[f"{name}.{f}"] = np.asarray(flat, dtype=np.int32)
            arrays[f"{name}.{f}.len"] = lengths
            spec["lists"].append(f)
        else:
            spec["values"][f] = column
    return spec


def _unpack_table(name: str, spec: dict, z: Any) -> list[dict]:
    """Rebuild records from flat arrays and JSON values."""
    records: list[dict] = [{} for _ in range(spec["n"])]
    for f in spec["lists"]:
        flat = z[f"{name}.{f}"].tolist()
        ends = np.cumsum(z[f"{name}.{f}.len"]).tolist()
        start = 0
        for r, end in zip(records, ends, strict=True):
            r[f] = flat[start:end]
            start = end
    for f, column in spec["values"].items():
        for r, v in zip(records, column, strict=True):
            r[f] = v
    return records
