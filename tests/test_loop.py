"""The shared training loop: losses, batches, accumulation, skips, schedules, eval, metrics."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from llamaforge.config import (
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    TrainConfig,
)
from llamaforge.losses import (
    causal_lm_loss_fn,
    chunked_causal_lm_loss_fn,
    count_label_tokens,
    token_ce_sum,
)
from llamaforge.train import BatchSource, NonFiniteLossError, collate, evaluate_loss, train
from llamaforge.train.loop import accumulate_gradients, resolve_precision
from llamaforge.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from tests.helpers import random_model


def make_examples(n: int, seed: int = 0, lo: int = 4, hi: int = 20) -> list[dict]:
    """Random examples of varied length whose first part (the 'prompt') has no labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.randint(3, 256, (t,), generator=g).tolist()
        p = int(torch.randint(1, t - 1, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def tiny_cfg(max_steps: int = 3, **optim) -> TrainConfig:
    """A quiet TrainConfig: no progress bar, TB, plot, or resume."""
    return TrainConfig(
        max_steps=max_steps,
        optim=OptimConfig(**{"lr": 1e-2, **optim}),
        checkpoint=CheckpointConfig(resume="never"),
        logging=LoggingConfig(tensorboard=False, plot=False, progress=False),
    )


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- losses


def test_token_ce_sum_matches_explicit_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 3, 4, -100, 7], [1, 2, -100, -100, -100]])
    total, n = token_ce_sum(logits, labels)
    expect, count = 0.0, 0
    for b in range(2):
        for t in range(4):  # position t predicts labels[t + 1]
            y = int(labels[b, t + 1])
            if y != -100:
                expect -= torch.log_softmax(logits[b, t].double(), -1)[y].item()
                count += 1
    assert int(n) == count == 4
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(expect, abs=1e-5)


def test_packed_row_loss_equals_separate_examples():
    model = random_model("tiny-llama3")
    a, b = make_examples(2, seed=3)
    packed = {
        "input_ids": a["input_ids"] + b["input_ids"],
        "labels": a["labels"] + [-100] + b["labels"][1:],
        "positions": list(range(len(a["input_ids"]))) + list(range(len(b["input_ids"]))),
        "doc_ids": [0] * len(a["input_ids"]) + [1] * len(b["input_ids"]),
    }
    got, n = causal_lm_loss_fn(model, collate([packed], pad_id=0))
    la, na = causal_lm_loss_fn(model, collate([a], pad_id=0))
    lb, nb = causal_lm_loss_fn(model, collate([b], pad_id=0))
    assert int(n) == int(na + nb)
    assert got.item() == pytest.approx((la + lb).item(), abs=1e-4)


def test_chunked_loss_equals_plain_in_value_and_gradient():
    model = random_model("tiny-smollm2")  # tied embeddings: lm_head shares the embedding
    batch = collate(make_examples(3, seed=1), pad_id=0)
    grads = []
    for fn in (causal_lm_loss_fn, lambda m, b: chunked_causal_lm_loss_fn(m, b, chunk_size=7)):
        model.zero_grad()
        total, n = fn(model, batch)
        (total / n).backward()
        grads.append(
            (total.item(), int(n), {k: p.grad.clone() for k, p in model.named_parameters()})
        )
    (v0, n0, g0), (v1, n1, g1) = grads
    assert n0 == n1 and v1 == pytest.approx(v0, abs=1e-4)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- batches


def test_collate_right_pads_every_key():
    exs = [
        {
            "input_ids": [5, 6, 7],
            "labels": [-100, 6, 7],
            "positions": [0, 1, 0],
            "doc_ids": [0, 0, 1],
        },
        {"input_ids": [8], "labels": [8], "positions": [0], "doc_ids": [0]},
    ]
    b = collate(exs, pad_id=2)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["positions"].tolist() == [[0, 1, 0], [0, 0, 0]]
    assert b["doc_ids"].tolist() == [[0, 0, 1], [0, -1, -1]]
    with pytest.raises(ValueError, match="labels"):
        collate([{"input_ids": [1, 2], "labels": [1]}], pad_id=0)


