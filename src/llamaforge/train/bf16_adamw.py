"""AdamW for bf16 weights: moments in bf16 too, update math in fp32, stochastic rounding.

Full fine-tuning with fp32 master weights keeps 16 bytes per parameter (weights, two
moments, and the bf16 copies autocast makes each step); bf16 weights and moments keep 8.
Rounding an update to the nearest bf16 (8 significant bits) silently drops it whenever it
is smaller than half a unit in the last place of the weight, which is most AdamW updates
late in training. Stochastic rounding rounds up with probability equal to the remainder,
so every update survives in expectation and the loss follows the fp32-master curve.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..kernels import use_kernel
from ..kernels.adamw import adamw_bf16_step_

CHUNK = 1 << 24  # elements updated at once: bounds the fp32 temporaries to ~256 MB


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Write fp32 `src` into bf16 `dst` (same shape), rounding up with the remainder's odds.

    bf16 is the top 16 bits of fp32: adding uniform noise below bit 16 and truncating
    rounds away from zero with probability (dropped bits) / 2^16.
    """
    bits = src.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    dst.copy_(((bits + noise) & -65536).view(torch.float32))  # exact: low bits are zero


class StochasticBF16AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (as torch.optim.AdamW) for bf16 parameters and states."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fused: bool = False,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.fused = fused  # one Triton kernel per CUDA parameter (kernels/adamw.py)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    raise TypeError(f"StochasticBF16AdamW takes bf16 parameters, got {p.dtype}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW update of every parameter that has a gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = float(state["step"])
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        step_size = lr / (1 - b1**t)
        root_bc2 = (1 - b2**t) ** 0.5
        tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
        if self.fused and use_kernel(True, p) and all(x.is_contiguous() for x in tensors):
            seed = int(torch.randint(0, 2**31 - 1, ()))  # CPU draw: follows torch.manual_seed
            adamw_bf16_step_(
                *tensors,
                lr=lr,
                betas=(b1, b2),
                eps=eps,
                weight_decay=wd,
                step_size=step_size,
                root_bc2=root_bc2,
                seed=seed,
            )
            return
        flat = [x.view(-1) for x in tensors]
        for start in range(0, p.numel(), CHUNK):
            w, g, m, v = (x[start : start + CHUNK] for x in flat)
            g32 = g.float()
            m32 = m.float().lerp_(g32, 1 - b1)
            v32 = v.float().mul_(b2).addcmul_(g32, g32, value=1 - b2)
            denom = (v32.sqrt() / root_bc2).add_(eps)
            w32 = w.float().mul_(1 - lr * wd).addcdiv_(m32, denom, value=-step_size)
            stochastic_round_(w, w32)
            stochastic_round_(m, m32)
            stochastic_round_(v, v32)
