"""bf16 weights with the stochastic-rounding AdamW follow the fp32-master AdamW."""

from __future__ import annotations

import torch

from llamaforge.losses import causal_lm_loss_fn
from llamaforge.train.bf16_adamw import StochasticBF16AdamW, stochastic_round_
from tests.helpers import random_model


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    torch.manual_seed(0)
    x = torch.randn(64) * 3
    lo = x.to(torch.bfloat16)  # nearest; the two neighbours bracket x
    out = torch.empty(4000, 64, dtype=torch.bfloat16)
    for i in range(out.shape[0]):
        stochastic_round_(out[i], x)
    down_bits = x.view(torch.int32) & -65536
    down = down_bits.view(torch.float32)  # the bf16 neighbour toward zero
    up = (down_bits + 65536).view(torch.float32)  # and the one away from zero
    vals = out.float()
    assert ((vals == down) | (vals == up)).all()
    ulp = (up - down).abs()
    assert ((vals.mean(0) - x).abs() < 0.05 * ulp).all(), "mean of roundings is x"
    assert lo.float().sub(x).abs().max() <= ulp.max()


def test_one_step_equals_torch_adamw_within_a_bf16_ulp():
    torch.manual_seed(1)
    w = torch.randn(300, 70).to(torch.bfloat16)
    grads = [torch.randn(300, 70).to(torch.bfloat16) for _ in range(3)]
    ours = torch.nn.Parameter(w.clone())
    ref = torch.nn.Parameter(w.float())
    kw = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    opt, ref_opt = StochasticBF16AdamW([ours], **kw), torch.optim.AdamW([ref], **kw)
    for g in grads:
        ours.grad, ref.grad = g.clone(), g.float()
        opt.step()
        ref_opt.step()
    # rounding noise on weights (a few ulps) and moments (~2^-8 of each lr-sized step)
    ulp = ref.detach().abs() * 2**-7
    assert ((ours.detach().float() - ref.detach()).abs() <= 4 * ulp + 3 * 1e-2 * 2**-7).all()
    state = opt.state_dict()
    again = StochasticBF16AdamW([torch.nn.Parameter(w.clone())], **kw)
    again.load_state_dict(state)
    assert torch.equal(
        again.state[again.param_groups[0]["params"][0]]["exp_avg"], opt.state[ours]["exp_avg"]
    )


def _train(dtype: torch.dtype, opt_cls, steps: int, lr: float) -> list[float]:
    model = random_model("tiny-llama3", seed=3).train().to(dtype)
    torch.manual_seed(4)
    ids = torch.randint(0, 64, (8, 24))  # a small vocabulary slice: learnable in few steps
    batch = {"input_ids": ids, "labels": ids}
    opt = opt_cls(model.parameters(), lr=lr, weight_decay=0.0)
    torch.manual_seed(5)
    losses = []
    for _ in range(steps):
        loss_sum, n = causal_lm_loss_fn(model, batch)
        loss = loss_sum / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_bf16_stochastic_adamw_follows_the_fp32_master_curve():
    """Same model and data: fp32 masters vs bf16 + stochastic rounding vs bf16 + nearest."""
    steps, lr = 40, 3e-4
    fp32 = _train(torch.float32, torch.optim.AdamW, steps, lr)
    sr = _train(torch.bfloat16, StochasticBF16AdamW, steps, lr)
    nearest = _train(torch.bfloat16, torch.optim.AdamW, steps, lr)
    drop_fp32, drop_sr = fp32[0] - fp32[-1], sr[0] - sr[-1]
    assert drop_fp32 > 0.5
    assert abs(drop_sr - drop_fp32) < 0.1 * drop_fp32, (fp32[-1], sr[-1])
    # round-to-nearest bf16 updates lose most of the small steps: it lags behind
    assert nearest[0] - nearest[-1] < drop_sr


def test_full_fine_tuning_defaults_to_bf16_weights_under_bf16():
    """`optim.master_dtype: auto` (the default): bf16 weights and states under bf16
    precision (the curve in benchmarks/RESULTS.md), fp32 masters when asked or under fp16;
    frozen bases are in the compute dtype whatever the setting."""
    from llamaforge.config import OptimConfig
    from llamaforge.train.recipe import base_dtype

    assert OptimConfig().master_dtype == "auto"
    assert base_dtype("full", "bf16") == torch.bfloat16
    assert base_dtype("full", "bf16", "fp32") == torch.float32
    assert base_dtype("full", "fp16") == torch.float32
    assert base_dtype("full", "fp32", "bf16") == torch.float32
    assert base_dtype("lora", "bf16", "fp32") == torch.bfloat16
