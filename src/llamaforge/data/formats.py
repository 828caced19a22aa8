"""Turn one source row into what the renderer needs, checking it on the way.

Formats (the field names are ours; ``data.columns`` renames a user's schema to them):

- ``alpaca``: ``instruction``, optional ``input``, ``output``.
- ``dialogsum``: ``dialogue``, ``summary``, optional ``topic`` (the summary is learned).
- ``messages``: ``messages: [{"role": system|user|assistant, "content": str}, ...]``.
- ``sharegpt``: ``conversations: [{"from": human|gpt|system, "value": str}, ...]``.
- ``text``: ``text`` (raw documents for continued pretraining).
- ``preference``: ``prompt``, ``chosen``, ``rejected`` (pairs for reward models and DPO; see
  ``preference``).
- ``auto``: pick one of the above from the columns present.

A row that cannot be used raises ``BadRow`` with a reason from ``sources`` and a detail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .preference import Preference, to_preference
from .sources import (
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

FORMATS = ("alpaca", "dialogsum", "messages", "sharegpt", "text", "preference", "auto")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
SUMMARIZE_REQUEST = "Summarize the below conversation."


@dataclass(frozen=True)
class Chat:
    """A validated conversation that ends with the assistant's answer."""

    messages: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class Alpaca:
    """An instruction, its optional input, and the response to learn."""

    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Dialogue:
    """A dialogue, its summary (learned) and an optional topic."""

    dialogue: str
    summary: str
    topic: str | None = None


@dataclass(frozen=True)
class Text:
    """A raw document for continued pretraining."""

    text: str


Sample = Chat | Alpaca | Dialogue | Text | Preference


def detect_format(rows: Sequence[Row]) -> str:
    """Pick a format from the columns of the first readable rows."""
    keys: set[str] = set()
    for row in [r for r in rows if r.error is None][:100]:
        keys |= set(row.data)
    for fmt, needed in (
        ("messages", {"messages"}),
        ("sharegpt", {"conversations"}),
        ("alpaca", {"instruction", "output"}),
        ("dialogsum", {"dialogue", "summary"}),
        ("text", {"text"}),
        ("preference", {"chosen", "rejected"}),
    ):
        if needed <= keys:
            return fmt
    raise DataError(
        "data.format",
        "cannot detect the format",
        f"columns {sorted(keys)} match none of: messages, conversations, instruction+output, "
        "dialogue+summary, text; set data.format, and data.columns to rename your columns",
    )


def to_sample(data: dict[str, Any], fmt: str, *, text_key: str = "text") -> Sample:
    """Convert one row's fields to a sample of the given format (raises BadRow)."""
    if fmt == "alpaca":
        return to_alpaca(data)
    if fmt == "dialogsum":
        return to_dialogue(data)
    if fmt == "messages":
        return Chat(check_messages(_field(data, "messages", list)))
    if fmt == "sharegpt":
        return Chat(check_messages(sharegpt_messages(_field(data, "conversations", list))))
    if fmt == "preference":
        return to_preference(data)
    if fmt == "text":
        text = _field(data, text_key, str)
        if not text.strip():
            raise BadRow(EMPTY_TEXT, f"{text_key!r} is empty", field=text_key)
        return Text(text)
    raise ValueError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")


def to_alpaca(data: dict[str, Any]) -> Alpaca:
    """Alpaca row: instruction (non-empty), input (optional), output (non-empty)."""
    instruction = _nonempty(data, "instruction", MISSING_FIELD)
    inp = _field(data, "input", str, required=False) or ""
    return Alpaca(instruction, inp, _nonempty(data, "output", EMPTY_RESPONSE))


def to_dialogue(data: dict[str, Any]) -> Dialogue:
    """DialogSum row: dialogue (non-empty), summary (non-empty), topic (optional)."""
    dialogue = _nonempty(data, "dialogue", MISSING_FIELD)
    summary = _nonempty(data, "summary", EMPTY_RESPONSE)
    return Dialogue(dialogue, summary, _field(data, "topic", str, required=False))


