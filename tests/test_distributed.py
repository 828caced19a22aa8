"""Several processes on the CPU (gloo): FSDP2 and DDP through torchrun.

Runs at world size 2 and 3 must give the losses and weights of one process on the same
global batch; sharded checkpoints resume at another world size (2 -> 1, 1 -> 2, 2 -> 3) as
if the run had never stopped; a rank that fails ends the job with its message. The module
starts torchrun twice (2 and 3 processes), each running all its scenarios
(tests/dist_cases.py) in one process group.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llamaforge.cli import main as cli
from llamaforge.config import ConfigError, DistributedConfig
from llamaforge.train import distributed
from llamaforge.train.batches import FILLER, BatchSource, RankShard
from llamaforge.train.checkpoint import is_sharded, latest_checkpoint
from llamaforge.train.loop import train
from tests.dist_cases import (
    CASES,
    GLOBAL_ACCUM,
    build_case,
    case_cfg,
    case_eval,
    case_source,
    examples,
)
from tests.helpers import tiny_hf_folder

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "data"
# (method, strategy, stage); auto is fsdp2 under torchrun; DPO with full fine-tuning
# precomputes reference log-probs (on rank 0, shared with the others).
CLI_RUNS = [("lora", "auto", "sft"), ("full", "ddp", "sft"), ("full", "fsdp2", "dpo")]
LAUNCH_2 = [
    "fsdp2_full",
    "fsdp2_full_bf16",
    "ddp_full",
    "fsdp2_lora",
    "ddp_lora",
    "fsdp2_qlora",
    "fsdp2_nan",
    "fsdp2_2to2",
    "fsdp2_signal",
    "fsdp2_from_single",
]
LAUNCH_3 = ["fsdp2_2to3", "fsdp2_crash"]  # the crash case last: that job fails by design
TOL = {"rtol": 1e-5, "atol": 2e-5}  # fp32: only the order of the sums differs
# After a few AdamW steps a weight whose gradient is near zero moves by up to lr per step on
# float noise (m / sqrt(v)), so weights get a bound at 3% of lr = 1e-2; losses and gradient
# norms stay at fp32 tolerance.
WEIGHT_TOL = {"rtol": 1e-4, "atol": 3e-4}
# bf16: FSDP2 computes with bf16 copies of the weights where one process autocasts fp32
# ones, so both round differently (~3 significant digits); weights are not compared.
BF16_TOL = {"rtol": 5e-3, "atol": 0.0}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(n: int, out: Path, cases: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}"]
    cmd += ["--master-port", str(_port()), "-m", "tests.dist_worker", str(out), *cases]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    return proc, time.perf_counter() - start


def _single(name: str, out: Path, **change) -> tuple[object, torch.nn.Module]:
    """The one-process run of a case with the whole global batch as grad_accum."""
    case = dataclasses.replace(CASES[name], **change)
    model, loss_fn = build_case(case)
    cfg = case_cfg(case, grad_accum=GLOBAL_ACCUM, out=out.parent)
    eval_fn = case_eval(case, loss_fn)
    result = train(
        model, source=case_source(case), loss_fn=loss_fn, cfg=cfg, out_dir=out, eval_fn=eval_fn
    )
    return result, model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Reference runs in this process, then the two torchrun launches."""
    out = tmp_path_factory.mktemp("dist")
    # 4 unbroken steps in one process; its step-2 checkpoint is resumed at 2 processes.
    unbroken, _ = _single("fsdp2_full", out / "single", steps=4, checkpoint_every=2)
    base = tiny_hf_folder(out / "base")
    configs = [_cli_config(out, base, m, s, 2, stage) for m, s, stage in CLI_RUNS]
    two, _ = _torchrun(2, out, LAUNCH_2 + [f"cli={c}" for c in configs])
    assert two.returncode == 0, two.stdout[-4000:] + two.stderr[-4000:]
    three, seconds = _torchrun(3, out, LAUNCH_3)
    return out, unbroken.losses, three, seconds


def _cli_config(
    out: Path, base: Path, method: str, strategy: str, world: int, stage: str = "sft"
) -> Path:
    """A tiny `llamaforge train` config whose global batch is 2 micro-batches of 2."""
    data = {"path": str(FIX / "alpaca.json"), "format": "alpaca", "cache_dir": str(out)}
    if stage == "dpo":
        data = {"path": str(FIX / "preference.jsonl"), "format": "preference", "val_size": 0.2}
        data |= {"template": "chatml", "cache_dir": str(out)}
    raw = {
        "model": str(base),
        "stage": stage,
        "method": method,
        "data": data,
        "output_dir": str(out / f"cli-{stage}-{method}-{strategy}-{world}"),
        "max_steps": 3,
        "lora": {"dropout": 0.0},
        "optim": {"lr": 0.02, "batch_size": 2, "grad_accum": 2 // world},
        "distributed": {"strategy": strategy if world > 1 else "none"},
        "eval": {"generate": {"max_examples": 2, "max_new_tokens": 4}},
    }
    path = out / f"{stage}-{method}-{strategy}-{world}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _result(out: Path, name: str) -> dict:
    return torch.load(out / name / "result.pt", weights_only=True)


def _rows(path: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _grad_norms(path: Path) -> list[float]:
    """The global gradient norm (before clipping) of every applied step."""
    return [r["grad_norm"] for r in _rows(path, "train")]


def _ranks(out: Path, name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / name).glob("rank*.json"))]


