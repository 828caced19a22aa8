"""Built-in chitchat dataset: turn merging, speaker labels, the 350-word cut, the sha256 split."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from llamaforge.data import chitchat
from llamaforge.data.chitchat import (
    TOPIC_QUESTION,
    benchmark_split,
    chitchat_path,
    read_chitchat,
)
from llamaforge.data.pipeline import build_dataset
from llamaforge.data.tokenizer import load_tokenizer

FIX = Path(__file__).parent / "fixtures" / "data"
SMALL = FIX / "chitchat_small.json"


def _dialogue(row):
    """The dialogue text inside a topic row's question."""
    user = row.data["messages"][0]["content"]
    head, tail = TOPIC_QUESTION.split("{dialogue}")
    assert user.startswith(head) and user.endswith(tail)
    return user[len(head) : -len(tail)]


def test_topic_rows():
    rows, filtered = read_chitchat("chitchat_topic", SMALL)
    assert [r.where.rsplit("[", 1)[1] for r in rows] == ["conv-001]", "conv-004]", "conv-033]"]
    assert dict(filtered) == {"no prompt (topic)": 2}
    first = rows[0]
    assert _dialogue(first) == "A: Hi how are you?\nB: Good you?\nA:    Fine thanks"
    assert first.data["messages"][1] == {
        "role": "assistant",
        "content": "What's your favorite smell?",
    }
    assert _dialogue(rows[1]) == "A: anyone there?"


def test_topic_dialogue_is_cut_to_350_words_and_third_sender_is_a():
    rows, _ = read_chitchat("chitchat_topic", SMALL)
    text = _dialogue(rows[2])
    assert len(text.split(" ")) == 350
    lines = text.split("\n")
    assert lines[0].startswith("A: w0 w1") and lines[1].startswith("B: w200")
    assert lines[2].startswith("A: w300") and text.endswith("w348")  # labels ride on words


def test_chat_rows_alternate_merged_turns():
    rows, filtered = read_chitchat("chitchat_chat", SMALL)
    assert dict(filtered) == {"fewer than two speakers": 1}
    by_id = {r.where.rsplit("[", 1)[1][:-1]: r.data["messages"] for r in rows}
    assert by_id["conv-001"] == [  # empty turn dropped, same-sender turns merged, last user cut
        {"role": "user", "content": "Hi how are you?"},
        {"role": "assistant", "content": "Good you?"},
    ]
    assert by_id["conv-002"] == [
        {"role": "user", "content": "yo"},
        {"role": "assistant", "content": "hey"},
    ]
    roles = [m["role"] for m in by_id["conv-033"]]
    assert roles == ["user", "assistant"]  # the third sender (A again) ends as a trailing user


def test_benchmark_split():
    assert benchmark_split("conv-033") == "test" and benchmark_split("conv-001") is None
    for key in ("a", "b", "conv-155", "0004441d-0390-4033-a321-6fef32ed7ddb"):
        bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100
        assert (benchmark_split(key) == "test") == (bucket < 5)
    rows, _ = read_chitchat("chitchat_topic", SMALL)
    assert [r.split for r in rows] == [None, None, "test"]


def test_build_topic_dataset(monkeypatch, tmp_path):
    monkeypatch.setattr(chitchat, "chitchat_path", lambda: SMALL)
    tok = load_tokenizer(FIX / "tiny_tokenizer")
    d = build_dataset(
        "chitchat",
        tok,
        format="chitchat_topic",
        val_size=0,
        max_seq_len=4096,
        cache_dir=str(tmp_path),
    )
    assert (len(d.train), len(d.test)) == (2, 1)
    assert d.report.filtered == {"no prompt (topic)": 2}
    assert d.eval_items["test"][0]["reference"] == "What if pigs could fly?"
    assert "chitchat_topic" in d.report.summary()
    ex = d.train[0]
    trained = [i for i, y in zip(ex["input_ids"], ex["labels"], strict=True) if y != -100]
    assert tok.decode(trained, skip_special=False) == "What's your favorite smell?<|im_end|>"
    with pytest.raises(Exception, match="chitchat_chat"):
        build_dataset("chitchat", tok, format="chitchat_summary", use_cache=False)


@pytest.mark.real
def test_real_file_matches_the_benchmark_task(tmp_path):
    """The full 40 MB file: counts, split and prompts as bench/hf_quality.py builds them."""
    path = chitchat_path()
    raw = json.loads(path.read_bytes())
    rows, filtered = read_chitchat("chitchat_topic", path)
    with_prompt = [k for k in sorted(raw) if raw[k].get("prompt")]
    assert len(rows) == len(with_prompt) == 6925 and sum(filtered.values()) == 243
    test_keys = [
        k for k in with_prompt if int(hashlib.sha256(k.encode()).hexdigest(), 16) % 100 < 5
    ]
    assert [r.where.rsplit("[", 1)[1][:-1] for r in rows if r.split == "test"] == test_keys
    topics = {raw[k]["prompt"].strip() for k in with_prompt}
    assert {r.data["messages"][1]["content"] for r in rows} == topics
    # the dialogue of a conversation as the benchmark's reader writes it
    key = test_keys[0]
    labels: dict[str, str] = {}
    lines = []
    for turn in raw[key]["messages"]:
        who = labels.setdefault(turn[0]["sender"], "AB"[len(labels) % 2])
        lines.append(who + ": " + " ".join(u["text"] for u in turn))
    expected = " ".join("\n".join(lines).split(" ")[:350])
    assert _dialogue(next(r for r in rows if r.where.endswith(f"[{key}]"))) == expected
    chat_rows, chat_filtered = read_chitchat("chitchat_chat", path)
    assert len(chat_rows) + sum(chat_filtered.values()) == len(raw)


@pytest.mark.real
def test_real_prompts_equal_transformers_chat_template(smol_path, tmp_path):
    """Our eval prompt ids equal transformers' apply_chat_template(add_generation_prompt=True)."""
    transformers = pytest.importorskip("transformers")
    from llamaforge.data.tokenizer import save_tokenizer

    tok = load_tokenizer(smol_path)
    save_tokenizer(tok, tmp_path / "tok")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    d = build_dataset(
        "chitchat", tok, format="chitchat_topic", limit=300, val_size=0, cache_dir=str(tmp_path)
    )
    rows, _ = read_chitchat("chitchat_topic")
    test_rows = [r for r in rows[:300] if r.split == "test"]
    assert len(test_rows) == len(d.eval_items["test"]) > 5
    for row, item, ex in zip(test_rows, d.eval_items["test"], d.test, strict=True):
        msgs = row.data["messages"][:1]
        want = ref.apply_chat_template(
            msgs, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert item["prompt_ids"] == list(want)
        assert item["reference"] == row.data["messages"][1]["content"]
        # trained as the benchmark trains: prompt ids, then the topic and <|im_end|> learned
        n = len(item["prompt_ids"])
        assert ex["input_ids"][:n] == item["prompt_ids"]
        answer = ref(item["reference"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert [y for y in ex["labels"] if y != -100] == answer