def sharegpt_messages(turns: list[Any]) -> list[dict[str, Any]]:
    """ShareGPT ``{from, value}`` turns as ``{role, content}`` messages."""
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow(WRONG_TYPE, f"conversations[{i}] is {_kind(turn)}, expected an object")
        who = _field(turn, "from", str, where=f"conversations[{i}]")
        if who.lower() not in SHAREGPT_ROLES:
            known = ", ".join(SHAREGPT_ROLES)
            raise BadRow(UNKNOWN_ROLE, f"conversations[{i}] is from {who!r} (use one of {known})")
        value = _field(turn, "value", str, where=f"conversations[{i}]")
        out.append({"role": SHAREGPT_ROLES[who.lower()], "content": value})
    return out


def check_messages(messages: list[Any]) -> tuple[dict[str, str], ...]:
    """Shape, roles (system?, user, assistant, ...; last is assistant) and non-empty answers."""
    if not messages:
        raise BadRow(EMPTY_CONVERSATION, "the conversation has no messages")
    clean = tuple(_check_message(i, m) for i, m in enumerate(messages))
    _check_order([m["role"] for m in clean])
    for i, m in enumerate(clean):
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadRow(EMPTY_RESPONSE, f"message {i} (assistant) is empty")
    return clean


def _check_message(i: int, message: Any) -> dict[str, str]:
    """One message: an object with a known role and string content."""
    if not isinstance(message, dict):
        raise BadRow(WRONG_TYPE, f"message {i} is {_kind(message)}, expected an object")
    role = _field(message, "role", str, where=f"message {i}")
    content = _field(message, "content", str, where=f"message {i}")
    if role not in ("system", "user", "assistant"):
        raise BadRow(UNKNOWN_ROLE, f"message {i} has role {role!r} (use system, user, assistant)")
    return {"role": role, "content": content}


def _check_order(roles: list[str]) -> None:
    """Optional system first, then user/assistant alternating, ending with the assistant."""
    start = 1 if roles[0] == "system" else 0
    for i in range(start, len(roles)):
        expected = ("user", "assistant")[(i - start) % 2]
        if roles[i] != expected:
            after = f" after {roles[i - 1]!r}" if i else ""
            raise BadRow(
                ROLES_OUT_OF_ORDER,
                f"message {i} is {roles[i]!r}{after}, expected {expected!r} (an optional system "
                "message first, then user and assistant alternating)",
            )
    if roles[-1] != "assistant":
        raise BadRow(
            ROLES_OUT_OF_ORDER,
            f"the last message is {roles[-1]!r}; a training conversation ends with the assistant",
        )


def _field(
    data: dict[str, Any], name: str, kind: type, *, required: bool = True, where: str = ""
) -> Any:
    """A field of the given type; absent/None is missing (or None when not required)."""
    value = data.get(name)
    place = f"{where} " if where else ""
    if value is None:
        if not required:
            return None
        have = ", ".join(map(repr, data)) or "none"
        raise BadRow(MISSING_FIELD, f"{place}has no {name!r} field (fields: {have})", field=name)
    if not isinstance(value, kind):
        raise BadRow(
            WRONG_TYPE,
            f"{place}{name!r} is {_kind(value)}, expected {_kind(kind())}",
            field=name,
        )
    return value


def _nonempty(data: dict[str, Any], name: str, reason: str) -> str:
    """A string field that must hold more than whitespace."""
    value = _field(data, name, str)
    if not value.strip():
        raise BadRow(reason, f"{name!r} is empty", field=name)
    return value


def _kind(value: Any) -> str:
    """A short type description for messages ("a string", "a list", ...)."""
    names = {str: "a string", list: "a list", dict: "an object", int: "a number", float: "a number"}
    names |= {bool: "a boolean", bytes: "bytes", type(None): "null"}
    return names.get(type(value), type(value).__name__)