def _continues_in_one_process(ckpt: Path, out: Path, unbroken: list[float]) -> None:
    """Resume `ckpt` (step 2 of the full case) in this process: steps 3-4 as if unbroken."""
    case = CASES["fsdp2_full"]
    model, loss_fn = build_case(case)
    cfg = case_cfg(case, grad_accum=GLOBAL_ACCUM)
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=str(ckpt)))
    result = train(model, source=case_source(case), loss_fn=loss_fn, cfg=cfg, out_dir=out)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(unbroken[2:]), **TOL)


@pytest.mark.parametrize(
    "name",
    ["fsdp2_full", "fsdp2_full_bf16", "ddp_full", "fsdp2_lora", "ddp_lora", "fsdp2_qlora"]
    + ["fsdp2_nan"],
)
def test_two_processes_equal_one_on_the_same_global_batch(runs, tmp_path, name):
    out = runs[0]
    got = _result(out, name)
    ref, model = _single(name, tmp_path / name)
    tol = BF16_TOL if CASES[name].precision == "bf16" else TOL
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref.losses), **tol)
    norms = [_grad_norms(d / "metrics.jsonl") for d in (out / name, tmp_path / name)]
    torch.testing.assert_close(torch.tensor(norms[0]), torch.tensor(norms[1]), **tol)
    if CASES[name].precision == "bf16":
        return
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(got["weights"]) == sorted(trained)
    for n, w in trained.items():
        torch.testing.assert_close(got["weights"][n], w, **WEIGHT_TOL, msg=n)
    assert [r["steps"] for r in _ranks(out, name)] == [ref.step, ref.step]


def test_validation_loss_is_reduced_over_ranks(runs, tmp_path):
    ref, _ = _single("fsdp2_lora", tmp_path / "ref")
    ranks = _ranks(runs[0], "fsdp2_lora")
    assert ranks[0]["eval"] == ranks[1]["eval"]  # every rank reports the global value
    assert ranks[0]["eval"]["val_loss"] == pytest.approx(ref.last_eval["val_loss"], rel=1e-5)


def test_nonfinite_loss_on_one_rank_skips_the_step_on_all(runs):
    ranks = _ranks(runs[0], "fsdp2_nan")
    assert [(r["steps"], r["skipped"]) for r in ranks] == [(3, 1), (3, 1)]


def test_qlora_base_is_sharded_not_replicated(runs):
    ranks = _ranks(runs[0], "fsdp2_qlora")
    total = ranks[0]["nf4_total"]
    assert total > 0 and all(r["nf4_local"] < total for r in ranks)
    assert sum(r["nf4_local"] for r in ranks) == total  # each code byte on exactly one rank


def test_sharded_checkpoint_at_2_resumes_in_one_process(runs, tmp_path):
    out, unbroken = runs[0], runs[1]
    ckpt = out / "fsdp2_full" / "checkpoints" / "checkpoint-00000002"
    assert is_sharded(ckpt)
    _continues_in_one_process(ckpt, tmp_path, unbroken)


def test_resume_at_the_same_world_size_gives_identical_losses(runs):
    out = runs[0]
    unbroken, resumed = _result(out, "fsdp2_full"), _result(out, "fsdp2_2to2")
    assert resumed["losses"] == unbroken["losses"][2:]


def test_a_signal_on_one_rank_stops_all_at_the_same_step_with_a_checkpoint(runs):
    out = runs[0]
    ranks = _ranks(out, "fsdp2_signal")
    # SIGINT reaches rank 0 during step 2 (its micro-batch call 4 of 3 per step): both
    # ranks finish that step, agree to stop, and save it together.
    assert [(r["steps"], r["stop_reason"]) for r in ranks] == [(2, "signal"), (2, "signal")]
    last = latest_checkpoint(out / "fsdp2_signal" / "checkpoints")
    assert last is not None and last.name == "checkpoint-00000002" and is_sharded(last)


@pytest.mark.parametrize("name", ["fsdp2_from_single", "fsdp2_2to3"])
def test_checkpoint_resumes_at_another_world_size(runs, name):
    """1 -> 2 (a single-process checkpoint, resharded) and 2 -> 3 (a sharded one)."""
    out, unbroken = runs[0], runs[1]
    got = _result(out, name)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(unbroken[2:]), **TOL)


