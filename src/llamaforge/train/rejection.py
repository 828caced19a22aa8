"""Rejection sampling (`stage: rs`): n answers per prompt, keep the best by reward, then SFT.

One round: the current policy samples `rs.n` answers for each of `rs.prompts` training
prompts (one continuous batch on the serving engine, a seed per sample); a reward model
from `stage: rm` (or any `RewardFn`) scores them; the best answer of each prompt is kept,
optionally only when its reward reaches `rs.threshold` or beats the mean of its n by
`rs.min_margin`; the kept set is written beside the run (`roundK/kept.jsonl`: messages,
the reward and all n rewards) and the policy is fine-tuned on it by the ordinary SFT recipe
(`recipe.run`, same method and optimiser settings). `rs.rounds` repeats sample -> select ->
train; each round trains from the starting model on the kept answers of every round so far
(`rs.accumulate`, as Llama 2's later rounds did) or of that round only, and the next round
samples from the result.

Logged per round (`rs.jsonl`, `roundK/round.json`): the mean reward of the first sample
(what plain sampling gives), of the mean and the best of n, how many were kept, and the mean
reward of the policy's greedy answers to held-out prompts (before the round); `summary.json`
adds the final policy's (`roundK/greedy_after.json` of the last round). Every stage of a
round is cached in its folder, so a stopped run started again continues where it was (its
SFT resumes from its own checkpoints), and one given more rounds adds them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import ConfigError, RunConfig, save_resolved
from ..data.tokenizer import Tokenizer
from ..io.atomic import write_text_atomic
from .recipe import base_dtype, log

Messages = list[dict[str, str]]
RewardFn = Callable[[Sequence[Messages], Sequence[str]], list[float]]


# ---------------------------------------------------------------- prompts


def load_prompts(cfg: RunConfig) -> tuple[list[Messages], list[Messages]]:
    """Distinct prompts (messages ending with the user) of the train and held-out splits."""
    from ..data import formats
    from ..data.pipeline import as_messages, assign_splits, load_rows
    from ..data.preference import Preference
    from ..data.sources import BadRow

    d = cfg.data
    rows, fmt, _ = load_rows(d)
    if fmt == "text":
        raise ConfigError(
            "data.format: stage rs needs prompts (chat, alpaca or pair rows), not text"
        )
    splits = assign_splits(rows, d.val_size, d.test_size, d.split_seed)
    train: list[Messages] = []
    held: list[Messages] = []
    seen: set[str] = set()
    for row, split in zip(rows, splits, strict=True):
        try:
            if row.error is not None:
                raise row.error
            sample = formats.to_sample(row.data, fmt, text_key=d.text_key)
        except BadRow:
            continue  # the prompt side is all rs needs; unusable rows are skipped
        if isinstance(sample, Preference):
            prompt = [dict(m) for m in sample.prompt]
            if d.system and prompt[0]["role"] != "system":
                prompt.insert(0, {"role": "system", "content": d.system})
        else:
            prompt = as_messages(sample, d.system)[:-1]
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            (train if split == "train" else held).append(prompt)
    if not train or not held:
        raise ConfigError(
            f"data.path {d.path!r}: stage rs needs training and held-out prompts "
            f"({len(train)} train, {len(held)} held out; set data.val_size or data.test_size)"
        )
    return train, held


def prompt_ids(tok: Tokenizer, prompt: Messages, cfg: RunConfig) -> list[int]:
    """The policy's generation prompt, cut from the left to the prompt budget."""
    from ..data.templates import render_conversation

    ids = render_conversation(tok, prompt, cfg.data.template, add_generation_prompt=True)[0]
    return ids[-_prompt_budget(cfg) :]


def _prompt_budget(cfg: RunConfig) -> int:
    room = cfg.data.max_seq_len - cfg.rs.max_new_tokens
    return max(1, min(cfg.data.max_prompt_len or room, room))


# ---------------------------------------------------------------- reward


