"""memory_budget_gb: measured per-block costs, the plan chosen, and a run that follows it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from llamaforge.adapters import add_adapter
from llamaforge.cli import main
from llamaforge.config import ConfigError, config_from_dict
from llamaforge.errors import UserError
from llamaforge.train.memory_plan import (
    GB,
    HEADROOM,
    block_costs,
    choose,
    fixed_bytes,
    movable_embedding_bytes,
)
from tests.helpers import random_model, tiny_hf_folder

FIX = Path(__file__).parent / "fixtures" / "data"
MB = 2**20


def test_choose_keeps_as_many_blocks_as_fit():
    fixed, keep, ckpt, n = 1000 * MB, 100 * MB, 10 * MB, 8
    back = keep * 3 // 2  # the backward's temporaries and a recomputed block's remains
    usable = lambda budget: budget * (1 - HEADROOM)  # noqa: E731
    big = choose(10 * GB, fixed, keep, ckpt, n)
    assert big.checkpointed == 0 and not big.offload
    assert big.estimate == fixed + n * keep + back
    # room for fixed + 5 kept + 3 checkpointed + the backward
    need = fixed + 5 * keep + 3 * ckpt + back
    plan = choose(int(need / (1 - HEADROOM)) + 1, fixed, keep, ckpt, n)
    assert plan.checkpointed == 3 and plan.estimate == need <= usable(plan.budget)
    # every block checkpointed does not fit: the inputs of as few blocks as needed go to the
    # CPU, the earliest first (one block's input short: one block offloaded)
    every = fixed + n * ckpt + back
    some = choose(int((every - 1) / (1 - HEADROOM)), fixed, keep, ckpt, n)
    assert some.checkpointed == n and some.offload and some.offloaded == 1
    assert some.estimate == every - ckpt and "inputs of the first 1 offloaded" in some.describe()
    three = choose(int((every - 3 * ckpt) / (1 - HEADROOM)) + 1, fixed, keep, ckpt, n)
    assert three.offloaded == 3 and three.estimate == every - 3 * ckpt
    off = choose(int((fixed + back) / (1 - HEADROOM)) + 1, fixed, keep, ckpt, n)
    assert off.checkpointed == n and off.offloaded == n and off.estimate == fixed + back
    assert "inputs offloaded to CPU" in off.describe()
    with pytest.raises(UserError, match="memory_budget_gb.*lower optim.batch_size"):
        choose(int(fixed / (1 - HEADROOM)), fixed, keep, ckpt, n)
    # under the auto default the most frugal plan is tried instead of refused
    tried = choose(int(fixed / (1 - HEADROOM)), fixed, keep, ckpt, n, strict=False)
    assert tried.offload and tried.checkpointed == n and not tried.fits
    assert "over the budget even so" in tried.describe()


def test_the_embeddings_move_to_the_host_before_any_input_is_offloaded():
    fixed, keep, ckpt, n, embed = 1000 * MB, 100 * MB, 10 * MB, 8, 200 * MB
    back = keep * 3 // 2
    every = fixed + n * ckpt + back  # every block checkpointed, embeddings on the device
    fits = choose(int(every / (1 - HEADROOM)) + 1, fixed, keep, ckpt, n, embed=embed)
    assert fits.checkpointed == n and not fits.host_embeddings and not fits.offload
    # short of that: the table (200 MB) moves, no input is offloaded, and the room it leaves
    # keeps two blocks' activations (90 MB more each than a checkpointed input)
    moved = choose(int((every - 1) / (1 - HEADROOM)), fixed, keep, ckpt, n, embed=embed)
    assert moved.host_embeddings and not moved.offload and moved.checkpointed == n - 2
    assert moved.estimate == every - embed + 2 * (keep - ckpt)
    assert "input embeddings in host memory" in moved.describe()
    # short even with it moved: inputs offloaded too, as few as fit
    both = choose(int((every - embed - 1) / (1 - HEADROOM)), fixed, keep, ckpt, n, embed=embed)
    assert both.host_embeddings and both.offload and both.offloaded == 1
    # nothing movable (embed=0): straight to offloading, as before
    assert not choose(int((every - 1) / (1 - HEADROOM)), fixed, keep, ckpt, n).host_embeddings


def test_only_a_frozen_untied_table_off_the_host_is_movable():
    with torch.device("meta"):  # a device other than the CPU, without one
        model = random_model("tiny-llama3")
        tied = random_model("tiny-smollm2")
    table = model.embed_tokens.weight
    model.embed_tokens.weight.requires_grad_(False)
    assert movable_embedding_bytes(model) == table.numel() * table.element_size()
    model.embed_tokens.weight.requires_grad_(True)  # trained (full fine-tuning)
    assert movable_embedding_bytes(model) == 0
    tied.embed_tokens.weight.requires_grad_(False)
    assert movable_embedding_bytes(tied) == 0  # the output head reads it
    on_cpu = random_model("tiny-llama3")
    on_cpu.embed_tokens.weight.requires_grad_(False)
    assert movable_embedding_bytes(on_cpu) == 0  # already there


def test_fixed_bytes_counts_weights_grads_and_adam_states():
    model = random_model("tiny-llama3")
    n = sum(p.numel() for p in model.parameters())  # all trainable, fp32
    buffers = sum(b.untyped_storage().nbytes() for b in model.buffers())
    assert fixed_bytes(model) == 4 * n * 4 + buffers
    largest = max(p.numel() for p in model.parameters())  # step_in_backward: one grad alive
    assert fixed_bytes(model, grads=False) == 3 * n * 4 + largest * 4 + buffers
    for p in model.parameters():
        p.requires_grad_(False)
    add_adapter(model, "a", r=4, alpha=8)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert fixed_bytes(model) == (n + lora) * 4 + 3 * lora * 4 + buffers


def test_block_costs_are_measured_at_the_planned_shape():
    model = random_model("tiny-llama3")
    keep, ckpt = block_costs(model, rows=2, tokens=32)
    assert ckpt == 2 * 32 * model.cfg.dim * 4
    assert keep > 4 * ckpt  # a block saves many of its (rows, tokens, .) intermediates
    keep2, ckpt2 = block_costs(model, rows=2, tokens=64)
    assert ckpt2 == 2 * ckpt and 1.8 * keep < keep2 < 2.5 * keep  # linear in tokens (+ attn)
    assert not any(p.grad is not None for p in model.parameters())  # the probe trains nothing


def test_the_probe_leaves_the_global_rng_alone():
    from llamaforge.adapters.inject import apply_lora

    model = random_model("tiny-llama3")
    apply_lora(model, r=4, alpha=8, dropout=0.1)  # the probe's forward draws dropout masks
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    block_costs(model, rows=2, tokens=64)
    assert torch.equal(torch.rand(3), want)


def test_the_probe_leaves_no_autograd_graph_alive(monkeypatch):
    """What the probe's graph saved dies with it: a graph kept alive keeps its AccumulateGrad
    nodes, and a captured step (train/graph_step.py) would then wait on the stream they were
    made on."""
    import gc
    import weakref

    import llamaforge.train.memory_plan as mp
    from llamaforge.adapters.inject import apply_lora

    model = random_model("tiny-llama3")
    apply_lora(model, r=4, alpha=8)
    weights = {t.untyped_storage().data_ptr() for t in model.parameters()}
    packed: list[weakref.ref] = []
    hooks = torch.autograd.graph.saved_tensors_hooks

    def watched(pack, unpack):  # noqa: ANN001, ANN202
        def spy(t: torch.Tensor):  # noqa: ANN202
            if t.untyped_storage().data_ptr() not in weights:
                packed.append(weakref.ref(t))
            return pack(t)

        return hooks(spy, unpack)

    monkeypatch.setattr(mp.torch.autograd.graph, "saved_tensors_hooks", watched)
    block_costs(model, rows=2, tokens=32)
    gc.collect()
    assert packed and not [r for r in packed if r() is not None]


def test_long_runs_are_probed_short_and_scaled(monkeypatch):
    import llamaforge.train.memory_plan as mp

    model = random_model("tiny-llama3")
    monkeypatch.setattr(mp, "PROBE_TOKENS", 16)
    one = mp._saved_bytes(model, 16, mp.contextlib.nullcontext)
    keep, ckpt = mp.block_costs(model, rows=3, tokens=200)
    assert keep == -(-one * 3 * 200 // 16)
    assert ckpt == 3 * 200 * model.cfg.dim * 4


def test_a_sliced_feed_forward_is_probed_sliced(monkeypatch):
    """Past the MLP's slice length a block saves the slices' inputs, not the (tokens x
    ffn_dim) intermediates: the probe counts what the run saves, and the backward's moment
    gets one slice's intermediates (and their gradients) on top."""
    import llamaforge.train.memory_plan as mp

    model = random_model("tiny-llama3")
    monkeypatch.setattr(mp, "PROBE_TOKENS", 32)
    whole, _ = mp.block_costs(model, rows=1, tokens=256)
    assert mp.slice_bytes(model, rows=1, tokens=256) == 0  # no slicing set: nothing extra
    model.set_mlp_chunk(64)
    sliced, ckpt = mp.block_costs(model, rows=1, tokens=256)
    extra = mp.slice_bytes(model, rows=1, tokens=256)
    assert all(m.chunk_tokens == 64 for m in model.modules() if isinstance(m, mp.MLP))
    ffn, dim = model.cfg.ffn_dim, model.cfg.dim
    # gate, up, silu(gate) and their product (the plain SwiGLU, fp32): 4 x ffn floats a token
    assert whole - sliced == 256 * 4 * ffn * 4
    assert sliced > ckpt  # attention's saved tensors stay
    assert extra == pytest.approx(2 * (whole - sliced) / 256 * 64, rel=0.02)
    assert mp.slice_bytes(model, rows=1, tokens=64) == 0  # short batches run unsliced
    plan = choose(100 * GB, 10 * MB, sliced, ckpt, 2, transient=extra)
    assert plan.estimate == 10 * MB + 2 * sliced + sliced * 3 // 2 + extra
    assert dim * 256 * 4 == ckpt


