"""Tokenizers for LLaMA-family models: tokenizer.json, SentencePiece, Llama 3 tiktoken and GGUF.

Every backend answers the same questions (encode, decode, special ids, stop ids, chat template).
Special-token strings inside user text are plain text unless a caller passes
``allow_special=True``: chat formats insert special ids themselves, so a user who types
``<|im_end|>`` cannot close a turn.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sentencepiece
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from ..model.config import ConfigError

if TYPE_CHECKING:
    import gguf

# Texts of tokens that end a turn or a document; each one present as a special token is a stop id.
STOP_TOKEN_TEXTS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|endoftext|>",
    "</s>",
    "<|end|>",
    "<end_of_turn>",
)
BOS_GUESSES = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>")
EOS_GUESSES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>")

# Llama 3's pre-tokenizer split pattern (words, 1-3 digit groups, punctuation runs, whitespace).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256
_LLAMA3_NAMED = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)

_LLAMA3_ROLES = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>")  # bos eos pad

# SentencePiece / GGUF token types (the two use the same numbers).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# GGUF `tokenizer.ggml.pre` values whose pre-tokenizer we know.
_GGUF_PRE_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"}
_GGUF_PRE_DIGITS = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone"}


class Tokenizer(ABC):
    """Text <-> token ids, plus the special-token facts that chat formats and training need."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    special_tokens: dict[str, int]
    stop_ids: set[int]
    chat_template: str | None
    add_bos: bool

    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False
    ) -> list[int]:
        """Encode text; special-token strings in it stay plain text unless ``allow_special``."""
        if not isinstance(text, str):
            raise TypeError(f"encode() needs a str, got {type(text).__name__}")
        ids = self._encode(text, allow_special)
        if bos:
            ids.insert(0, _required(self.bos_id, "bos"))
        if eos:
            ids.append(_required(self.eos_id, "eos"))
        return ids

    @abstractmethod
    def _encode(self, text: str, allow_special: bool) -> list[int]:
        """Encode without bos/eos."""

    @abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Decode ids to text, dropping special tokens when ``skip_special``."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry, or None when absent."""

    @abstractmethod
    def id_to_token(self, i: int) -> str:
        """Vocabulary entry (raw piece text) of an id."""

    @property
    def bos_token(self) -> str | None:
        """Text of the bos token."""
        return None if self.bos_id is None else self.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        """Text of the eos token."""
        return None if self.eos_id is None else self.id_to_token(self.eos_id)

    @property
    def pad_token(self) -> str | None:
        """Text of the padding token."""
        return None if self.pad_id is None else self.id_to_token(self.pad_id)

    def _set_specials(
        self,
        special_tokens: Mapping[str, int],
        *,
        bos: int | str | None = None,
        eos: int | str | None = None,
        pad: int | str | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
        extra_stop_ids: Iterable[int] = (),
    ) -> None:
        """Fill in special ids (guessing bos/eos from well-known texts when not given)."""
        self.special_tokens = dict(special_tokens)
        self.bos_id = self._resolve(bos, BOS_GUESSES)
        self.eos_id = self._resolve(eos, EOS_GUESSES)
        self.pad_id = self._resolve(pad, ())
        if self.pad_id is None:
            self.pad_id = self.eos_id
        self.chat_template = chat_template
        self.add_bos = bool(add_bos) and self.bos_id is not None
        stops = {self.special_tokens[t] for t in STOP_TOKEN_TEXTS if t in self.special_tokens}
        stops.update(i for i in extra_stop_ids if 0 <= i < self.vocab_size)
        if self.eos_id is not None:
            stops.add(self.eos_id)
        self.stop_ids = stops

    def _resolve(self, value: int | str | None, guesses: Sequence[str]) -> int | None:
        """Turn a token id or text (or the first known guess) into an id."""
        if isinstance(value, int):
            return value if 0 <= value < self.vocab_size else None
        if isinstance(value, str):
            return self.token_to_id(value)
        return next((self.special_tokens[g] for g in guesses if g in self.special_tokens), None)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, specials={len(self.special_tokens)})"
        )


