"""Tokenizer backends checked against sentencepiece, transformers and a reference BPE."""

from __future__ import annotations

import base64
import importlib.metadata
import pickle
import random
from pathlib import Path

import pytest
import sentencepiece
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFBackend

from llamaforge.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    read_tiktoken_ranks,
    save_tokenizer,
)

TEXTS = [
    "Hello world",
    " leading space",
    "  two leading spaces and trailing  ",
    "a  b   c    d     e",
    "line one\nline two\n\nline four\n",
    "\r\n windows line\r\n",
    "tab\there\t\tand\t there",
    "12345678901234567890 and 3.14159 and 1,000,000",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "日本語のテキストと中文",
    "emoji 😀🎉 👍🏽 family 👨‍👩‍👧",
    "Ünïcödé façade naïve café ΑΒΓ δεζ привет",
    "it's I'LL we've they'd",
    "<s>[INST] not special [/INST]</s>",
    "<|im_start|>user\nhi<|im_end|>",
    "<|begin_of_text|><|eot_id|>",
    "x",
    " ",
    "   ",
    "\n",
    "",
    "ＦＵＬＬ ｗｉｄｔｈ",
    "a" * 60,
]

# Llama 3's pre-tokenizer pattern, as published with the model.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's 2024 and we've 12345 tokens.\n"
    "Once upon a time, there was a tokenizer that learned byte pairs from text.\n"
    "def tokenize(text):\n    return [ord(c) for c in text]\n"
    "Numbers like 3.14159, 2.71828 and 1,000,000 appear often in documents.\n"
    "Ünïcödé text, café and naïve words, 日本語 and emoji 😀 are handled as bytes.\n"
) * 20


def asset(dist: str, file: str) -> Path:
    """Path of a file shipped in an installed asset package, or skip the test."""
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(file)))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"asset package {dist} is not installed")
    if not path.is_file():
        pytest.skip(f"{file} is missing from {dist}")
    return path