def test_offloaded_inputs_the_host_cannot_hold_stop_the_run(monkeypatch):
    import llamaforge.train.memory_plan as mp

    fixed, keep, ckpt, n = 1000 * MB, 100 * MB, 10 * MB, 8
    every = fixed + n * ckpt + keep * 3 // 2
    plan = choose(int((every - 3 * ckpt) / (1 - HEADROOM)) + 1, fixed, keep, ckpt, n)
    assert plan.offloaded == 3 and plan.host_bytes == 3 * ckpt
    assert "(0.0 GB)" in plan.describe()
    monkeypatch.setattr(mp, "available_host_bytes", lambda: 30 * MB)  # 85% of it: 25.5 MB
    with pytest.raises(UserError, match="offloads 3 blocks' inputs.*CPU memory"):
        mp.check_host_memory(plan, strict=True)
    with pytest.warns(UserWarning, match="host has available"):
        mp.check_host_memory(plan, strict=False)
    monkeypatch.setattr(mp, "available_host_bytes", lambda: 40 * MB)
    mp.check_host_memory(plan, strict=True)  # fits: nothing said
    assert mp.available_host_bytes() == 40 * MB


def test_an_offloading_plan_suggests_expandable_segments():
    from llamaforge.train.memory_plan import allocator_hint

    fixed, keep, ckpt, n = 1000 * MB, 100 * MB, 10 * MB, 8
    every = fixed + n * ckpt + keep * 3 // 2
    off = choose(int((every - 1) / (1 - HEADROOM)), fixed, keep, ckpt, n)
    kept = choose(10 * GB, fixed, keep, ckpt, n)
    assert off.offload and not kept.offload
    assert "expandable_segments:True" in allocator_hint(off, {})
    assert allocator_hint(off, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}) is None
    assert allocator_hint(kept, {}) is None