def test_batch_source_epochs_are_permutations_and_resume_exactly():
    exs = [{"input_ids": [i], "labels": [i]} for i in range(10)]
    src = BatchSource(exs, 3, pad_id=0, seed=4)
    first = [next(src)["input_ids"].flatten().tolist() for _ in range(8)]  # 4 per epoch
    epoch0 = sorted(x for b in first[:4] for x in b)
    epoch1 = sorted(x for b in first[4:] for x in b)
    assert epoch0 == epoch1 == list(range(10))
    assert first[:4] != first[4:]  # a new order each epoch
    src2 = BatchSource(exs, 3, pad_id=0, seed=4)
    for _ in range(5):
        next(src2)
    resumed = BatchSource(exs, 3, pad_id=0, seed=4)
    resumed.load_state_dict(src2.state_dict())
    assert [next(resumed)["input_ids"].flatten().tolist() for _ in range(3)] == first[5:8]
    assert src.steps_per_epoch(2) == 2 and src.total_steps(1.5, 2) == 3


def test_length_grouping_groups_similar_lengths():
    exs = [{"input_ids": [1] * n, "labels": [1] * n} for n in range(1, 65)]
    src = BatchSource(exs, 8, pad_id=0, group_by_length=True, drop_last=True)
    batches = list(src.epoch_batches(0))
    widths = [b["input_ids"].shape[1] for b in batches]
    assert sorted(widths) == list(range(8, 65, 8))  # each batch holds 8 consecutive lengths
    assert widths != sorted(widths, reverse=True)  # batch order is still shuffled
    assert sorted(src.order(0)[0]) != sorted(src.order(1)[0]) or src.order(0) != src.order(1)


# ---------------------------------------------------------------- accumulation


