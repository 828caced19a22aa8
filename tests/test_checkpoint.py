"""Checkpoints: exact resume, atomic saves, stop signals, keep-last-N, safe loading."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from llamaforge.config import CheckpointConfig, LoggingConfig, OptimConfig, TrainConfig
from llamaforge.losses import causal_lm_loss_fn, token_ce_sum
from llamaforge.train import BatchSource, latest_checkpoint, load_checkpoint, save_checkpoint, train
from llamaforge.train import checkpoint as ck
from llamaforge.train.checkpoint import list_checkpoints, trainable_state
from llamaforge.train.optim import build_optimizer, build_scheduler
from tests.helpers import random_model
from tests.test_loop import make_examples

ROOT = Path(__file__).resolve().parents[1]


def dropout_loss_fn(model, batch):
    """Causal-LM loss with dropout on the logits, so the torch RNG shapes every loss."""
    logits = F.dropout(model(batch["input_ids"]), p=0.2, training=model.training)
    return token_ce_sum(logits, batch["labels"])


def run_tiny(out_dir, max_steps, *, every=None, keep=2, resume="auto", seed=0):
    """Train a fresh tiny model (new objects every call); returns (model, result)."""
    model = random_model("tiny-llama3")
    src = BatchSource(make_examples(14, seed=11), 3, pad_id=0, seed=5)  # 5 batches/epoch
    cfg = TrainConfig(
        max_steps=max_steps,
        seed=seed,
        optim=OptimConfig(
            lr=5e-3, grad_accum=2, warmup_steps=2, weight_decay=0.1, max_grad_norm=0.5
        ),
        checkpoint=CheckpointConfig(every=every, keep=keep, resume=resume),
        logging=LoggingConfig(tensorboard=False, plot=False, progress=False),
    )
    return model, train(model, source=src, loss_fn=dropout_loss_fn, cfg=cfg, out_dir=out_dir)


def train_steps(out_dir) -> list[int]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


def start_child(code: str, *args: str) -> subprocess.Popen:
    """A Python child in the repo root running `code` (tests importable, one thread)."""
    prelude = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import torch; torch.set_num_threads(1)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", prelude + code, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(predicate, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


# ---------------------------------------------------------------- exact resume


def test_resume_gives_identical_losses(tmp_path):
    full_model, full = run_tiny(tmp_path / "a", 6, every=3, keep=5)
    assert len(full.losses) == 6
    # A new run that finds step 3's checkpoint (mid-epoch: 6 of 5-per-epoch micro-batches).
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "a/checkpoints/checkpoint-00000003",
        tmp_path / "b/checkpoints/checkpoint-00000003",
    )
    torch.manual_seed(1234), random.seed(1), np.random.seed(2)  # disturb every RNG
    model, resumed = run_tiny(tmp_path / "b", 6)
    assert resumed.losses == full.losses[3:]
    assert train_steps(tmp_path / "b") == [4, 5, 6]
    for (name, p), q in zip(model.named_parameters(), full_model.parameters(), strict=True):
        assert torch.equal(p, q), name
    # The RNG really matters here: another seed changes the very first loss.
    _, other = run_tiny(tmp_path / "c", 1, resume="never", seed=1)
    assert other.losses[0] != full.losses[0]


def test_resume_never_starts_over(tmp_path):
    run_tiny(tmp_path, 2, every=2)
    _, again = run_tiny(tmp_path, 2, resume="never")
    assert len(again.losses) == 2


# ---------------------------------------------------------------- signals and crashes


def test_sigterm_finishes_step_saves_and_resumes(tmp_path):
    child = start_child(
        "from tests.test_checkpoint import run_tiny\n"
        "_, r = run_tiny(sys.argv[1], 100000)\n"
        "print('STOPPED', r.stop_reason, r.step, flush=True)\n",
        str(tmp_path),
    )
    try:
        metrics = tmp_path / "metrics.jsonl"
        wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3)
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=90)
    finally:
        child.kill()
    assert child.returncode == 0, out
    stopped = [line.split() for line in out.splitlines() if line.startswith("STOPPED")]
    assert stopped and stopped[0][1] == "signal", out
    step = int(stopped[0][2])
    assert latest_checkpoint(tmp_path / "checkpoints").name == f"checkpoint-{step:08d}"
    assert train_steps(tmp_path)[-1] == step
    with pytest.warns(UserWarning, match="lr schedule changes shape"):
        _, resumed = run_tiny(tmp_path, step + 2)
    assert resumed.step == step + 2 and len(resumed.losses) == 2
    assert train_steps(tmp_path) == list(range(1, step + 3))


def test_killed_during_save_keeps_previous_checkpoint(tmp_path):
    child = start_child(
        "import time\n"
        "import llamaforge.train.checkpoint as ck\n"
        "from tests.test_checkpoint import run_tiny\n"
        "commit = ck._commit\n"
        "def stall(tmp, final):\n"
        "    if final.name == 'checkpoint-00000004':\n"
        "        print('SAVING', flush=True)\n"
        "        time.sleep(300)\n"
        "    commit(tmp, final)\n"
        "ck._commit = stall\n"
        "run_tiny(sys.argv[1], 100, every=2)\n",
        str(tmp_path),
    )
    try:
        line = child.stdout.readline()
        while line and "SAVING" not in line:
            line = child.stdout.readline()
        assert "SAVING" in line
        child.kill()  # SIGKILL between writing the files and the rename
        child.wait(timeout=30)
    finally:
        child.kill()
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["checkpoint-00000002"]
    (partial,) = ckpts.glob(".tmp-checkpoint-00000004-*")
    assert (partial / "model.safetensors").is_file()
    state = load_checkpoint(latest_checkpoint(ckpts), model=random_model("tiny-llama3"))
    assert state.step == 2 and state.source_state == {"epoch": 0, "index": 4}
    with pytest.warns(UserWarning, match="planned for 100 steps with 4"):
        _, resumed = run_tiny(tmp_path, 4, every=2)
    assert resumed.step == 4 and len(resumed.losses) == 2
    assert not list(ckpts.glob(".tmp-*"))
    assert train_steps(tmp_path) == [1, 2, 3, 4]  # steps 3-4 of the killed run were dropped


# ---------------------------------------------------------------- files


def trained_state(name: str = "tiny-llama2"):
    """A model after one AdamW step, with its optimizer and scheduler."""
    model = random_model(name)
    cfg = OptimConfig(lr=1e-2, warmup_steps=2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10)
    from llamaforge.train import collate

    total, n = causal_lm_loss_fn(model, collate(make_examples(2), 0))
    (total / n).backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_keep_last_n_and_latest(tmp_path):
    model = random_model("tiny-llama2")
    (tmp_path / ".tmp-checkpoint-00000009-1").mkdir(parents=True)  # stale half-save
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, trainable_state(model), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-00000004",
        "checkpoint-00000005",
    ]
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000005"
    assert not list(tmp_path.glob(".tmp-*"))
    assert latest_checkpoint(tmp_path / "missing") is None


def test_round_trip_restores_model_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = trained_state()
    path = save_checkpoint(
        tmp_path, 1, trainable_state(model), optimizer=opt, scheduler=sched,
        source_state={"epoch": 2, "index": 3}, extra={"best": 0.5},
    )  # fmt: skip
    draws = (torch.rand(3), random.random(), np.random.rand())
    fresh = random_model("tiny-llama2", seed=7)
    opt2 = build_optimizer(fresh, OptimConfig(lr=1e-2, warmup_steps=2))
    sched2 = build_scheduler(opt2, OptimConfig(lr=1e-2, warmup_steps=2), 10)
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    state = load_checkpoint(path, model=fresh, optimizer=opt2, scheduler=sched2)
    assert (state.step, state.source_state, state.extra) == (
        1,
        {"epoch": 2, "index": 3},
        {"best": 0.5},
    )
    for (n, p), q in zip(fresh.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q), n
    for p, q in zip(fresh.parameters(), model.parameters(), strict=True):
        assert torch.equal(opt2.state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"])
    assert sched2.last_epoch == sched.last_epoch and sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(torch.rand(3), draws[0])
    assert (random.random(), np.random.rand()) == draws[1:]


def test_pt_files_load_with_weights_only(tmp_path, monkeypatch):
    model, opt, sched = trained_state()
    scaler = torch.amp.GradScaler("cpu")
    path = save_checkpoint(
        tmp_path, 3, trainable_state(model), optimizer=opt, scheduler=sched, scaler=scaler
    )
    for name in ("optimizer.pt", "rng.pt"):
        torch.load(path / name, weights_only=True)  # raises on any non-allowlisted pickle
    calls = []
    real_load = torch.load
    monkeypatch.setattr(ck.torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    load_checkpoint(path, model=random_model("tiny-llama2"), optimizer=opt, scheduler=sched)
    assert calls and all(k.get("weights_only") is True for k in calls)


def test_only_trainable_weights_saved_and_required(tmp_path):
    model = random_model("tiny-llama2")
    model.requires_grad_(False)
    model.layers[1].mlp.requires_grad_(True)  # like a freeze / adapter run
    path = save_checkpoint(tmp_path, 1, trainable_state(model))
    keys = set(load_file(path / "model.safetensors"))
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}
    fresh = random_model("tiny-llama2", seed=3)
    fresh.requires_grad_(False)
    fresh.layers[1].mlp.requires_grad_(True)
    load_checkpoint(path, model=fresh, restore_rng_state=False)
    assert torch.equal(fresh.layers[1].mlp.up_proj.weight, model.layers[1].mlp.up_proj.weight)
    assert not torch.equal(fresh.layers[0].mlp.up_proj.weight, model.layers[0].mlp.up_proj.weight)
    fresh.layers[0].requires_grad_(True)  # now the checkpoint lacks trainable weights
    with pytest.raises(ValueError, match="lacks trainable weights: layers.0"):
        load_checkpoint(path, model=fresh)


def test_resume_refuses_weights_of_another_trained_dtype(tmp_path):
    """A run written with fp32 master weights does not resume silently into bf16 ones."""
    from llamaforge.errors import UserError

    model = random_model("tiny-llama2")
    path = save_checkpoint(tmp_path, 1, trainable_state(model))
    bf16 = random_model("tiny-llama2").to(torch.bfloat16)
    with pytest.raises(UserError, match="in torch.float32 but this run in torch.bfloat16.*master"):
        load_checkpoint(path, model=bf16, restore_rng_state=False)
    load_checkpoint(path, model=random_model("tiny-llama2", seed=2), restore_rng_state=False)


def test_tied_embeddings_saved_once_and_stay_tied(tmp_path):
    model = random_model("tiny-smollm2")
    path = save_checkpoint(tmp_path, 1, trainable_state(model))
    keys = set(load_file(path / "model.safetensors"))
    assert "embed_tokens.weight" in keys and "lm_head.weight" not in keys
    fresh = random_model("tiny-smollm2", seed=5)
    load_checkpoint(path, model=fresh)
    assert fresh.lm_head.weight is fresh.embed_tokens.weight
    assert torch.equal(fresh.lm_head.weight, model.embed_tokens.weight)


def test_extra_state_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path, 1, {}, extra={"bad": object()})
    assert not list(tmp_path.iterdir())


def test_sigterm_handler_restored_after_training(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    run_tiny(tmp_path, 1, resume="never")
    assert signal.getsignal(signal.SIGTERM) is before