def test_config_key():
    base = {"model": "m", "data": {"path": "d"}}
    assert config_from_dict(base).memory_budget_gb == "auto"  # the default plans on a GPU
    assert config_from_dict({**base, "memory_budget_gb": None}).memory_budget_gb is None
    # under auto, checkpointing set by hand wins (no error); with a given budget it conflicts
    hand = config_from_dict({**base, "activation_checkpointing": True})
    assert hand.memory_budget_gb == "auto" and hand.activation_checkpointing
    assert config_from_dict({**base, "memory_budget_gb": 16.7}).memory_budget_gb == 16.7
    assert config_from_dict({**base, "memory_budget_gb": "auto"}).memory_budget_gb == "auto"
    for bad in (-1, 0, "lots"):
        with pytest.raises(ConfigError, match="memory_budget_gb"):
            config_from_dict({**base, "memory_budget_gb": bad})
    with pytest.raises(ConfigError, match="activation_checkpointing.*memory_budget_gb"):
        config_from_dict({**base, "memory_budget_gb": 8, "activation_checkpointing": True})
    with pytest.raises(ConfigError, match="not ppo"):
        config_from_dict({**base, "memory_budget_gb": 8, "stage": "ppo"})
    with pytest.raises(ConfigError, match="embeddings_on_host.*memory_budget_gb"):
        config_from_dict({**base, "memory_budget_gb": 8, "embeddings_on_host": True})
    assert config_from_dict({**base, "embeddings_on_host": True}).embeddings_on_host
    with pytest.raises(ConfigError, match="embeddings_on_host.*full fine-tuning trains them"):
        config_from_dict({**base, "embeddings_on_host": True, "method": "full"})
    with pytest.raises(ConfigError, match="embeddings_on_host.*one process"):
        config_from_dict({**base, "embeddings_on_host": True, "distributed": {"strategy": "ddp"}})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return tiny_hf_folder(tmp_path_factory.mktemp("base"))


