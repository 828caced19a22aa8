"""Row -> sample conversion per format, auto-detection, and per-row validation reasons."""

from __future__ import annotations

import pytest

from llamaforge.data.formats import (
    Alpaca,
    Chat,
    Dialogue,
    Text,
    detect_format,
    to_sample,
)
from llamaforge.data.sources import (
    EMPTY_CONVERSATION,
    EMPTY_RESPONSE,
    EMPTY_TEXT,
    MISSING_FIELD,
    ROLES_OUT_OF_ORDER,
    UNKNOWN_ROLE,
    WRONG_TYPE,
    BadRow,
    DataError,
    Row,
)


def _msgs(*roles):
    return [{"role": r, "content": f"{r} text"} for r in roles]


def test_alpaca_dialogsum_text():
    assert to_sample({"instruction": "i", "output": "o"}, "alpaca") == Alpaca("i", "", "o")
    assert to_sample({"instruction": "i", "input": "x", "output": "o"}, "alpaca").input == "x"
    row = {"dialogue": "#P1#: hi", "summary": "greeting", "topic": "hello"}
    assert to_sample(row, "dialogsum") == Dialogue("#P1#: hi", "greeting", "hello")
    assert to_sample({"body": "doc"}, "text", text_key="body") == Text("doc")


def test_messages_and_sharegpt():
    chat = to_sample({"messages": _msgs("system", "user", "assistant")}, "messages")
    assert isinstance(chat, Chat) and [m["role"] for m in chat.messages] == [
        "system",
        "user",
        "assistant",
    ]
    turns = [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}]
    turns.append({"from": "gpt", "value": "a"})
    chat = to_sample({"conversations": turns}, "sharegpt")
    assert chat.messages[1] == {"role": "user", "content": "q"}
    assert chat.messages[2] == {"role": "assistant", "content": "a"}


@pytest.mark.parametrize(
    ("row", "fmt", "reason", "words"),
    [
        ({"instruction": "i"}, "alpaca", MISSING_FIELD, "'output'"),
        ({"instruction": "i", "output": None}, "alpaca", MISSING_FIELD, "'output'"),
        ({"instruction": "", "output": "o"}, "alpaca", MISSING_FIELD, "empty"),
        ({"instruction": "i", "output": 3}, "alpaca", WRONG_TYPE, "a number"),
        ({"instruction": "i", "input": ["x"], "output": "o"}, "alpaca", WRONG_TYPE, "a list"),
        ({"instruction": "i", "output": " \n"}, "alpaca", EMPTY_RESPONSE, "'output'"),
        ({"dialogue": "d", "summary": ""}, "dialogsum", EMPTY_RESPONSE, "summary"),
        ({"dialogue": "d"}, "dialogsum", MISSING_FIELD, "summary"),
        ({"messages": "hi"}, "messages", WRONG_TYPE, "a string"),
        ({"messages": []}, "messages", EMPTY_CONVERSATION, "no messages"),
        ({"messages": ["hi"]}, "messages", WRONG_TYPE, "message 0"),
        ({"messages": [{"role": "user"}]}, "messages", MISSING_FIELD, "'content'"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages", UNKNOWN_ROLE, "'bot'"),
        ({"messages": _msgs("user", "user")}, "messages", ROLES_OUT_OF_ORDER, "message 1"),
        ({"messages": _msgs("assistant")}, "messages", ROLES_OUT_OF_ORDER, "message 0"),
        ({"messages": _msgs("user", "assistant", "system")}, "messages", ROLES_OUT_OF_ORDER, "2"),
        ({"messages": _msgs("user", "assistant", "user")}, "messages", ROLES_OUT_OF_ORDER, "last"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", UNKNOWN_ROLE, "'bot'"),
        ({"conversations": [{"from": "human"}]}, "sharegpt", MISSING_FIELD, "'value'"),
        ({"text": "  "}, "text", EMPTY_TEXT, "'text'"),
        ({"text": 5}, "text", WRONG_TYPE, "'text'"),
    ],
)
def test_bad_rows_give_reasons(row, fmt, reason, words):
    with pytest.raises(BadRow) as e:
        to_sample(row, fmt)
    assert e.value.reason == reason and words in e.value.detail


def test_empty_assistant_message():
    msgs = _msgs("user", "assistant")
    msgs[1]["content"] = ""
    with pytest.raises(BadRow) as e:
        to_sample({"messages": msgs}, "messages")
    assert e.value.reason == EMPTY_RESPONSE and "message 1" in e.value.detail


@pytest.mark.parametrize(
    ("keys", "fmt"),
    [
        ({"messages"}, "messages"),
        ({"conversations", "id"}, "sharegpt"),
        ({"instruction", "input", "output"}, "alpaca"),
        ({"dialogue", "summary", "topic"}, "dialogsum"),
        ({"text", "url"}, "text"),
    ],
)
def test_detect_format(keys, fmt):
    rows = [Row(dict.fromkeys(keys, "x"), "f:1"), Row({}, "f:2", error=BadRow("x"))]
    assert detect_format(rows) == fmt


def test_detect_format_failures():
    with pytest.raises(DataError, match="columns"):
        detect_format([Row({"question": 1, "answer": 2}, "f:1")])
    rows = [Row({"prompt": 1, "chosen": 2, "rejected": 3}, "f:1")]
    assert detect_format(rows) == "preference"  # pairs: the rm/dpo stages read them
