"""PPO's four roles over one base model, and rollouts: generate, then score every token.

Roles (`Roles`): the actor (LoRA adapter `actor`, or the fully trained model), the critic
(adapter `critic` + a value head; with full fine-tuning the value head sits on the actor's
own hidden states), the reference (the base with adapters switched off, or a frozen copy
for full fine-tuning) and the reward model (adapter `reward` + its score head on the same
base when it is a LoRA reward model of that base, else a separate frozen model).

A batch of sequences (prompt + response) is padded on either side; every per-token tensor
is response-aligned, (B, R) with a mask, so rewards, values and log-probs read the same
positions whatever the padding (tests/test_ppo.py checks left against right).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..adapters.lora import disable_adapters, set_adapter
from ..model.llama import padded_causal_mask

Batch = dict[str, Tensor]


# ---------------------------------------------------------------- layout


def collate_sequences(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    side: str = "right",
    tail: Sequence[Sequence[int]] | None = None,
) -> Batch:
    """Pad prompt + response (+ tail: tokens the reward model reads after the response).

    Returns input_ids (B, T), last (B,) index of each row's last real token, resp_idx
    (B, R) the position whose logits predict each response token, and mask (B, R); left
    padding adds attention_mask (B, T) (1 on real tokens).
    """
    tails = tail or [[] for _ in prompts]
    rows = [list(p) + list(r) + list(t) for p, r, t in zip(prompts, responses, tails, strict=True)]
    width = max(len(r) for r in rows)
    resp_w = max(1, max(len(r) for r in responses))
    b = len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    am = torch.zeros((b, width), dtype=torch.long)
    resp_idx = torch.zeros((b, resp_w), dtype=torch.long)
    mask = torch.zeros((b, resp_w))
    last = torch.zeros(b, dtype=torch.long)
    for i, (row, p, r) in enumerate(zip(rows, prompts, responses, strict=True)):
        off = width - len(row) if side == "left" else 0
        ids[i, off : off + len(row)] = torch.tensor(row, dtype=torch.long)
        am[i, off : off + len(row)] = 1
        last[i] = off + len(row) - 1
        n = len(r)
        resp_idx[i, :n] = torch.arange(off + len(p) - 1, off + len(p) - 1 + n)
        mask[i, :n] = 1.0
    batch = {"input_ids": ids, "last": last, "resp_idx": resp_idx, "mask": mask}
    if side == "left":
        batch["attention_mask"] = am
    elif side != "right":
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    return batch


def hidden_states(model: nn.Module, batch: Batch) -> Tensor:
    """Final hidden states (B, T, C); left-padded rows get positions from 0 and pad masking."""
    ids = batch["input_ids"]
    if "attention_mask" not in batch:
        return model.hidden_states(ids)  # right padding: pads come after, causal is enough
    am = batch["attention_mask"]
    positions = (am.cumsum(1) - 1).clamp(min=0)
    mask = padded_causal_mask(am, ids.shape[1], 0)
    return model.hidden_states(ids, positions=positions, mask=mask)


def _at_response(x: Tensor, batch: Batch) -> Tensor:
    """x (B, T, C) at the positions predicting each response token: (B, R, C)."""
    idx = batch["resp_idx"].to(x.device)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def response_logps(
    model: nn.Module, hidden: Tensor, batch: Batch, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Log-prob of each response token under logits / temperature, and entropy: (B, R) x 2."""
    h = _at_response(hidden, batch)  # (B, R, C)
    logits = model.lm_head(h).float() / temperature  # (B, R, V)
    targets = batch["input_ids"].gather(1, batch["resp_idx"] + 1)  # (B, R)
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    mask = batch["mask"]
    return logp * mask, entropy.detach() * mask


def last_token_scores(model: nn.Module, hidden: Tensor, batch: Batch) -> Tensor:
    """The reward model's score at each row's last real token: (B,) float32."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return model.score(hidden[rows, batch["last"]]).squeeze(-1).float()


# ---------------------------------------------------------------- roles


class ActorCritic(nn.Module):
    """What the optimizer trains and checkpoints hold: the policy's trainable part + value head."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        p = policy.embed_tokens.weight
        self.value_head = nn.Linear(policy.cfg.dim, 1, bias=True, device=p.device)
        with torch.no_grad():  # start near 0 so the first value loss is the returns' scale
            self.value_head.weight.normal_(0.0, policy.cfg.dim**-0.5 * 0.1)
            self.value_head.bias.zero_()


@dataclass
class Roles:
    """Actor, critic, reference and reward model, and how each is reached.

    With `lora`, the policy holds adapters `actor` and `critic`; the reference is the policy
    with adapters off; `reward` is None when the policy also holds the reward adapter.
    """

    net: ActorCritic
    lora: bool
    reference: nn.Module | None = None  # a frozen copy (full fine-tuning)
    reward: nn.Module | None = None  # a separate frozen reward model
    # a reward that is a known function of the token ids (tests, rule-based rewards):
    # batch (with the reward model's tail tokens) -> (B,) scores; wins over the models
    reward_fn: Callable[[Batch], Tensor] | None = None

    @property
    def policy(self) -> nn.Module:
        """The model that generates (the base holding the adapters, or the full model)."""
        return self.net.policy

    @contextlib.contextmanager
    def adapter(self, name: str) -> Iterator[None]:
        """Run the policy with adapter `name` (a no-op without LoRA); back to `actor` after."""
        if self.lora:
            set_adapter(self.policy, name)
        try:
            yield
        finally:
            if self.lora:
                set_adapter(self.policy, "actor")

    def actor_critic(
        self, batch: Batch, temperature: float, need_values: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Actor log-probs and entropies (B, R), and critic values (B, R) (or None)."""
        with self.adapter("actor"):
            hidden = hidden_states(self.policy, batch)
            logp, entropy = response_logps(self.policy, hidden, batch, temperature)
        values = None
        if need_values:
            if self.lora:
                with self.adapter("critic"):
                    hidden = hidden_states(self.policy, batch)
            values = self.net.value_head(_at_response(hidden, batch).float()).squeeze(-1)
            values = values * batch["mask"]
        return logp, entropy, values

    @torch.no_grad()
    def reference_logps(self, batch: Batch, temperature: float) -> Tensor:
        """The reference model's log-probs of the response tokens (B, R)."""
        if self.reference is not None:
            hidden = hidden_states(self.reference, batch)
            return response_logps(self.reference, hidden, batch, temperature)[0]
        with disable_adapters(self.policy):
            hidden = hidden_states(self.policy, batch)
            return response_logps(self.policy, hidden, batch, temperature)[0]

    @torch.no_grad()
    def scores(self, batch: Batch) -> Tensor:
        """The reward model's scalar score of each row (B,)."""
        if self.reward_fn is not None:
            return self.reward_fn(batch).float()
        if self.reward is not None:
            return last_token_scores(self.reward, hidden_states(self.reward, batch), batch)
        with self.adapter("reward"):
            return last_token_scores(self.policy, hidden_states(self.policy, batch), batch)