def random_texts(sp: sentencepiece.SentencePieceProcessor, n: int, seed: int = 0) -> list[str]:
    """Texts glued from random vocabulary pieces and separators (stress-tests BPE merges)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [sp.decode([rng.randrange(259, sp.get_piece_size())]) for _ in range(12)]
        out.append("".join(p + rng.choice(["", " ", "  ", "\n", "7"]) for p in parts))
    return out


# ---------------------------------------------------------------- SentencePiece


@pytest.fixture(scope="module")
def spm_path() -> Path:
    return asset("mistral-common", "mistral_common/data/tokenizer.model.v1")


@pytest.fixture(scope="module")
def sp_ref(spm_path: Path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(spm_path))


@pytest.fixture(scope="module")
def spm_tok(spm_path: Path) -> Tokenizer:
    return load_tokenizer(spm_path)


def test_spm_ids_match_sentencepiece(spm_tok, sp_ref):
    assert isinstance(spm_tok, SentencePieceTokenizer)
    for text in TEXTS + random_texts(sp_ref, 50):
        ids = spm_tok.encode(text)
        assert ids == sp_ref.encode(text), text
        assert spm_tok.decode(ids) == sp_ref.decode(ids) == text


def test_spm_special_ids(spm_tok, sp_ref):
    assert (spm_tok.vocab_size, spm_tok.bos_id, spm_tok.eos_id) == (32000, 1, 2)
    assert spm_tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert spm_tok.pad_id == 2  # no pad piece: falls back to eos
    assert spm_tok.stop_ids == {2}
    assert spm_tok.add_bos and spm_tok.chat_template is None
    assert spm_tok.encode("Hi there", bos=True, eos=True) == [1, *sp_ref.encode("Hi there"), 2]


def test_spm_special_text_stays_plain(spm_tok, sp_ref):
    text = "<s>hello</s> world"
    plain = spm_tok.encode(text)
    assert plain == sp_ref.encode(text) and 1 not in plain and 2 not in plain
    special = spm_tok.encode(text, allow_special=True)
    assert special == [1, *sp_ref.encode("hello"), 2, *sp_ref.encode(" world")]
    assert spm_tok.decode(special, skip_special=False) == text
    assert spm_tok.decode(special) == sp_ref.decode(special)


def test_spm_token_lookup(spm_tok, sp_ref):
    for i in (0, 1, 2, 3, 300, 31999):
        assert spm_tok.id_to_token(i) == sp_ref.id_to_piece(i)
        assert spm_tok.token_to_id(sp_ref.id_to_piece(i)) == i
    assert spm_tok.token_to_id("definitely-not-a-piece") is None
    with pytest.raises(IndexError, match="outside the vocabulary"):
        spm_tok.id_to_token(32000)


def test_spm_save_loads_in_transformers(spm_tok, sp_ref, spm_path, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_tokenizer(spm_tok, tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == spm_path.read_bytes()
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = load_tokenizer(tmp_path)  # reads the converted tokenizer.json
    assert isinstance(ours, HFTokenizer)
    for text in TEXTS + random_texts(sp_ref, 50, seed=1):
        ref = sp_ref.encode(text)
        assert hf.encode(text, add_special_tokens=False, split_special_tokens=True) == ref, text
        assert ours.encode(text) == ref, text
        special = spm_tok.encode(text, allow_special=True)
        assert hf.encode(text, add_special_tokens=False) == special, text
        assert ours.decode(ref) == sp_ref.decode(ref), text
    assert hf.encode("Hi") == [1, *sp_ref.encode("Hi")]
    assert (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (1, 2, True)


def test_gguf_llama_vocab_matches_sentencepiece(sp_ref, tmp_path):
    gguf = pytest.importorskip("gguf")
    n = sp_ref.get_piece_size()
    kinds = [
        2 if sp_ref.is_unknown(i) else 3 if sp_ref.is_control(i) else 6 if sp_ref.is_byte(i) else 1
        for i in range(n)
    ]
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp_ref.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp_ref.get_score(i) for i in range(n)])
    writer.add_token_types(kinds)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = load_tokenizer(tmp_path / "spm.gguf")
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    for text in TEXTS + random_texts(sp_ref, 30, seed=2):
        assert tok.encode(text) == sp_ref.encode(text), text
        assert tok.decode(tok.encode(text)) == text


# ---------------------------------------------------------------- Llama 3 tiktoken format


def bytes_of(token: str) -> bytes:
    """Raw bytes of a byte-level BPE token string (transformers' table as the reference)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    inverse = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(inverse[c] for c in token)


@pytest.fixture(scope="module")
def trained_bpe() -> HFBackend:
    """A small byte-level BPE trained on the corpus with Llama 3's pre-tokenizer."""
    pytest.importorskip("transformers")
    tk = HFBackend(models.BPE(ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(CORPUS.splitlines(), trainer)
    return tk


@pytest.fixture(scope="module")
def ranks(trained_bpe) -> dict[bytes, int]:
    vocab = trained_bpe.get_vocab()
    return {bytes_of(t): i for t, i in sorted(vocab.items(), key=lambda kv: kv[1])}


@pytest.fixture(scope="module")
def tiktoken_dir(ranks, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("llama3")
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items()]
    (d / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture(scope="module")
def tik_tok(tiktoken_dir) -> Tokenizer:
    return load_tokenizer(tiktoken_dir)


def reference_bpe(ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's algorithm, written plainly: split, then merge the best-ranked pair first."""
    regex = pytest.importorskip("regex")
    ids = []
    for word in regex.findall(LLAMA3_SPLIT, text):
        parts = [bytes([b]) for b in word.encode("utf-8")]
        while len(parts) > 1:
            pairs = [parts[k] + parts[k + 1] for k in range(len(parts) - 1)]
            candidates = [(ranks[p], k) for k, p in enumerate(pairs) if p in ranks]
            if not candidates:
                break
            _, k = min(candidates)
            parts[k : k + 2] = [parts[k] + parts[k + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def test_tiktoken_ids_match_reference_bpe(tik_tok, ranks, trained_bpe):
    assert isinstance(tik_tok, HFTokenizer)
    for text in TEXTS + CORPUS.splitlines()[:5]:
        ids = tik_tok.encode(text)
        assert ids == reference_bpe(ranks, text), text
        assert ids == trained_bpe.encode(text, add_special_tokens=False).ids, text
        assert tik_tok.decode(ids) == text


def test_tiktoken_special_token_layout(tik_tok, ranks):
    n = len(ranks)
    specials = tik_tok.special_tokens
    assert len(specials) == 256 and tik_tok.vocab_size == n + 256
    expected = {
        "<|begin_of_text|>": 0,
        "<|end_of_text|>": 1,
        "<|finetune_right_pad_id|>": 4,
        "<|start_header_id|>": 6,
        "<|end_header_id|>": 7,
        "<|eom_id|>": 8,
        "<|eot_id|>": 9,
        "<|python_tag|>": 10,
        "<|reserved_special_token_3|>": 11,
        "<|reserved_special_token_247|>": 255,
    }
    for text, offset in expected.items():
        assert specials[text] == n + offset, text
    assert (tik_tok.bos_id, tik_tok.eos_id) == (n, n + 1)
    assert {n + 1, n + 8, n + 9} <= tik_tok.stop_ids
    assert tik_tok.add_bos
    assert tik_tok.encode("hi", bos=True) == [n, *reference_bpe(ranks, "hi")]


def test_tiktoken_special_text_stays_plain(tik_tok, ranks):
    n = len(ranks)
    text = "<|start_header_id|>user<|end_header_id|>hi<|eot_id|>"
    plain = tik_tok.encode(text)
    assert plain == reference_bpe(ranks, text) and max(plain) < n
    special = tik_tok.encode(text, allow_special=True)
    assert special == [
        n + 6,
        *reference_bpe(ranks, "user"),
        n + 7,
        *reference_bpe(ranks, "hi"),
        n + 9,
    ]
    assert tik_tok.decode(special) == "userhi"
    assert tik_tok.decode(special, skip_special=False) == text


def test_tiktoken_save_loads_in_transformers(tik_tok, ranks, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_tokenizer(tik_tok, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    n = len(ranks)
    for text in TEXTS:
        plain = hf.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert plain == tik_tok.encode(text), text
        ids = tik_tok.encode(text, allow_special=True)
        assert hf.encode(text, add_special_tokens=False) == ids, text
    assert hf.encode("hi")[0] == n
    assert hf.convert_tokens_to_ids("<|eot_id|>") == n + 9
    again = load_tokenizer(tmp_path)
    assert again.special_tokens == tik_tok.special_tokens
    assert (again.bos_id, again.eos_id, again.add_bos) == (n, n + 1, True)


def test_tiktoken_file_errors(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nIg== one\n")
    with pytest.raises(ValueError, match=r"tokenizer.model:2"):
        read_tiktoken_ranks(bad)
    bad.write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(ValueError, match="without gaps"):
        read_tiktoken_ranks(bad)
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "missing_dir_is_a_file_path")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, tokenizer.model"):
        load_tokenizer(empty)


# ---------------------------------------------------------------- SmolLM2 GGUF (real asset)


SMOL_EXTRA = [
    "<|im_start|>system\nYou are nice<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
    "word<|im_end|>word <|endoftext|> <file_sep>x",
    "pi is 3.141592653589793238462643383279",
]


@pytest.mark.real
def test_smollm2_ids_match_transformers(smol_tok, smol_hf_tok):
    for text in TEXTS + SMOL_EXTRA:
        plain = smol_tok.encode(text)
        assert plain == smol_hf_tok.encode(
            text, add_special_tokens=False, split_special_tokens=True
        )
        special = smol_tok.encode(text, allow_special=True)
        assert special == smol_hf_tok.encode(text, add_special_tokens=False), text
        assert smol_tok.decode(plain) == text
        assert smol_tok.decode(special) == smol_hf_tok.decode(special, skip_special_tokens=True)
        assert smol_tok.decode(special, skip_special=False) == smol_hf_tok.decode(special)


@pytest.mark.real
def test_smollm2_specials_and_template(smol_tok, smol_hf_tok):
    assert smol_tok.vocab_size == 49152 and len(smol_tok.special_tokens) == 17
    assert (smol_tok.bos_token, smol_tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smol_tok.pad_id == 2 and 2 in smol_tok.stop_ids
    assert not smol_tok.add_bos
    assert smol_tok.chat_template == smol_hf_tok.chat_template
    assert 1 not in smol_tok.encode("<|im_start|>")
    assert smol_tok.encode("<|im_start|>", allow_special=True) == [1]
    for i in (0, 5, 1000, 49151):
        assert smol_tok.id_to_token(i) == smol_hf_tok.convert_ids_to_tokens(i)
        assert smol_tok.token_to_id(smol_tok.id_to_token(i)) == i


@pytest.mark.real
def test_smollm2_save_roundtrip(smol_tok, smol_hf_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_tokenizer(smol_tok, tmp_path, model_max_length=8192)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path)
    for text in TEXTS + SMOL_EXTRA:
        ids = smol_tok.encode(text, allow_special=True)
        assert hf.encode(text) == ids, text
        assert again.encode(text) == smol_tok.encode(text), text
    assert hf.chat_template == again.chat_template == smol_tok.chat_template
    chat = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
    expected = smol_hf_tok.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert hf.apply_chat_template(chat, tokenize=True, return_dict=False) == expected
    assert (again.bos_id, again.eos_id, again.pad_id) == (
        smol_tok.bos_id,
        smol_tok.eos_id,
        smol_tok.pad_id,
    )
    assert again.special_tokens == smol_tok.special_tokens
    assert hf.model_max_length == 8192


@pytest.mark.real
def test_tokenizer_pickles(smol_tok):
    clone = pickle.loads(pickle.dumps(smol_tok))
    assert clone.encode("hello <|im_end|>", allow_special=True) == smol_tok.encode(
        "hello <|im_end|>", allow_special=True
    )