class RewardModel:
    """A `stage: rm` folder as a RewardFn: the reward of each (prompt, answer) sequence."""

    def __init__(self, path: str, cfg: RunConfig, device: torch.device) -> None:
        from ..io.load import load_model

        if not Path(path).is_dir():
            raise ConfigError(f"key 'rs.reward_model': {path}: no such reward-model folder")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model, self.tok = load_model(path, device=device, dtype=dtype)
        if getattr(self.model, "score", None) is None:
            raise ConfigError(
                f"key 'rs.reward_model': {path} has no score head (use the model/ folder that "
                "stage rm writes)"
            )
        self.cfg = cfg

    def __call__(self, prompts: Sequence[Messages], answers: Sequence[str]) -> list[float]:
        from ..eval.reward import score_answers

        d = self.cfg.data
        return score_answers(
            self.model,
            self.tok,
            prompts,
            answers,
            template=d.template,
            max_seq_len=d.max_seq_len,
            max_prompt_len=d.max_prompt_len,
            batch_size=self.cfg.optim.batch_size,
        )


# ---------------------------------------------------------------- sampling and selection


def sample_answers(
    model,
    tok: Tokenizer,
    prompts: Sequence[list[int]],
    cfg: RunConfig,
    *,
    n: int,
    seed: int,
    greedy: bool = False,
) -> list[list[str]]:
    """n answers per prompt from one engine run (rs sampling settings, or greedy)."""
    from ..model.generate import SamplingParams
    from ..serve.engine import OFFLINE_PREFILL_BUDGET, Engine, Request

    rs = cfg.rs
    max_len = max(map(len, prompts)) + rs.max_new_tokens + 1
    engine = Engine(
        model, decode=tok.decode, max_batch=rs.batch_size, max_len=max_len,
        prefill_budget=OFFLINE_PREFILL_BUDGET,
    )  # fmt: skip
    bar = tqdm(total=len(prompts) * n, desc="greedy" if greedy else f"sample x{n}", leave=False)
    reqs = []
    for i, p in enumerate(prompts):
        for j in range(n):
            sp = SamplingParams(
                max_new_tokens=rs.max_new_tokens,
                temperature=0.0 if greedy else rs.temperature,
                top_k=rs.top_k,
                top_p=rs.top_p,
                stop_ids=sorted(tok.stop_ids),
                seed=(seed * 1_000_003 + i * 1009 + j) % (1 << 62),
            )
            req = Request(p, sp, on_finish=lambda _r: bar.update(1))
            reqs.append(engine.submit(req, enforce_queue_cap=False))
    engine.wait(reqs)
    bar.close()
    texts = [tok.decode(r.output).strip() for r in reqs]
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def select_best(
    rewards: Sequence[Sequence[float]],
    *,
    threshold: float | None = None,
    min_margin: float | None = None,
) -> list[int | None]:
    """Index of the best answer per prompt, or None where the filters reject it."""
    out: list[int | None] = []
    for r in rewards:
        j = max(range(len(r)), key=lambda k: r[k])
        mean = sum(r) / len(r)
        ok = (threshold is None or r[j] >= threshold) and (
            min_margin is None or r[j] - mean >= min_margin
        )
        out.append(j if ok else None)
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


# ---------------------------------------------------------------- rounds


def _cached(path: Path, compute: Callable[[], Any]) -> Any:
    """A JSON result of an earlier (stopped) run, else computed and written atomically."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    write_text_atomic(path, json.dumps(value, indent=1) + "\n")
    return value


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def load_policy(cfg: RunConfig, output: Path | None, device: torch.device):
    """The starting model, or the starting model with a round's SFT output applied."""
    from ..io.load import load_model
    from .loop import resolve_precision
    from .recipe import merge_adapter

    dtype = base_dtype("lora", resolve_precision(cfg.precision, device))
    if output is None or (output / "config.json").is_file():
        return load_model(output or cfg.model, device=device, dtype=dtype)
    model, tok = load_model(cfg.model, device=device, dtype=dtype)
    return merge_adapter(model, output), tok


