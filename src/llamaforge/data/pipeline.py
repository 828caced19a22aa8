"""From a data spec to tokenized train/validation/test examples (cached on disk).

Flow: read rows (``sources`` / ``chitchat``) -> seeded split -> per row: check and convert
(``formats``), render to ids + loss mask (``templates``), truncate -> optional packing
(``pack``). The result is cached (``cache``): a second run with the same inputs reads it back.

Examples are ``{"input_ids", "labels"}`` (labels = input_ids where the loss mask is 1, else
-100; the loss at t predicts labels[t+1]); packed rows add ``positions`` and ``doc_ids``.

Truncation policy (``truncation``), for examples longer than ``max_seq_len``:

- ``right``: cut the end (the tail of the answer is lost);
- ``left``: cut the beginning (keeps the answer; the start of the prompt is lost);
- ``drop``: skip the example (counted in the report as dropped, not an error).

An example left with zero trainable tokens is a bad row. Bad rows (missing field, wrong type,
roles out of order, invalid UTF-8, empty response, zero trainable tokens, ...) stop the run
with ``file:line: reason: detail`` (strict, the default) or, with ``lenient``, are skipped and
counted per reason in the report. Nothing is dropped silently.

Splits: rows a source marks as test/validation (chitchat's benchmark split, a DatasetDict's
splits, ``val_path``) keep them; the others are shuffled with ``split_seed`` and cut into
test (``test_size``) and validation (``val_size``): a fraction of the rows if < 1, else a
count. ``limit`` keeps the first rows of the source. Validation and test rows also give
``eval_items`` ({"prompt_ids", "reference"}) for generation metrics.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import random
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DataConfig
from . import chitchat, formats, pack, preference, sources
from .cache import (
    cache_file,
    cache_key,
    default_cache_dir,
    files_fingerprint,
    load_cached,
    save_cached,
    tokenizer_fingerprint,
)
from .formats import SUMMARIZE_REQUEST, Alpaca, Chat, Dialogue, Sample, Text
from .preference import PAIR_SETTINGS, Preference, pair_sequences, tokenize_pair
from .sources import ZERO_TRAINABLE, BadRow, DataError, Row
from .templates import (
    TemplateError,
    get_chat_format,
    render_alpaca,
    render_conversation,
    render_instruct,
)
from .tokenizer import Tokenizer

# One source of truth for the data settings: the config's `data:` section.
DataSpec = DataConfig

Example = dict[str, list[int]]
EvalItem = dict[str, Any]
SPLITS = ("train", "validation", "test")
IGNORE = -100
MAX_LISTED_ERRORS = 20
_NATIVE_TEMPLATES = (None, "", "auto")


@dataclass
class DataReport:
    """What loading did: counts per split, skipped rows per reason, truncation, cache use."""

    source: str
    format: str
    rows: int = 0
    examples: dict[str, int] = field(default_factory=dict)
    sequences: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    trainable_tokens: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    dropped_too_long: int = 0
    errors: list[str] = field(default_factory=list)
    splits_from_source: list[str] = field(default_factory=list)
    from_cache: bool = False
    cache_path: str | None = None

    def summary(self) -> str:
        """A few lines for the trainer's log."""
        per = ", ".join(f"{s} {self.examples.get(s, 0)}" for s in SPLITS)
        lines = [f"data {self.source} ({self.format}): {self.rows} rows -> examples: {per}"]
        if self.sequences != self.examples:
            lines.append(
                "  sequences: " + ", ".join(f"{s} {self.sequences.get(s, 0)}" for s in SPLITS)
            )
        lines.append(
            f"  tokens: train {self.tokens.get('train', 0)} "
            f"(trainable {self.trainable_tokens.get('train', 0)})"
        )
        if self.truncated or self.dropped_too_long:
            lines.append(
                f"  truncated {self.truncated}, dropped as too long {self.dropped_too_long}"
            )
        for title, counts in (("skipped bad rows", self.skipped), ("filtered", self.filtered)):
            if counts:
                lines.append(
                    f"  {title}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                )
        lines += [f"    {e}" for e in self.errors[:5]]
        if self.from_cache:
            lines.append(f"  (from cache {self.cache_path})")
        return "\n".join(lines)


@dataclass
class DatasetSplits:
    """Tokenized examples per split, eval items for generation metrics, and the report."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    report: DataReport
    eval_items: dict[str, list[EvalItem]] = field(default_factory=dict)


def build_dataset(
    spec: Any,
    tok: Tokenizer,
    *,
    use_cache: bool = True,
    **overrides: Any,
) -> DatasetSplits:
    """Read, check, split, tokenize, truncate and pack a dataset (reusing the disk cache).

    ``spec`` is a path, a mapping, or any object with DataSpec's attributes (e.g. the
    config's ``data`` section); keyword overrides (max_seq_len=..., packing=...) win.
    """
    s = resolve_spec(spec, **overrides)
    check_spec(s, tok)
    if not use_cache:
        return _build(s, tok)
    cache_dir = Path(s.cache_dir) if s.cache_dir else default_cache_dir()
    key = cache_key(_key_parts(s, tok))
    hit = load_cached(cache_dir, key)
    if hit is not None:
        return _from_tables(*hit, cache_file(cache_dir, key))
    splits = _build(s, tok)
    path = save_cached(cache_dir, key, *_to_tables(splits))
    splits.report.cache_path = str(path)
    return splits


def resolve_spec(spec: Any, **overrides: Any) -> DataSpec:
    """A DataSpec from a path, mapping or config object, with non-None overrides applied."""
    names = [f.name for f in dataclasses.fields(DataSpec)]
    if isinstance(spec, str | os.PathLike):
        values: dict[str, Any] = {"path": str(spec)}
    elif isinstance(spec, Mapping):
        unknown = set(spec) - set(names)
        if unknown:
            raise TypeError(f"unknown data setting(s): {', '.join(sorted(unknown))}")
        values = dict(spec)
    else:
        values = {n: getattr(spec, n) for n in names if hasattr(spec, n)}
    unknown = set(overrides) - set(names)
    if unknown:
        raise TypeError(f"unknown data setting(s): {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["columns"] = dict(values.get("columns") or {})
    return DataSpec(**values)


def check_spec(s: DataSpec, tok: Tokenizer) -> None:
    """Reject settings that would fail on every row, naming the config key."""
    if s.truncation not in ("right", "left", "drop"):
        raise DataError("data.truncation", "invalid", f"{s.truncation!r}; use right, left or drop")
    if s.max_seq_len < 2:
        raise DataError("data.max_seq_len", "invalid", f"{s.max_seq_len}; must be at least 2")
    if s.packing and s.format == "preference":
        raise DataError("data.packing", "invalid", "preference pairs are not packed")
    known = (*formats.FORMATS, *chitchat.ALL_TASKS)
    if s.format not in known:
        raise DataError("data.format", "unknown format", f"{s.format!r}; use one of {known}")
    if (s.path == chitchat.NAME) != (s.format in chitchat.ALL_TASKS):
        raise DataError(
            "data.format",
            "mismatch",
            "data.path: chitchat goes with data.format: chitchat_topic, chitchat_chat, "
            "chitchat_next_turn or chitchat_ratings (and those formats only with the "
            "built-in chitchat data)",
        )
    if s.template not in _NATIVE_TEMPLATES:
        try:
            get_chat_format(s.template, tok)
        except TemplateError as e:
            raise DataError("data.template", "invalid", str(e)) from None


def _key_parts(s: DataSpec, tok: Tokenizer) -> dict[str, Any]:
    """Everything that changes the result: files, tokenizer, code and settings."""
    settings = dataclasses.asdict(s)
    settings.pop("cache_dir")
    settings.pop("num_workers")  # how many processes build it does not change the result
    paths = [chitchat.chitchat_path()] if s.path == chitchat.NAME else [s.path]
    if s.val_path:
        paths.append(s.val_path)
    files = [f for p in paths for f in sources.source_files(p)]
    return {
        "settings": settings,
        "files": files_fingerprint(files),
        "tokenizer": tokenizer_fingerprint(tok),
        "code": files_fingerprint(_code_files()),
    }


def _code_files() -> list[Path]:
    """Source files whose behaviour shapes the cached tokens."""
    from . import templates, tokenizer

    modules = (sources, formats, chitchat, pack, preference, templates, tokenizer)
    return [Path(m.__file__) for m in modules] + [Path(__file__)]


# ---------------------------------------------------------------- building


def _build(s: DataSpec, tok: Tokenizer) -> DatasetSplits:
    """Build every split from the source (no cache)."""
    rows, fmt, filtered = load_rows(s)
    shown = s.format if s.format in chitchat.ALL_TASKS else fmt
    report = DataReport(source=s.path, format=shown, rows=len(rows), filtered=dict(filtered))
    report.splits_from_source = sorted({r.split for r in rows if r.split})
    assignment = assign_splits(rows, s.val_size, s.test_size, s.split_seed)
    if fmt == "text":
        splits = _build_text(rows, assignment, s, tok, report)
    else:
        splits = _build_examples(rows, assignment, fmt, s, tok, report)
    if not splits.train:
        raise DataError(s.path, "no training examples", _why_empty(report))
    _count(splits, report)
    return splits


def load_rows(s: DataSpec) -> tuple[list[Row], str, Counter]:
    """Rows of the source (and val_path), the resolved format, and filtered-row counts."""
    filtered: Counter = Counter()
    if s.path == chitchat.NAME and s.format in chitchat.PAIR_TASKS:
        rows, filtered = chitchat.read_pairs(s.format, seed=s.split_seed)
        fmt = "preference"
    elif s.path == chitchat.NAME:
        rows, filtered = chitchat.read_chitchat(s.format, max_words=s.max_words)
        fmt = "messages"
    else:
        rows = sources.read_rows(s.path, columns=s.columns)
        fmt = s.format
    rows = rows[: s.limit] if s.limit else rows
    if s.val_path:
        extra = sources.read_rows(s.val_path, columns=s.columns)
        rows += [dataclasses.replace(r, split="validation") for r in extra[: s.limit or None]]
    if fmt == "auto":
        fmt = formats.detect_format(rows)
    return rows, fmt, filtered


def assign_splits(rows: list[Row], val_size: float, test_size: float, seed: int) -> list[str]:
    """Split name per row: a source's own split, else a seeded shuffle cut into test/val/train."""
    out = [r.split or "train" for r in rows]
    free = [i for i, r in enumerate(rows) if r.split is None]
    random.Random(seed).shuffle(free)
    preset = {r.split for r in rows}
    n_test = 0 if "test" in preset else _size(test_size, len(free), "data.test_size")
    n_val = 0 if "validation" in preset else _size(val_size, len(free), "data.val_size")
    if free and n_test + n_val >= len(free):
        raise DataError(
            "data.val_size",
            "too large",
            f"validation {n_val} + test {n_test} of {len(free)} rows leave nothing to train on",
        )
    for k, i in enumerate(free[: n_test + n_val]):
        out[i] = "test" if k < n_test else "validation"
    return out


def _size(size: float | None, n: int, key: str) -> int:
    """Rows for a split: a fraction of n (at least 1 when > 0) or a count."""
    if not size:
        return 0
    if size < 0:
        raise DataError(key, "invalid", f"{size}; must be >= 0")
    if size < 1:
        return max(1, round(size * n)) if n > 1 else 0
    return int(size)


def _build_examples(
    rows: list[Row],
    assignment: list[str],
    fmt: str,
    s: DataSpec,
    tok: Tokenizer,
    report: DataReport,
) -> DatasetSplits:
    """Convert, render, truncate (and pack) every row into its split."""
    out: dict[str, list[Example]] = {name: [] for name in SPLITS}
    evals: dict[str, list[EvalItem]] = {"validation": [], "test": []}
    results = _row_results(rows, assignment, fmt, s, tok)
    for row, split, result in zip(rows, assignment, results, strict=True):
        if isinstance(result, BadRow):
            _bad_row(row, result, s, report)  # in row order: strict mode stops at the first
        elif result is None:
            report.dropped_too_long += 1
        else:
            example, truncated, item = result
            if item is not None:
                evals[split].append(item)
            report.truncated += truncated
            out[split].append(example)
    if s.packing:
        out = {name: pack.pack_examples(ex, s.max_seq_len) for name, ex in out.items()}
    return DatasetSplits(out["train"], out["validation"], out["test"], report, evals)


PARALLEL_MIN_ROWS = 512  # fewer rows are built in this process (forking costs more)
MAX_WORKERS = 8
_JOB: tuple | None = None  # what forked workers read: (rows, assignment, fmt, spec, tokenizer)


def _row_result(
    row: Row, split: str, fmt: str, s: DataSpec, tok: Tokenizer
) -> tuple[Example, bool, EvalItem | None] | BadRow | None:
    """One row rendered and tokenized: (example, truncated, eval item), its BadRow, or None
    when it is too long under truncation: drop."""
    try:
        sample = _sample(row, fmt, s)
        done = tokenize_sample(sample, tok, s)
        if done is None:
            return None
        evaluated = split in ("validation", "test") and not isinstance(sample, Preference)
        return done[0], done[1], eval_item(sample, tok, s) if evaluated else None
    except BadRow as e:
        return e


def _row_results(
    rows: list[Row], assignment: list[str], fmt: str, s: DataSpec, tok: Tokenizer
) -> Iterable[tuple[Example, bool, EvalItem | None] | BadRow | None]:
    """Every row's result in row order, from `data.num_workers` forked processes when the
    source is large enough (the jinja chat templates make rendering the slow part: each
    conversation renders its growing prefixes), else here."""
    workers = _workers(s, len(rows))
    if workers <= 1:
        return (_row_result(r, a, fmt, s, tok) for r, a in zip(rows, assignment, strict=True))
    global _JOB
    _JOB = (rows, assignment, fmt, s, tok)
    step = -(-len(rows) // (workers * 4))  # a few chunks per worker evens out their lengths
    bounds = [(a, min(a + step, len(rows))) for a in range(0, len(rows), step)]
    try:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            parts = list(pool.map(_chunk_results, bounds))
    finally:
        _JOB = None
    return [r for part in parts for r in part]


def _chunk_results(
    bounds: tuple[int, int],
) -> list[tuple[Example, bool, EvalItem | None] | BadRow | None]:
    """A forked worker's share: rows[a:b] of the job its parent left in _JOB."""
    assert _JOB is not None
    rows, assignment, fmt, s, tok = _JOB
    return [_row_result(rows[i], assignment[i], fmt, s, tok) for i in range(*bounds)]


def _workers(s: DataSpec, n_rows: int) -> int:
    """Processes for n_rows: data.num_workers, else one per core up to MAX_WORKERS; 1 for
    small sources, where fork is unavailable, and in a process running other Python threads
    (a forked child would inherit their held locks)."""
    if n_rows < PARALLEL_MIN_ROWS or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    if threading.active_count() > 1:
        return 1
    if s.num_workers is not None:
        return s.num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_WORKERS, cores or 1))


