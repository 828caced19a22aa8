"""Best-of-n, rejection sampling and PPO on real chitchat text, judged by a second reward model.

One run (a GPU makes it minutes; `--small` runs the plumbing on a CPU). From the
chitchat_next_turn pairs (`python benchmarks/preference_quality.py --write-data DIR`):
1. Two LoRA reward models of SmolLM2 on disjoint halves of the training pairs (even and odd
   rows), with different seeds: RM1 is optimised against, RM2 only judges (a policy that
   exploits RM1's quirks gains less, or loses, under RM2). Held-out pair accuracy of each.
2. Best-of-n (issue 10): n = 1, 2, 4, ..., 32 sampled answers (temperature 1) to held-out
   prompts on the serving engine; samples/s of each n as its own run; the mean RM1 reward
   of the RM1-best of n (from disjoint groups of the 32 samples of every prompt) and the RM2
   reward of that same answer.
3. Rejection sampling (`stage: rs`, RM1, one round), and PPO (`stage: ppo`, RM1 as a third
   adapter of the one base): held-out greedy answers of the SFT model (SmolLM2-Instruct)
   and of each trained policy, scored by RM1 and RM2; win rate against the SFT model by RM2
   (ties count half); PPO's KL to the reference on its held-out prompts; answer lengths.

    python benchmarks/rlhf_quality.py --model GGUF --data DIR --out rlhf_quality.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from preference_quality import lf, settings

ROOT = Path(__file__).resolve().parent.parent
NS = (1, 2, 4, 8, 16, 32)


def split_pairs(data: str, work: Path) -> tuple[Path, Path]:
    """Even and odd rows of the training pairs: two disjoint training sets."""
    rows = Path(data, "chitchat_next_turn.train.jsonl").read_text().splitlines()
    out = []
    for k, part in enumerate((rows[0::2], rows[1::2])):
        path = work / f"pairs_{k}.jsonl"
        path.write_text("".join(x + "\n" for x in part))
        out.append(path)
    return out[0], out[1]


def train_rm(a, name: str, pairs: Path, seed: int, work: Path) -> dict:
    out = work / name
    t0 = time.time()
    if not (out / "model").is_dir():
        lf(
            "train", str(ROOT / "configs/rm_chitchat.yaml"), f"model={a.model}",
            f"data.path={pairs}", f"output_dir={out}", f"seed={seed}", *settings(a),
        )  # fmt: skip
    res = json.loads(
        lf("score", str(out / "model"), "--data", test_file(a), "--max-seq-len", "256")
    )
    return {**res, "train_seconds": round(time.time() - t0, 1), "seed": seed, "pairs": str(pairs)}


def test_file(a) -> str:
    return str(Path(a.data, "chitchat_next_turn.test.jsonl"))


def held_prompts(a) -> list[list[dict]]:
    """Distinct prompts (messages) of the held-out pairs, the first --prompts of them."""
    from llamaforge.data.preference import to_preference

    seen, out = set(), []
    for line in Path(test_file(a)).read_text().splitlines():
        prompt = [dict(m) for m in to_preference(json.loads(line)).prompt]
        key = json.dumps(prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(prompt)
    return out[: a.prompts]


def rs_config(a, reward_model: str, batch: int):
    from llamaforge.config import config_from_dict

    return config_from_dict(
        {
            "model": a.model,
            "stage": "rs",
            "data": {"path": test_file(a), "format": "preference", "max_seq_len": 256,
                     "max_prompt_len": 192},
            "rs": {"reward_model": reward_model, "max_new_tokens": a.new_tokens,
                   "temperature": 1.0, "top_p": 1.0, "batch_size": batch},
            "optim": {"batch_size": 64},
        }
    )  # fmt: skip


class Judges:
    """RM1 and RM2 as reward functions of (prompt messages, answer text)."""

    def __init__(self, a, rm1: str, rm2: str, dev: torch.device) -> None:
        from llamaforge.train.rejection import RewardModel

        self.cfg = rs_config(a, rm1, a.batch)
        self.rm = [RewardModel(p, self.cfg, dev) for p in (rm1, rm2)]

    def __call__(self, prompts, answers) -> list[list[float]]:
        return [rm(prompts, answers) for rm in self.rm]


def best_of_n(a, policy, tok, prompts, judges: Judges, dev: torch.device) -> dict:
    from llamaforge.train.rejection import prompt_ids, sample_answers

    cfg = judges.cfg
    ids = [prompt_ids(tok, p, cfg) for p in prompts]
    speed = {}
    answers = None
    for n in NS:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        got = sample_answers(policy, tok, ids, cfg, n=n, seed=n)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        speed[n] = {"samples": len(ids) * n, "seconds": round(dt, 2),
                    "samples_per_s": round(len(ids) * n / dt, 1)}  # fmt: skip
        print(f"best-of-n: n={n} {speed[n]}", flush=True)
        answers = got
    assert answers is not None
    n_max = NS[-1]
    flat_p = [p for p in prompts for _ in range(n_max)]
    flat_a = [x for row in answers for x in row]
    r1, r2 = judges(flat_p, flat_a)
    curve = {}
    for n in NS:
        best1, best2 = [], []
        for i in range(len(prompts)):
            for g in range(n_max // n):
                idx = range(i * n_max + g * n, i * n_max + (g + 1) * n)
                j = max(idx, key=lambda k: r1[k])
                best1.append(r1[j])
                best2.append(r2[j])
        curve[n] = {"rm1_best": sum(best1) / len(best1), "rm2_of_rm1_best": sum(best2) / len(best2)}
        print(f"best-of-n: n={n} {curve[n]}", flush=True)
    lengths = [len(tok.encode(x)) for x in flat_a]
    return {
        "prompts": len(prompts),
        "speed": speed,
        "curve": curve,
        "mean_answer_tokens": sum(lengths) / len(lengths),
        "examples": [{"prompt": prompts[0][-1]["content"], "answers": answers[0][:4]}],
    }


def greedy(policy, tok, prompts, judges: Judges) -> dict:
    from llamaforge.train.rejection import prompt_ids, sample_answers

    ids = [prompt_ids(tok, p, judges.cfg) for p in prompts]
    answers = [row[0] for row in sample_answers(policy, tok, ids, judges.cfg, n=1, seed=0,
                                                greedy=True)]  # fmt: skip
    r1, r2 = judges(prompts, answers)
    return {"answers": answers, "rm1": r1, "rm2": r2,
            "tokens": [len(tok.encode(x)) for x in answers]}  # fmt: skip


def win_rate(ours: list[float], theirs: list[float]) -> float:
    """Fraction of prompts where `ours` scores higher (ties count half)."""
    wins = sum(1.0 if o > t else 0.5 if o == t else 0.0 for o, t in zip(ours, theirs, strict=True))
    return wins / len(ours)


def compare(base: dict, other: dict) -> dict:
    """Mean rewards, and the win rate of `other` over `base` by RM2 (and by RM1)."""
    return {
        "rm1_mean": sum(other["rm1"]) / len(other["rm1"]),
        "rm2_mean": sum(other["rm2"]) / len(other["rm2"]),
        "rm2_win_rate_vs_sft": win_rate(other["rm2"], base["rm2"]),
        "rm1_win_rate_vs_sft": win_rate(other["rm1"], base["rm1"]),
        "mean_tokens": sum(other["tokens"]) / len(other["tokens"]),
        "example": other["answers"][:3],
    }


def run_rs(a, rm1: str, work: Path) -> tuple[str, dict]:
    out = work / "rs"
    lf(
        "train", str(ROOT / "configs/rs_chitchat.yaml"), f"model={a.model}",
        f"data.path={work / 'pairs_0.jsonl'}", "data.format=preference", "data.val_size=0.05",
        f"rs.reward_model={rm1}", f"rs.prompts={a.rs_prompts}", f"rs.n={a.rs_n}",
        f"rs.max_new_tokens={a.new_tokens}", "rs.batch_size=256", f"max_steps={a.rs_steps}",
        f"output_dir={out}", "logging.progress=false", "checkpoint.every=null",
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    return summary["output"], summary


def run_ppo(a, rm1_adapter: str, work: Path, kl: float) -> tuple[str, dict]:
    out = work / f"ppo-kl{kl}"
    lf(
        "train", str(ROOT / "configs/ppo_chitchat.yaml"), f"model={a.model}",
        f"data.path={work / 'pairs_0.jsonl'}", "data.format=preference", "data.val_size=0.05",
        "data.max_prompt_len=192", f"ppo.reward_model={rm1_adapter}",
        f"ppo.rollout_batch_size={a.ppo_batch}", f"ppo.max_new_tokens={a.new_tokens}",
        f"ppo.kl_coef={kl}", "ppo.epochs=2", "ppo.mini_batches=4", "ppo.eval_prompts=64",
        f"optim.batch_size={min(32, a.ppo_batch)}", f"optim.lr={a.ppo_lr}",
        f"max_steps={a.ppo_steps}", f"output_dir={out}", "logging.progress=false",
        "logging.tensorboard=false", f"checkpoint.every={max(a.ppo_steps // 2, 1)}",
    )  # fmt: skip
    summary = json.loads((out / "eval.json").read_text())
    return str(out / "adapter"), summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="SmolLM2 GGUF or HF folder")
    p.add_argument("--data", required=True, help="folder of chitchat_next_turn.train/test.jsonl")
    p.add_argument("--work", default="/tmp/rlhfq")
    p.add_argument("--out", default="rlhf_quality.json")
    p.add_argument("--steps", type=int, default=200, help="reward-model steps")
    p.add_argument("--batch-size", type=int, default=8, help="reward-model pairs per step")
    p.add_argument("--lr", type=float, default=1e-3, help="reward-model learning rate")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--batch", type=int, default=256, help="engine rows / scoring batch")
    p.add_argument("--rs-prompts", type=int, default=256)
    p.add_argument("--rs-n", type=int, default=8)
    p.add_argument("--rs-steps", type=int, default=64)
    p.add_argument("--ppo-steps", type=int, default=60)
    p.add_argument("--ppo-batch", type=int, default=64)
    p.add_argument("--ppo-lr", type=float, default=1e-4)
    p.add_argument("--ppo-kl", default="0.05,0.2", help="one PPO run per KL coefficient")
    p.add_argument("--skip", default="", help="comma list of bon, rs, ppo")
    p.add_argument("--small", action="store_true", help="a few steps of everything (CPU)")
    a = p.parse_args()
    if a.small:
        a.steps, a.prompts, a.new_tokens, a.batch = 4, 4, 8, 16
        a.rs_prompts, a.rs_n, a.rs_steps, a.ppo_steps, a.ppo_batch = 4, 2, 2, 2, 4
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(a.out)  # a later run with --skip adds to the results of an earlier one
    result: dict = json.loads(out.read_text()) if out.is_file() else {}
    result.setdefault("settings", []).append(vars(a))
    result["device"] = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    half0, half1 = split_pairs(a.data, work)
    result["rm1"] = train_rm(a, "rm1", half0, 0, work)
    result["rm2"] = train_rm(a, "rm2", half1, 1, work)
    print("reward models", json.dumps({k: result[k] for k in ("rm1", "rm2")}), flush=True)
    save()
    from llamaforge.io.load import load_model
    from llamaforge.train.recipe import merge_adapter

    rm1, rm2 = str(work / "rm1/model"), str(work / "rm2/model")
    judges = Judges(a, rm1, rm2, dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    prompts = held_prompts(a)
    skip = set(filter(None, a.skip.split(",")))

    def policy(adapter: str | None):
        model, tok = load_model(a.model, device=dev, dtype=dtype)
        if adapter:  # merged: the engine serves unnamed requests with the base alone
            model = merge_adapter(model, Path(adapter))
        return model, tok

    model, tok = policy(None)
    if "bon" not in skip:
        result["best_of_n"] = best_of_n(a, model, tok, prompts, judges, dev)
        save()
    sft = greedy(model, tok, prompts, judges)
    result["sft"] = compare(sft, sft)
    del model
    if "rs" not in skip:
        t0 = time.time()
        adapter, summary = run_rs(a, rm1, work)
        m, tok = policy(adapter)
        result["rs"] = {
            **compare(sft, greedy(m, tok, prompts, judges)),
            "seconds": round(time.time() - t0, 1),
            "rounds": summary["rounds"],
        }
        print("rs", json.dumps(result["rs"]), flush=True)
        save()
    if "ppo" not in skip:
        for kl in map(float, a.ppo_kl.split(",")):
            t0 = time.time()
            adapter, summary = run_ppo(a, str(work / "rm1/adapter"), work, kl)
            m, tok = policy(adapter)
            result[f"ppo_kl{kl}"] = {
                **compare(sft, greedy(m, tok, prompts, judges)),
                "seconds": round(time.time() - t0, 1),
                "kl_to_reference": summary["after"].get("kl"),
                "heldout_sampled_rm1": [summary["before"].get("reward_mean"),
                                        summary["after"].get("reward_mean")],
            }  # fmt: skip
            print(f"ppo kl {kl}", json.dumps(result[f"ppo_kl{kl}"]), flush=True)
            save()
    save()


if __name__ == "__main__":
    main()