def greedy_reward(model, tok, held: Sequence[Messages], reward: RewardFn, cfg: RunConfig):
    """Mean reward of the policy's greedy answers to the held-out prompts, and the answers."""
    ids = [prompt_ids(tok, p, cfg) for p in held]
    answers = [a[0] for a in sample_answers(model, tok, ids, cfg, n=1, seed=0, greedy=True)]
    scores = reward(held, answers)
    return {"mean_reward": _mean(scores), "answers": answers, "rewards": scores}


class RejectionSampling:
    """The rounds of one `stage: rs` run (see the module docstring)."""

    def __init__(self, cfg: RunConfig, reward: RewardFn | None = None) -> None:
        from ..io.load import pick_device

        if reward is None and not cfg.rs.reward_model:
            raise ConfigError("stage rs needs key 'rs.reward_model' (a folder written by stage rm)")
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.device = pick_device(cfg.device)
        self.reward = reward or RewardModel(cfg.rs.reward_model, cfg, self.device)
        train, held = load_prompts(cfg)
        self.train_prompts, self.held = train, held[: cfg.rs.eval_prompts]

    def round_prompts(self, k: int) -> list[Messages]:
        """The prompts sampled in round k (a seeded draw from the training prompts)."""
        n = min(self.cfg.rs.prompts, len(self.train_prompts))
        return random.Random(f"rs:{self.cfg.seed}:{k}").sample(self.train_prompts, n)

    def sample_round(self, k: int, model, tok) -> list[dict]:
        """Prompts of round k, their n answers and rewards (one row per prompt)."""
        rs = self.cfg.rs
        prompts = self.round_prompts(k)
        ids = [prompt_ids(tok, p, self.cfg) for p in prompts]
        answers = sample_answers(model, tok, ids, self.cfg, n=rs.n, seed=self.cfg.seed + k)
        flat = self.reward(
            [p for p in prompts for _ in range(rs.n)], [a for x in answers for a in x]
        )
        rewards = [flat[i * rs.n : (i + 1) * rs.n] for i in range(len(prompts))]
        return [
            {"prompt": p, "answers": a, "rewards": r}
            for p, a, r in zip(prompts, answers, rewards, strict=True)
        ]

    def kept_rows(self, samples: list[dict]) -> list[dict]:
        """The SFT rows: each prompt's best answer that passes the filters, with its scores."""
        rs = self.cfg.rs
        picks = select_best(
            [s["rewards"] for s in samples], threshold=rs.threshold, min_margin=rs.min_margin
        )
        rows = []
        for s, j in zip(samples, picks, strict=True):
            if j is not None:
                answer = {"role": "assistant", "content": s["answers"][j]}
                rows.append(
                    {
                        "messages": [*s["prompt"], answer],
                        "reward": s["rewards"][j],
                        "mean_reward": _mean(s["rewards"]),
                        "rewards": s["rewards"],
                    }
                )
        return rows

    def train_round(self, k: int, rows: list[dict]) -> dict[str, Any]:
        """SFT of the starting model on the kept rows (this round's, or all rounds')."""
        from .recipe import run

        rdir = self.out / f"round{k}"
        path = rdir / "train.jsonl"
        _write_jsonl(path, [{"messages": r["messages"]} for r in rows])
        data = replace(
            self.cfg.data,
            path=str(path),
            format="messages",
            columns={},
            val_size=0.0,
            test_size=0.0,
            val_path=None,
            limit=None,
            truncation="left",  # a long prompt loses its start, never the kept answer
        )
        sft = replace(self.cfg, stage="sft", output_dir=str(rdir / "sft"), data=data)
        return run(sft)

    def _sample(self, k: int, policy: Path | None) -> tuple[dict, list[dict]]:
        """Round k's held-out greedy reward and samples (the policy is freed on return)."""
        rdir = self.out / f"round{k}"
        model, tok = load_policy(self.cfg, policy, self.device)
        greedy = _cached(
            rdir / "greedy_before.json",
            lambda: greedy_reward(model, tok, self.held, self.reward, self.cfg),
        )
        return greedy, _cached(rdir / "samples.json", lambda: self.sample_round(k, model, tok))

    def run_round(self, k: int, policy: Path | None, kept_all: list[dict]) -> dict[str, Any]:
        """Sample with `policy`, select, train; returns the round's log entry."""
        cfg, rdir = self.cfg, self.out / f"round{k}"
        greedy, samples = self._sample(k, policy)
        kept = self.kept_rows(samples)
        _write_jsonl(rdir / "kept.jsonl", kept)
        if not kept:
            raise ConfigError(f"round {k}: no answer passed rs.threshold / rs.min_margin")
        kept_all += kept
        trained_on = kept_all if cfg.rs.accumulate else kept
        summary = self.train_round(k, trained_on)
        return {
            "round": k,
            "prompts": len(samples),
            "n": cfg.rs.n,
            "first_of_n": _mean([s["rewards"][0] for s in samples]),
            "mean_of_n": _mean([_mean(s["rewards"]) for s in samples]),
            "best_of_n": _mean([max(s["rewards"]) for s in samples]),
            "kept": len(kept),
            "kept_mean_reward": _mean([r["reward"] for r in kept]),
            "trained_on": len(trained_on),
            "greedy_heldout_before": greedy["mean_reward"],
            "sft_steps": summary["steps"],
            "sft_final_loss": summary["final_train_loss"],
            "policy": summary["output"],
        }

    def run(self) -> dict[str, Any]:
        """Every round (finished ones are read back), then the final policy's greedy reward."""
        cfg, out = self.cfg, self.out
        save_resolved(cfg, out)
        history: list[dict] = []
        kept_all: list[dict] = []
        policy: Path | None = None
        for k in range(1, cfg.rs.rounds + 1):
            record = out / f"round{k}" / "round.json"
            if record.is_file():
                entry = json.loads(record.read_text())
                kept_all += _read_jsonl(record.with_name("kept.jsonl"))
            else:
                entry = self.run_round(k, policy, kept_all)
                write_text_atomic(record, json.dumps(entry, indent=1) + "\n")
                log(_round_line(entry))
            history.append(entry)
            _write_jsonl(out / "rs.jsonl", history)
            policy = Path(entry["policy"])
        model, tok = load_policy(cfg, policy, self.device)
        final = _cached(  # beside the last round: a run given more rounds measures again
            out / f"round{cfg.rs.rounds}" / "greedy_after.json",
            lambda: greedy_reward(model, tok, self.held, self.reward, cfg),
        )
        result = {
            "output": str(policy),
            "rounds": history,
            "heldout_prompts": len(self.held),
            "greedy_heldout_before": history[0]["greedy_heldout_before"],
            "greedy_heldout_after": final["mean_reward"],
            "sample_after": {"prompt": self.held[0], "answer": final["answers"][0]},
        }
        write_text_atomic(out / "summary.json", json.dumps(result, indent=1) + "\n")
        return result


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _round_line(e: dict) -> str:
    return (
        f"rs round {e['round']}: {e['prompts']} prompts x {e['n']}: reward first "
        f"{e['first_of_n']:.3f}"
        f" / mean {e['mean_of_n']:.3f} / best {e['best_of_n']:.3f}; kept {e['kept']}; held-out "
        f"greedy before {e['greedy_heldout_before']:.3f}"
    )


def run_rejection_sampling(cfg: RunConfig, reward: RewardFn | None = None) -> dict[str, Any]:
    """`stage: rs` end to end; `reward` replaces rs.reward_model (e.g. a known function)."""
    return RejectionSampling(cfg, reward).run()
