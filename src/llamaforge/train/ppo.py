"""`stage: ppo`: RLHF with PPO and a KL penalty to the reference (InstructGPT step 3).

Each step is one PPO iteration: sample responses to a batch of prompts with the actor
(the serving engine, `EngineSampler`, or the KV-cache loop of `model.generate`; both batched
with a per-row stop at end-of-turn), score them
once (actor and reference log-probs, critic values, reward-model scores), turn scores and
per-token KL into per-token rewards, GAE advantages and returns, then `ppo.epochs` passes
of `ppo.mini_batches` optimizer steps of the clipped surrogate + clipped value loss.

PPO's rollout/update cycle does not fit the shared loop's one-batch-per-step shape, so this
recipe drives the loop's pieces itself: `accumulate_gradients` / `optimizer_step` (grad
accumulation over micro-batches, clipping, non-finite skips), the optimizer and schedule,
atomic checkpoints with exact resume, and the metrics logger (JSONL, TensorBoard, PNG).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..adapters.inject import add_adapter, parameter_counts, quantize_linears
from ..adapters.lora import set_adapter
from ..config import RunConfig, save_resolved
from ..data.formats import to_sample
from ..data.pipeline import assign_splits, build_dataset, load_rows, resolve_spec
from ..data.sources import DataError
from ..data.templates import render_conversation
from ..data.tokenizer import Tokenizer
from ..errors import UserError
from ..io.hf import is_reward_model
from ..io.load import load_model, pick_device
from ..io.peft import load_peft_adapter, read_adapter_config
from ..losses import IGNORE_INDEX
from ..model.generate import SamplingParams, generate
from ..ppo_losses import (
    KLController,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_loss_parts,
    token_rewards,
)
from ..runtime import frozen_gc
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, trainable_state
from .loop import (
    NonFiniteLossError,
    StopSignals,
    accumulate_gradients,
    autocast_context,
    optimizer_step,
    resolve_precision,
    seed_everything,
)
from .metrics import MetricsLogger, plot_losses, read_metrics, truncate_metrics
from .optim import build_optimizer, build_scheduler
from .recipe import _cached_json, apply_method, base_dtype, log, save_outputs
from .rollout import ActorCritic, Batch, Roles, collate_sequences

ADAPTERS = ("actor", "critic", "reward")


class RewardModelError(UserError, ValueError):
    """ppo.reward_model is not a usable reward model for this policy."""


# ---------------------------------------------------------------- prompts


def prompt_of(example: dict) -> list[int]:
    """The prompt side of a tokenized example: a pair's prompt, or the ids before the answer."""
    if "prompt_ids" in example:
        return list(example["prompt_ids"])
    first = next((i for i, t in enumerate(example["labels"]) if t != IGNORE_INDEX), None)
    return list(example["input_ids"][: first or 0])


def unique_prompts(examples: Sequence[dict]) -> list[list[int]]:
    """Distinct non-empty prompts, in order of first appearance."""
    seen: dict[tuple[int, ...], None] = {}
    for ex in examples:
        p = tuple(prompt_of(ex))
        if p:
            seen.setdefault(p, None)
    return [list(p) for p in seen]


