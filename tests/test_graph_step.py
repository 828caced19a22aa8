"""The packed training step built for CUDA-graph capture (train/graph_step.py) against the
training loop's own step: same losses, norms and trained weights (fp32, tiny model).

On the CPU the step runs eagerly on its static buffers (padded rows, per-token loss weights,
empty segments); on a GPU the captured replay is compared with the same eager step."""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from llamaforge.adapters.inject import apply_lora
from llamaforge.cli import main
from llamaforge.config import ConfigError, OptimConfig, config_from_dict
from llamaforge.data.pack import pack_examples
from llamaforge.losses import chunked_causal_lm_loss_fn
from llamaforge.train.batches import collate
from llamaforge.train.graph_step import NonFiniteStep, PackedGraphStep
from llamaforge.train.loop import accumulate_gradients, optimizer_step
from llamaforge.train.optim import build_optimizer, build_scheduler
from tests.helpers import random_model, tiny_hf_folder

ROWS, SEQ = 3, 48


def packed_batches(n: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n collated packed batches of <= ROWS rows, prompts masked out of the labels."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        examples = []
        for _ in range(rng.randint(3, 8)):
            length = rng.randint(4, 30)
            ids = [rng.randrange(1, vocab) for _ in range(length)]
            cut = rng.randint(1, length - 1)
            examples.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
        rows = pack_examples(examples, SEQ)[:ROWS]
        out.append(collate(rows, pad_id=0))
    return out


def trainee(device: str = "cpu"):
    model = random_model("tiny-llama3").to(device)
    apply_lora(model, r=4, alpha=8)
    return model.train()


def loop_run(model, batches, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10)
    losses, norms = [], []
    for b in batches:
        stats = accumulate_gradients(model, [b], chunked_causal_lm_loss_fn)
        norm, applied = optimizer_step(opt, sched, params, max_grad_norm=1.0)
        assert applied
        losses.append(stats.loss)
        norms.append(norm)
    return losses, norms


def graph_run(model, batches, cfg, *, warm: bool, segments: int | None = None, **kw):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10)
    step = PackedGraphStep(
        model, opt, params, rows=ROWS, seq_len=SEQ, max_grad_norm=1.0, segments=segments, **kw
    )
    if warm:  # warm-up trains nothing: its weights and optimizer state are put back
        step._load(batches[0])
        step.warm_up()
    losses, norms = [], []
    for b in batches:
        loss, norm = step(b)
        sched.step()
        losses.append(float(loss))
        norms.append(float(norm))
    return losses, norms


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("warm", [False, True])
def test_static_step_equals_the_loop(warm):
    base = trainee()
    batches = packed_batches(4, base.cfg.vocab_size)
    # padding to the static shape is exercised: fewer rows or narrower rows than it
    assert any(b["input_ids"].shape[0] < ROWS or b["input_ids"].shape[1] < SEQ for b in batches)
    cfg = OptimConfig(lr=5e-3, schedule="cosine", warmup_steps=1)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    want = loop_run(a, batches, cfg)
    got = graph_run(b, batches, cfg, warm=warm, capture=False, segments=2)  # grows its room
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    wa, wb = trainable(a), trainable(b)
    assert any(not torch.equal(wa[n], trainable(base)[n]) for n in wa)  # it trained
    for n in wa:
        torch.testing.assert_close(wb[n], wa[n], rtol=1e-4, atol=1e-5)  # Adam: ~1/sqrt(v)


def test_label_room_grows_for_a_batch_with_more_labels_and_trains_the_same():
    """The head runs on the labelled positions gathered into a buffer sized by the first
    batch; a later batch with more labels grows it (a new capture on a GPU)."""
    base = trainee()
    few, *rest = packed_batches(3, base.cfg.vocab_size, seed=4)
    few = {k: v.clone() for k, v in few.items()}
    few["labels"][:, 8:] = -100  # fewer labels than the rest
    for b in rest:  # every token of these a label
        b["labels"] = torch.where(b["doc_ids"] >= 0, b["input_ids"], -100)
    n_few = int((few["labels"][:, 1:] != -100).sum())
    n_most = max(int((b["labels"][:, 1:] != -100).sum()) for b in rest)
    assert n_few <= 24 and n_most > 64
    batches = [few, *rest]
    cfg = OptimConfig(lr=5e-3)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    want = loop_run(a, batches, cfg)
    params = [p for p in b.parameters() if p.requires_grad]
    opt = build_optimizer(b, cfg)
    sched = build_scheduler(opt, cfg, 10)
    step = PackedGraphStep(b, opt, params, rows=ROWS, seq_len=SEQ, max_grad_norm=1.0)
    got, room = [], []
    for batch in batches:
        loss, _ = step(batch)
        sched.step()
        got.append(float(loss))
        room.append(step.labels_capacity)
    assert room[0] < room[-1] <= ROWS * SEQ and room[-1] >= n_most
    torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-6)