def test_accumulated_micro_batches_match_one_big_batch():
    model = random_model("tiny-llama2").train()
    exs = make_examples(4, seed=2)
    big = collate(exs, pad_id=0)
    logits = model(big["input_ids"])  # independent reference: mean CE over the big batch
    ref = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), big["labels"][:, 1:].flatten(), ignore_index=-100
    )
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    window = [collate([e], pad_id=0) for e in exs]
    stats = accumulate_gradients(model, window, causal_lm_loss_fn)
    assert stats.tokens == count_label_tokens(big)
    assert stats.loss == pytest.approx(ref.item(), abs=1e-5)
    worst = max((p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters())
    assert worst <= 1e-5
    # Averaging per-micro-batch means instead would be visibly wrong on this data.
    model.zero_grad(set_to_none=True)
    for b in window:
        total, n = causal_lm_loss_fn(model, b)
        (total / n / len(window)).backward()
    naive = max((p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters())
    assert naive > 100 * 1e-5


def test_train_grad_accum_equals_large_batch(tmp_path):
    exs = make_examples(4, seed=5)
    logs = []
    for bs, accum in ((4, 1), (1, 4)):
        model = random_model("tiny-llama2")
        src = BatchSource(exs, bs, pad_id=0, shuffle=False)
        out = tmp_path / f"bs{bs}"
        res = train(
            model,
            source=src,
            loss_fn=causal_lm_loss_fn,
            cfg=tiny_cfg(1, grad_accum=accum),
            out_dir=out,
        )
        logs.append((res.losses[0], metrics(out)[0]["grad_norm"], metrics(out)[0]["tokens"]))
    (l1, g1, t1), (l2, g2, t2) = logs
    assert t1 == t2 and abs(l1 - l2) <= 1e-5 and abs(g1 - g2) <= 1e-5


def test_zero_token_window_is_finite_with_zero_gradients(tmp_path):
    model = random_model("tiny-llama3").train()
    exs = [
        {"input_ids": e["input_ids"], "labels": [-100] * len(e["labels"])} for e in make_examples(4)
    ]
    stats = accumulate_gradients(
        model, [collate(exs[:2], 0), collate(exs[2:], 0)], causal_lm_loss_fn
    )
    assert stats.loss == 0.0 and stats.tokens == 0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    before = params_of(model)
    res = train(
        model,
        source=BatchSource(exs, 2, pad_id=0),
        loss_fn=causal_lm_loss_fn,
        cfg=tiny_cfg(2),
        out_dir=tmp_path,
    )
    assert res.losses == [0.0, 0.0] and res.skipped_steps == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_count_fn_mismatch_is_reported():
    model = random_model("tiny-llama2")
    with pytest.raises(ValueError, match="count_fn"):
        accumulate_gradients(
            model, [collate(make_examples(2), 0)], causal_lm_loss_fn, count_fn=lambda b: 1
        )


# ---------------------------------------------------------------- non-finite losses


def nan_on_calls(bad: set[int]):
    """causal_lm_loss_fn that returns NaN on the given (1-based) calls."""
    calls = []

    def fn(model, batch):
        calls.append(1)
        total, n = causal_lm_loss_fn(model, batch)
        return (total * float("nan") if len(calls) in bad else total), n

    return fn


def test_nonfinite_windows_are_skipped_without_touching_optimizer_or_schedule(tmp_path):
    exs = make_examples(5, seed=7)
    cfg = dataclasses.replace(tiny_cfg(3, warmup_steps=1, weight_decay=0.1))
    model = random_model("tiny-llama2")
    src = BatchSource(exs, 1, pad_id=0, shuffle=False)
    res = train(model, source=src, loss_fn=nan_on_calls({2, 3}), cfg=cfg, out_dir=tmp_path / "a")
    assert res.step == 3 and res.skipped_steps == 2
    skips = [r for r in metrics(tmp_path / "a") if r.get("event") == "skip"]
    assert [r["reason"] for r in skips] == ["nonfinite_loss"] * 2
    # Independent reference: the same run over only the examples that were applied.
    ref = random_model("tiny-llama2")
    src = BatchSource([exs[0], exs[3], exs[4]], 1, pad_id=0, shuffle=False)
    ref_res = train(ref, source=src, loss_fn=causal_lm_loss_fn, cfg=cfg, out_dir=tmp_path / "b")
    assert res.losses == ref_res.losses
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_nonfinite_loss_stops_after_k_in_a_row(tmp_path):
    model = random_model("tiny-llama2")
    before = params_of(model)
    cfg = tiny_cfg(10, max_nonfinite_steps=3)
    src = BatchSource(make_examples(6), 1, pad_id=0)
    with pytest.raises(NonFiniteLossError, match="3 windows in a row"):
        train(
            model, source=src, loss_fn=nan_on_calls(set(range(1, 100))), cfg=cfg, out_dir=tmp_path
        )
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert sum(r.get("event") == "skip" for r in metrics(tmp_path)) == 3
    last = metrics(tmp_path)[-1]  # the run's own record of how it ended
    assert last["event"] == "failed" and last["error"].startswith("NonFiniteLossError: ")


# ---------------------------------------------------------------- optimizer and schedule


def test_schedules_warm_up_then_decay_to_min():
    total, warm, lo = 20, 4, 0.1
    f = {
        s: [lr_factor(i, total=total, warmup=warm, schedule=s, min_ratio=lo) for i in range(21)]
        for s in ("cosine", "linear", "constant")
    }
    for s, vals in f.items():
        assert vals[:warm] == pytest.approx([0.25, 0.5, 0.75, 1.0]), s
    for i in range(warm, total + 1):
        p = (i - warm) / (total - warm)
        assert f["cosine"][i] == pytest.approx(lo + (1 - lo) * (1 + math.cos(math.pi * p)) / 2)
        assert f["linear"][i] == pytest.approx(lo + (1 - lo) * (1 - p))
    assert f["cosine"][total] == pytest.approx(lo) and f["linear"][total] == pytest.approx(lo)
    assert all(a >= b for a, b in zip(f["cosine"][warm:], f["cosine"][warm + 1 :], strict=False))
    assert set(f["constant"][warm:]) == {1.0}
    # The scheduler drives the optimizer's lr with the same numbers.
    model = random_model("tiny-llama2")
    cfg = OptimConfig(lr=0.5, warmup_ratio=0.2, min_lr_ratio=lo)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5 * v for v in f["cosine"][:total]])


def test_weight_decay_skips_norms_and_frozen_params():
    model = random_model("tiny-llama2")
    model.layers[0].requires_grad_(False)
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all("norm" in n for n in plain) and not any("norm" in n for n in decayed)
    assert not any(n.startswith("layers.0.") for n in decayed | plain)
    assert "layers.1.mlp.up_proj.weight" in decayed


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        resolve_precision("fp16", cpu)


def test_bf16_autocast_and_activation_checkpointing_train(tmp_path):
    model = random_model("tiny-llama3")
    cfg = dataclasses.replace(tiny_cfg(2), precision="bf16", activation_checkpointing=True)
    res = train(
        model,
        source=BatchSource(make_examples(4), 2, pad_id=0),
        loss_fn=causal_lm_loss_fn,
        cfg=cfg,
        out_dir=tmp_path,
    )
    assert model.gradient_checkpointing and all(math.isfinite(v) for v in res.losses)


