"""Prompt formats: one function renders a conversation to token ids plus a loss mask.

Training and inference call the same ``render_conversation``; inference passes
``add_generation_prompt=True`` and ignores the mask. The mask is 1 exactly on the tokens the
model should learn: each assistant answer and the token(s) that end its turn.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llamaforge.data.tokenizer import Tokenizer

from ..errors import UserError

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
ROLES = ("system", "user", "assistant")


class TemplateError(UserError):
    """A conversation or template that cannot be rendered."""


def validate_messages(messages: Sequence[Message]) -> None:
    """Check roles and contents: optional system first, then user/assistant alternating."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise TemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise TemplateError("empty conversation: give at least one user message")
    for i, message in enumerate(messages):
        _check_message(i, message)
    start = 1 if messages[0]["role"] == "system" else 0
    if start == len(messages):
        raise TemplateError("conversation has only a system message: add a user message")
    for i in range(start, len(messages)):
        role, expected = messages[i]["role"], ("user", "assistant")[(i - start) % 2]
        if role == "system":
            raise TemplateError(f"message {i}: a system message may only come first")
        if role != expected:
            raise TemplateError(
                f"message {i}: expected role {expected!r}, got {role!r} (after an optional "
                "system message, roles must alternate user, assistant, user, ...)"
            )


def _check_message(i: int, message: Any) -> None:
    """Check one message's shape, role and content type."""
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        raise TemplateError(f"message {i}: expected a dict with 'role' and 'content' keys")
    if message["role"] not in ROLES:
        raise TemplateError(f"message {i}: unknown role {message['role']!r} (use one of {ROLES})")
    if not isinstance(message["content"], str):
        kind = type(message["content"]).__name__
        raise TemplateError(f"message {i}: content must be a str, got {kind}")


class _Ids:
    """Token ids with their loss mask, built piece by piece."""

    def __init__(self, tok: Tokenizer, fmt: str) -> None:
        self.tok, self.fmt = tok, fmt
        self.ids: list[int] = []
        self.mask: list[int] = []

    def add(self, ids: Sequence[int], train: bool = False) -> None:
        """Append ids; ``train`` marks them as learned."""
        self.ids += ids
        self.mask += [int(train)] * len(ids)

    def text(self, text: str, train: bool = False) -> None:
        """Append plain text (special-token strings in it stay text)."""
        self.add(self.tok.encode(text), train)

    def special(self, token: str, train: bool = False) -> None:
        """Append one special token by its text."""
        self.add([special_id(self.tok, token, self.fmt)], train)

    def bos(self) -> None:
        """Append the bos id."""
        self.add([_need(self.tok.bos_id, "bos", self.fmt)])

    def eos(self, train: bool = True) -> None:
        """Append the eos id (learned by default: it ends the answer)."""
        self.add([_need(self.tok.eos_id, "eos", self.fmt)], train)


def special_id(tok: Tokenizer, token: str, fmt: str = "this") -> int:
    """Id of a special token the format needs, or a TemplateError naming it."""
    i = tok.special_tokens.get(token)
    return _need(i, repr(token), fmt)


def _need(value: int | None, what: str, fmt: str) -> int:
    """Return a required token id or explain which format needs it."""
    if value is None:
        raise TemplateError(f"the tokenizer has no {what} token, which the {fmt} format needs")
    return value


