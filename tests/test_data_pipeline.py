"""build_dataset on small fixtures: labels, splits, truncation, bad rows, text, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llamaforge.data.pipeline import DataSpec, build_dataset, resolve_spec
from llamaforge.data.sources import (
    EMPTY_RESPONSE,
    INVALID_UTF8,
    MISSING_FIELD,
    ROLES_OUT_OF_ORDER,
    WRONG_TYPE,
    ZERO_TRAINABLE,
    DataError,
)
from llamaforge.data.tokenizer import load_tokenizer
from llamaforge.model.llama import document_causal_mask
from llamaforge.train.batches import collate
from tests.helpers import random_model

FIX = Path(__file__).parent / "fixtures" / "data"
BAD = FIX / "bad"


@pytest.fixture(scope="module")
def tok():
    """The 200-token BPE fixture (specials <s>, </s>, <|im_start|>, <|im_end|>)."""
    return load_tokenizer(FIX / "tiny_tokenizer")


def build(path, tok, **kw):
    """build_dataset without touching the disk cache."""
    return build_dataset(str(path), tok, use_cache=False, **kw)


def trained_text(tok, example):
    """Decoded text of the tokens that carry a loss."""
    ids = [i for i, y in zip(example["input_ids"], example["labels"], strict=True) if y != -100]
    return tok.decode(ids, skip_special=False)


def all_examples(d):
    return d.train + d.validation + d.test


def test_alpaca_labels_mask_the_prompt(tok):
    d = build(FIX / "alpaca.json", tok, val_size=0, test_size=0)
    assert len(d.train) == 12 and d.validation == d.test == []
    for ex in d.train:
        assert set(ex) == {"input_ids", "labels"}
        assert len(ex["labels"]) == len(ex["input_ids"])
        assert all(y in (-100, i) for i, y in zip(ex["input_ids"], ex["labels"], strict=True))
    assert trained_text(tok, d.train[0]) == "The sum is 2.</s>"
    assert "### Instruction:\nAdd 1 and 1." in tok.decode(d.train[0]["input_ids"])
    assert "### Input:\nShow your work." in tok.decode(d.train[3]["input_ids"])


def test_messages_chatml_trains_every_answer(tok):
    d = build(FIX / "messages.jsonl", tok, val_size=0)
    assert trained_text(tok, d.train[0]) == "Hello Ann, how can I help?<|im_end|>"
    two = trained_text(tok, d.train[1])
    assert two == "Hello Bob, how can I help?<|im_end|>B O B<|im_end|>"
    assert tok.decode(d.train[1]["input_ids"], skip_special=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>"
    )


def test_sharegpt_and_dialogsum(tok):
    d = build(FIX / "sharegpt.json", tok, val_size=0)
    assert trained_text(tok, d.train[2]) == "It is 9.<|im_end|>"
    d = build(FIX / "dialogsum.csv", tok, val_size=0)
    text = tok.decode(d.train[0]["input_ids"])
    assert "### Instruct: Summarize the below conversation." in text and "#Person2#" in text
    assert trained_text(tok, d.train[0]) == "Ann greets.\n\n### End</s>"
    d = build(FIX / "dialogsum.csv", tok, val_size=0, template="chatml")
    assert "user\nSummarize the below conversation.\n\n#Person1#" in tok.decode(
        d.train[0]["input_ids"], skip_special=False
    )
    assert trained_text(tok, d.train[0]) == "Ann greets.<|im_end|>"


def test_system_prompt_and_train_on_prompt(tok):
    d = build(FIX / "alpaca.json", tok, val_size=0, template="chatml", system="Be exact.")
    assert tok.decode(d.train[0]["input_ids"], skip_special=False).startswith(
        "<|im_start|>system\nBe exact.<|im_end|>"
    )
    d = build(FIX / "alpaca.json", tok, val_size=0, train_on_prompt=True)
    assert all(ex["labels"] == ex["input_ids"] for ex in d.train)


def test_splits_are_seeded(tok):
    def ids(d):
        return [tok.decode(e["input_ids"]) for e in d.validation + d.test]

    a = build(FIX / "alpaca.json", tok, val_size=0.25, test_size=2, split_seed=1)
    assert (len(a.train), len(a.validation), len(a.test)) == (7, 3, 2)
    assert ids(a) == ids(build(FIX / "alpaca.json", tok, val_size=0.25, test_size=2, split_seed=1))
    assert ids(a) != ids(build(FIX / "alpaca.json", tok, val_size=0.25, test_size=2, split_seed=2))
    assert a.report.examples == {"train": 7, "validation": 3, "test": 2}


def test_eval_items_are_generation_prompts(tok):
    d = build(FIX / "messages.jsonl", tok, val_size=0.3, test_size=0.2)
    assert len(d.eval_items["validation"]) == len(d.validation) == 3
    assert len(d.eval_items["test"]) == len(d.test) == 2
    items = d.eval_items["validation"] + d.eval_items["test"]
    for ex, item in zip(d.validation + d.test, items, strict=True):
        assert set(item) == {"prompt_ids", "reference"}
        n = len(item["prompt_ids"])
        assert ex["input_ids"][:n] == item["prompt_ids"]  # training and inference render alike
        assert tok.decode(item["prompt_ids"], skip_special=False).endswith("assistant\n")
        rest = tok.decode(ex["input_ids"][n:], skip_special=False)
        assert rest.startswith(item["reference"] + "<|im_end|>")
    d = build(FIX / "alpaca.json", tok, val_size=2)
    item, ex = d.eval_items["validation"][0], d.validation[0]
    assert tok.decode(item["prompt_ids"]).endswith("### Response:\n")
    assert trained_text(tok, ex) == item["reference"] + "</s>"


def test_truncation_policies(tok, tmp_path):
    p = tmp_path / "long.jsonl"
    rows = [{"instruction": "Count.", "output": "one two three " * (1 + 20 * k)} for k in range(3)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    full = build(p, tok, val_size=0).train
    n = min(len(e["input_ids"]) for e in full[1:]) - 5
    right = build(p, tok, val_size=0, max_seq_len=n, truncation="right")
    assert [e["input_ids"] for e in right.train] == [e["input_ids"][:n] for e in full]
    assert right.report.truncated == 2 and trained_text(tok, right.train[1]).startswith("one two")
    left = build(p, tok, val_size=0, max_seq_len=n, truncation="left")
    assert [e["input_ids"] for e in left.train] == [e["input_ids"][-n:] for e in full]
    assert trained_text(tok, left.train[2]).endswith("three </s>")  # left cut keeps the answer
    drop = build(p, tok, val_size=0, max_seq_len=n, truncation="drop")
    assert drop.train == full[:1] and drop.report.dropped_too_long == 2


def test_left_truncation_rescues_a_long_prompt(tok):
    left = build(BAD / "too_long.jsonl", tok, val_size=0, max_seq_len=200, truncation="left")
    assert trained_text(tok, left.train[2]) == "ok</s>"
    assert len(left.train[2]["input_ids"]) == 200


BAD_FILES = [
    ("missing_field.jsonl", MISSING_FIELD, {}),
    ("wrong_type.jsonl", WRONG_TYPE, {}),
    ("roles_out_of_order.jsonl", ROLES_OUT_OF_ORDER, {}),
    ("invalid_utf8.jsonl", INVALID_UTF8, {}),
    ("invalid_utf8.csv", INVALID_UTF8, {}),
    ("empty_response.jsonl", EMPTY_RESPONSE, {}),
    ("too_long.jsonl", ZERO_TRAINABLE, {"max_seq_len": 200}),
]


@pytest.mark.parametrize(("name", "reason", "kw"), BAD_FILES)
def test_bad_row_strict_names_file_and_line(tok, name, reason, kw):
    line = 3  # every fixture's bad record starts on line 3 (the CSV's spans lines 3-4)
    with pytest.raises(DataError) as e:
        build(BAD / name, tok, val_size=0, **kw)
    assert str(e.value).startswith(f"{BAD / name}:{line}: {reason}: ")
    assert e.value.reason == reason and "lenient" in str(e.value)


@pytest.mark.parametrize(("name", "reason", "kw"), BAD_FILES)
def test_bad_row_lenient_skips_and_counts(tok, name, reason, kw):
    d = build(BAD / name, tok, val_size=0, lenient=True, **kw)
    rows = 3 if name.endswith(".csv") else 4
    assert len(d.train) == rows - 1
    assert d.report.skipped == {reason: 1}
    assert d.report.errors[0].startswith(f"{BAD / name}:")
    assert reason in d.report.summary()


def test_missing_field_hint_names_the_column_mapping(tok, tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    columns = {"instruction": "question", "output": "answer"}
    with pytest.raises(
        DataError, match=r"qa\.jsonl:2: missing field: .*maps 'output' from column 'answer'"
    ):
        build(p, tok, format="alpaca", columns=columns, val_size=0)


def test_everything_skipped_is_an_error(tok, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "i", "output": 1}\n{"instruction": "i"}\n')
    with pytest.raises(DataError, match="no training examples.*missing field 1, wrong type 1"):
        build(p, tok, val_size=0, lenient=True)


def test_text_format_concatenates_and_chunks(tok):
    d = build(FIX / "text.jsonl", tok, val_size=0.2, max_seq_len=64)
    assert all(e["labels"] == e["input_ids"] for e in all_examples(d))
    assert all(len(e["input_ids"]) == 64 for e in d.train[:-1])
    docs = [json.loads(line)["text"] for line in (FIX / "text.jsonl").read_text().splitlines()]
    seen = []
    for split in (d.train, d.validation):
        stream = [i for e in split for i in e["input_ids"]]
        seen += tok.decode(stream, skip_special=False).split("</s>")[:-1]  # eos closes each doc
    assert sorted(seen) == sorted(docs) and len(d.validation) > 0
    assert d.eval_items == {}


def test_packing_through_the_pipeline(tok):
    plain = build(FIX / "messages.jsonl", tok, val_size=0, max_seq_len=128)
    packed = build(FIX / "messages.jsonl", tok, val_size=0, max_seq_len=128, packing=True)
    assert len(packed.train) < len(plain.train)
    assert packed.report.examples["train"] == 10 and packed.report.sequences["train"] == len(
        packed.train
    )
    for row in packed.train:
        assert set(row) == {"input_ids", "labels", "positions", "doc_ids"}
        starts = [k for k, p in enumerate(row["positions"]) if p == 0]
        assert all(row["labels"][k] == -100 for k in starts)
    assert sum(len(r["input_ids"]) for r in packed.train) == sum(
        len(e["input_ids"]) for e in plain.train
    )


def test_limit_and_val_path(tok, tmp_path):
    d = build(FIX / "alpaca.json", tok, limit=5, val_size=0)
    assert len(d.train) == 5 and d.report.rows == 5
    val = tmp_path / "val.jsonl"
    val.write_text('{"instruction": "Hi.", "output": "Hello."}\n' * 3)
    d = build(FIX / "alpaca.json", tok, val_path=str(val), val_size=0.5)
    assert len(d.train) == 12 and len(d.validation) == 3  # validation comes from val_path only
    assert d.report.splits_from_source == ["validation"]


def test_dataset_dict_keeps_its_test_split(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = json.loads((FIX / "alpaca.json").read_text())
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:10]),
            "test": datasets.Dataset.from_list(rows[10:]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    d = build(tmp_path / "dd", tok, val_size=2, test_size=0.5)
    assert (len(d.train), len(d.validation), len(d.test)) == (8, 2, 2)
    assert "The sum is 22." in tok.decode(d.test[0]["input_ids"])


def test_config_objects_and_overrides(tok):
    from llamaforge.config import DataConfig

    cfg = DataConfig(path=str(FIX / "alpaca.json"), val_size=0.0, max_seq_len=256)
    spec = resolve_spec(cfg, packing=True)
    assert isinstance(spec, DataSpec) and spec.packing and spec.max_seq_len == 256
    d = build_dataset(cfg, tok, use_cache=False)
    assert len(d.train) == 12
    with pytest.raises(TypeError, match="max_len"):
        resolve_spec(cfg, max_len=3)


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"truncation": "middle"}, "data.truncation"),
        ({"template": "nope"}, "data.template"),
        ({"format": "csv"}, "data.format"),
        ({"format": "chitchat_topic"}, "data.format"),
    ],
)
def test_bad_settings_name_the_key(tok, kw, key):
    with pytest.raises(DataError, match=key.replace(".", r"\.")):
        build(FIX / "alpaca.json", tok, **kw)


def _loss_sum(model, batch):
    """Summed shift-by-one cross entropy of a collated batch (packed rows use their mask)."""
    kw = {}
    if "doc_ids" in batch:
        kw = {"positions": batch["positions"], "mask": document_causal_mask(batch["doc_ids"])}
    logits = model(batch["input_ids"], **kw)  # (B, T, V)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum"
    )


def test_packed_and_plain_batches_give_the_same_loss(tok):
    """Through the training loop's collate: packing changes the layout, not the loss."""
    model = random_model("tiny-llama3")
    plain = build(FIX / "messages.jsonl", tok, val_size=0, max_seq_len=128)
    packed = build(FIX / "messages.jsonl", tok, val_size=0, max_seq_len=128, packing=True)
    with torch.no_grad():
        a = _loss_sum(model, collate(plain.train, tok.pad_id))
        b = _loss_sum(model, collate(packed.train, tok.pad_id))
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-5)
    assert packed.report.trainable_tokens == plain.report.trainable_tokens