def _required(value: int | None, name: str) -> int:
    """Return a special id or explain that the tokenizer lacks it."""
    if value is None:
        raise ValueError(f"this tokenizer has no {name} token")
    return value


class HFTokenizer(Tokenizer):
    """Backend: a ``tokenizers.Tokenizer`` (tokenizer.json, Llama 3 tiktoken ranks, GGUF vocab)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos: int | str | None = None,
        eos: int | str | None = None,
        pad: int | str | None = None,
        chat_template: str | None = None,
        add_bos: bool | None = None,
        extra_stop_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        added = backend.get_added_tokens_decoder()
        specials = {t.content: i for i, t in sorted(added.items()) if t.special}
        self._set_specials(
            specials,
            bos=bos,
            eos=eos,
            pad=pad,
            chat_template=chat_template,
            extra_stop_ids=extra_stop_ids,
        )
        if add_bos is None:
            add_bos = self._post_processor_adds_bos()
        self.add_bos = bool(add_bos) and self.bos_id is not None

    def _post_processor_adds_bos(self) -> bool:
        """Whether tokenizer.json's post-processor prepends bos (as Llama tokenizers do)."""
        if self.bos_id is None:
            return False
        with self._lock:
            self.backend.encode_special_tokens = True
            ids = self.backend.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_id

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        with self._lock:  # encode_special_tokens is state on the shared backend
            self.backend.encode_special_tokens = not allow_special
            return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Decode ids to text, dropping special tokens when ``skip_special``."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry, or None when absent."""
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        """Vocabulary entry (byte-level or ▁ form) of an id."""
        token = self.backend.id_to_token(int(i))
        if token is None:
            raise IndexError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return token

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class SentencePieceTokenizer(Tokenizer):
    """Backend: a SentencePiece ``tokenizer.model`` (Llama 2 layout) run by ``sentencepiece``."""

    def __init__(
        self,
        model_proto: bytes,
        *,
        bos: int | str | None = None,
        eos: int | str | None = None,
        pad: int | str | None = None,
        chat_template: str | None = None,
        add_bos: bool = True,
    ) -> None:
        self.model_proto = model_proto
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        specials = {
            sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if sp.is_control(i) or sp.is_unknown(i)
        }
        self._special_re = _alternation(specials)
        self._set_specials(
            specials,
            bos=sp.bos_id() if bos is None and sp.bos_id() >= 0 else bos,
            eos=sp.eos_id() if eos is None and sp.eos_id() >= 0 else eos,
            pad=sp.pad_id() if pad is None and sp.pad_id() >= 0 else pad,
            chat_template=chat_template,
            add_bos=add_bos,
        )

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        if not allow_special or self._special_re is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for piece, is_special in _split_on(self._special_re, text):
            ids += [self.special_tokens[piece]] if is_special else self.sp.encode(piece)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Decode ids; with ``skip_special=False`` specials appear as their text."""
        specials = set(self.special_tokens.values())
        ids = [int(i) for i in ids]
        if skip_special:
            return self.sp.decode([i for i in ids if i not in specials])
        out, run = [], []
        for i in ids:
            if i in specials:
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def token_to_id(self, token: str) -> int | None:
        """Id of a piece, or None when absent."""
        i = self.sp.piece_to_id(token)
        return None if self.sp.is_unknown(i) and self.sp.id_to_piece(i) != token else i

    def id_to_token(self, i: int) -> str:
        """Piece text of an id (▁ for spaces, <0xNN> for bytes)."""
        if not 0 <= int(i) < self.vocab_size:
            raise IndexError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return self.sp.id_to_piece(int(i))


def _alternation(tokens: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching any of the tokens, longest first."""
    ordered = sorted(set(tokens), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


def _split_on(pattern: re.Pattern[str], text: str) -> Iterator[tuple[str, bool]]:
    """Split text into (piece, is_match) around the pattern's matches; empty pieces dropped."""
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            yield text[pos : m.start()], False
        yield m.group(), True
        pos = m.end()
    if pos < len(text):
        yield text[pos:], False


# ---------------------------------------------------------------- byte-level helpers


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _derive_merges(ranked: Mapping[Any, Any]) -> list[tuple[Any, Any]]:
    """BPE merges equivalent to "merge the adjacent pair whose join ranks best".

    ``ranked`` maps each mergeable token (bytes or str) to a sortable priority; every split of
    a token into two ranked halves becomes one merge, ordered by the joined token's priority.
    """
    found = []
    for token, priority in ranked.items():
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in ranked and right in ranked:
                found.append((priority, ranked[left], ranked[right], left, right))
    found.sort(key=lambda f: f[:3])
    return [(left, right) for *_, left, right in found]


def _byte_level_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], pre: str, *, ignore_merges: bool
) -> tokenizers.Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` with the named pre-tokenizer."""
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
    tk = tokenizers.Tokenizer(model)
    tk.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    tk.decoder = decoders.ByteLevel()
    return tk


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """Pre-tokenizer for a GGUF ``tokenizer.ggml.pre`` name ("llama3", "smollm", "gpt2", ...)."""
    if pre in _GGUF_PRE_LLAMA3:
        split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, byte_level])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GGUF_PRE_DIGITS:  # StarCoder-family vocabularies split every digit
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


# ---------------------------------------------------------------- Llama 3 tiktoken files


def llama3_special_tokens(n: int = LLAMA3_NUM_SPECIAL) -> list[str]:
    """Llama 3.1's special-token texts in id order (they follow the BPE ranks)."""
    reserved = (f"<|reserved_special_token_{k}|>" for k in range(3, 3 + n))
    return [*_LLAMA3_NAMED, *reserved][:n]


def is_tiktoken_file(path: str | os.PathLike) -> bool:
    """True for a tiktoken rank file (lines ``base64 rank``), False for a protobuf model."""
    with open(path, "rb") as f:
        first = f.read(512).split(b"\n", 1)[0].strip()
    return re.fullmatch(rb"[A-Za-z0-9+/]+=*\s+\d+", first) is not None


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken rank file: one ``base64(token bytes) rank`` per line."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: not a 'base64 rank' line ({e})") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def tokenizer_from_tiktoken(
    ranks: Mapping[bytes, int],
    *,
    special_tokens: Sequence[str] | None = None,
    bos: str | None = _LLAMA3_ROLES[0],
    eos: str | None = _LLAMA3_ROLES[1],
    pad: str | None = _LLAMA3_ROLES[2],
    chat_template: str | None = None,
    add_bos: bool = True,
    extra_stop_ids: Iterable[int] = (),
) -> HFTokenizer:
    """Llama 3 tokenizer from BPE ranks; special tokens take ids ``len(ranks)`` onwards."""
    b2u = byte_to_unicode()
    as_text = {tok: "".join(b2u[b] for b in tok) for tok in ranks}
    vocab = {as_text[tok]: rank for tok, rank in ranks.items()}
    merges = [(as_text[a], as_text[b]) for a, b in _derive_merges(ranks)]
    backend = _byte_level_tokenizer(vocab, merges, "llama3", ignore_merges=True)
    names = list(special_tokens) if special_tokens is not None else llama3_special_tokens()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    return HFTokenizer(
        backend,
        bos=bos,
        eos=eos,
        pad=pad,
        chat_template=chat_template,
        add_bos=add_bos,
        extra_stop_ids=extra_stop_ids,
    )


# ---------------------------------------------------------------- SentencePiece model files


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Decode one level of a protobuf message into (field number, raw value) pairs."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """Read a protobuf varint at offset i; return (value, next offset)."""
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def read_spm_proto(model_proto: bytes) -> dict[str, Any]:
    """The parts of a SentencePiece ModelProto needed to rebuild it as a ``tokenizers`` BPE."""
    info: dict[str, Any] = {"pieces": [], "scores": [], "types": [], "byte_fallback": False}
    norm = {"charsmap": b"", "add_dummy_prefix": True, "remove_extra_whitespaces": True}
    for field, value in _proto_fields(model_proto):
        if field == 1:
            piece = dict(_proto_fields(value))
            info["pieces"].append(piece.get(1, b"").decode("utf-8"))
            info["scores"].append(struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0)
            info["types"].append(piece.get(3, NORMAL))
        elif field == 2:
            trainer = dict(_proto_fields(value))
            info["model_type"] = trainer.get(3, 1)
            info["byte_fallback"] = bool(trainer.get(35, 0))
        elif field == 3:
            spec = dict(_proto_fields(value))
            norm["charsmap"] = spec.get(2, b"")
            norm["add_dummy_prefix"] = bool(spec.get(3, 1))
            norm["remove_extra_whitespaces"] = bool(spec.get(4, 1))
    return info | norm


def spm_to_hf_backend(
    pieces: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    *,
    add_dummy_prefix: bool = True,
    byte_fallback: bool = True,
    remove_extra_whitespaces: bool = False,
    charsmap: bytes = b"",
) -> tokenizers.Tokenizer:
    """Rebuild a SentencePiece BPE vocabulary (pieces, scores, types) as a ``tokenizers`` BPE."""
    vocab = {p: i for i, p in enumerate(pieces)}
    mergeable = {p: (-scores[i], i) for i, p in enumerate(pieces) if types[i] == NORMAL}
    unk = next((p for p, t in zip(pieces, types, strict=True) if t == UNKNOWN), None)
    model = models.BPE(
        vocab=vocab,
        merges=_derive_merges(mergeable),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=byte_fallback,
    )
    tk = tokenizers.Tokenizer(model)
    tk.normalizer = _spm_normalizer(add_dummy_prefix, remove_extra_whitespaces, charsmap)
    strip = [decoders.Strip(content=" ", left=1, right=0)] if add_dummy_prefix else []
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    tk.decoder = decoders.Sequence(steps)
    typed = list(zip(pieces, types, strict=True))
    tk.add_special_tokens(
        [AddedToken(p, special=True, normalized=False) for p, t in typed if t in (CONTROL, UNKNOWN)]
    )
    tk.add_tokens(
        [AddedToken(p, special=False, normalized=False) for p, t in typed if t == USER_DEFINED]
    )
    return tk


def _spm_normalizer(
    add_dummy_prefix: bool, remove_extra_whitespaces: bool, charsmap: bytes
) -> normalizers.Normalizer:
    """SentencePiece normalisation: charsmap, whitespace cleanup, ▁ prefix, ▁ for space."""
    steps: list[normalizers.Normalizer] = []
    if charsmap:
        steps.append(normalizers.Precompiled(charsmap))
    if remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    return normalizers.Sequence(steps)


def spm_proto_to_hf_backend(model_proto: bytes) -> tokenizers.Tokenizer:
    """Convert a SentencePiece BPE ``tokenizer.model`` into an equivalent ``tokenizers`` BPE."""
    info = read_spm_proto(model_proto)
    if info.get("model_type", 1) != 2:
        raise ValueError("only SentencePiece BPE models can be converted (Llama 2 style)")
    return spm_to_hf_backend(
        info["pieces"],
        info["scores"],
        info["types"],
        add_dummy_prefix=info["add_dummy_prefix"],
        byte_fallback=info["byte_fallback"],
        remove_extra_whitespaces=info["remove_extra_whitespaces"],
        charsmap=info["charsmap"],
    )


# ---------------------------------------------------------------- GGUF


class TokenizerError(ConfigError):
    """A tokenizer file llamaforge cannot read; the message names the file and the reason."""


def _gguf_value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """A GGUF metadata value as a Python str / number / list, or ``default`` when absent."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return default
    if field.types[0] == GGUFValueType.ARRAY:
        parts = [field.parts[i] for i in field.data]
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(p).decode("utf-8") for p in parts]
        return [p.tolist()[0] for p in parts]
    part = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def tokenizer_from_gguf(reader: gguf.GGUFReader, where: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a GGUF file; metadata it cannot use is a TokenizerError naming
    `where` (the file) and what is wrong, on one line."""
    from ..io.gguf import _why

    try:
        return tokenizer_from_gguf_fields(reader)
    except TokenizerError as e:
        raise TokenizerError(f"{where}: {e}") from None
    except Exception as e:  # wrong value types in foreign or damaged files
        raise TokenizerError(f"{where}: bad tokenizer metadata ({_why(e)})") from None


def tokenizer_from_gguf_fields(reader: gguf.GGUFReader) -> Tokenizer:
    """Build the tokenizer stored in a GGUF file's ``tokenizer.*`` metadata."""
    kind = _gguf_value(reader, "tokenizer.ggml.model")
    if _gguf_value(reader, "tokenizer.ggml.tokens") is None:
        raise TokenizerError("no tokenizer in the file (tokenizer.ggml.tokens is missing)")
    if kind == "gpt2":
        backend = _gguf_byte_level(reader)
    elif kind == "llama":
        backend = _gguf_sentencepiece(reader)
    else:
        raise TokenizerError(f"unsupported tokenizer.ggml.model {kind!r} (supported: gpt2, llama)")
    extra = [_gguf_value(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    return HFTokenizer(
        backend,
        bos=_gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        eos=_gguf_value(reader, "tokenizer.ggml.eos_token_id"),
        pad=_gguf_value(reader, "tokenizer.ggml.padding_token_id"),
        chat_template=_gguf_value(reader, "tokenizer.chat_template"),
        add_bos=bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", kind == "llama")),
        extra_stop_ids=[i for i in extra if i is not None],
    )


def _gguf_byte_level(reader: gguf.GGUFReader) -> tokenizers.Tokenizer:
    """Byte-level BPE (``tokenizer.ggml.model == "gpt2"``) from GGUF tokens and merges."""
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    types = _gguf_value(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _gguf_value(reader, "tokenizer.ggml.merges", [])]
    pre = _gguf_value(reader, "tokenizer.ggml.pre", "default")
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = _byte_level_tokenizer(vocab, merges, pre, ignore_merges=pre in _GGUF_PRE_LLAMA3)
    typed = list(zip(tokens, types, strict=True))
    tk.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in typed if k == CONTROL]
    )
    # user-defined tokens are matched in any text, as llama.cpp does, but are not "special"
    tk.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in typed if k == USER_DEFINED]
    )
    return tk


def _gguf_sentencepiece(reader: gguf.GGUFReader) -> tokenizers.Tokenizer:
    """SentencePiece-style vocabulary (``tokenizer.ggml.model == "llama"``) with scores."""
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    types = _gguf_value(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    scores = _gguf_value(reader, "tokenizer.ggml.scores")
    if scores is None:
        raise TokenizerError("'llama' tokenizer without tokenizer.ggml.scores")
    return spm_to_hf_backend(
        tokens,
        scores,
        types,
        add_dummy_prefix=bool(_gguf_value(reader, "tokenizer.ggml.add_space_prefix", True)),
        byte_fallback=BYTE in types,
    )


# ---------------------------------------------------------------- loading and saving


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a directory, tokenizer.json, tokenizer.model or .gguf file."""
    p = Path(path)
    if p.is_dir():
        return _load_dir(p)
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer at {p}")
    if p.suffix == ".gguf":
        from ..io.gguf import open_gguf

        try:
            reader = open_gguf(p)  # header checks: bad files fail with the file's name
        except ConfigError as e:
            raise TokenizerError(str(e)) from None
        return tokenizer_from_gguf(reader, p)
    if p.suffix == ".json":
        return _load_tokenizer_json(p, _read_hf_config(p.parent))
    return _load_model_file(p, _read_hf_config(p.parent))


def _load_dir(d: Path) -> Tokenizer:
    """Pick the tokenizer file inside a model directory."""
    if (d / "tokenizer.json").is_file():
        return load_tokenizer(d / "tokenizer.json")
    if (d / "tokenizer.model").is_file():
        return load_tokenizer(d / "tokenizer.model")
    ggufs = sorted(d.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_tokenizer(ggufs[0])
    raise FileNotFoundError(
        f"{d} holds no tokenizer.json, tokenizer.model or single .gguf file to load"
    )


def _load_tokenizer_json(path: Path, cfg: dict[str, Any]) -> Tokenizer:
    """A tokenizer.json file, with options from tokenizer_config.json."""
    backend = tokenizers.Tokenizer.from_file(str(path))
    return HFTokenizer(backend, **_hf_options(cfg), extra_stop_ids=_config_stop_ids(path.parent))


def _load_model_file(path: Path, cfg: dict[str, Any]) -> Tokenizer:
    """A tokenizer.model file: SentencePiece protobuf or Llama 3 tiktoken ranks."""
    options = _hf_options(cfg)
    if options["add_bos"] is None:
        options["add_bos"] = True  # Llama 2 and Llama 3 both start documents with bos
    if not is_tiktoken_file(path):
        return SentencePieceTokenizer(path.read_bytes(), **options)
    ranks = read_tiktoken_ranks(path)
    names = llama3_special_tokens()
    for key, token in (cfg.get("added_tokens_decoder") or {}).items():
        if 0 <= int(key) - len(ranks) < len(names):  # a config may rename reserved tokens
            names[int(key) - len(ranks)] = _token_text(token)
    for key, default in zip(("bos", "eos", "pad"), _LLAMA3_ROLES, strict=True):
        options[key] = options[key] or default
    return tokenizer_from_tiktoken(
        ranks, special_tokens=names, **options, extra_stop_ids=_config_stop_ids(path.parent)
    )


def _read_hf_config(d: Path) -> dict[str, Any]:
    """Merge special_tokens_map.json, tokenizer_config.json and chat_template files of a dir."""
    cfg: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json", "chat_template.json"):
        if (d / name).is_file():
            cfg.update(json.loads((d / name).read_text(encoding="utf-8")))
    if (d / "chat_template.jinja").is_file():
        cfg["chat_template"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
    return cfg


def _token_text(value: Any) -> str | None:
    """Token text from a config entry (a string or an AddedToken-like dict)."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _hf_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad/chat_template/add_bos keyword arguments from a tokenizer_config dict."""
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return {
        "bos": _token_text(cfg.get("bos_token")),
        "eos": _token_text(cfg.get("eos_token")),
        "pad": _token_text(cfg.get("pad_token")),
        "chat_template": template,
        "add_bos": cfg.get("add_bos_token"),
    }


def _config_stop_ids(d: Path) -> list[int]:
    """eos_token_id values (int or list) from config.json / generation_config.json."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        if (d / name).is_file():
            value = json.loads((d / name).read_text(encoding="utf-8")).get("eos_token_id")
            ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    return ids


def save_tokenizer(
    tok: Tokenizer, out_dir: str | os.PathLike, *, model_max_length: int | None = None
) -> None:
    """Write tokenizer files that both ``load_tokenizer`` and ``transformers`` can read."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(tok, SentencePieceTokenizer):
        (out / "tokenizer.model").write_bytes(tok.model_proto)
        backend = spm_proto_to_hf_backend(tok.model_proto)
    elif isinstance(tok, HFTokenizer):
        backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    else:
        raise TypeError(f"cannot save a {type(tok).__name__}")
    backend.post_processor = _bos_post_processor(tok)
    backend.save(str(out / "tokenizer.json"))
    specials = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token}
    specials = {k: v for k, v in specials.items() if v is not None}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": tok.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", specials)


def _bos_post_processor(tok: Tokenizer) -> processors.PostProcessor:
    """Post-processor that adds bos exactly when the tokenizer adds it by default."""
    if not tok.add_bos or tok.bos_id is None:
        return processors.TemplateProcessing(single="$A", pair="$A $B")
    bos = tok.bos_token
    return processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)]
    )


def _write_json(path: Path, obj: Any) -> None:
    """Write pretty UTF-8 JSON."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