class ChatFormat:
    """Base class: renders a validated conversation to (ids, loss_mask)."""

    name = "base"

    def render(
        self, tok: Tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Render messages to token ids and a mask that is 1 on assistant answers + turn ends."""
        validate_messages(messages)
        out = _Ids(tok, self.name)
        self._render(out, list(messages), add_generation_prompt)
        return out.ids, out.mask

    def _render(self, out: _Ids, messages: list[Message], add_generation_prompt: bool) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ChatMLFormat(ChatFormat):
    """ChatML (SmolLM2, Qwen): ``<|im_start|>{role}\\n{content}<|im_end|>\\n``."""

    name = "chatml"

    def _render(self, out: _Ids, messages: list[Message], add_generation_prompt: bool) -> None:
        for m in messages:
            train = m["role"] == "assistant"
            head, content = _split_after(out.tok, f"{m['role']}\n", f"{m['role']}\n{m['content']}")
            out.special("<|im_start|>")
            out.add(head)
            out.add(content, train)
            out.special("<|im_end|>", train)
            out.text("\n")
        if add_generation_prompt:
            out.special("<|im_start|>")
            out.text("assistant\n")


class Llama3Format(ChatFormat):
    """Llama 3: bos, then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``"""

    name = "llama3"

    def _render(self, out: _Ids, messages: list[Message], add_generation_prompt: bool) -> None:
        out.special("<|begin_of_text|>")
        for m in messages:
            train = m["role"] == "assistant"
            self._header(out, m["role"])
            out.text(m["content"].strip(), train)
            out.special("<|eot_id|>", train)
        if add_generation_prompt:
            self._header(out, "assistant")

    @staticmethod
    def _header(out: _Ids, role: str) -> None:
        """Append a role header as Meta's reference encodes it."""
        out.special("<|start_header_id|>")
        out.text(role)
        out.special("<|end_header_id|>")
        out.text("\n\n")


B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class Llama2Format(ChatFormat):
    """Llama 2 chat: ``<s>[INST] {user} [/INST] {answer} </s>`` per exchange, system folded in."""

    name = "llama2"

    def _render(self, out: _Ids, messages: list[Message], add_generation_prompt: bool) -> None:
        _no_prompt_after_answer(messages, add_generation_prompt, self.name)
        turns = _fold_system(messages)
        for k in range(0, len(turns), 2):
            prompt = f"{B_INST} {turns[k]['content'].strip()} {E_INST}"
            out.bos()
            if k + 1 == len(turns):
                out.text(prompt)
                continue
            exchange = f"{prompt} {turns[k + 1]['content'].strip()} "
            head, tail = _split_after(out.tok, prompt, exchange)
            out.add(head)
            out.add(tail, train=True)
            out.eos()


def _fold_system(messages: list[Message]) -> list[Message]:
    """Merge a leading system message into the first user turn, as Meta's reference does."""
    if messages[0]["role"] != "system":
        return messages
    user = messages[1]["content"]
    merged = {"role": "user", "content": B_SYS + messages[0]["content"] + E_SYS + user}
    return [merged, *messages[2:]]


def _split_after(tok: Tokenizer, prompt: str, full: str) -> tuple[list[int], list[int]]:
    """Tokenize ``full`` (which starts with ``prompt``) and split its ids where the prompt ends.

    A token straddling the boundary (e.g. whitespace that opens the answer) goes to the answer.
    """
    head, ids = tok.encode(prompt), tok.encode(full)
    k = 0
    while k < min(len(head), len(ids)) and head[k] == ids[k]:
        k += 1
    return ids[:k], ids[k:]


def _no_prompt_after_answer(messages: list[Message], add_generation_prompt: bool, fmt: str):
    """Formats built from user->answer exchanges cannot prompt after an answer."""
    if add_generation_prompt and messages[-1]["role"] == "assistant":
        raise TemplateError(
            f"the {fmt} format cannot add a generation prompt after an assistant message; "
            "end the conversation with a user message"
        )


ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_alpaca(
    tok: Tokenizer, instruction: str, input: str = "", output: str | None = None
) -> tuple[list[int], list[int]]:
    """Stanford Alpaca prompt (with or without input); the response and eos are learned.

    The response follows ``### Response:`` on a new line (as alpaca-lora and most ports do).
    """
    template = ALPACA_PROMPT_INPUT if input else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=instruction, input=input)
    return _prompt_answer(tok, "alpaca", prompt, output)


def _prompt_answer(
    tok: Tokenizer, fmt: str, prompt: str, answer: str | None
) -> tuple[list[int], list[int]]:
    """bos (when the tokenizer adds one) + prompt, then the learned answer + eos if given."""
    out = _Ids(tok, fmt)
    if tok.add_bos:
        out.bos()
    if answer is None:
        out.text(prompt)
        return out.ids, out.mask
    head, tail = _split_after(tok, prompt, prompt + answer)
    out.add(head)
    out.add(tail, train=True)
    out.eos()
    return out.ids, out.mask