def _sample(row: Row, fmt: str, s: DataSpec) -> Sample:
    """A row's sample, raising the error found while reading it."""
    if row.error is not None:
        raise row.error
    return formats.to_sample(row.data, fmt, text_key=s.text_key)


def _bad_row(row: Row, e: BadRow, s: DataSpec, report: DataReport) -> None:
    """Strict: raise ``file:line: reason: detail``. Lenient: count it and keep the message."""
    detail = e.detail + _hint(e, s)
    if not s.lenient:
        raise DataError(row.where, e.reason, detail + " (set data.lenient: true to skip bad rows)")
    report.skipped[e.reason] = report.skipped.get(e.reason, 0) + 1
    if len(report.errors) < MAX_LISTED_ERRORS:
        report.errors.append(str(DataError(row.where, e.reason, detail)))


def _hint(e: BadRow, s: DataSpec) -> str:
    """What to change, for errors a setting can fix."""
    if e.field and e.field in s.columns:
        return f" (data.columns maps {e.field!r} from column {s.columns[e.field]!r})"
    if e.reason == ZERO_TRAINABLE:
        return "; raise data.max_seq_len or use data.truncation: left"
    return ""


def _why_empty(report: DataReport) -> str:
    """Why no training example is left."""
    if report.skipped:
        return "every row was skipped: " + ", ".join(
            f"{k} {v}" for k, v in sorted(report.skipped.items())
        )
    if report.dropped_too_long:
        return f"{report.dropped_too_long} rows were longer than max_seq_len (truncation: drop)"
    return "the source has no rows for the training split"


