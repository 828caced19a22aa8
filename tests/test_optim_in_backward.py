"""optim.step_in_backward: each parameter's AdamW update applied during the backward."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from llamaforge.config import (
    CheckpointConfig,
    LoggingConfig,
    OptimConfig,
    TrainConfig,
    config_from_dict,
)
from llamaforge.errors import UserError
from llamaforge.losses import causal_lm_loss_fn
from llamaforge.train import BatchSource, NonFiniteLossError, train
from llamaforge.train.optim import InBackwardOptimizer, build_optimizer
from tests.helpers import random_model
from tests.test_loop import make_examples, metrics, nan_on_calls


def cfg_for(max_steps: int, in_backward: bool, every: int | None = None, resume="never"):
    return TrainConfig(
        max_steps=max_steps,
        optim=OptimConfig(
            lr=5e-3,
            warmup_steps=2,
            weight_decay=0.1,
            max_grad_norm=0.0,
            step_in_backward=in_backward,
        ),  # fmt: skip
        checkpoint=CheckpointConfig(every=every, keep=5, resume=resume),
        logging=LoggingConfig(tensorboard=False, plot=False, progress=False),
    )


def run(out, max_steps, in_backward, **kw):
    model = random_model("tiny-llama3")
    src = BatchSource(make_examples(14, seed=11), 3, pad_id=0, seed=5)
    res = train(model, source=src, loss_fn=causal_lm_loss_fn,
                cfg=cfg_for(max_steps, in_backward, **kw), out_dir=out)  # fmt: skip
    return model, res


def test_same_updates_as_the_optimizer_after_the_backward(tmp_path):
    """Full fine-tuning, fp32, 6 steps with warm-up, weight decay and a cosine schedule:
    the same losses, gradient norms and weights as AdamW stepped after the backward."""
    ref_model, ref = run(tmp_path / "ref", 6, False)
    model, res = run(tmp_path / "inbw", 6, True)
    torch.testing.assert_close(
        torch.tensor(res.losses), torch.tensor(ref.losses), rtol=1e-5, atol=1e-6
    )
    norms = [
        [r["grad_norm"] for r in metrics(d) if r["kind"] == "train"]
        for d in (tmp_path / "ref", tmp_path / "inbw")
    ]
    torch.testing.assert_close(torch.tensor(norms[1]), torch.tensor(norms[0]), rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert any(
        not torch.equal(p, q)
        for p, q in zip(model.parameters(), random_model("tiny-llama3").parameters(), strict=True)
    )


def test_gradients_are_freed_during_the_backward():
    model = random_model("tiny-llama3")
    opt = build_optimizer(model, OptimConfig(lr=1e-2, max_grad_norm=0.0, step_in_backward=True))
    assert isinstance(opt, InBackwardOptimizer)
    before = [p.detach().clone() for p in model.parameters()]
    alive: list[int] = []  # gradients alive when each hook ran, at most a handful
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(
            lambda _p: alive.append(sum(q.grad is not None for q in model.parameters()))
        )
    ids = torch.randint(3, 256, (2, 12))
    model(ids).float().logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert max(alive) <= 2  # (the hooks registered later see their own gradient too)
    assert opt.take_grad_norm() > 0 and opt.take_grad_norm() == 0.0


def test_exact_resume(tmp_path):
    full_model, full = run(tmp_path / "a", 6, True, every=3)
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a/checkpoints/checkpoint-00000003",
                    tmp_path / "b/checkpoints/checkpoint-00000003")  # fmt: skip
    model, resumed = run(tmp_path / "b", 6, True, resume="auto")
    assert resumed.losses == full.losses[3:]
    for (n, p), q in zip(model.named_parameters(), full_model.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_a_nonfinite_loss_runs_no_backward(tmp_path):
    """The loss is checked before its backward: the step is skipped and nothing applied."""
    exs = make_examples(5, seed=7)
    cfg = cfg_for(3, True)
    model = random_model("tiny-llama2")
    src = BatchSource(exs, 1, pad_id=0, shuffle=False)
    res = train(model, source=src, loss_fn=nan_on_calls({2}), cfg=cfg, out_dir=tmp_path / "a")
    assert res.step == 3 and res.skipped_steps == 1
    ref = random_model("tiny-llama2")
    src = BatchSource([exs[0], exs[2], exs[3]], 1, pad_id=0, shuffle=False)
    train(ref, source=src, loss_fn=causal_lm_loss_fn, cfg=cfg, out_dir=tmp_path / "b")
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_a_nonfinite_gradient_stops_the_run(tmp_path):
    def bad_grad_loss(model, batch):
        total, n = causal_lm_loss_fn(model, batch)
        return total + _inf_grad(model.norm.weight), n

    model = random_model("tiny-llama2")
    src = BatchSource(make_examples(4, seed=2), 1, pad_id=0, shuffle=False)
    with pytest.raises(NonFiniteLossError, match="non-finite gradient"):
        train(model, source=src, loss_fn=bad_grad_loss, cfg=cfg_for(2, True), out_dir=tmp_path)


def _inf_grad(w: torch.Tensor) -> torch.Tensor:
    """0 in value, inf in gradient."""

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.new_zeros(())

        @staticmethod
        def backward(ctx, g):
            return torch.full_like(w, float("inf"))

    return InfGrad.apply(w)


@pytest.mark.parametrize(
    ("override", "key"),
    [("optim.grad_accum=2", "optim.grad_accum"), ("optim.max_grad_norm=1.0", "optim.max_grad_norm"),
     ("precision=fp16", "precision")],
)  # fmt: skip
def test_what_it_cannot_do_is_a_config_error(override, key):
    raw = {"model": "preset:tiny-llama3", "data": {"path": "x.jsonl"},
           "optim": {"step_in_backward": True, "max_grad_norm": 0.0}}  # fmt: skip
    overrides = [override]
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        config_from_dict(raw, overrides)
    dataclasses.replace(OptimConfig(), step_in_backward=True)  # the dataclass itself is fine


def test_same_updates_with_checkpointing_chunked_loss_and_tied_embeddings(tmp_path):
    """Every block recomputed, the loss over checkpointed chunks of the (tied) LM head: a
    tensor used in several places of the backward still gets one update a step."""
    import functools

    from llamaforge.losses import chunked_causal_lm_loss_fn

    loss_fn = functools.partial(chunked_causal_lm_loss_fn, chunk_size=5)
    models, losses = [], []
    for in_backward in (False, True):
        model = random_model("tiny-llama3")
        model.lm_head.weight = model.embed_tokens.weight  # tied, as SmolLM2 and Llama-3.2
        src = BatchSource(make_examples(8, seed=3), 2, pad_id=0, seed=1)
        cfg = dataclasses.replace(cfg_for(4, in_backward), activation_checkpointing=True)
        res = train(
            model, source=src, loss_fn=loss_fn, cfg=cfg, out_dir=tmp_path / str(in_backward)
        )
        assert model.gradient_checkpointing
        models.append(model)
        losses.append(torch.tensor(res.losses))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(models[1].named_parameters(), models[0].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
