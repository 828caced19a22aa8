"""Generation: cached decoding against a no-cache loop and transformers; sampling; stopping."""

from __future__ import annotations

import pytest
import torch

from llamaforge.io.hf import save_hf
from llamaforge.model.generate import (
    SamplingParams,
    TextStream,
    _cut_at_stop_string,
    _run,
    apply_repetition_penalty,
    generate,
    stream_text,
)
from tests.helpers import TINY, random_model

transformers = pytest.importorskip("transformers")


PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [11, 3], [200, 201, 202, 9, 8, 7, 6, 5, 4, 3, 1, 250]]


def letters(ids: list[int]) -> str:
    """A toy decode: one lowercase letter per token."""
    return "".join(chr(97 + t % 26) for t in ids)


@torch.no_grad()
def naive_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding that re-runs the whole sequence without a cache at every step."""
    seq, out, logits = list(prompt), [], []
    for _ in range(n):
        last = model(torch.tensor([seq]))[0, -1].float()
        logits.append(last)
        out.append(int(last.argmax()))
        seq.append(out[-1])
    return out, logits


@pytest.mark.parametrize("name", TINY)
def test_cached_equals_uncached(name):
    model = random_model(name)
    tokens, history = _run(model, [PROMPTS[0]], SamplingParams(max_new_tokens=12), keep_logits=True)
    ref_tokens, ref_logits = naive_greedy(model, PROMPTS[0], 12)
    assert tokens[0] == ref_tokens
    assert len(history) == 12
    for got, want in zip(history, ref_logits, strict=True):
        assert (got[0] - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", TINY)
def test_batched_padding_equals_alone(name):
    model = random_model(name, seed=3)
    params = SamplingParams(max_new_tokens=10)
    batched, history = _run(model, PROMPTS, params, keep_logits=True)
    for r, prompt in enumerate(PROMPTS):
        alone, alone_history = _run(model, [prompt], params, keep_logits=True)
        assert batched[r] == alone[0]
        for got, want in zip(history, alone_history, strict=True):
            assert (got[r] - want[0]).abs().max().item() <= 1e-5


def _hf_model(model, tmp_path):
    save_hf(model, tmp_path)
    return transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()


def _until(tokens: list[int], stop: int) -> list[int]:
    return tokens[: tokens.index(stop)] if stop in tokens else tokens


@pytest.mark.parametrize("name", TINY)
def test_greedy_equals_transformers_batched(name, tmp_path):
    model = random_model(name, seed=4)
    ref = _hf_model(model, tmp_path)
    eos, n, width = 2, 16, max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    out = ref.generate(
        input_ids=ids,
        attention_mask=attn,
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=eos,
        pad_token_id=0,
    )
    ours = generate(model, PROMPTS, SamplingParams(max_new_tokens=n, stop_ids=[eos]))
    for r in range(len(PROMPTS)):
        assert ours[r] == _until(out[r, width:].tolist(), eos)


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_repetition_penalty_greedy_equals_transformers(penalty, tmp_path):
    model = random_model("tiny-llama3", seed=5)
    ref = _hf_model(model, tmp_path)
    prompt, n = PROMPTS[2], 20
    out = ref.generate(
        input_ids=torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=n,
        repetition_penalty=penalty,
        eos_token_id=2,
        pad_token_id=0,
    )
    params = SamplingParams(max_new_tokens=n, repetition_penalty=penalty, stop_ids=[2])
    assert generate(model, [prompt], params)[0] == _until(out[0, len(prompt) :].tolist(), 2)


def test_repetition_penalty_matches_transformers_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 4
    ids = torch.randint(0, 50, (3, 12))
    want = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), want)


def test_stop_id_ends_row_without_it():
    model = random_model("tiny-llama2", seed=6)
    free = generate(model, PROMPTS, SamplingParams(max_new_tokens=20))
    row = free[0]
    k = next(i for i in range(2, len(row)) if row[i] not in row[:i])
    stopped = generate(model, PROMPTS, SamplingParams(max_new_tokens=20, stop_ids={row[k]}))
    assert stopped[0] == row[:k]
    for r in (1, 2):  # other rows go on exactly as before unless they met the same id
        assert stopped[r] == _until(free[r], row[k])


def test_stop_string_spanning_tokens():
    model = random_model("tiny-llama2", seed=6)
    free = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=24))[0]
    text = letters(free)
    k = next(i for i in range(3, 20) if text.find(text[i : i + 3]) == i)
    stop = text[k : k + 3]  # three tokens' worth of text, first seen at token k
    params = SamplingParams(max_new_tokens=24, stop_strings=["zzzzzzzz", stop])
    got = generate(model, [PROMPTS[0]], params, decode=letters)[0]
    assert got == free[:k]
    with pytest.raises(ValueError, match="decode"):
        generate(model, [PROMPTS[0]], params)


def test_stop_string_inside_a_token_drops_that_token():
    pieces = {1: "ab", 2: "c#", 3: "#d", 4: "ef"}
    decode = lambda ids: "".join(pieces[t] for t in ids)
    assert _cut_at_stop_string([1, 2], decode, ["##"]) is None
    assert _cut_at_stop_string([1, 2, 3], decode, ["##"]) == 1  # "c#" reaches into "##"
    assert _cut_at_stop_string([1, 4, 1], decode, ["fa"]) == 1


def test_max_new_tokens_and_on_token():
    model = random_model("tiny-llama3", seed=8)
    seen: list[tuple[int, int]] = []
    out = generate(
        model,
        PROMPTS,
        SamplingParams(max_new_tokens=7),
        on_token=lambda r, t: seen.append((r, t)),
    )
    assert [len(o) for o in out] == [7, 7, 7]
    for r in range(3):
        assert [t for rr, t in seen if rr == r] == out[r]
    assert generate(model, PROMPTS, SamplingParams(max_new_tokens=0)) == [[], [], []]


def test_sampling_reproducible_and_degenerate_cases():
    model = random_model("tiny-llama3", seed=9)
    greedy = generate(model, PROMPTS, SamplingParams(max_new_tokens=12))
    hot = SamplingParams(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, seed=123)
    a = generate(model, PROMPTS, hot)
    assert a == generate(model, PROMPTS, hot)
    other = SamplingParams(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, seed=124)
    assert a != generate(model, PROMPTS, other)
    assert a != greedy
    top1 = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1, seed=1)
    assert generate(model, PROMPTS, top1) == greedy
    tiny_p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=1)
    assert generate(model, PROMPTS, tiny_p) == greedy


def test_bfloat16_runs():
    model = random_model("tiny-smollm2").to(torch.bfloat16)
    out = generate(model, PROMPTS, SamplingParams(max_new_tokens=5, temperature=0.8, seed=0))
    assert [len(o) for o in out] == [5, 5, 5]


def utf8(ids: list[int]) -> str:
    """A byte-level toy decode: each token is one UTF-8 byte."""
    return bytes(ids).decode("utf-8", errors="replace")


def test_stream_text_multibyte_split():
    text = "héllo € 👍!"
    pieces = list(stream_text(text.encode(), utf8))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "€" in pieces and "👍" in pieces  # a 3- and a 4-byte char, each released whole


def test_stream_text_stop_strings():
    pieces = list(stream_text(b"a#b ok ## not this", utf8, stop_strings=["##"]))
    assert "".join(pieces) == "a#b ok "
    stream = TextStream(utf8, ["END"])
    shown = "".join(stream.push(t) for t in b"xEN")
    assert shown == "x"  # "EN" could start END: held back
    assert stream.flush() == "EN"