def load_prompts(cfg: RunConfig, tok: Tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(training prompts, held-out prompts) from the data section; only prompts are kept."""
    if cfg.data.packing:
        raise DataError("data.packing", "true", "stage ppo reads prompts; set data.packing: false")
    if cfg.data.format == "text":
        train, held = _text_prompts(cfg, tok)
    else:
        splits = build_dataset(cfg.data, tok)
        log(splits.report.summary())
        train = unique_prompts(splits.train)
        held = unique_prompts(splits.test or splits.validation)
    if not train:
        raise DataError("data.path", repr(cfg.data.path), "no prompts in the training split")
    return train, held[: cfg.ppo.eval_prompts]


def _text_prompts(cfg: RunConfig, tok: Tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """A plain prompt file: each `text` row is one user message, in the chat template."""
    spec = resolve_spec(cfg.data)
    rows, _, _ = load_rows(spec)
    splits = assign_splits(rows, spec.val_size, spec.test_size, spec.split_seed)
    out: dict[str, list[list[int]]] = {"train": [], "validation": [], "test": []}
    for row, split in zip(rows, splits, strict=True):
        text = to_sample(row.data, "text", text_key=spec.text_key).text.strip()
        if not text:
            raise DataError(row.where, "empty prompt")
        msgs = [{"role": "system", "content": spec.system}] if spec.system else []
        msgs.append({"role": "user", "content": text})
        ids = render_conversation(tok, msgs, spec.template, add_generation_prompt=True)[0]
        out[split].append(ids[-spec.max_seq_len :])
    log(f"data {cfg.data.path} (prompts): train {len(out['train'])}, held out "
        f"{len(out['test'] or out['validation'])}")  # fmt: skip
    return out["train"], out["test"] or out["validation"]


def prompts_for_step(prompts: Sequence[list[int]], step: int, n: int, seed: int) -> list[list[int]]:
    """The n prompts of iteration `step`: consecutive slices of seeded per-epoch shuffles."""
    out = []
    for k in range(step * n, (step + 1) * n):
        epoch, pos = divmod(k, len(prompts))
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + epoch))
        out.append(prompts[int(order[pos])])
    return out


def end_of_turn(tok: Tokenizer, template: str) -> list[int]:
    """What the chat template writes after an assistant answer, from its stop token on."""
    user = [{"role": "user", "content": "Hi"}]
    prompt = render_conversation(tok, user, template, add_generation_prompt=True)[0]
    full = render_conversation(tok, [*user, {"role": "assistant", "content": "Hello"}], template)
    rest = full[0][len(prompt) :]
    for i, t in enumerate(rest):
        if t in tok.stop_ids:
            return rest[i:]
    return [tok.eos_id] if tok.eos_id is not None else []


# ---------------------------------------------------------------- roles


def _same_base(adapter_dir: Path, model: str) -> bool:
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if base is None:
        return False
    if base == model:
        return True
    return (
        Path(base).exists()
        and Path(model).exists()
        and Path(base).resolve() == Path(model).resolve()
    )


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers map every id to the same token (chat templates may differ)."""
    if a.vocab_size != b.vocab_size:
        return False
    return all(a.id_to_token(i) == b.id_to_token(i) for i in range(a.vocab_size))


def _separate_reward_model(
    path: Path, tok: Tokenizer, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """A frozen reward model of its own: a merged stage-rm folder, or base + its adapter."""
    key = "ppo.reward_model"
    if (path / "adapter_config.json").is_file():
        base = read_adapter_config(path).get("base_model_name_or_path")
        if not base:
            raise RewardModelError(f"{key}: {path}/adapter_config.json names no base model")
        rm, rm_tok = load_model(base, device=device, dtype=dtype)
        load_peft_adapter(rm, path)
    elif path.is_dir() and is_reward_model(path):
        rm, rm_tok = load_model(path, device=device, dtype=dtype)
    else:
        raise RewardModelError(
            f"{key}: {path} is neither a reward-model folder (LlamaForSequenceClassification) "
            "nor a reward adapter (run `llamaforge train` with stage: rm)"
        )
    if getattr(rm, "score", None) is None:
        raise RewardModelError(f"{key}: {path} has no score head (is it a stage rm output?)")
    if not same_vocabulary(rm_tok, tok):
        raise RewardModelError(
            f"{key}: {path} uses another tokenizer than the policy; PPO needs one vocabulary"
        )
    return _frozen(rm)


def build_roles(model: nn.Module, tok: Tokenizer, cfg: RunConfig, compute: torch.dtype) -> Roles:
    """Set up actor, critic, reference and reward model per the method (see module doc)."""
    rm_path = Path(cfg.ppo.reward_model or "")
    if not rm_path.exists():
        raise RewardModelError(f"ppo.reward_model: no such folder {rm_path}")
    lora = cfg.method in ("lora", "qlora")
    device, dtype = model.device, model.dtype
    shared_rm = (
        lora and (rm_path / "adapter_config.json").is_file() and _same_base(rm_path, cfg.model)
    )
    reward = None if shared_rm else _separate_reward_model(rm_path, tok, device, dtype)
    reference = None if lora else _frozen(copy.deepcopy(model))
    if lora:
        if cfg.method == "qlora":
            q = cfg.qlora
            quantize_linears(
                model, blocksize=q.blocksize, double_quant=q.double_quant, compute_dtype=compute
            )
        lo = cfg.lora
        for name in ADAPTERS[:2]:
            add_adapter(
                model, name, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, targets=lo.targets,
                rslora=lo.rslora, dtype=torch.float32,
            )  # fmt: skip
        for n, p in model.named_parameters():
            p.requires_grad_(any(f".lora_{ab}.{a}" in n for a in ADAPTERS[:2] for ab in "AB"))
        if shared_rm:
            load_peft_adapter(model, rm_path, adapter_name="reward", activate=False)
            model.score.requires_grad_(False)
    else:
        apply_method(model, cfg, compute)
    if lora:
        set_adapter(model, "actor")
    return Roles(ActorCritic(model), lora=lora, reference=reference, reward=reward)


def memory_report(roles: Roles) -> dict[str, int]:
    """Bytes each role adds: the shared base once, then adapters, heads and separate copies."""

    def size(params) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    policy = roles.policy
    named = dict(policy.named_parameters())
    by_adapter = {
        a: size(p for n, p in named.items() if f".{a}" in n and "lora_" in n) for a in ADAPTERS
    }
    adapters = sum(by_adapter.values())
    base = size(policy.parameters()) + size(policy.buffers()) - adapters
    if getattr(policy, "score", None) is not None:
        base -= size(policy.score.parameters())
    report = {"base": base, "actor": by_adapter["actor"] if roles.lora else 0}
    report["critic"] = by_adapter["critic"] + size(roles.net.value_head.parameters())
    report["reference"] = size(roles.reference.parameters()) if roles.reference is not None else 0
    if roles.reward is not None:
        report["reward"] = size(roles.reward.parameters())
    else:
        report["reward"] = by_adapter["reward"] + size(policy.score.parameters())
    return report


# ---------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """Sampled responses and their per-token statistics, response-aligned (N, R)."""

    prompts: list[list[int]]
    responses: list[list[int]]  # the actor's tokens, end-of-turn included when it ended
    ended: list[bool]
    mask: Tensor
    logp: Tensor
    ref_logp: Tensor
    entropy: Tensor
    values: Tensor
    scores: Tensor  # (N,) the reward model's raw scores
    gen_seconds: float
    score_seconds: float

    def rows(self, idx: Sequence[int], pad_id: int, side: str = "right") -> Batch:
        """A collated batch of some samples (the policy's sequences, not the RM's tail)."""
        return collate_sequences(
            [self.prompts[i] for i in idx], [self.responses[i] for i in idx], pad_id, side
        )


Sampler = Callable[[list[list[int]], SamplingParams], list[list[int]]]


class EngineSampler:
    """Rollouts on the serving engine (`serve.engine.Engine`), built once per run.

    All rows of a rollout run as one continuous batch, each with its own seed (seed of the
    call mixed with the row index). With LoRA the rows use adapter `actor` through the
    engine's gathered adapter weights, re-read from the layers before every call (the
    optimizer changed them), and the decode step is captured as CUDA graphs on a GPU; a fully
    trained actor is read in place, without graphs (its weights may be fp32 masters cast by
    autocast, which a captured graph would not see change).
    """

    def __init__(self, roles: Roles, max_len: int, max_batch: int) -> None:
        from ..serve.engine import OFFLINE_PREFILL_BUDGET, Engine

        self.lora = roles.lora
        self.engine = Engine(
            roles.policy, max_batch=max_batch, max_len=max_len,
            graphs="auto" if roles.lora else "off", prefill_budget=OFFLINE_PREFILL_BUDGET,
        )  # fmt: skip

    def __call__(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        if self.lora:
            self.engine.refresh_adapter("actor")
        seed = params.seed or 0
        rows = [
            dataclasses.replace(params, seed=(seed * 1009 + i) % (1 << 62))
            for i in range(len(prompts))
        ]
        names = ["actor" if self.lora else None] * len(prompts)
        return self.engine.generate(prompts, rows, names)


def _microbatches(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


def _place(out: Tensor, idx: Sequence[int], part: Tensor) -> None:
    out[idx, : part.shape[1]] = part.float().cpu()


@torch.no_grad()
def make_rollout(
    roles: Roles,
    prompts: list[list[int]],
    cfg: RunConfig,
    eot: list[int],
    *,
    seed: int,
    pad_id: int,
    autocast: Any,
    sampler: Sampler | None = None,
) -> Rollout:
    """Generate with the actor (`sampler`, else `model.generate`) and score every sample once."""
    p = cfg.ppo
    params = SamplingParams(
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        stop_ids=eot[:1] if p.stop_on_eot else (),
        seed=seed,
    )
    policy = roles.policy
    t0 = time.perf_counter()
    with roles.adapter("actor"), autocast():
        outs = sampler(prompts, params) if sampler else generate(policy, prompts, params)
    gen_s = time.perf_counter() - t0
    ended = [p.stop_on_eot and len(o) < p.max_new_tokens for o in outs]
    responses = [o + eot[:1] if e else o for o, e in zip(outs, ended, strict=True)]
    responses = [r if r else eot[:1] for r in responses]  # never empty (nothing to score)
    tails = [eot[1:] if e else [] for e in ended]  # e.g. ChatML's newline after <|im_end|>
    n, width = len(prompts), max(len(r) for r in responses)
    stats = {k: torch.zeros(n, width) for k in ("logp", "ref_logp", "entropy", "values", "mask")}
    scores = torch.zeros(n)
    device = policy.device
    for idx in _microbatches(n, cfg.optim.batch_size):
        batch = collate_sequences([prompts[i] for i in idx], [responses[i] for i in idx], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logp, entropy, values = roles.actor_critic(batch, p.temperature)
            ref = roles.reference_logps(batch, p.temperature)
            rm_batch = collate_sequences(
                [prompts[i] for i in idx], [responses[i] for i in idx], pad_id,
                tail=[tails[i] for i in idx],
            )  # fmt: skip
            scores[idx] = roles.scores({k: v.to(device) for k, v in rm_batch.items()}).cpu()
        for key, val in (("logp", logp), ("ref_logp", ref), ("entropy", entropy)):
            _place(stats[key], idx, val)
        _place(stats["values"], idx, values)
        _place(stats["mask"], idx, batch["mask"])
    return Rollout(
        prompts, responses, ended, stats["mask"], stats["logp"], stats["ref_logp"],
        stats["entropy"], stats["values"], scores, gen_s, time.perf_counter() - t0 - gen_s,
    )  # fmt: skip


def shaped_scores(ro: Rollout, cfg: RunConfig) -> Tensor:
    """Scores after the length penalty, the missing end-of-turn penalty and clipping: (N,)."""
    p = cfg.ppo
    s = ro.scores - p.length_penalty * ro.mask.sum(1)
    if p.missing_eos_penalty is not None:
        s = s - p.missing_eos_penalty * (~torch.tensor(ro.ended)).float()
    if p.reward_clip is not None:
        s = s.clamp(-p.reward_clip, p.reward_clip)
    return s


@dataclass
class Advantages:
    """What the update needs beyond the rollout: (N, R) advantages and returns, KL per token."""

    advantages: Tensor
    returns: Tensor
    kl: Tensor
    rewards: Tensor


def compute_advantages(ro: Rollout, cfg: RunConfig, kl_coef: float) -> Advantages:
    """Per-token rewards (score at the end, -kl_coef * KL everywhere), GAE, whitening."""
    p = cfg.ppo
    kl = kl_penalty(ro.logp, ro.ref_logp, p.kl_estimator) * ro.mask
    rewards, _ = token_rewards(shaped_scores(ro, cfg), kl, ro.mask, kl_coef)
    if p.whiten_rewards:
        rewards = masked_whiten(rewards, ro.mask, shift_mean=False)
    adv, ret = gae(rewards, ro.values, ro.mask, p.gamma, p.lam)
    if p.whiten_advantages:
        adv = masked_whiten(adv, ro.mask)
    return Advantages(adv, ret, kl, rewards)


# ---------------------------------------------------------------- the update


def ppo_loss_fn(roles: Roles, cfg: RunConfig):
    """The loop's loss function: (policy + vf_coef * value token sums, tokens, metric sums)."""
    p = cfg.ppo

    def loss_fn(_net: nn.Module, batch: Batch) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        logp, entropy, values = roles.actor_critic(batch, p.temperature)
        parts = ppo_loss_parts(
            logp, batch["old_logp"], batch["advantages"], values, batch["old_values"],
            batch["returns"], batch["mask"], clip_ratio=p.clip_ratio, clip_value=p.clip_value,
        )  # fmt: skip
        extras = {
            "policy_loss": parts.policy.detach(),
            "value_loss": parts.value.detach(),
            "clipfrac": parts.clipped,
            "value_clipfrac": parts.value_clipped,
            "approx_kl": parts.approx_kl,
            "ratio": parts.ratio,
        }
        return parts.policy + p.vf_coef * parts.value, parts.tokens.long(), extras

    return loss_fn


def _update_batch(ro: Rollout, adv: Advantages, idx: list[int], pad_id: int) -> Batch:
    batch = ro.rows(idx, pad_id)
    r = batch["mask"].shape[1]
    for key, full in (
        ("old_logp", ro.logp), ("old_values", ro.values),
        ("advantages", adv.advantages), ("returns", adv.returns),
    ):  # fmt: skip
        batch[key] = full[idx, :r]
    return batch


def _count_tokens(batch: Batch) -> int:
    return int(batch["mask"].sum())


# ---------------------------------------------------------------- the run


class PPORun:
    """State of one PPO run: roles, optimizer, KL controller, logger, checkpoints."""

    def __init__(
        self,
        cfg: RunConfig,
        roles: Roles,
        prompts: list[list[int]],
        out: Path,
        *,
        pad_id: int,
        eot: list[int],
        decode: Callable[[list[int]], str],
        held: Sequence[list[int]] = (),
    ) -> None:
        self.cfg, self.roles, self.prompts, self.out = cfg, roles, prompts, out
        self.held = held  # held-out prompts: the engine's max_len covers them too
        self.pad, self.eot, self.decode = pad_id, eot, decode
        device = roles.policy.device
        self.precision = resolve_precision(cfg.precision, device)
        self.autocast = lambda: autocast_context(self.precision, device)
        p = cfg.ppo  # without max_steps: `epochs` passes over the training prompts
        self.total_steps = cfg.max_steps or math.ceil(
            cfg.epochs * len(prompts) / p.rollout_batch_size
        )
        n = p.rollout_batch_size * p.samples_per_prompt
        self.mini = n // p.mini_batches
        self.optimizer = build_optimizer(roles.net, cfg.optim)
        updates = self.total_steps * p.epochs * p.mini_batches
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, updates)
        self.params = [q for q in roles.net.parameters() if q.requires_grad]
        self.kl = KLController(
            p.kl_coef, p.kl_target if p.kl_controller == "adaptive" else None, p.kl_horizon
        )
        self.loss_fn = ppo_loss_fn(roles, cfg)
        self.step, self.skipped, self.bad_streak = 0, 0, 0
        self.ckpt_dir = out / "checkpoints"
        self.logger = MetricsLogger(out, tensorboard=cfg.logging.tensorboard)
        self.last_checkpoint: Path | None = None
        self._sampler: EngineSampler | None = None

    def sampler(self) -> Sampler | None:
        """The engine rollouts run on (built on first use), or None for `model.generate`."""
        p = self.cfg.ppo
        if not p.rollout_engine:
            return None
        if self._sampler is None:
            longest = max(map(len, [*self.prompts, *self.held]), default=1)
            rows = p.rollout_batch_size * p.samples_per_prompt
            self._sampler = EngineSampler(self.roles, longest + p.max_new_tokens + 1, rows)
        return self._sampler

    # -- checkpoints

    def resume(self) -> None:
        """Restore the latest (or named) checkpoint unless checkpoint.resume is 'never'."""
        seed_everything(self.cfg.seed)
        resume = self.cfg.checkpoint.resume
        path = None if resume == "never" else latest_checkpoint(self.ckpt_dir)
        if resume not in ("auto", "never"):
            path = Path(resume)
            if not path.is_dir():
                raise FileNotFoundError(f"checkpoint.resume: no checkpoint folder at {path}")
        if path is None:
            return
        ck = load_checkpoint(
            path, model=self.roles.net, optimizer=self.optimizer, scheduler=self.scheduler,
            objects={"kl_controller": self.kl},
        )  # fmt: skip
        self.step, self.skipped = ck.step, ck.extra.get("skipped_steps", 0)
        self.last_checkpoint = path
        truncate_metrics(self.logger.path, self.step)
        log(f"llamaforge: resumed from {path} at step {self.step}")

    def save(self) -> None:
        """Checkpoint the current step, unless it already is, or a weight is not finite."""
        path = self.ckpt_dir / f"checkpoint-{self.step:08d}"
        if self.last_checkpoint == path:
            return
        if not all(torch.isfinite(q).all() for q in self.params):
            raise NonFiniteLossError(self._nan_message("trainable weights are not finite"))
        self.last_checkpoint = save_checkpoint(
            self.ckpt_dir, self.step, trainable_state(self.roles.net), optimizer=self.optimizer,
            scheduler=self.scheduler, source_state={"step": self.step},
            extra={"skipped_steps": self.skipped, "total_steps": self.total_steps},
            objects={"kl_controller": self.kl}, keep=self.cfg.checkpoint.keep,
        )  # fmt: skip

    def _nan_message(self, what: str) -> str:
        last = self.last_checkpoint or "none yet"
        return (
            f"ppo step {self.step + 1}: {what}; stopped. Last usable checkpoint: {last}. "
            "Lower optim.lr, raise ppo.kl_coef, set ppo.reward_clip, or check the reward model"
        )

    # -- one iteration

    def iteration(self) -> dict[str, Any]:
        """Rollout, advantages, PPO epochs; returns the step's record."""
        cfg, p = self.cfg, self.cfg.ppo
        seed = cfg.seed * 1_000_003 + self.step
        prompts = prompts_for_step(self.prompts, self.step, p.rollout_batch_size, cfg.seed)
        prompts = [q for q in prompts for _ in range(p.samples_per_prompt)]
        self.roles.net.eval()  # no dropout anywhere: ratios start at exactly 1
        ro = make_rollout(
            self.roles, prompts, cfg, self.eot, seed=seed, pad_id=self.pad,
            autocast=self.autocast, sampler=self.sampler(),
        )  # fmt: skip
        for name, t in (("reward-model scores", ro.scores), ("policy log-probs", ro.logp)):
            if not torch.isfinite(t).all():
                raise NonFiniteLossError(self._nan_message(f"{name} are NaN/inf"))
        adv = compute_advantages(ro, cfg, self.kl.value)
        t0 = time.perf_counter()
        updates = self._update(ro, adv, torch.Generator().manual_seed(seed))
        train_s = time.perf_counter() - t0
        record = self._record(ro, adv, updates, train_s)
        self.kl.update(record["kl"], len(prompts))
        self.step += 1
        return record

    def _update(self, ro: Rollout, adv: Advantages, gen: torch.Generator) -> list[dict]:
        p, mb = self.cfg.ppo, self.cfg.optim.batch_size
        n, out = len(ro.prompts), []
        for _ in range(p.epochs):
            order = torch.randperm(n, generator=gen).tolist()
            for s in range(0, n, self.mini):
                rows = order[s : s + self.mini]
                window = [
                    _update_batch(ro, adv, rows[i : i + mb], self.pad)
                    for i in range(0, len(rows), mb)
                ]
                out.append(self._apply(window))
        return out

    def _apply(self, window: list[Batch]) -> dict[str, float]:
        stats = accumulate_gradients(
            self.roles.net, window, self.loss_fn, count_fn=_count_tokens, autocast=self.autocast
        )
        lr = self.scheduler.get_last_lr()[0]
        if not math.isfinite(stats.loss):
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip("nonfinite_loss", stats.loss)
        norm, applied = optimizer_step(
            self.optimizer, self.scheduler, self.params, max_grad_norm=self.cfg.optim.max_grad_norm
        )
        if not applied:
            return self._skip("nonfinite_grad", norm)
        self.bad_streak = 0
        return {"loss": stats.loss, "lr": lr, "grad_norm": norm, "tokens": stats.tokens} | (
            stats.extras
        )

    def _skip(self, reason: str, value: float) -> dict[str, float]:
        self.skipped += 1
        self.bad_streak += 1
        self.logger.log({"kind": "event", "step": self.step, "event": "skip", "reason": reason})
        if self.bad_streak >= self.cfg.optim.max_nonfinite_steps:
            raise NonFiniteLossError(
                self._nan_message(f"{reason.replace('_', ' ')} ({value}) {self.bad_streak} times")
            )
        return {}

    def _record(self, ro: Rollout, adv: Advantages, updates: list[dict], train_s: float) -> dict:
        done = [u for u in updates if u]
        mean = {k: sum(u[k] for u in done) / len(done) for k in (done[0] if done else {})}
        seq_kl = adv.kl.sum(1)
        lengths = ro.mask.sum(1)
        gen_tokens = float(lengths.sum())
        trained = sum(u.get("tokens", 0) for u in done)
        record = {
            "kind": "train",
            "step": self.step + 1,
            **{k: v for k, v in mean.items() if k != "tokens"},
            "reward_mean": float(ro.scores.mean()),
            "reward_std": float(ro.scores.std()) if len(ro.scores) > 1 else 0.0,
            "shaped_reward_mean": float(adv.rewards.sum(1).mean()),
            "kl": float(seq_kl.mean()),
            "kl_coef": self.kl.value,
            "entropy": float(masked_mean(ro.entropy, ro.mask)),
            "explained_variance": explained_variance(ro.values, adv.returns, ro.mask),
            "response_length": float(lengths.mean()),
            "ended_fraction": sum(ro.ended) / len(ro.ended),
            "generation_s": ro.gen_seconds,
            "scoring_s": ro.score_seconds,
            "training_s": train_s,
            "generation_tokens_per_s": gen_tokens / max(ro.gen_seconds, 1e-9),
            "training_tokens_per_s": trained / max(train_s, 1e-9),
            "samples_per_s": len(ro.prompts)
            / max(ro.gen_seconds + ro.score_seconds + train_s, 1e-9),
            "skipped_steps": self.skipped,
        }
        return record


def evaluate_policy(
    run: PPORun, prompts: list[list[int]], desc: str, samples: int = 3
) -> dict[str, Any]:
    """Held-out mean reward-model score and KL to the reference of sampled responses."""
    if not prompts:
        return {}
    run.roles.net.eval()
    ro = make_rollout(
        run.roles, prompts, run.cfg, run.eot, seed=run.cfg.seed + 12345, pad_id=run.pad,
        autocast=run.autocast, sampler=run.sampler(),
    )  # fmt: skip
    seq_kl = (kl_penalty(ro.logp, ro.ref_logp, "k1") * ro.mask).sum(1)
    decode = run.decode
    log(f"{desc}: {len(prompts)} held-out prompts scored")
    return {
        "prompts": len(prompts),
        "reward_mean": float(ro.scores.mean()),
        "reward_std": float(ro.scores.std()) if len(prompts) > 1 else 0.0,
        "kl": float(seq_kl.mean()),
        "response_length": float(ro.mask.sum(1).mean()),
        "samples": [
            {"prompt": decode(ro.prompts[i]), "response": decode(ro.responses[i])}
            for i in range(min(samples, len(prompts)))
        ],
    }


def train_ppo(run: PPORun) -> str:
    """Iterate until max_steps or a stop signal; returns the stop reason."""
    cfg = run.cfg
    run.resume()
    bar = tqdm(
        total=run.total_steps, initial=run.step, desc="ppo", dynamic_ncols=True,
        disable=not cfg.logging.progress,
    )  # fmt: skip
    reason = "completed"
    try:
        with StopSignals() as signals, bar, frozen_gc():
            while run.step < run.total_steps:
                record = run.iteration()
                if run.step % cfg.logging.every == 0 or run.step == run.total_steps:
                    run.logger.log(record)
                bar.set_postfix(
                    reward=f"{record['reward_mean']:.3f}", kl=f"{record['kl']:.3f}", refresh=False
                )
                bar.update(1)
                if cfg.checkpoint.every and run.step % cfg.checkpoint.every == 0:
                    run.save()
                if signals.received is not None:
                    reason = "signal"
                    break
            run.save()
    finally:
        run.logger.close()
    if cfg.logging.plot:
        plot_losses(read_metrics(run.logger.path), run.out / "loss.png")
    return reason


def run_ppo(cfg: RunConfig) -> dict[str, Any]:
    """`llamaforge train` with stage ppo: roles, rollouts and updates, outputs, before/after."""
    out = Path(cfg.output_dir)
    save_resolved(cfg, out)
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model, tok = load_model(
        cfg.model, device=device, dtype=base_dtype(cfg.method, precision, cfg.optim.master_dtype)
    )
    prompts, held = load_prompts(cfg, tok)
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    roles = build_roles(model, tok, cfg, compute)
    model.set_kernels(cfg.kernels)
    trainable, total = parameter_counts(roles.net)
    mem = memory_report(roles)
    log(
        f"ppo ({cfg.method}): training {trainable:,} of {total:,} parameters on {device} "
        f"({precision}); memory by role (MB): "
        + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in mem.items())
    )
    pad = tok.pad_id if tok.pad_id is not None else 0
    eot = end_of_turn(tok, cfg.data.template)
    run = PPORun(cfg, roles, prompts, out, pad_id=pad, eot=eot, decode=tok.decode, held=held)
    before = (
        _cached_json(out / "eval_before.json", lambda: evaluate_policy(run, held, "eval before"))
        or {}
    )
    reason = train_ppo(run)
    saved = save_outputs(model, tok, cfg, out, adapter_name="actor")
    after = evaluate_policy(run, held, "eval after")
    summary = {
        "output": str(saved),
        "steps": run.step,
        "stop_reason": reason,
        "memory_bytes": mem,
        "before": {k: v for k, v in before.items() if k != "samples"},
        "after": {k: v for k, v in after.items() if k != "samples"},
        "sample_before": (before.get("samples") or [None])[0],
        "sample_after": (after.get("samples") or [None])[0],
    }
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    if before and after:
        log(
            f"held-out ({before['prompts']} prompts): reward {before['reward_mean']:.3f} -> "
            f"{after['reward_mean']:.3f}, KL to reference {before['kl']:.3f} -> {after['kl']:.3f}"
            f"\nsample before: {summary['sample_before']['response']!r}"
            f"\n       after:  {summary['sample_after']['response']!r}"
        )
    return summary