class AlpacaFormat(ChatFormat):
    """Alpaca: the user message is the instruction, the assistant message the response."""

    name = "alpaca"

    def _render(self, out: _Ids, messages: list[Message], add_generation_prompt: bool) -> None:
        _no_prompt_after_answer(messages, add_generation_prompt, self.name)
        user, answer = _single_exchange(messages, self.name)
        ids, mask = render_alpaca(out.tok, user, output=answer)
        out.ids, out.mask = ids, mask


def _single_exchange(messages: list[Message], fmt: str) -> tuple[str, str | None]:
    """(user content, assistant content or None) of a one-exchange conversation."""
    if messages[0]["role"] == "system":
        raise TemplateError(f"the {fmt} format has no place for a system message")
    if len(messages) > 2:
        raise TemplateError(
            f"the {fmt} format holds one user message and at most one answer; "
            f"got {len(messages)} messages"
        )
    return messages[0]["content"], messages[1]["content"] if len(messages) == 2 else None


INSTRUCT_INTRO = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
INSTRUCT_KEY = "### Instruct: Summarize the below conversation."
OUTPUT_KEY = "### Output:"
END_KEY = "### End"


def render_instruct(
    tok: Tokenizer, dialogue: str, summary: str | None = None
) -> tuple[list[int], list[int]]:
    """Dialogue-summary instruction prompt; the summary, ``### End`` and eos are learned.

    Full text: intro, ``### Instruct: ...``, dialogue, ``### Output:\\n{summary}``, ``### End``,
    joined by blank lines. Without a summary it stops after ``### Output:\\n``.
    """
    prompt = "\n\n".join([INSTRUCT_INTRO, INSTRUCT_KEY, dialogue, OUTPUT_KEY]) + "\n"
    answer = None if summary is None else f"{summary}\n\n{END_KEY}"
    return _prompt_answer(tok, "dialogsum", prompt, answer)


class InstructFormat(ChatFormat):
    """Dialogue summarisation: the user message is the dialogue, the answer the summary."""

    name = "dialogsum"

    def _render(self, out: _Ids, messages: list[Message], add_generation_prompt: bool) -> None:
        _no_prompt_after_answer(messages, add_generation_prompt, self.name)
        dialogue, summary = _single_exchange(messages, self.name)
        out.ids, out.mask = render_instruct(out.tok, dialogue, summary)