# ---------------------------------------------------------------- one example


def tokenize_sample(sample: Sample, tok: Tokenizer, s: DataSpec) -> tuple[Example, bool] | None:
    """(example, was truncated) for one sample; None when too long under truncation=drop."""
    if isinstance(sample, Preference):
        return tokenize_pair(sample, tok, **{k: getattr(s, k) for k in PAIR_SETTINGS})
    ids, mask = render_sample(sample, tok, s.template, s.system)
    if sum(mask) == 0:
        raise BadRow(ZERO_TRAINABLE, "the rendered example has no tokens to learn")
    truncated = len(ids) > s.max_seq_len
    if truncated:
        if s.truncation == "drop":
            return None
        cut = slice(None, s.max_seq_len) if s.truncation == "right" else slice(-s.max_seq_len, None)
        ids, mask = ids[cut], mask[cut]
        if sum(mask) == 0:
            raise BadRow(
                ZERO_TRAINABLE,
                f"{len(ids)} of its tokens remain after {s.truncation} truncation to "
                f"max_seq_len={s.max_seq_len} and none is part of the answer",
            )
    labels = [i if m or s.train_on_prompt else IGNORE for i, m in zip(ids, mask, strict=True)]
    return {"input_ids": ids, "labels": labels}, truncated


def render_sample(
    sample: Sample, tok: Tokenizer, template: str | None = "auto", system: str | None = None
) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a sample: Alpaca/DialogSum natively unless a chat template is set."""
    try:
        if isinstance(sample, Alpaca) and template in (*_NATIVE_TEMPLATES, "alpaca"):
            return render_alpaca(tok, sample.instruction, sample.input, sample.output)
        if isinstance(sample, Dialogue) and template in (*_NATIVE_TEMPLATES, "dialogsum"):
            return render_instruct(tok, sample.dialogue, sample.summary)
        return render_conversation(tok, as_messages(sample, system), template or "auto")
    except TemplateError as e:
        raise BadRow(sources.INVALID_CONVERSATION, str(e)) from None


def eval_item(sample: Sample, tok: Tokenizer, s: DataSpec) -> EvalItem:
    """The generation prompt (as inference renders it) and the reference answer."""
    try:
        ids = _prompt_ids(sample, tok, s.template, s.system)
    except TemplateError as e:
        raise BadRow(sources.INVALID_CONVERSATION, str(e)) from None
    return {"prompt_ids": ids[-s.max_seq_len :], "reference": reference(sample)}


def _prompt_ids(
    sample: Sample, tok: Tokenizer, template: str | None, system: str | None
) -> list[int]:
    """Prompt ids without the answer, ending where the model starts to answer."""
    if isinstance(sample, Alpaca) and template in (*_NATIVE_TEMPLATES, "alpaca"):
        return render_alpaca(tok, sample.instruction, sample.input, None)[0]
    if isinstance(sample, Dialogue) and template in (*_NATIVE_TEMPLATES, "dialogsum"):
        return render_instruct(tok, sample.dialogue, None)[0]
    history = as_messages(sample, system)[:-1]
    return render_conversation(tok, history, template or "auto", add_generation_prompt=True)[0]


def as_messages(sample: Sample, system: str | None = None) -> list[dict[str, str]]:
    """A sample as chat messages (user prompt, assistant answer), with an optional system."""
    if isinstance(sample, Chat):
        messages = [dict(m) for m in sample.messages]
    elif isinstance(sample, Alpaca):
        user = f"{sample.instruction}\n\n{sample.input}" if sample.input else sample.instruction
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": sample.output},
        ]
    elif isinstance(sample, Dialogue):
        user = f"{SUMMARIZE_REQUEST}\n\n{sample.dialogue}"
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": sample.summary},
        ]
    else:
        raise TypeError(f"{type(sample).__name__} has no chat form")
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def reference(sample: Sample) -> str:
    """The answer text a generation is scored against."""
    if isinstance(sample, Chat):
        return sample.messages[-1]["content"]
    if isinstance(sample, Alpaca):
        return sample.output
    if isinstance(sample, Dialogue):
        return sample.summary
    raise TypeError(f"{type(sample).__name__} has no reference answer")


# ---------------------------------------------------------------- raw text


def _build_text(
    rows: list[Row], assignment: list[str], s: DataSpec, tok: Tokenizer, report: DataReport
) -> DatasetSplits:
    """Continued pretraining: documents joined with eos, cut into max_seq_len rows, all learned."""
    streams: dict[str, list[int]] = {name: [] for name in SPLITS}
    for row, split in zip(rows, assignment, strict=True):
        try:
            sample = _sample(row, "text", s)
        except BadRow as e:
            _bad_row(row, e, s, report)
            continue
        streams[split] += tokenize_text(sample, tok)
    out = {name: chunk_stream(ids, s.max_seq_len) for name, ids in streams.items()}
    return DatasetSplits(out["train"], out["validation"], out["test"], report, {})


def tokenize_text(sample: Text, tok: Tokenizer) -> list[int]:
    """A document's ids: bos when the tokenizer adds one, the text, then eos."""
    return tok.encode(sample.text, bos=bool(getattr(tok, "add_bos", False)), eos=True)


