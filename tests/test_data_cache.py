"""The tokenized-data cache: a second run does not tokenize; any input change does."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from llamaforge.data import pipeline
from llamaforge.data.cache import (
    default_cache_dir,
    load_cached,
    save_cached,
    tokenizer_fingerprint,
)
from llamaforge.data.pipeline import build_dataset
from llamaforge.data.tokenizer import load_tokenizer

FIX = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture
def tok():
    """A fresh tiny tokenizer (tests below modify their copy)."""
    return load_tokenizer(FIX / "tiny_tokenizer")


@pytest.fixture
def calls(monkeypatch):
    """Count calls of the per-example tokenize function."""
    counter = {"n": 0}
    real = pipeline.tokenize_sample

    def counting(*args, **kwargs):
        counter["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "tokenize_sample", counting)
    return counter


def _run(path, tok, cache, **kw):
    return build_dataset(str(path), tok, cache_dir=str(cache), **kw)


def _same(a, b):
    return (a.train, a.validation, a.test, a.eval_items) == (
        b.train,
        b.validation,
        b.test,
        b.eval_items,
    )


def test_second_run_reads_the_cache(tok, tmp_path, calls):
    first = _run(FIX / "messages.jsonl", tok, tmp_path, val_size=0.3, test_size=0.2, packing=True)
    assert calls["n"] == 10 and not first.report.from_cache
    second = _run(FIX / "messages.jsonl", tok, tmp_path, val_size=0.3, test_size=0.2, packing=True)
    assert calls["n"] == 10 and second.report.from_cache
    assert _same(first, second) and second.eval_items["test"]
    assert second.report.examples == first.report.examples
    assert second.report.cache_path == first.report.cache_path
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]  # no temporary files left


@pytest.mark.parametrize(
    "change",
    [
        {"max_seq_len": 64},
        {"template": "alpaca"},
        {"train_on_prompt": True},
        {"truncation": "left"},
        {"split_seed": 3},
        {"val_size": 0.2},
        {"system": "Be brief."},
        {"packing": True},
    ],
)
def test_any_setting_change_retokenizes(tok, tmp_path, calls, change):
    _run(FIX / "messages.jsonl", tok, tmp_path, lenient=True)
    n = calls["n"]
    again = _run(FIX / "messages.jsonl", tok, tmp_path, lenient=True, **change)
    assert calls["n"] > n and not again.report.from_cache


def test_source_change_retokenizes(tok, tmp_path, calls):
    data = tmp_path / "data.jsonl"
    shutil.copy(FIX / "messages.jsonl", data)
    _run(data, tok, tmp_path / "cache")
    data.write_text(data.read_text().replace("Ann", "Ana"))
    d = _run(data, tok, tmp_path / "cache")
    assert calls["n"] == 20 and not d.report.from_cache
    assert "Ana" in tok.decode(d.train[0]["input_ids"] + d.validation[0]["input_ids"])


def test_tokenizer_change_retokenizes(tok, tmp_path, calls):
    _run(FIX / "messages.jsonl", tok, tmp_path)
    other = load_tokenizer(FIX / "tiny_tokenizer")
    assert tokenizer_fingerprint(other) == tokenizer_fingerprint(tok)
    assert _run(FIX / "messages.jsonl", other, tmp_path).report.from_cache
    other.backend.add_tokens(["Bob"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    assert not _run(FIX / "messages.jsonl", other, tmp_path).report.from_cache
    templated = load_tokenizer(FIX / "tiny_tokenizer")
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tokenizer_fingerprint(templated) != tokenizer_fingerprint(tok)


def test_fingerprint_without_a_backend(tok):
    class Plain:  # only the public Tokenizer attributes
        vocab_size, bos_id, eos_id, pad_id = tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id
        special_tokens, stop_ids, chat_template = tok.special_tokens, tok.stop_ids, None
        encode, decode = tok.encode, tok.decode

    a = tokenizer_fingerprint(Plain())
    assert a == tokenizer_fingerprint(Plain()) and len(a) == 32


def test_damaged_entry_is_rebuilt(tok, tmp_path, calls):
    first = _run(FIX / "alpaca.json", tok, tmp_path)
    Path(first.report.cache_path).write_bytes(b"not a zip")
    again = _run(FIX / "alpaca.json", tok, tmp_path)
    assert calls["n"] == 24 and _same(first, again)
    assert _run(FIX / "alpaca.json", tok, tmp_path).report.from_cache


def test_entries_are_plain_arrays(tmp_path):
    tables = {
        "t": [
            {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "name": "x"},
            {"input_ids": [], "labels": [], "name": "y"},
        ]
    }
    path = save_cached(tmp_path, "k", tables, {"note": 1})
    with np.load(path, allow_pickle=False) as z:  # no pickled objects inside
        assert z["t.input_ids"].dtype == np.int32
    loaded, meta = load_cached(tmp_path, "k")
    assert loaded == tables and meta == {"note": 1}
    assert load_cached(tmp_path, "missing") is None


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "llamaforge" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "llamaforge" / "data"
