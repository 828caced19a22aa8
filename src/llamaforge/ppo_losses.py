"""PPO's math as pure functions of tensors: KL estimators, whitening, GAE, the clipped losses.

Per-token tensors are response-aligned: (B, R) with a float `mask` (1 on the response's
tokens, 0 after its end), so column t is the t-th generated token of every row whatever
the prompt length or padding side. Masked means/sums count only mask == 1 positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k3")


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens' log-probs.

    k1 = log p - log q (unbiased, can be negative per token); k3 = (q/p - 1) - log(q/p)
    (unbiased and never negative; Schulman's "Approximating KL divergence").
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use one of {', '.join(KL_ESTIMATORS)}")


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum of x over mask == 1 positions (scalar)."""
    return (x * mask).sum()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over mask == 1 positions (scalar; 0 when the mask is empty)."""
    return masked_sum(x, mask) / mask.sum().clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over mask == 1 positions (Bessel-corrected by default)."""
    n = mask.sum()
    mean = masked_mean(x, mask)
    var = masked_sum((x - mean) ** 2, mask) / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over mask == 1 positions; shift_mean=False adds the mean back.

    Masked-out positions come back as 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_rewards(
    scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: -kl_coef * kl on every response token, + the score on the last.

    scores (B,), kl (B, R), mask (B, R). Returns (rewards (B, R), last-token index (B,)).
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,)
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last] += scores
    return rewards, last


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation: (advantages, returns), both (B, R).

    delta_t = r_t + γ V_{t+1} - V_t and A_t = delta_t + γλ A_{t+1}, with V and A zero past
    each row's last response token (an ended or truncated response is terminal).
    """
    values = values * mask
    rewards = rewards * mask
    b, r = rewards.shape
    adv = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(b)
    next_adv = rewards.new_zeros(b)
    for t in reversed(range(r)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        adv[:, t] = next_adv
        next_value = values[:, t]
    return adv, (adv + values) * mask


@dataclass
class PPOLossParts:
    """Token-summed parts of the PPO objective on one (micro-)batch and its metrics."""

    policy: Tensor  # sum over tokens of max(-A r, -A clip(r))
    value: Tensor  # sum over tokens of 0.5 max((v - R)^2, (v_clip - R)^2)
    clipped: Tensor  # tokens whose policy term was clipped
    value_clipped: Tensor  # tokens whose value term was clipped
    approx_kl: Tensor  # sum of 0.5 (log r)^2: KL(old || new) per token
    ratio: Tensor  # sum of the ratios
    entropy: Tensor  # sum of per-token entropies (0 when not computed)
    tokens: Tensor  # response tokens counted


def ppo_loss_parts(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_ratio: float,
    clip_value: float,
    entropy: Tensor | None = None,
) -> PPOLossParts:
    """The clipped surrogate and clipped value loss as token sums (PPO, Schulman et al. 2017).

    All inputs (B, R). The loop divides sums by the token count of a whole mini-batch, so
    the gradient is the token mean over the mini-batch however it is split in micro-batches.
    """
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    v_clip = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    vf1, vf2 = (values - returns) ** 2, (v_clip - returns) ** 2
    return PPOLossParts(
        policy=masked_sum(torch.maximum(pg1, pg2), mask),
        value=0.5 * masked_sum(torch.maximum(vf1, vf2), mask),
        clipped=masked_sum((pg2 > pg1).float(), mask).detach(),
        value_clipped=masked_sum((vf2 > vf1).float(), mask).detach(),
        approx_kl=0.5 * masked_sum(log_ratio.detach() ** 2, mask),
        ratio=masked_sum(ratio.detach(), mask),
        entropy=masked_sum(entropy.detach(), mask) if entropy is not None else mask.new_zeros(()),
        tokens=mask.sum(),
    )


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over response tokens (1 is a perfect critic)."""
    var = float(masked_var(returns, mask))
    if var == 0:
        return float("nan")
    return 1.0 - float(masked_var(returns - values, mask)) / var


class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al. 2019) toward a target KL.

    Adaptive: coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon after each rollout
    of n samples whose mean sequence KL was kl.
    """

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000) -> None:
        self.value, self.target, self.horizon = float(coef), target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        """Move the coefficient after a rollout (a no-op for the fixed controller)."""
        if self.target is None or not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon

    def state_dict(self) -> dict[str, float]:
        """What a checkpoint keeps."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from a checkpoint."""
        self.value = float(state["value"])