def chunk_stream(ids: list[int], max_seq_len: int) -> list[Example]:
    """Consecutive rows of max_seq_len tokens (a last shorter row is kept if >= 2 tokens)."""
    chunks = [ids[i : i + max_seq_len] for i in range(0, len(ids), max_seq_len)]
    return [{"input_ids": c, "labels": list(c)} for c in chunks if len(c) >= 2]


# ---------------------------------------------------------------- report and cache tables


def _count(splits: DatasetSplits, report: DataReport) -> None:
    """Fill per-split example, sequence and token counts (a pair counts both sequences)."""
    for name in SPLITS:
        examples = getattr(splits, name)
        report.sequences[name] = len(examples)
        if examples and "prompt_ids" in examples[0]:
            report.examples[name] = len(examples)
            examples = [seq for e in examples for seq in pair_sequences(e)]
        elif examples and "doc_ids" in examples[0]:
            report.examples[name] = sum(max(e["doc_ids"]) + 1 for e in examples)
        else:
            report.examples[name] = len(examples)
        report.tokens[name] = sum(len(e["input_ids"]) for e in examples)
        report.trainable_tokens[name] = sum(
            sum(1 for x in e["labels"][1:] if x != IGNORE) for e in examples
        )


def _to_tables(splits: DatasetSplits) -> tuple[dict[str, list[dict]], dict]:
    """Cache tables (examples and eval items per split) and metadata (the report)."""
    tables: dict[str, list[dict]] = {name: getattr(splits, name) for name in SPLITS}
    tables |= {f"eval.{name}": items for name, items in splits.eval_items.items()}
    return tables, {"report": dataclasses.asdict(splits.report), "eval": list(splits.eval_items)}


def _from_tables(tables: dict[str, list[dict]], meta: dict, path: Path) -> DatasetSplits:
    """DatasetSplits from a cache entry."""
    report = DataReport(**meta["report"])
    report.from_cache, report.cache_path = True, str(path)
    evals = {name: tables[f"eval.{name}"] for name in meta["eval"]}
    return DatasetSplits(tables["train"], tables["validation"], tables["test"], report, evals)