def _train(tmp_path: Path, base: Path, name: str, capsys, **extra) -> tuple[dict, Path, str]:
    out = tmp_path / name
    raw = {
        "model": str(base),
        "method": "full",
        "data": {"path": str(FIX / "alpaca.json"), "format": "alpaca", "cache_dir": str(tmp_path),
                 "max_seq_len": 256, "packing": True},
        "output_dir": str(out),
        "device": "cpu",  # the block costs above are the CPU's (fp32): the plan's too
        "max_steps": 2,
        "optim": {"lr": 0.01, "batch_size": 2},
        "logging": {"tensorboard": False, "plot": False},
        **extra,
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 0
    got = capsys.readouterr()
    return json.loads(got.out), out, got.err


def test_a_run_follows_the_plan_and_learns_the_same(tmp_path, base_dir, capsys):
    """A budget that fits 2 kept blocks of tiny-llama3: the other blocks are checkpointed,
    memory_plan.json says so, and the losses equal an unplanned run's (same math)."""
    model = random_model("tiny-llama3", seed=3)
    keep, ckpt = block_costs(model, rows=2, tokens=256)
    n = len(model.layers)
    need = fixed_bytes(model) + 2 * keep + (n - 2) * ckpt + keep * 3 // 2
    budget_gb = (need / (1 - HEADROOM) + 1) / GB
    plain, plain_out, _ = _train(tmp_path, base_dir, "plain", capsys)
    planned, out, log = _train(tmp_path, base_dir, "planned", capsys, memory_budget_gb=budget_gb)
    assert f"checkpoint {n - 2} of {n} blocks" in log
    plan = json.loads((out / "memory_plan.json").read_text())
    assert plan["checkpointed"] == n - 2 and not plan["offload"]
    assert plan["block_keep"] == keep and plan["block_checkpointed"] == ckpt

    def losses(d: Path) -> list[float]:
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r.get("kind") == "train"]

    assert losses(out) == pytest.approx(losses(plain_out), rel=1e-5)
    assert planned["steps"] == plain["steps"] == 2


