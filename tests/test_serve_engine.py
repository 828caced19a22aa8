"""The serving engine: continuous batching, per-row params and adapters, slot pool, prefill."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from llamaforge.adapters import add_adapter, lora_modules, row_adapters, set_adapter
from llamaforge.io.peft import AdapterError, save_peft_adapter
from llamaforge.model.generate import SamplingParams, _run, generate
from llamaforge.serve import CANCELLED, LENGTH, STOP, Engine, EngineBusy, Request, UnknownAdapter
from llamaforge.serve.engine import OFFLINE_PREFILL_BUDGET
from llamaforge.serve.kv import RowBatch, SlotPool
from tests.helpers import TINY, random_model

ADAPTERS = ("a", "b", "c", "d")


def letters(ids: list[int]) -> str:
    """A toy decode: one lowercase letter per token."""
    return "".join(chr(97 + t % 26) for t in ids)


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, 256, (k,), generator=g).tolist() for k in lens]


def with_adapters(name: str = "tiny-llama3", names=ADAPTERS, seed: int = 0):
    """A tiny model with LoRA adapters of different ranks and targets, B non-zero."""
    model = random_model(name, seed=seed)
    targets = [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), None, ("down_proj",)]
    for i, n in enumerate(names):
        kw = {} if targets[i % 4] is None else {"targets": targets[i % 4]}
        add_adapter(model, n, r=(2, 4, 8, 3)[i % 4], alpha=(4, 8, 8, 6)[i % 4], **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for n in m.lora_B:
                m.lora_B[n].copy_(torch.randn(m.lora_B[n].shape, generator=g) * 0.3)
    set_adapter(model, None)
    return model


def solo_reference(model, prompt, params, adapter):
    """model.generate.generate with the adapter switched on the modules (the old path)."""
    set_adapter(model, adapter)
    try:
        return generate(model, [prompt], params, decode=letters)[0]
    finally:
        set_adapter(model, None)


@pytest.mark.parametrize("name", TINY)
def test_engine_equals_generate_with_queue_and_chunks(name):
    model = random_model(name)
    ps = prompts(6, seed=1)
    params = SamplingParams(max_new_tokens=10)
    ref = [generate(model, [p], params)[0] for p in ps]
    # fewer slots than requests (queue), prompts cut into chunks of 7
    engine = Engine(model, max_batch=4, max_len=64, prefill_chunk=7, prefill_budget=14)
    assert engine.generate(ps, params) == ref


def test_greedy_is_batch_invariant_over_adapters_fp32():
    """Each request alone == mixed with 15 others over 4 adapters and the base."""
    model = with_adapters()
    ps = prompts(16, seed=2, hi=50)
    names = [(None, *ADAPTERS)[i % 5] for i in range(16)]
    params = SamplingParams(max_new_tokens=16)
    alone = []
    for p, n in zip(ps, names, strict=True):
        e = Engine(model, max_batch=16, max_len=96, prefill_chunk=16)
        alone.append(e.generate([p], params, [n])[0])
    mixed_engine = Engine(model, max_batch=16, max_len=96, prefill_chunk=16, prefill_budget=64)
    mixed = mixed_engine.generate(ps, params, names)
    assert mixed == alone
    # and each equals the old one-adapter-at-a-time path (module state switched per call)
    assert alone == [solo_reference(model, p, params, n) for p, n in zip(ps, names, strict=True)]
    assert len({tuple(o) for o in alone}) > 8  # the adapters really change the outputs


def test_offline_budget_prefills_the_whole_batch_at_once():
    """With OFFLINE_PREFILL_BUDGET every prompt reads its next chunk in each step: a batch of
    prompts of <= 2 chunks is prefilled in 2 steps (not one prompt per step), same tokens."""
    model = with_adapters()
    ps = prompts(16, seed=2, lo=17, hi=32)  # 2 chunks of 16 each
    names = [(None, *ADAPTERS)[i % 5] for i in range(16)]
    params = SamplingParams(max_new_tokens=6)
    ref = Engine(model, max_batch=16, max_len=64, prefill_chunk=16).generate(ps, params, names)
    engine = Engine(
        model, max_batch=16, max_len=64, prefill_chunk=16, prefill_budget=OFFLINE_PREFILL_BUDGET
    )
    reqs = [engine.submit(Request(p, params, n)) for p, n in zip(ps, names, strict=True)]
    engine.step()
    assert all(r.cached == 16 for r in reqs)  # every prompt read its first chunk
    engine.step()
    assert not any(r.reading_prompt for r in reqs) and all(r.output for r in reqs)
    engine.wait(reqs)
    assert [r.output for r in reqs] == ref


def test_staggered_arrivals_join_the_running_batch():
    model = with_adapters()
    ps = prompts(8, seed=3)
    names = [(None, *ADAPTERS)[i % 5] for i in range(8)]
    params = SamplingParams(max_new_tokens=12)
    ref = [solo_reference(model, p, params, n) for p, n in zip(ps, names, strict=True)]
    engine = Engine(model, max_batch=3, max_len=64, prefill_chunk=5)
    reqs = []
    for p, n in zip(ps, names, strict=True):  # one new request every two steps
        reqs.append(engine.submit(Request(p, params, n)))
        engine.step()
        engine.step()
    engine.wait(reqs)
    assert [r.output for r in reqs] == ref
    first, second = reqs[0], reqs[1]
    assert second.times[1] < first.finished_at  # joined while the first was still running


def test_long_prefill_does_not_stall_running_rows():
    model = random_model("tiny-llama3")
    engine = Engine(model, max_batch=2, max_len=200, prefill_chunk=8)
    running = engine.submit(Request([5, 6, 7], SamplingParams(max_new_tokens=40)))
    engine.step()
    engine.step()
    long = engine.submit(Request(prompts(1, seed=4, lo=150, hi=151)[0], SamplingParams(4)))
    before = len(running.output)
    steps = 0
    while long.reading_prompt:
        engine.step()
        steps += 1
    assert steps == 19  # 150 tokens in chunks of 8
    assert len(running.output) - before == steps  # one token per step all along
    engine.wait([running, long])
    assert long.output == generate(model, [long.prompt], SamplingParams(4))[0]


def test_per_row_sampling_params_and_stops():
    model = random_model("tiny-smollm2")
    p = [9, 8, 7, 6, 5]
    greedy = generate(model, [p], SamplingParams(max_new_tokens=12))[0]
    stop_id = greedy[3]
    stop_str = letters(greedy[5:7])
    rows = [
        SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=3),
        SamplingParams(max_new_tokens=12, stop_ids=[stop_id]),
        SamplingParams(max_new_tokens=12, stop_strings=[stop_str]),
        SamplingParams(max_new_tokens=12, temperature=0.8, top_k=1),  # top-1 == greedy
        SamplingParams(max_new_tokens=12, repetition_penalty=1.3),
    ]
    engine = Engine(model, decode=letters, max_batch=8, max_len=64)
    reqs = [engine.submit(Request(p, sp)) for sp in rows]
    engine.wait(reqs)
    out = [r.output for r in reqs]
    assert out[0] == greedy and out[4] == greedy
    assert out[1] == greedy[:3] and reqs[1].finish_reason == LENGTH
    assert out[2] == greedy[: greedy.index(stop_id)] and reqs[2].finish_reason == STOP
    assert stop_str not in letters(out[3]) and reqs[3].finish_reason == STOP
    assert out[3] == generate(model, [p], rows[3], decode=letters)[0]
    assert out[5] == generate(model, [p], rows[5])[0]


def test_seeded_sampling_does_not_depend_on_the_batch():
    model = random_model("tiny-llama3")
    p = prompts(1, seed=5)[0]
    sp = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=123)
    alone = Engine(model, max_len=64).generate([p], sp)[0]
    others = [SamplingParams(max_new_tokens=10), SamplingParams(8, temperature=0.7)]
    mixed = Engine(model, max_len=64).generate([prompts(1, 6)[0], p, p], [others[0], sp, others[1]])
    assert mixed[1] == alone
    again = Engine(model, max_len=64).generate([p], SamplingParams(**{**sp.__dict__, "seed": 124}))
    assert again[0] != alone


def test_sampling_follows_the_filtered_distribution():
    """top-k 2 at temperature 1: only the two best tokens, in proportion to their probs."""
    from llamaforge.serve.sampling import RowSampling, sample_rows

    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    rows = [RowSampling(1.0, 2, 1.0, 1.0, g)] * 4000
    counts = torch.bincount(sample_rows(logits, rows), minlength=4)
    assert counts[0] == 0 and counts[3] == 0
    want = torch.tensor([2.0, 1.0]).softmax(0)[0].item()  # 0.731
    assert abs(counts[1].item() / 4000 - want) < 0.03


def test_logprobs_are_the_models():
    model = random_model("tiny-llama2")
    p = [4, 5, 6, 7]
    engine = Engine(model, max_len=32)
    r = engine.submit(Request(p, SamplingParams(max_new_tokens=5), logprobs=3))
    engine.wait([r])
    out, history = _run(model, [p], SamplingParams(max_new_tokens=5), keep_logits=True)
    assert r.output == out[0]
    for tok, lp, top, logits in zip(
        r.output, r.token_logprobs, r.top_logprobs, history, strict=True
    ):
        ref = logits[0].log_softmax(-1)
        assert abs(lp - ref[tok].item()) < 1e-4
        assert [t for t, _ in top] == ref.topk(3).indices.tolist()


def test_cancel_frees_the_slot_and_others_continue():
    model = random_model("tiny-llama3")
    ps = prompts(3, seed=7)
    params = SamplingParams(max_new_tokens=20)
    ref = [generate(model, [p], params)[0] for p in ps]
    engine = Engine(model, max_batch=2, max_len=64)
    reqs = [engine.submit(Request(p, params)) for p in ps]
    for _ in range(4):
        engine.step()
    assert engine.load == {"running": 2, "queued": 1}
    engine.cancel(reqs[0])
    engine.step()
    assert reqs[0].finish_reason == CANCELLED and reqs[0].done.is_set()
    assert engine.load["queued"] == 0  # the third request took the freed slot at once
    engine.wait(reqs[1:])
    assert [r.output for r in reqs[1:]] == ref[1:]
    assert reqs[0].output == ref[0][: len(reqs[0].output)]


def test_queue_cap_and_limits():
    model = random_model("tiny-llama3")
    engine = Engine(model, max_batch=1, max_len=16, max_queue=2)
    for _ in range(2):
        engine.submit(Request([1, 2], SamplingParams(4)))
    with pytest.raises(EngineBusy):
        engine.submit(Request([1, 2], SamplingParams(4)))
    with pytest.raises(ValueError, match="does not fit"):
        engine.submit(Request(list(range(16)), SamplingParams(4)))
    with pytest.raises(UnknownAdapter):
        engine.submit(Request([1], SamplingParams(4), "nope"))
    r = Request(list(range(1, 13)), SamplingParams(50))  # runs into the end of its slot
    short = Engine(model, max_len=16)
    short.wait([short.submit(r)])
    assert r.finish_reason == LENGTH and len(r.prompt) + len(r.output) == 16 + 1


def test_background_thread_many_submitters():
    model = with_adapters()
    ps = prompts(12, seed=8)
    names = [(None, *ADAPTERS)[i % 5] for i in range(12)]
    params = SamplingParams(max_new_tokens=8)
    ref = Engine(model, max_batch=16, max_len=64).generate(ps, params, names)
    engine = Engine(model, max_batch=5, max_len=64, prefill_chunk=8).start()
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        r = engine.submit(Request(ps[i], params, names[i]))
        r.done.wait(30)
        results[i] = r.output

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    frozen = gc.get_freeze_count()  # the engine's thread keeps its objects out of the GC
    engine.stop()
    assert [results[i] for i in range(12)] == ref
    assert frozen > 1000 and gc.get_freeze_count() == 0


def test_gathered_lora_equals_row_adapters_and_leaves_training_path_alone():
    model = with_adapters()
    x = torch.randint(0, 256, (5, 9), generator=torch.Generator().manual_seed(9))
    names = ["a", None, "c", "d", "b"]
    with torch.no_grad(), row_adapters(model, names):
        ref = model(x)
    engine = Engine(model, max_batch=5, max_len=16)
    rows = [Request(list(t), SamplingParams(1), n) for t, n in zip(x.tolist(), names, strict=True)]
    for i, r in enumerate(rows):
        r.slot = i
    with torch.no_grad():
        hidden = engine._forward(rows, x.tolist(), [9] * 5)
        torch.testing.assert_close(model.lm_head(hidden), ref, atol=1e-5, rtol=0)
    # q/k/v and gate/up read one input: each group's A lives in one shared buffer
    stacks = engine.stacks.stacks
    for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        parent = "layers.0.self_attn" if group[0] == "q_proj" else "layers.0.mlp"
        shared = {stacks[f"{parent}.{n}"].shared[0] for n in group}
        assert len(shared) == 1 and shared.pop().members == len(group)
    assert stacks["layers.0.self_attn.o_proj"].shared is None
    assert not any(g._h is not None for g in engine.stacks.selection.groups)  # forgotten
    # outside an engine forward the LoRA layers run as before (training uses this path)
    set_adapter(model, "b")
    model.train()
    y = model(x)
    y.sum().backward()
    assert all(m.lora_A["b"].grad is not None for _, m in lora_modules(model) if "b" in m.lora_A)


def test_load_and_unload_adapters_from_peft_folders(tmp_path):
    src = with_adapters(names=("a", "b"))
    save_peft_adapter(src, tmp_path / "a", adapter_name="a")
    save_peft_adapter(src, tmp_path / "b", adapter_name="b")
    model = random_model("tiny-llama3")  # same base weights, no adapters
    engine = Engine(model, max_batch=4, max_len=64, max_loras=1, max_lora_rank=4)
    assert engine.adapters == []
    engine.load_adapter("b", tmp_path / "b")
    with pytest.raises(ValueError, match="slots"):
        engine.load_adapter("a", tmp_path / "a")
    p = prompts(1, seed=10)[0]
    params = SamplingParams(max_new_tokens=8)
    assert engine.generate([p], params, ["b"])[0] == solo_reference(src, p, params, "b")
    engine.unload_adapter("b")
    assert engine.adapters == [] and not any("b" in m.lora_A for _, m in lora_modules(model))
    engine.load_adapter("a", tmp_path / "a")
    assert engine.generate([p], params, ["a"])[0] == solo_reference(src, p, params, "a")
    small = Engine(random_model("tiny-llama3"), max_loras=2, max_lora_rank=2)
    with pytest.raises(ValueError, match="rank 4 > max rank 2"):
        small.load_adapter("b", tmp_path / "b")
    assert small.adapters == [] and not list(lora_modules(small.model))[0][1].lora_A
    with pytest.raises(AdapterError):
        other = random_model("tiny-llama2")  # different shapes
        Engine(other, max_loras=2).load_adapter("a", tmp_path / "a")


def test_row_batch_stores_only_real_tokens_at_each_rows_length():
    model = random_model("tiny-llama3")
    pool = SlotPool(model.cfg, 3, 10, dtype=torch.float32, device="cpu")
    batch = RowBatch(pool, [2, 0], [4, 1], [2, 0])
    k = torch.ones(2, model.cfg.n_kv_heads, 2, model.cfg.head_dim)
    k[1] = 7.0
    q = torch.zeros(2, model.cfg.n_heads, 2, model.cfg.head_dim)
    batch.attend(0, q, k, k)
    filled = pool.k[0].abs().sum((1, 3))  # (slots, positions)
    assert filled[2, 4:6].all() and filled[2].count_nonzero() == 2
    assert filled[0].count_nonzero() == 0 and filled[1].count_nonzero() == 0