def _chat_rows(n: int) -> list[str]:
    """n chat rows; every 97th has a non-string answer, every 89th is far too long."""
    lines = []
    for i in range(n):
        answer = 7 if i % 97 == 5 else f"answer {i} " + ("x y " * 300 if i % 89 == 3 else "")
        msgs = [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": answer},
        ]
        lines.append(json.dumps({"messages": msgs}))
    return lines


def test_worker_processes_build_exactly_what_one_process_builds(tok, tmp_path, monkeypatch):
    import concurrent.futures
    import pickle

    from llamaforge.data import pipeline
    from llamaforge.data.sources import BadRow

    p = tmp_path / "chat.jsonl"
    p.write_text("\n".join(_chat_rows(700)) + "\n")
    pools = []
    real_pool = concurrent.futures.ProcessPoolExecutor
    monkeypatch.setattr(
        pipeline.concurrent.futures,
        "ProcessPoolExecutor",
        lambda *a, **k: pools.append(a) or real_pool(*a, **k),
    )
    monkeypatch.setattr(pipeline.threading, "active_count", lambda: 1)  # other tests' threads
    kw = {"template": "chatml", "max_seq_len": 200, "truncation": "drop", "lenient": True}
    one = build(p, tok, num_workers=1, **kw)
    assert not pools
    two = build(p, tok, num_workers=2, **kw)
    assert pools == [(2,)]
    assert (one.train, one.validation, one.test) == (two.train, two.validation, two.test)
    assert one.eval_items == two.eval_items and one.report == two.report
    assert one.report.skipped == {WRONG_TYPE: 8} and one.report.dropped_too_long == 8
    # strict: the first bad row in file order is the one reported, from any worker
    with pytest.raises(DataError, match=r"chat\.jsonl:6: wrong type"):
        build(p, tok, num_workers=2, **{**kw, "lenient": False})
    # the errors that cross process boundaries survive pickling
    e = pickle.loads(pickle.dumps(DataError("f.jsonl:3", "bad", "why")))
    assert (str(e), e.where, e.reason, e.detail) == (
        "f.jsonl:3: bad: why",
        "f.jsonl:3",
        "bad",
        "why",
    )
    b = pickle.loads(pickle.dumps(BadRow(WRONG_TYPE, "x", field="output")))
    assert (b.reason, b.detail, b.field) == (WRONG_TYPE, "x", "output")


def test_the_number_of_workers_is_not_part_of_the_cache_key(tok):
    from llamaforge.data.cache import cache_key
    from llamaforge.data.pipeline import _key_parts

    keys = {
        cache_key(_key_parts(resolve_spec(str(FIX / "alpaca.json"), num_workers=n), tok))
        for n in (1, 4)
    }
    assert len(keys) == 1


def test_no_worker_processes_beside_other_python_threads():
    import threading

    from llamaforge.data.pipeline import _workers

    spec = resolve_spec("x.jsonl", num_workers=4)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert _workers(spec, 10_000) == 1
    finally:
        stop.set()
        other.join()
    assert _workers(spec, 100) == 1  # small sources stay in this process