def test_batches_that_do_not_fit_and_a_trained_head_are_refused():
    model = trainee()
    opt = build_optimizer(model, OptimConfig())
    params = [p for p in model.parameters() if p.requires_grad]
    step = PackedGraphStep(model, opt, params, rows=1, seq_len=8, max_grad_norm=1.0)
    (big,) = packed_batches(1, model.cfg.vocab_size)
    assert not step.fits(big)
    with pytest.raises(ValueError, match="does not fit 1 x 8"):
        step(big)
    with pytest.raises(NonFiniteStep, match="step 7"):
        step.check(float("nan"), 7)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen lm_head"):
        PackedGraphStep(model, opt, params, rows=1, seq_len=8, max_grad_norm=1.0)


def test_checkpointed_blocks_train_the_same_in_the_static_step():
    """Blocks recomputed in the backward (what a captured step on a large model does to fit
    its memory) change nothing; with dropout or CPU offload such a step is refused."""
    base = trainee()
    batches = packed_batches(3, base.cfg.vocab_size, seed=2)
    cfg = OptimConfig(lr=5e-3)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    want = loop_run(a, batches, cfg)
    b.gradient_checkpointing = True
    got = graph_run(b, batches, cfg, warm=True, capture=False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    params = [p for p in b.parameters() if p.requires_grad]
    opt = build_optimizer(b, cfg)
    b.offload_activations = True
    with pytest.raises(ValueError, match="offload"):
        PackedGraphStep(b, opt, params, rows=1, seq_len=8, max_grad_norm=1.0)
    drop = random_model("tiny-llama3")
    apply_lora(drop, r=4, alpha=8, dropout=0.1)
    drop.gradient_checkpointing = True
    params = [p for p in drop.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="dropout"):
        PackedGraphStep(drop, build_optimizer(drop, cfg), params, rows=1, seq_len=8,
                        max_grad_norm=1.0)  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("variant", ["plain", "checkpointing", "host_embeddings"])
def test_captured_replay_equals_the_eager_step(variant):
    """Captured against eager; blocks recomputed inside the graph, or the input embedding
    table in host memory (rows gathered by the host into the graph's static buffer)."""
    base = trainee("cuda")
    base.gradient_checkpointing = variant == "checkpointing"
    batches = packed_batches(5, base.cfg.vocab_size)
    cfg = OptimConfig(lr=5e-3, schedule="cosine", warmup_steps=1)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    kw = {"autocast_dtype": torch.bfloat16}
    if variant == "host_embeddings":
        b.keep_embeddings_on_host()
        assert b.embeddings_on_host
    want = graph_run(a, batches, cfg, warm=False, capture=False, **kw)
    got = graph_run(b, batches, cfg, warm=False, capture=True, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=2e-3, atol=2e-3)
    wa, wb = trainable(a), trainable(b)
    for n in wa:
        torch.testing.assert_close(wb[n], wa[n], rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------- in the training loop

FIX = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return tiny_hf_folder(tmp_path_factory.mktemp("base"))


def _raw(tmp_path: Path, base: Path, name: str, **extra) -> dict:
    return {
        "model": str(base),
        "method": "lora",
        "data": {"path": str(FIX / "alpaca.json"), "format": "alpaca", "cache_dir": str(tmp_path),
                 "max_seq_len": 256, "packing": True},
        "output_dir": str(tmp_path / name),
        "max_steps": 3,
        "precision": "fp32",
        "lora": {"dropout": 0.0},  # dropout masks follow the (padded) shape: off to compare
        "optim": {"lr": 0.01, "batch_size": 2},
        "logging": {"tensorboard": False, "plot": False},
        **extra,
    }  # fmt: skip


def _losses(d: Path) -> list[float]:
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("kind") == "train"]


def test_a_run_with_cuda_graph_learns_what_the_eager_loop_learns(
    tmp_path, base_dir, capsys, monkeypatch
):
    """`cuda_graph: true` (eager on the CPU, the same static step a GPU captures): the
    same per-step losses and checkpoints as the default loop. The learning rate is a
    tensor, as a capture makes it (its log line once failed on the GPU only)."""
    made = PackedGraphStep.__init__

    def lr_as_on_a_gpu(self, model, optimizer, *a, **k):
        made(self, model, optimizer, *a, **k)
        for g in optimizer.param_groups:  # (foreach refuses a tensor lr uncaptured)
            g["lr"], g["foreach"] = torch.tensor(float(g["lr"])), False

    monkeypatch.setattr(PackedGraphStep, "__init__", lr_as_on_a_gpu)
    for name, extra in (("plain", {}), ("graph", {"cuda_graph": True})):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_raw(tmp_path, base_dir, name, **extra)))
        assert main(["train", str(path)]) == 0
        capsys.readouterr()
    plain, graph = _losses(tmp_path / "plain"), _losses(tmp_path / "graph")
    assert len(graph) == 3 and graph == pytest.approx(plain, rel=1e-5)
    assert (tmp_path / "graph" / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(x) for x in (tmp_path / "graph" / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["lr"], float) for r in rows if r.get("kind") == "train")