# ---------------------------------------------------------------- evaluation and outputs


def test_evaluate_loss_is_token_weighted():
    model = random_model("tiny-llama2")
    exs = make_examples(5, seed=9)
    got = evaluate_loss(model, exs, causal_lm_loss_fn, batch_size=2, pad_id=0)
    total, count = 0.0, 0
    for e in exs:  # one example at a time, no padding
        logits = model(torch.tensor([e["input_ids"]]))[0]
        for t in range(len(e["labels"]) - 1):
            if e["labels"][t + 1] != -100:
                total -= torch.log_softmax(logits[t], -1)[e["labels"][t + 1]].item()
                count += 1
    assert got["val_loss"] == pytest.approx(total / count, abs=1e-5)
    assert got["val_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_early_stopping_on_validation_loss(tmp_path):
    vals = iter([1.0, 0.9, 0.95, 0.97, 0.5, 0.4])
    cfg = tiny_cfg(20)
    cfg.eval = EvalConfig(every=2, patience=2)
    res = train(
        random_model("tiny-llama2"),
        source=BatchSource(make_examples(4), 2, pad_id=0),
        loss_fn=causal_lm_loss_fn,
        cfg=cfg,
        out_dir=tmp_path,
        eval_fn=lambda m: {"val_loss": next(vals)},
    )
    assert res.stop_reason == "early_stop" and res.step == 8
    assert res.best_val_loss == 0.9
    assert [r["step"] for r in metrics(tmp_path) if r["kind"] == "eval"] == [2, 4, 6, 8]


def test_metrics_jsonl_tensorboard_and_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = tiny_cfg(4)
    cfg.logging = LoggingConfig(tensorboard=True, plot=True, progress=False)
    cfg.eval = EvalConfig(every=2)
    exs = make_examples(6)
    res = train(
        random_model("tiny-llama2"),
        source=BatchSource(exs, 2, pad_id=0),
        loss_fn=causal_lm_loss_fn,
        cfg=cfg,
        out_dir=tmp_path,
        eval_fn=lambda m: evaluate_loss(m, exs[:2], causal_lm_loss_fn, pad_id=0),
    )
    recs = metrics(tmp_path)
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    assert [r["loss"] for r in train_recs] == pytest.approx(res.losses)
    assert {"lr", "grad_norm", "tokens", "tokens_per_s"} <= set(train_recs[0])
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [2, 4]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if pytest.importorskip("tensorboard"):
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_train_applies_the_memory_settings_to_the_model(tmp_path):
    """Checkpointing, how many blocks, the feed-forward slices and the kept attention
    outputs reach the model, and a run with all of them takes the same first step as one
    without."""
    exs = make_examples(4, seed=6)
    losses = []
    for settings in ({}, {"activation_checkpointing": True,
                         "activation_checkpointing_layers": 1, "mlp_chunk_tokens": 8,
                         "activation_checkpointing_keep_attention": True}):  # fmt: skip
        model = random_model("tiny-llama3")
        cfg = dataclasses.replace(tiny_cfg(1), **settings)
        src = BatchSource(exs, 4, pad_id=0, shuffle=False)
        res = train(model, source=src, loss_fn=causal_lm_loss_fn, cfg=cfg, out_dir=tmp_path / "o")
        losses.append(res.losses[0])
    assert model.gradient_checkpointing and model.checkpoint_layers == 1
    assert model.layers[0].mlp.chunk_tokens == 8 and model.checkpoint_keeps_attention
    assert abs(losses[0] - losses[1]) <= 1e-5


def test_the_loop_keeps_objects_made_before_it_out_of_the_collector(tmp_path):
    """While the loop steps, what existed before it (model, optimizer, modules) is frozen
    out of the cyclic garbage collector's passes; afterwards everything is back."""
    import gc

    seen = []

    def loss_fn(model, batch):
        seen.append(gc.get_freeze_count())
        return causal_lm_loss_fn(model, batch)

    assert gc.get_freeze_count() == 0
    model = random_model("tiny-llama2")
    src = BatchSource(make_examples(4), 2, pad_id=0, shuffle=False)
    train(model, source=src, loss_fn=loss_fn, cfg=tiny_cfg(2), out_dir=tmp_path)
    assert len(seen) == 2 and min(seen) > 1000  # the model's tensors and modules at least
    assert gc.get_freeze_count() == 0