def test_a_failing_rank_ends_the_job_and_the_last_checkpoint_resumes(runs, tmp_path):
    out, unbroken, proc, seconds = runs
    assert proc.returncode != 0
    assert "rank 2 fails on purpose at micro-batch 5" in proc.stdout + proc.stderr
    assert seconds < 120  # torchrun stopped the ranks waiting in a collective: no hang
    last = latest_checkpoint(out / "fsdp2_crash" / "checkpoints")
    assert last is not None and last.name == "checkpoint-00000002" and is_sharded(last)
    _continues_in_one_process(last, tmp_path, unbroken)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_an_epoch_with_no_example_twice_or_skipped(world):
    exs = examples(23)
    shards = [RankShard(BatchSource(exs, 2, pad_id=0, seed=5), r, world) for r in range(world)]
    per_epoch = shards[0].source.batches_per_epoch
    seen: list[tuple[int, ...]] = []
    for _ in range(per_epoch // world):
        for shard in shards:
            seen.append(tuple(next(shard)["input_ids"][:, 0].tolist()))
    order = BatchSource(exs, 2, pad_id=0, seed=5).order(0)
    first = [tuple(exs[i]["input_ids"][0] for i in ids) for ids in order]
    assert seen == first[: len(seen)]  # rank r got global micro-batches r, r + W, ...
    assert len({s.state_dict()["index"] for s in shards}) == 1  # one shared position


@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_shares_pad_with_fillers_only(world):
    held = BatchSource(examples(13), 2, pad_id=0, shuffle=False)  # 7 batches
    shares = [list(RankShard(held, r, world).epoch_batches()) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # the same number of forwards on every rank
    real = [b for s in shares for b in s if FILLER not in b]
    assert len(real) == held.batches_per_epoch


@pytest.mark.parametrize(("method", "strategy", "stage"), CLI_RUNS)
def test_llamaforge_train_under_torchrun_equals_one_process(runs, method, strategy, stage, capsys):
    """`llamaforge train` at 2 processes: same losses, and rank 0 writes the usual outputs."""
    out = runs[0]
    single = _cli_config(out, out / "base", method, strategy, 1, stage)
    assert cli(["train", str(single), "logging.tensorboard=false"]) == 0
    summary = json.loads(capsys.readouterr().out)
    dirs = [out / f"cli-{stage}-{method}-{strategy}-{w}" for w in (2, 1)]
    losses = [[r["loss"] for r in _rows(d / "metrics.jsonl", "train")] for d in dirs]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), **TOL)
    val = [_rows(d / "metrics.jsonl", "eval")[-1]["val_loss"] for d in dirs]
    assert val[0] == pytest.approx(val[1], rel=1e-5)
    name = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    saved = [load_file(d / name) for d in dirs]
    assert sorted(saved[0]) == sorted(saved[1])
    for key, w in saved[1].items():
        torch.testing.assert_close(saved[0][key], w, **WEIGHT_TOL, msg=key)
    assert json.loads((dirs[0] / "eval.json").read_text())["steps"] == summary["steps"] == 3


def test_a_sharded_checkpoint_becomes_the_usual_outputs_in_one_process(runs, tmp_path, capsys):
    """Resuming the last sharded checkpoint in one process, with nothing left to train,
    writes the PEFT adapter (or HF folder) the distributed run wrote."""
    out = runs[0]
    run_dir = out / "cli-sft-lora-auto-2"
    last = latest_checkpoint(run_dir / "checkpoints")
    assert last is not None and is_sharded(last)
    single = _cli_config(out, out / "base", "lora", "auto", 1)
    args = [f"checkpoint.resume={last}", f"output_dir={tmp_path}", "logging.tensorboard=false"]
    assert cli(["train", str(single), *args]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3
    name = "adapter/adapter_model.safetensors"
    got, want = load_file(tmp_path / name), load_file(run_dir / name)
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        assert torch.equal(got[key], w), key


def test_fp16_under_fsdp2_is_refused_with_the_key():
    env = distributed.DistEnv(0, 1, 0, torch.device("cpu"), "fsdp2", None)
    with pytest.raises(ConfigError, match="key 'precision': fp16"):
        distributed.wrap(torch.nn.Linear(2, 2), lambda m, b: (m, b), env, precision="fp16")


def test_strategy_none_under_a_multi_process_launch_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="distributed.strategy"):
        distributed.resolve_strategy(DistributedConfig(strategy="none"))
    assert distributed.resolve_strategy(DistributedConfig()) == "fsdp2"
    with pytest.raises(ConfigError, match="key 'stage': stage ppo runs in one process"):
        distributed.require_one_process("stage ppo")
    monkeypatch.delenv("RANK")
    assert distributed.resolve_strategy(DistributedConfig()) == "none"
    distributed.require_one_process("stage ppo")  # alone: fine