def test_a_cuda_graph_run_evaluates_checkpoints_and_resumes_exactly(tmp_path, base_dir, capsys):
    """`cuda_graph: true` with evaluation and checkpoints between steps: the same losses as
    the eager loop, and a rerun without its last checkpoint resumes and logs them again
    (the static step is built anew over the loaded optimizer state)."""
    every = {"max_steps": 4, "eval": {"every": 2, "max_batches": 1},
             "checkpoint": {"every": 2}}  # fmt: skip
    for name, extra in (("plain", {}), ("graph", {"cuda_graph": True})):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_raw(tmp_path, base_dir, name, **every, **extra)))
        assert main(["train", str(path)]) == 0
        capsys.readouterr()
    plain, graph = _losses(tmp_path / "plain"), _losses(tmp_path / "graph")
    assert len(graph) == 4 and graph == pytest.approx(plain, rel=1e-5)
    ckpts = sorted((tmp_path / "graph" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["checkpoint-00000002", "checkpoint-00000004"]
    shutil.rmtree(ckpts[-1])
    assert main(["train", str(tmp_path / "graph.yaml")]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert _losses(tmp_path / "graph")[-2:] == pytest.approx(graph[-2:], rel=1e-6)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"method": "full"}, "method"),
        ({"stage": "pt", "data": {"path": "x.txt", "format": "text"}}, "data.packing"),
        ({"optim": {"grad_accum": 2}}, "optim.grad_accum"),
        ({"precision": "fp16"}, "precision"),
    ],
)
def test_what_a_captured_step_cannot_do_is_a_config_error(tmp_path, extra, key):
    raw = _raw(tmp_path, Path("base"), "x", cuda_graph=True)
    raw.update(extra)
    with pytest.raises(ConfigError, match=f"cuda_graph.*{key}"):
        config_from_dict(raw)


def test_auto_captures_on_a_gpu_only_what_has_been_measured(tmp_path):
    """`cuda_graph: auto`: never on the CPU; on a GPU for a LoRA run without
    dropout or checkpointing; off for LoRA dropout, checkpointing, accumulation or another
    loss (device faked: only the decision is under test)."""
    from llamaforge.config import TrainConfig
    from llamaforge.train.loop import _Loop

    def decide(model, loss_fn=chunked_causal_lm_loss_fn, gpu=True, **cfg):
        loop = _Loop(model, iter([]), loss_fn, TrainConfig(max_steps=1, **cfg), tmp_path,
                     eval_fn=None, objects=None, count_fn=len, main=True)  # fmt: skip
        if gpu:
            loop.device = torch.device("cuda")
        return loop._graph_auto

    model = trainee()
    assert TrainConfig().cuda_graph == "auto"  # the default: measured in a whole GPU run
    raw = _raw(tmp_path, Path("base"), "x")  # full and freeze runs keep eager steps
    assert config_from_dict(raw).train_config().cuda_graph == "auto"
    for method in ("full", "freeze"):
        assert config_from_dict({**raw, "method": method}).train_config().cuda_graph is False
    assert not decide(model, gpu=False)
    assert decide(model)
    assert not decide(model, optim=OptimConfig(grad_accum=2))
    assert not decide(model, loss_fn=lambda m, b: chunked_causal_lm_loss_fn(m, b))
    model.gradient_checkpointing = True
    assert not decide(model)
    model.gradient_checkpointing = False
    dropped = random_model("tiny-llama3")
    apply_lora(dropped, r=4, alpha=8, dropout=0.1)
    assert not decide(dropped.train())


def test_auto_falls_back_to_eager_steps_when_a_capture_fails(
    tmp_path, base_dir, capsys, monkeypatch
):
    """`cuda_graph: auto` whose capture fails (forced here) logs it and trains eagerly,
    with the losses of a run that never tried; `true` raises instead."""
    from llamaforge.train import loop as loop_mod

    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(_raw(tmp_path, base_dir, "plain", cuda_graph=False)))
    assert main(["train", str(plain)]) == 0

    def fail(self, batch):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(loop_mod._Loop, "_graph_auto", True)
    monkeypatch.setattr(PackedGraphStep, "__call__", fail)
    auto = tmp_path / "auto.yaml"
    auto.write_text(yaml.safe_dump(_raw(tmp_path, base_dir, "auto", cuda_graph="auto")))
    with pytest.warns(UserWarning, match="could not capture"):
        assert main(["train", str(auto)]) == 0
    capsys.readouterr()
    assert _losses(tmp_path / "auto") == pytest.approx(_losses(tmp_path / "plain"), rel=1e-6)
    events = (tmp_path / "auto" / "metrics.jsonl").read_text()
    assert '"cuda_graph_off"' in events
    forced = tmp_path / "forced.yaml"
    forced.write_text(yaml.safe_dump(_raw(tmp_path, base_dir, "forced", cuda_graph=True)))
    with pytest.raises(RuntimeError, match="capturing"):
        main(["train", str(forced)])
