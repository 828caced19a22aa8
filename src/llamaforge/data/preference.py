"""Preference pairs: a prompt and two answers to it, one chosen and one rejected.

Row shapes (``data.format: preference``; ``data.columns`` renames a user's schema):

- ``prompt`` (text or a messages list ending with the user), ``chosen`` and ``rejected``
  (text, or a list of assistant messages);
- no ``prompt``: ``chosen`` and ``rejected`` are whole conversations that share a prefix;
  the shared messages are the prompt, the rest are the two answers.

A pair is rendered with the model's chat template through the one renderer: the prompt ids
are rendered once (ending where the model starts to answer) and both answers continue them,
so chosen and rejected share the prompt ids exactly. Truncation (when prompt + the longer
answer exceeds ``max_seq_len``): the prompt is cut to ``max_prompt_len`` tokens from the left
(``prompt_truncation: left``, the default, keeps the end of the prompt, next to the answer) or
the right; then answers are cut from the right to what is left (``truncation: drop`` skips
the pair instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .sources import (
    EMPTY_RESPONSE,
    MISSING_FIELD,
    ROLES_OUT_OF_ORDER,
    WRONG_TYPE,
    ZERO_TRAINABLE,
    BadRow,
)
from .templates import TemplateError, render_conversation
from .tokenizer import Tokenizer

IGNORE = -100
IDENTICAL = "chosen equals rejected"
# data settings tokenize_pair reads (the config's data section has the same names)
PAIR_SETTINGS = (
    "template",
    "system",
    "max_seq_len",
    "max_prompt_len",
    "truncation",
    "prompt_truncation",
)


@dataclass(frozen=True)
class Preference:
    """A prompt (messages ending with the user) and two answers (assistant messages)."""

    prompt: tuple[dict[str, str], ...]
    chosen: tuple[dict[str, str], ...]
    rejected: tuple[dict[str, str], ...]

    def answer(self) -> str:
        """The chosen answer's text (the reference for generation metrics)."""
        return self.chosen[-1]["content"]


def to_preference(data: dict[str, Any]) -> Preference:
    """Check and convert one row (raises BadRow naming the field)."""
    chosen, rejected = _side(data, "chosen"), _side(data, "rejected")
    if data.get("prompt") is None:
        prompt, chosen, rejected = _split_shared(chosen, rejected)
    else:
        prompt = _messages(data["prompt"], "prompt", "user")
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRow(ROLES_OUT_OF_ORDER, "the prompt must end with a user message", field="prompt")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side:
            raise BadRow(EMPTY_RESPONSE, f"{name!r} has no answer after the prompt", field=name)
        if any(m["role"] == "assistant" and not m["content"].strip() for m in side):
            raise BadRow(EMPTY_RESPONSE, f"{name!r} is empty", field=name)
        if side[0]["role"] != "assistant":
            raise BadRow(ROLES_OUT_OF_ORDER, f"{name!r} must start with the assistant", field=name)
    if chosen == rejected:
        raise BadRow(IDENTICAL, "the two answers are identical, so there is nothing to prefer")
    return Preference(prompt, chosen, rejected)


def _side(data: dict[str, Any], name: str) -> tuple[dict[str, str], ...]:
    value = data.get(name)
    if value is None:
        have = ", ".join(map(repr, data)) or "none"
        raise BadRow(MISSING_FIELD, f"has no {name!r} field (fields: {have})", field=name)
    return _messages(value, name, "assistant")


def _messages(value: Any, name: str, text_role: str) -> tuple[dict[str, str], ...]:
    """Text (one message of `text_role`) or a list of {role, content} messages."""
    if isinstance(value, str):
        return ({"role": text_role, "content": value},)
    if not isinstance(value, list):
        raise BadRow(WRONG_TYPE, f"{name!r} must be text or a list of messages", field=name)
    out = []
    for i, m in enumerate(value):
        ok = isinstance(m, dict) and isinstance(m.get("role"), str)
        if not ok or not isinstance(m.get("content"), str):
            raise BadRow(WRONG_TYPE, f"{name}[{i}] is not a {{role, content}} message", field=name)
        if m["role"] not in ("system", "user", "assistant"):
            raise BadRow(WRONG_TYPE, f"{name}[{i}] has unknown role {m['role']!r}", field=name)
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _split_shared(chosen: tuple, rejected: tuple) -> tuple[tuple, tuple, tuple]:
    """Whole conversations -> (shared prefix up to the last common user turn, two answers)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] != "user":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


# ---------------------------------------------------------------- tokens


def tokenize_pair(
    sample: Preference,
    tok: Tokenizer,
    *,
    template: str = "auto",
    system: str | None = None,
    max_seq_len: int = 1024,
    max_prompt_len: int | None = None,
    truncation: str = "right",
    prompt_truncation: str = "left",
) -> tuple[dict[str, list[int]], bool] | None:
    """({prompt_ids, chosen_ids/labels, rejected_ids/labels}, truncated); None when dropped."""
    prompt = list(sample.prompt)
    if system and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system})
    try:
        prompt_ids = render_conversation(tok, prompt, template, add_generation_prompt=True)[0]
        sides = [
            _answer_ids(tok, prompt, list(s), prompt_ids, template)
            for s in (sample.chosen, sample.rejected)
        ]
    except TemplateError as e:
        raise BadRow("invalid conversation", str(e)) from None
    longest = max(len(ids) for ids, _ in sides)
    truncated = len(prompt_ids) + longest > max_seq_len
    if truncated:
        if truncation == "drop":
            return None
        keep = min(len(prompt_ids), max_prompt_len or max_seq_len // 2)
        cut = slice(-keep, None) if prompt_truncation == "left" else slice(None, keep)
        prompt_ids = prompt_ids[cut] if keep else []
        room = max_seq_len - len(prompt_ids)
        sides = [(ids[:room], labels[:room]) for ids, labels in sides]
    for name, (_, labels) in zip(("chosen", "rejected"), sides, strict=True):
        if all(x == IGNORE for x in labels):
            raise BadRow(
                ZERO_TRAINABLE,
                f"the {name} answer has no tokens left after truncation to "
                f"max_seq_len={max_seq_len}",
            )
    (c_ids, c_lab), (r_ids, r_lab) = sides
    example = {
        "prompt_ids": prompt_ids,
        "chosen_ids": c_ids,
        "chosen_labels": c_lab,
        "rejected_ids": r_ids,
        "rejected_labels": r_lab,
    }
    return example, truncated


def _answer_ids(
    tok: Tokenizer, prompt: list, answer: list, prompt_ids: list[int], template: str
) -> tuple[list[int], list[int]]:
    """The answer's ids after the prompt's, and labels (its loss-masked tokens)."""
    ids, mask = render_conversation(tok, prompt + answer, template)
    if ids[: len(prompt_ids)] != prompt_ids:
        raise TemplateError(
            "the chat template renders the prompt differently when an answer follows, so "
            "chosen and rejected cannot share the prompt ids"
        )
    rest, rest_mask = ids[len(prompt_ids) :], mask[len(prompt_ids) :]
    return rest, [i if m else IGNORE for i, m in zip(rest, rest_mask, strict=True)]


def pair_sequences(example: dict[str, list[int]]) -> list[dict[str, list[int]]]:
    """The pair as two causal-LM examples (prompt + chosen, prompt + rejected)."""
    p = example["prompt_ids"]
    return [
        {
            "input_ids": p + example[f"{side}_ids"],
            "labels": [IGNORE] * len(p) + example[f"{side}_labels"],
        }
        for side in ("chosen", "rejected")
    ]
