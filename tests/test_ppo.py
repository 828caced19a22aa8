"""PPO (`stage: ppo`): the math against hand-written references, the roles over one base,
padding-side independence, a known-reward learning run, and the CLI end to end with resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from llamaforge.adapters.inject import add_adapter
from llamaforge.adapters.lora import lora_modules, set_adapter
from llamaforge.cli import main
from llamaforge.config import config_from_dict
from llamaforge.io.hf import add_score_head
from llamaforge.ppo_losses import (
    KLController,
    explained_variance,
    gae,
    kl_penalty,
    masked_whiten,
    ppo_loss_parts,
    token_rewards,
)
from llamaforge.train.ppo import PPORun, compute_advantages, make_rollout, prompts_for_step
from llamaforge.train.rollout import ActorCritic, Roles, collate_sequences
from tests.helpers import random_model, tiny_hf_folder

PAIRS = Path(__file__).parent / "fixtures" / "data" / "preference.jsonl"


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).float()


# ---------------------------------------------------------------- math


def test_gae_matches_a_hand_written_loop():
    torch.manual_seed(0)
    lengths, width, gamma, lam = [5, 2, 7, 1], 7, 0.97, 0.9
    mask = _mask(lengths, width)
    rewards, values = torch.randn(4, width), torch.randn(4, width)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        r, v = rewards[i, :n].tolist(), values[i, :n].tolist()
        want, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            nxt = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * nxt - v[t] + gamma * lam * running
            want[t] = running
        assert adv[i, :n].tolist() == pytest.approx(want, abs=1e-5)
        assert ret[i, :n].tolist() == pytest.approx(
            [a + b for a, b in zip(want, v, strict=True)], abs=1e-5
        )
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0
    # gamma = lam = 1: the advantage is the sum of future rewards minus the value
    a1, _ = gae(rewards, values, mask, 1.0, 1.0)
    future = (rewards * mask).flip(1).cumsum(1).flip(1)
    assert torch.allclose(a1, (future - values) * mask, atol=1e-5)


def test_token_rewards_put_the_score_on_the_last_response_token():
    mask = _mask([3, 1], 4)
    kl = torch.ones(2, 4)
    rewards, last = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    assert last.tolist() == [2, 0]
    assert rewards[0].tolist() == pytest.approx([-0.1, -0.1, 1.9, 0.0])
    assert rewards[1].tolist() == pytest.approx([-1.1, 0.0, 0.0, 0.0])


def test_kl_estimators_are_unbiased_and_k3_never_negative():
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(12), 0)
    q = torch.softmax(torch.randn(12), 0)
    exact = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 400_000, replacement=True)
    logp, logq = p.log()[x], q.log()[x]
    k1, k3 = kl_penalty(logp, logq, "k1"), kl_penalty(logp, logq, "k3")
    assert float(k1.mean()) == pytest.approx(exact, abs=0.01)
    assert float(k3.mean()) == pytest.approx(exact, abs=0.01)
    assert bool((k3 >= 0).all()) and bool((k1 < 0).any())
    r = (logq - logp).exp()
    assert torch.allclose(k3, (r - 1) - r.log(), atol=1e-6)
    with pytest.raises(ValueError, match="k1, k3"):
        kl_penalty(logp, logq, "k9")


def test_masked_whiten():
    torch.manual_seed(2)
    mask = _mask([4, 6, 2], 6)
    x = torch.randn(3, 6) * 3 + 5
    w = masked_whiten(x, mask)
    real = w[mask.bool()]
    assert float(real.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(real.std()) == pytest.approx(1.0, abs=1e-4)  # Bessel-corrected, as the var
    assert w[~mask.bool()].abs().sum() == 0
    kept = masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    assert float(kept.mean()) == pytest.approx(float(x[mask.bool()].mean()), abs=1e-4)


def test_ppo_loss_against_a_per_token_reference():
    torch.manual_seed(3)
    mask = _mask([3, 5], 5)
    old_logp, old_v = torch.randn(2, 5), torch.randn(2, 5)
    logp, v = old_logp + 0.4 * torch.randn(2, 5), old_v + 0.5 * torch.randn(2, 5)
    adv, ret = torch.randn(2, 5), torch.randn(2, 5)
    eps, cv = 0.2, 0.3
    parts = ppo_loss_parts(logp, old_logp, adv, v, old_v, ret, mask, clip_ratio=eps, clip_value=cv)
    pol = val = clipped = 0.0
    for i in range(2):
        for t in range(int(mask[i].sum())):
            ratio = math.exp(logp[i, t] - old_logp[i, t])
            a = float(adv[i, t])
            unclipped, clip = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            pol += max(unclipped, clip)
            clipped += clip > unclipped
            vc = float(old_v[i, t]) + min(max(float(v[i, t] - old_v[i, t]), -cv), cv)
            val += 0.5 * max((float(v[i, t]) - float(ret[i, t])) ** 2, (vc - float(ret[i, t])) ** 2)
    assert float(parts.policy) == pytest.approx(pol, rel=1e-5)
    assert float(parts.value) == pytest.approx(val, rel=1e-5)
    assert float(parts.clipped) == clipped and int(parts.tokens) == 8
    # at the rollout's own weights the ratio is 1: the loss is -mean(A), nothing clipped
    same = ppo_loss_parts(
        old_logp, old_logp, adv, old_v, old_v, ret, mask, clip_ratio=eps, clip_value=cv
    )
    assert float(same.policy) == pytest.approx(-float((adv * mask).sum()), rel=1e-6)
    assert float(same.clipped) == 0 and float(same.approx_kl) == 0


def test_explained_variance():
    mask = _mask([3, 3], 3)
    ret = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(ret) + ret.mean(), ret, mask) == pytest.approx(0.0)


def test_adaptive_kl_controller_moves_toward_the_target():
    fixed = KLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    ctl = KLController(0.1, target=6.0, horizon=1000)
    ctl.update(12.0, 100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    ctl.update(6.0 * 0.95, 100)  # error -0.05
    assert ctl.value == pytest.approx(0.1 * 1.02 * (1 - 0.05 * 0.1))
    again = KLController(0.0, target=1.0)
    again.load_state_dict(ctl.state_dict())
    assert again.value == ctl.value


# ---------------------------------------------------------------- roles over one base


def _lora_roles(seed: int = 0) -> Roles:
    """A tiny base with actor, critic and reward adapters (random, non-zero) + score head."""
    model = random_model("tiny-llama3", seed=seed)
    torch.manual_seed(seed + 1)
    add_score_head(model)
    for name in ("actor", "critic", "reward"):
        add_adapter(model, name, r=4, alpha=8, dtype=torch.float32)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for b in m.lora_B.values():
                b.normal_(0, 0.05)
    set_adapter(model, "actor")
    return Roles(ActorCritic(model), lora=True)


def test_rewards_values_and_logps_do_not_depend_on_the_padding_side():
    roles = _lora_roles()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    responses = [[20, 21], [22, 23, 24, 25, 26], [27]]
    tails = [[3], [], [3, 4]]
    got = {}
    for side in ("left", "right"):
        batch = collate_sequences(prompts, responses, 0, side)
        rm = collate_sequences(prompts, responses, 0, side, tail=tails)
        with torch.no_grad():
            logp, ent, values = roles.actor_critic(batch, 1.0)
            ref = roles.reference_logps(batch, 1.0)
            scores = roles.scores(rm)
        m = batch["mask"].bool()
        got[side] = (logp[m], ent[m], values[m], ref[m], scores)
        assert int(m.sum()) == 8
    for a, b in zip(got["left"], got["right"], strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # the score is read at the real last token: each row alone gives the same score
    for i in range(3):
        one = collate_sequences([prompts[i]], [responses[i]], 0, tail=[tails[i]])
        assert float(roles.scores(one)[0]) == pytest.approx(float(got["right"][4][i]), abs=1e-5)


def test_reference_is_the_base_with_adapters_off_exactly():
    roles = _lora_roles(seed=4)
    base = random_model("tiny-llama3", seed=4)
    batch = collate_sequences([[5, 6, 7], [8, 9]], [[10, 11, 12], [13]], 0)
    from llamaforge.train.rollout import hidden_states, response_logps

    with torch.no_grad():
        ref = roles.reference_logps(batch, 0.7)
        want = response_logps(base, hidden_states(base, batch), batch, 0.7)[0]
        actor = roles.actor_critic(batch, 0.7, need_values=False)[0]
    assert torch.equal(ref, want)
    assert not torch.allclose(actor, want)  # the adapters do change the actor


# ---------------------------------------------------------------- learning a known reward


def _tiny_cfg(tmp_path: Path, **ppo) -> object:
    raw = {
        "model": "unused",
        "stage": "ppo",
        "data": {"path": "unused", "format": "preference"},
        "output_dir": str(tmp_path / "ppo"),
        "max_steps": 16,
        "optim": {"lr": 0.02, "batch_size": 8, "schedule": "constant", "max_grad_norm": 1.0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "logging": {"tensorboard": False, "progress": False, "plot": False},
        "ppo": {
            "reward_model": "fn",
            "rollout_batch_size": 16,
            "max_new_tokens": 6,
            "kl_coef": 0.02,
            "epochs": 2,
            "mini_batches": 2,
            **ppo,
        },
    }
    return config_from_dict(raw)


def _count_target(batch: dict) -> torch.Tensor:
    """Known reward: the fraction of response ids that are multiples of 4 (~1/4 at random)."""
    ids = batch["input_ids"].gather(1, batch["resp_idx"] + 1)
    return ((ids % 4 == 0).float() * batch["mask"]).sum(1) / batch["mask"].sum(1)


def _fn_run(tmp_path: Path, **ppo) -> PPORun:
    model = random_model("tiny-llama3", seed=7)
    for name in ("actor", "critic"):
        add_adapter(model, name, r=8, alpha=16, dtype=torch.float32)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    set_adapter(model, "actor")
    roles = Roles(ActorCritic(model), lora=True, reward_fn=_count_target)
    cfg = _tiny_cfg(tmp_path, **ppo)
    prompts = [[5 + i, 30 + i % 7, 60 + i % 5] for i in range(40)]
    return PPORun(cfg, roles, prompts, Path(cfg.output_dir), pad_id=0, eot=[2], decode=str)


def test_ppo_raises_a_known_reward_with_bounded_kl(tmp_path):
    from llamaforge.train.ppo import evaluate_policy, train_ppo

    run = _fn_run(tmp_path, stop_on_eot=False, rollout_batch_size=32, max_new_tokens=2, epochs=4)
    for g in run.optimizer.param_groups:
        g["lr"] = g["initial_lr"] = 0.01
    run.scheduler.base_lrs = [0.01 for _ in run.scheduler.base_lrs]
    run.cfg.max_steps = run.total_steps = 30
    held = [[5 + i, 30 + i % 7, 60 + i % 5] for i in range(40, 136)]  # prompts not trained on
    before = evaluate_policy(run, held, "before")
    assert train_ppo(run) == "completed"
    after = evaluate_policy(run, held, "after")
    assert before["kl"] == pytest.approx(0.0, abs=1e-6)  # actor == reference at the start
    assert after["reward_mean"] > before["reward_mean"] + 0.08, (before, after)  # 0.22 -> 0.36
    assert 0 < after["kl"] < 3.0
    records = [json.loads(x) for x in (run.out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 31))
    for key in (
        "reward_mean", "reward_std", "kl", "entropy", "clipfrac", "value_loss", "policy_loss",
        "explained_variance", "response_length", "generation_s", "training_s",
        "generation_tokens_per_s", "training_tokens_per_s", "kl_coef", "approx_kl",
    ):  # fmt: skip
        assert key in train[0] and math.isfinite(train[0][key]) or key == "explained_variance"


def test_engine_rollouts_follow_the_trained_actor(tmp_path):
    """Rollouts on the serving engine see every update (adapter re-read) and equal generate."""
    from llamaforge.model.generate import SamplingParams, generate
    from llamaforge.train.ppo import train_ppo

    run = _fn_run(tmp_path, stop_on_eot=False, rollout_batch_size=16, max_new_tokens=6)
    run.cfg.max_steps = run.total_steps = 3
    sampler = run.sampler()
    assert sampler is not None and sampler.engine.runner is None  # CPU: no graphs
    held = [[5 + i, 30 + i % 7, 60 + i % 5] for i in range(40, 52)]
    greedy = SamplingParams(max_new_tokens=5, temperature=0.0)
    with torch.no_grad():
        first = sampler(held, greedy)
        train_ppo(run)
        gen = torch.Generator().manual_seed(0)
        for name, p in run.roles.policy.named_parameters():
            if ".actor" in name:  # a large step, so greedy answers surely change
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        after = sampler(held, greedy)
        with run.roles.adapter("actor"):
            want = generate(run.roles.policy, held, greedy)
    assert after == want
    assert after != first  # the actor changed, and the engine saw it
    # sampled rows of one prompt differ (a seed per row), and repeat for the same call seed
    hot = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    with torch.no_grad():
        a, b = sampler([held[0]] * 8, hot), sampler([held[0]] * 8, hot)
    assert a == b and len({tuple(x) for x in a}) > 1
    assert _fn_run(tmp_path / "g", rollout_engine=False).sampler() is None


def test_first_update_ratio_is_one_and_advantages_are_whitened(tmp_path):
    run = _fn_run(tmp_path, epochs=1, mini_batches=1)
    prompts = prompts_for_step(run.prompts, 0, 16, 0)
    ro = make_rollout(run.roles, prompts, run.cfg, [2], seed=1, pad_id=0, autocast=run.autocast)
    adv = compute_advantages(ro, run.cfg, 0.02)
    real = adv.advantages[ro.mask.bool()]
    assert float(real.mean()) == pytest.approx(0.0, abs=1e-5)
    stats = run._update(ro, adv, torch.Generator().manual_seed(0))
    assert stats[0]["ratio"] == pytest.approx(1.0, abs=1e-5)  # same weights, no dropout
    assert stats[0]["clipfrac"] == 0.0
    # responses stop at the end-of-turn token, which they keep (the policy chose it)
    for r, ended in zip(ro.responses, ro.ended, strict=True):
        assert (r[-1] == 2) == ended and 2 not in r[:-1]


def test_adaptive_controller_in_a_run_and_exact_resume(tmp_path):
    from llamaforge.train.ppo import train_ppo

    kw = {"kl_controller": "adaptive", "kl_target": 0.01, "kl_horizon": 200}
    run = _fn_run(tmp_path, **kw)
    run.cfg.max_steps = run.total_steps = 4
    run.cfg.checkpoint.every = 2
    train_ppo(run)
    first = [json.loads(x) for x in (run.out / "metrics.jsonl").read_text().splitlines()]
    coefs = [r["kl_coef"] for r in first]
    assert coefs[0] == 0.02 and coefs != sorted(coefs, reverse=True)[:1] * 4
    shutil.rmtree(run.out / "checkpoints" / "checkpoint-00000004")
    again = _fn_run(tmp_path, **kw)
    again.cfg.max_steps = again.total_steps = 4
    train_ppo(again)
    second = [json.loads(x) for x in (run.out / "metrics.jsonl").read_text().splitlines()]
    keys = ("reward_mean", "kl", "kl_coef", "loss", "value_loss", "entropy", "clipfrac")
    for a, b in zip(first, second, strict=True):
        assert a["step"] == b["step"]
        assert [round(a[k], 6) for k in keys] == [round(b[k], 6) for k in keys]


def test_a_nan_reward_stops_with_a_message_and_a_usable_checkpoint(tmp_path):
    from llamaforge.train.checkpoint import load_checkpoint
    from llamaforge.train.loop import NonFiniteLossError
    from llamaforge.train.ppo import train_ppo

    run = _fn_run(tmp_path)
    run.cfg.max_steps = run.total_steps = 4
    run.cfg.checkpoint.every = 1
    calls = []

    def reward(batch):
        calls.append(1)
        scores = _count_target(batch)
        return scores / 0 if len(calls) > 4 else scores  # 2 calls a step: NaN/inf from step 3

    run.roles.reward_fn = reward
    with pytest.raises(NonFiniteLossError, match="checkpoint-00000002") as err:
        train_ppo(run)
    assert "reward-model scores are NaN/inf" in str(err.value)
    good = run.out / "checkpoints" / "checkpoint-00000002"
    fresh = _fn_run(tmp_path / "fresh")
    assert load_checkpoint(good, model=fresh.roles.net).step == 2
    assert all(torch.isfinite(p).all() for p in fresh.roles.net.parameters())


# ---------------------------------------------------------------- the CLI end to end


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return tiny_hf_folder(tmp_path_factory.mktemp("base"))


def _write(tmp_path: Path, name: str, raw: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _data(tmp_path: Path) -> dict:
    return {
        "path": str(PAIRS),
        "format": "preference",
        "template": "chatml",
        "val_size": 0.17,
        "cache_dir": str(tmp_path / "cache"),
    }


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, base_dir) -> Path:
    tmp = tmp_path_factory.mktemp("rm")
    raw = {
        "model": str(base_dir),
        "stage": "rm",
        "method": "lora",
        "data": _data(tmp),
        "output_dir": str(tmp / "rm"),
        "max_steps": 3,
        "optim": {"lr": 0.01, "batch_size": 4},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "logging": {"tensorboard": False, "progress": False},
    }
    assert main(["train", str(_write(tmp, "rm", raw))]) == 0
    return tmp / "rm"


def _ppo_cfg(tmp_path: Path, base: Path, rm: Path, method: str = "lora", **top) -> Path:
    raw = {
        "model": str(base),
        "stage": "ppo",
        "method": method,
        "data": _data(tmp_path),
        "output_dir": str(tmp_path / f"ppo-{method}"),
        "max_steps": 4,
        "checkpoint": {"every": 2},
        "optim": {"lr": 0.005, "batch_size": 2},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "logging": {"tensorboard": False, "progress": False},
        "ppo": {
            "reward_model": str(rm),
            "rollout_batch_size": 2,
            "samples_per_prompt": 2,
            "max_new_tokens": 5,
            "mini_batches": 2,
            "eval_prompts": 2,
        },
        **top,
    }
    return _write(tmp_path, f"ppo-{method}", raw)


@pytest.mark.parametrize(
    ("method", "rm_kind"), [("lora", "adapter"), ("qlora", "adapter"), ("full", "model")]
)
def test_stage_ppo_end_to_end_and_resume(tmp_path, base_dir, reward_dir, method, rm_kind, capsys):
    cfg = _ppo_cfg(tmp_path, base_dir, reward_dir / rm_kind, method)
    assert main(["train", str(cfg)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "memory by role" in captured.err and "held-out (2 prompts)" in captured.err
    mem = summary["memory_bytes"]
    if method != "full":  # one base: reference and reward model add adapters, not copies
        assert Path(summary["output"]).name == "adapter"
        assert mem["reference"] == 0 and mem["reward"] < mem["base"] / 4
    else:
        assert Path(summary["output"]).name == "model"
        assert mem["reference"] >= mem["base"] * 0.9  # a frozen copy
        assert mem["reward"] >= mem["base"] * 0.8  # a separate model (no lm_head)
    out = tmp_path / f"ppo-{method}"
    assert (out / "loss.png").is_file()
    assert set(summary["before"]) >= {"reward_mean", "kl", "response_length"}
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["checkpoint-00000002", "checkpoint-00000004"]
    shutil.rmtree(ckpts[-1])
    assert main(["train", str(cfg)]) == 0
    assert "resumed from" in capsys.readouterr().err
    again = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keys = ("reward_mean", "kl", "loss", "value_loss", "response_length")
    assert [[round(r[k], 5) for k in keys] for r in again] == [
        [round(r[k], 5) for k in keys] for r in train
    ]


def test_generate_loads_the_ppo_actor(tmp_path, base_dir, reward_dir, capsys):
    cfg = _ppo_cfg(tmp_path, base_dir, reward_dir / "adapter", max_steps=1)
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    adapter = tmp_path / "ppo-lora" / "adapter"
    args = ["generate", str(base_dir), "--adapter", f"a={adapter}", "--prompt", "hi"]
    assert main([*args, "--max-new-tokens", "3"]) == 0


def test_prompts_from_a_plain_text_file_and_from_sft_rows(tmp_path, base_dir):
    from llamaforge.data.templates import render_conversation
    from llamaforge.data.tokenizer import load_tokenizer
    from llamaforge.train.ppo import load_prompts

    tok = load_tokenizer(base_dir)
    lines = ["Say something kind.", "Name a colour.", "Count to three.", "Hello there!"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    raw = {
        "model": str(base_dir),
        "stage": "ppo",
        "data": {"path": str(path), "format": "text", "template": "chatml", "val_size": 0.25},
        "ppo": {"reward_model": "x"},
    }
    train, held = load_prompts(config_from_dict(raw), tok)
    assert len(train) == 3 and len(held) == 1
    user = [[{"role": "user", "content": t}] for t in lines]
    want = {
        tuple(render_conversation(tok, u, "chatml", add_generation_prompt=True)[0]) for u in user
    }
    assert {tuple(p) for p in train + held} == want
    raw["data"] = {
        **_data(tmp_path),
        "path": str(PAIRS.parent / "messages.jsonl"),
        "format": "messages",
    }
    train, held = load_prompts(config_from_dict(raw), tok)
    decoded = tok.decode(train[0], skip_special=False)
    assert decoded.rstrip().endswith("assistant") and train[0] not in held


def test_bad_ppo_configs_are_one_line_errors(tmp_path, base_dir, reward_dir, capsys):
    cfg = _ppo_cfg(tmp_path, base_dir, reward_dir / "adapter")
    assert main(["train", str(cfg), "ppo.reward_model=null"]) == 2
    assert "ppo.reward_model" in capsys.readouterr().err
    assert main(["train", str(cfg), "ppo.mini_batches=3"]) == 2
    assert "ppo.mini_batches" in capsys.readouterr().err
    assert main(["train", str(cfg), f"ppo.reward_model={tmp_path}/nowhere"]) == 2
    assert "ppo.reward_model: no such folder" in capsys.readouterr().err
    assert main(["train", str(cfg), f"ppo.reward_model={base_dir}"]) == 2
    assert "neither a reward-model folder" in capsys.readouterr().err
