"""Rejection sampling (`stage: rs`): best-of-n selection, kept-set files, rounds, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from llamaforge.cli import main
from llamaforge.config import config_from_dict
from llamaforge.eval.reward import score_answers
from llamaforge.io.hf import add_score_head, save_hf
from llamaforge.io.load import load_model
from llamaforge.train.rejection import RejectionSampling, run_rejection_sampling, select_best
from tests.helpers import random_model
from tests.serve_helpers import FIX

TOKENIZER = FIX / "tiny_tokenizer" / "tokenizer.json"


def space_share(prompts, answers) -> list[float]:
    """A known reward: the share of spaces among the answer's characters (the random tiny
    model's greedy answers have almost none, its samples some)."""
    return [a.count(" ") / max(1, len(a)) for a in answers]


def _folder(d: Path, model) -> Path:
    save_hf(model, d)
    shutil.copy(TOKENIZER, d / "tokenizer.json")
    return d


def _prompts(d: Path, n: int = 32) -> Path:
    topics = "sky sea fox tree road bird rain snow lamp door book song".split()
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"tell me {k} about the {topics[k % 12]}"},
                {"role": "assistant", "content": "ok"},
            ]
        }
        for k in range(n)
    ]
    path = d / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path: Path, **rs) -> dict:
    base = _folder(tmp_path / "base", random_model("tiny-llama3", seed=3))
    return {
        "model": str(base),
        "stage": "rs",
        "method": "full",
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "max_steps": 30,
        "data": {
            "path": str(_prompts(tmp_path)),
            "format": "messages",
            "template": "chatml",
            "max_seq_len": 96,
            "val_size": 0.25,
        },
        "rs": {"n": 8, "prompts": 24, "eval_prompts": 8, "max_new_tokens": 16, **rs},
        "optim": {"lr": 3e-3, "batch_size": 8, "warmup_steps": 0, "schedule": "constant"},
        "logging": {"tensorboard": False, "plot": False, "progress": False},
    }


def test_select_best_takes_the_argmax_and_applies_threshold_and_margin():
    rewards = [[0.1, 0.9, 0.3], [0.5, 0.5, 0.4], [-2.0, -1.0, -3.0]]
    assert select_best(rewards) == [1, 0, 1]
    assert select_best(rewards, threshold=0.0) == [1, 0, None]
    assert select_best(rewards, min_margin=0.4) == [1, None, 1]
    assert select_best(rewards, min_margin=1.1) == [None, None, None]


def test_kept_set_is_the_best_sample_of_each_prompt_by_a_known_reward(tmp_path):
    rs = RejectionSampling(config_from_dict(_cfg(tmp_path)), reward=space_share)
    model, tok = load_model(rs.cfg.model, device="cpu")
    samples = rs.sample_round(1, model, tok)
    assert len(samples) == 24 and all(len(s["answers"]) == 8 for s in samples)
    assert any(len(set(s["answers"])) > 1 for s in samples)  # sampled, not greedy
    kept = rs.kept_rows(samples)
    for s, row in zip(samples, kept, strict=True):
        best = max(space_share(None, s["answers"]))
        assert row["reward"] == best == space_share(None, [row["messages"][-1]["content"]])[0]
        assert row["messages"][:-1] == s["prompt"] and row["rewards"] == s["rewards"]
    again = rs.sample_round(1, model, tok)  # seeded: the same samples again
    assert [s["answers"] for s in again] == [s["answers"] for s in samples]


def test_a_round_raises_the_heldout_reward_of_the_function(tmp_path):
    result = run_rejection_sampling(config_from_dict(_cfg(tmp_path)), reward=space_share)
    (entry,) = result["rounds"]
    assert entry["best_of_n"] > entry["mean_of_n"] >= 0
    assert result["greedy_heldout_after"] > result["greedy_heldout_before"] + 0.05, result
    run = tmp_path / "run"
    kept = [json.loads(x) for x in (run / "round1" / "kept.jsonl").read_text().splitlines()]
    assert len(kept) == 24 and all({"messages", "reward", "rewards"} <= set(k) for k in kept)
    assert (run / "round1" / "sft" / "model" / "config.json").is_file()
    assert (
        json.loads((run / "summary.json").read_text())["greedy_heldout_after"]
        == (result["greedy_heldout_after"])
    )
    again = run_rejection_sampling(config_from_dict(_cfg(tmp_path)), reward=space_share)
    assert again["rounds"] == result["rounds"]  # a finished run is read back, not redone
    more = _cfg(tmp_path)
    more["rs"]["rounds"] = 2  # the same run given one more round adds it, measured again
    two = run_rejection_sampling(config_from_dict(more), reward=space_share)
    assert two["rounds"][0] == result["rounds"][0] and two["rounds"][1]["trained_on"] == 48
    assert two["rounds"][1]["greedy_heldout_before"] == result["greedy_heldout_after"]
    assert (run / "round2" / "greedy_after.json").is_file()


def test_cli_stage_rs_with_a_reward_model_from_stage_rm(tmp_path, capsys):
    rm = random_model("tiny-llama3", seed=5)
    add_score_head(rm)
    rm_dir = _folder(tmp_path / "rm", rm)
    cfg = _cfg(tmp_path, reward_model=str(rm_dir), rounds=2, n=3, prompts=6, eval_prompts=4)
    cfg.update(method="lora", max_steps=2)
    path = tmp_path / "rs.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["rounds"][1]["trained_on"] == 12  # round 2 trains on both rounds' answers
    run = tmp_path / "run"
    assert (run / "round2" / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    kept = json.loads((run / "round1" / "kept.jsonl").read_text().splitlines()[0])
    model, tok = load_model(rm_dir, device="cpu")
    prompt, answer = kept["messages"][:-1], kept["messages"][-1]["content"]
    rescored = score_answers(model, tok, [prompt], [answer], template="chatml", max_seq_len=96)
    assert rescored[0] == pytest.approx(kept["reward"], abs=1e-5)
    lines = (run / "rs.jsonl").read_text().splitlines()
    assert len(lines) == 2 and {"first_of_n", "best_of_n", "greedy_heldout_before"} <= set(
        json.loads(lines[0])
    )


def test_rs_config_errors_exit_2(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    path = tmp_path / "rs.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    assert "rs.reward_model" in capsys.readouterr().err
    cfg["rs"]["reward_model"] = str(tmp_path / "base")  # a causal LM, no score head
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    assert "no score head" in capsys.readouterr().err
    cfg["rs"]["n"] = 0
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    assert "rs.n" in capsys.readouterr().err