class JinjaFormat(ChatFormat):
    """A Jinja ``chat_template`` (as shipped with Hugging Face tokenizers), token-exact."""

    name = "jinja"

    def __init__(self, template: str) -> None:
        self.template = template
        self._compiled = _compile(template)

    def render_text(
        self, tok: Tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False
    ) -> str:
        """The template's text for these messages."""
        context = {
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": tok.bos_token or "",
            "eos_token": tok.eos_token or "",
            "pad_token": tok.pad_token or "",
        }
        try:
            return self._compiled.render(**context)
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template failed: {e}") from e

    def render(
        self, tok: Tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Render with the template; the mask comes from rendering growing prefixes."""
        validate_messages(messages)
        cuts = self._cuts(tok, list(messages), add_generation_prompt)
        ids = tok.encode(cuts[-1][0], allow_special=True)
        segments = _segment_ids(tok, cuts, ids)
        mask: list[int] = []
        for (_, train), seg in zip(cuts, segments, strict=True):
            mask += _answer_mask(seg, tok.stop_ids) if train else [0] * len(seg)
        return ids, mask

    def _cuts(
        self, tok: Tokenizer, messages: list[Message], add_generation_prompt: bool
    ) -> list[tuple[str, bool]]:
        """Texts of growing prefixes; the flag says the piece added last is an answer."""
        cuts = [(self._empty_render(tok), False)]
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                header = self.render_text(tok, messages[:i], add_generation_prompt=True)
                cuts.append((header, False))
            cuts.append((self.render_text(tok, messages[: i + 1]), m["role"] == "assistant"))
        if add_generation_prompt:
            cuts.append((self.render_text(tok, messages, add_generation_prompt=True), False))
        for k in range(1, len(cuts)):
            if not cuts[k][0].startswith(cuts[k - 1][0]):
                raise TemplateError(
                    "the chat template rewrites earlier turns when the conversation grows "
                    "(e.g. it uses loop.last / loop.length or drops old content), so a loss "
                    "mask cannot be derived from it; use a built-in format such as 'chatml'"
                )
        return cuts

    def _empty_render(self, tok: Tokenizer) -> str:
        """What the template emits before any message (e.g. bos), or '' if it cannot render."""
        try:
            return self.render_text(tok, [])
        except (TemplateError, jinja2.TemplateError, IndexError, KeyError, TypeError):
            return ""

    def __repr__(self) -> str:
        return f"JinjaFormat({self.template[:40]!r}...)"


def _segment_ids(tok: Tokenizer, cuts: list[tuple[str, bool]], ids: list[int]) -> list[list[int]]:
    """Split the full ids at the cut points, tokenizing pieces or (fallback) prefixes."""
    texts = [cuts[0][0]] + [cuts[k][0][len(cuts[k - 1][0]) :] for k in range(1, len(cuts))]
    pieces = [tok.encode(t, allow_special=True) for t in texts]
    if [i for p in pieces for i in p] == ids:
        return pieces
    ends = []
    for text, _ in cuts:
        prefix = tok.encode(text, allow_special=True)
        if ids[: len(prefix)] != prefix or (ends and len(prefix) < ends[-1]):
            raise TemplateError(
                f"cannot align the loss mask with the tokens: the template text up to "
                f"{text[-40:]!r} tokenizes differently alone than inside the conversation"
            )
        ends.append(len(prefix))
    return [ids[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def _answer_mask(segment: list[int], stop_ids: set[int]) -> list[int]:
    """Learn an answer segment up to and including its last end-of-turn token."""
    last = max((k for k, i in enumerate(segment) if i in stop_ids), default=len(segment) - 1)
    return [1] * (last + 1) + [0] * (len(segment) - last - 1)


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (transformers' marker) as a no-op."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    """``raise_exception`` helper available inside chat templates."""
    raise TemplateError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None, **kwargs: Any) -> str:
    """JSON without HTML escaping, as chat templates expect."""
    return json.dumps(value, ensure_ascii=False, indent=indent, **kwargs)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """Compile a chat template in a sandbox with the usual chat-template settings."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTag],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template has a syntax error (line {e.lineno}): {e}") from e


_FORMATS: dict[str, type[ChatFormat]] = {
    "llama2": Llama2Format,
    "llama3": Llama3Format,
    "chatml": ChatMLFormat,
    "alpaca": AlpacaFormat,
    "dialogsum": InstructFormat,
}


def get_chat_format(name_or_template: str | ChatFormat, tok: Tokenizer | None = None) -> ChatFormat:
    """A format by name (llama2, llama3, chatml, alpaca, dialogsum, jinja, auto) or template."""
    if isinstance(name_or_template, ChatFormat):
        return name_or_template
    if "{%" in name_or_template or "{{" in name_or_template:
        return JinjaFormat(name_or_template)
    key = name_or_template.strip().lower()
    if key in _FORMATS:
        return _FORMATS[key]()
    if key in ("jinja", "auto"):
        template = tok.chat_template if tok is not None else None
        if template:
            return JinjaFormat(template)
        if key == "auto":
            return ChatMLFormat()
        raise TemplateError("format 'jinja' needs a tokenizer that ships a chat_template")
    known = ", ".join([*_FORMATS, "jinja", "auto"])
    raise TemplateError(f"unknown chat format {name_or_template!r}; choose one of: {known}")


def render_conversation(
    tok: Tokenizer,
    messages: Sequence[Message],
    fmt: str | ChatFormat = "auto",
    *,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Render a conversation to (ids, loss_mask); inference passes add_generation_prompt=True."""
    chat_format = get_chat_format(fmt, tok)
    return chat_format.render(tok, messages, add_generation_prompt=add_generation_prompt)