def test_a_budget_under_every_block_checkpointed_offloads_the_first_inputs(
    tmp_path, base_dir, capsys
):
    """One checkpointed input more than the budget holds: the plan offloads the first
    block's, not every block's (on the CPU the offload itself is a no-op; the run trains)."""
    model = random_model("tiny-llama3", seed=3)
    keep, ckpt = block_costs(model, rows=2, tokens=256)
    n = len(model.layers)
    need = fixed_bytes(model) + (n - 1) * ckpt + keep * 3 // 2
    budget_gb = (need / (1 - HEADROOM) + 1) / GB
    done, out, log = _train(tmp_path, base_dir, "some", capsys, memory_budget_gb=budget_gb)
    assert f"checkpoint {n} of {n} blocks, inputs of the first 1 offloaded to CPU" in log
    plan = json.loads((out / "memory_plan.json").read_text())
    assert plan["checkpointed"] == n and plan["offload"] and plan["offloaded"] == 1
    assert done["steps"] == 2


def _refused(tmp_path: Path, model: Path, name: str, capsys, **extra) -> str:
    """A one-step run that must stop with exit code 2 before any checkpoint: its stderr."""
    raw = {
        "model": str(model),
        "method": "full",
        "data": {"path": str(FIX / "alpaca.json"), "format": "alpaca", "cache_dir": str(tmp_path)},
        "output_dir": str(tmp_path / name),
        "max_steps": 1,
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not (tmp_path / name / "checkpoints").exists()
    return err


def test_a_budget_too_small_stops_before_training(tmp_path, base_dir, capsys):
    err = _refused(tmp_path, base_dir, "small", capsys, memory_budget_gb=1e-6)
    assert "memory_budget_gb" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory needs CUDA")
def test_estimate_is_near_the_measured_peak_on_cuda():
    """One LoRA step of SmolLM2-135M's shape (activations ~1 GB, well above allocator and
    workspace noise): the plan's estimate within half to 1.5x of the measured peak."""
    from llamaforge.config import OptimConfig
    from llamaforge.losses import chunked_causal_lm_loss_fn
    from llamaforge.train.loop import autocast_context
    from llamaforge.train.memory_plan import plan_memory
    from llamaforge.train.optim import build_optimizer

    model = random_model("smollm2-135m").cuda().bfloat16().train()
    for p in model.parameters():
        p.requires_grad_(False)
    add_adapter(model, "a", r=8, alpha=16)
    autocast = lambda: autocast_context("bf16", model.device)  # noqa: E731
    plan = plan_memory(model, 80, rows=2, tokens=1024, autocast=autocast)
    assert plan is not None and plan.checkpointed == 0
    torch.cuda.reset_peak_memory_stats()
    opt = build_optimizer(model, OptimConfig())
    ids = torch.randint(0, model.cfg.vocab_size, (2, 1024), device="cuda")
    with autocast():
        loss, count = chunked_causal_lm_loss_fn(model, {"input_ids": ids, "labels": ids})
    (loss / count).backward()
    opt.step()
    peak = torch.cuda.max_memory_allocated()
    assert 0.5 * peak < plan.estimate < 1.5 * peak


def test_the_loss_head_counts_where_it_is_larger_than_the_backward():
    """A trained head under the fused linear + CE holds a float32 (vocab x dim) gradient at
    the forward's end: when that moment outweighs the backward's temporaries it sets the
    estimate (and so the plan)."""
    fixed, keep, ckpt, n = 1000 * MB, 100 * MB, 10 * MB, 8
    small = choose(10 * GB, fixed, keep, ckpt, n, head=50 * MB)
    assert small.estimate == fixed + n * keep + keep * 3 // 2  # the backward is larger
    big = choose(10 * GB, fixed, keep, ckpt, n, head=700 * MB)
    assert big.estimate == fixed + n * keep + 700 * MB and "loss head 700 MB" in big.describe()
    need = fixed + 5 * keep + 3 * ckpt + 700 * MB
    assert (
        choose(int(need / (1 - HEADROOM)) + 1, fixed, keep, ckpt, n, head=700 * MB).checkpointed
        == 3
    )


def test_head_bytes_follow_the_loss_path():
    from llamaforge.kernels import Kernels
    from llamaforge.kernels.fused_ce import TRAINED_HEAD_BUDGET_BYTES, auto_chunk_size
    from llamaforge.train.memory_plan import head_bytes

    model = random_model("tiny-llama3")
    vocab, dim = model.lm_head.weight.shape
    rows, tokens = 2, 64
    n, size = rows * (tokens - 1), model.lm_head.weight.element_size()
    chunk = min(n, auto_chunk_size(vocab, TRAINED_HEAD_BUDGET_BYTES))
    trained = head_bytes(model, rows, tokens)  # full fine-tuning: fused CE, trained head
    assert trained == chunk * vocab * (4 + size) + n * dim * size + vocab * dim * 4
    model.lm_head.weight.requires_grad_(False)  # LoRA / frozen head: no weight gradient
    assert head_bytes(model, rows, tokens) < trained - vocab * dim * 4 + 1
    model.set_kernels(Kernels(fused_ce=False))  # checkpointed chunks instead
    assert head_bytes(model, rows, tokens) == min(n, 1024) * vocab * (4 + size)


def test_embeddings_on_host_by_hand_and_where_it_cannot_be(tmp_path, base_dir, capsys):
    """`embeddings_on_host: true` trains (on the CPU the table is already there); a model
    whose head reads the table is a one-line error naming the key, before any step."""
    done, _, _ = _train(tmp_path, base_dir, "host", capsys, method="lora", embeddings_on_host=True)
    assert done["steps"] == 2
    tied = tmp_path / "tied"
    from llamaforge.io.hf import save_hf

    save_hf(random_model("tiny-llama3", tie_embeddings=True), tied)
    shutil.copy(base_dir / "tokenizer.json", tied / "tokenizer.json")
    err = _refused(tmp_path, tied, "tied_out", capsys, method="lora", embeddings_on_host=True)
    assert "embeddings_on_host" in err and "tied" in err


def test_a_table_on_the_host_gives_the_same_logits_and_gradients_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("the host/device split needs a GPU")
    base = random_model("tiny-llama3", seed=5).cuda()
    base.embed_tokens.weight.requires_grad_(False)
    moved = random_model("tiny-llama3", seed=5).cuda()
    moved.embed_tokens.weight.requires_grad_(False)
    before = torch.cuda.memory_allocated()
    moved.keep_embeddings_on_host()
    table = moved.embed_tokens.weight
    assert moved.embeddings_on_host and table.is_pinned() and moved.device.type == "cuda"
    assert torch.cuda.memory_allocated() == before - table.numel() * table.element_size()
    ids = torch.randint(0, 256, (2, 24), device="cuda")
    a, b = base(ids), moved(ids)
    torch.testing.assert_close(b, a)
    a.float().square().mean().backward()
    b.float().square().mean().backward()
    for (n, p), q in zip(base.named_parameters(), moved.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the table moves off a GPU only")
def test_a_gpu_run_with_the_table_on_the_host_trains_and_saves_the_same(tmp_path, base_dir, capsys):
    """`llamaforge train` on CUDA with `embeddings_on_host: true`: the same per-step losses as
    the table on the device (the same rows reach the model), evaluation and the merged
    output still work, and the saved model equals the other run's."""
    from safetensors.torch import load_file

    runs, saved = {}, {}
    for name, extra in (("device", {}), ("host", {"embeddings_on_host": True})):
        done, out, _ = _train(
            tmp_path, base_dir, name, capsys, method="lora", device="cuda", precision="bf16",
            memory_budget_gb=None, **extra,
        )  # fmt: skip
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [r["loss"] for r in rows if r.get("kind") == "train"]
        files = sorted(Path(done["output"]).rglob("*.safetensors"))
        assert files, done["output"]
        saved[name] = {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}
    assert len(runs["host"]) == 2 and runs["host"] == pytest.approx(runs["device"], rel=1e-6)
    assert saved["host"].keys() == saved["device"].keys()
    for k, v in saved["device"].items():
        torch.testing.assert_close(saved["host"][k], v, msg=k)
