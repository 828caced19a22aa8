"""Same math: llamaforge's loss and gradients against transformers + peft on one batch.

Issue 4, item 4. One random Llama (llamaforge preset, fewer layers), one batch of random
tokens with an unlabelled prompt and right padding, and for each method (LoRA r16 on all
seven projections with the same random non-zero A and B in both stacks, or full
fine-tuning) and each precision:

- llamaforge as its recipe trains: bf16 base + fp32 LoRA under bf16 autocast (LoRA), fp32
  master weights under bf16 autocast (full); loss = chunked_causal_lm_loss_fn sum / count;
  activation checkpointing on; its fused kernels at their defaults, and also switched off
  (`--kernels default,none`) where the model has them, so a kernel is told from the rest;
- transformers + peft as the throughput benchmark runs them: bf16 weights, fp32 peft
  adapters, `model(input_ids, labels).loss`, gradient checkpointing (non-reentrant).

It prints, per case, both losses, the relative difference of the loss and the relative
norm error of the gradients of all trainable parameters together (||g_lf - g_hf|| /
||g_hf||; the worst single tensor beside it), PASS/FAIL against the tolerance of the
precision (gradients: bf16 2e-2, fp32 1e-3; loss: bf16 5e-3, fp32 1e-4, relative), and,
where an fp32 run exists, each bf16 stack's own error against fp32 transformers (how far
bf16 alone moves a stack; a bf16 case over the gradient tolerance still passes when
llamaforge is no further from fp32 than transformers is, see `verdict`). The exit status
is 1 when any case fails or errs; the JSON (--out) is written either way.

On an H200 (the default shape, 2 x 1024 tokens) both stacks' bf16 gradients were 2-3e-2
from fp32 transformers' (relative norm), so the two bf16 stacks differ by about as much
and those cases pass by the second rule; fp32 cases agreed to 1.5e-5; the run took 32 s.

    python benchmarks/same_math.py --out same_math.json            # GPU: bf16 and fp32
    python benchmarks/same_math.py --tiny --out same_math_tiny.json  # CPU, fp32, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import TARGETS, ensure_llamaforge, versions  # noqa: E402

TOL = {"bf16": {"grad": 2e-2, "loss": 5e-3}, "fp32": {"grad": 1e-3, "loss": 1e-4}}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TINY = {"preset": "tiny-llama3", "dim": 128, "ffn_dim": 352, "vocab_size": 512, "n_layers": 2}
PAD_ID = 0

Grads = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- setup


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_config(args: argparse.Namespace):
    """llamaforge's LlamaConfig: the preset with fewer layers, or the tiny shape."""
    ensure_llamaforge()
    from llamaforge.model.presets import preset

    if args.tiny:
        overrides = {k: v for k, v in TINY.items() if k != "preset"}
        return preset(TINY["preset"], **overrides, max_seq_len=max(256, args.seq))
    return preset(args.preset, n_layers=args.layers)


def master_weights(cfg, dev: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """fp32 weights of both stacks: N(0, 0.02) matrices as transformers', norms U(0.5, 1.5)."""
    from llamaforge.model.llama import Llama

    torch.manual_seed(seed)
    with torch.device(dev):
        model = Llama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.02)
    return {k: v.detach() for k, v in model.state_dict().items()}


def lora_values(cfg, rank: int, dev: torch.device, seed: int) -> dict[str, tuple]:
    """Random non-zero (A (r, in), B (out, r)) per adapted module, in fp32.

    A ~ N(0, 1/in) and B ~ N(0, 0.02^2), so the adapter changes a projection by several
    percent and both A's and B's gradients are non-trivial.
    """
    from llamaforge.adapters import apply_lora, lora_modules
    from llamaforge.model.llama import Llama

    with torch.device("meta"):
        shell = apply_lora(Llama(cfg), r=rank, alpha=rank, targets=TARGETS)
    g = torch.Generator(device=dev).manual_seed(seed + 1)
    out = {}
    for name, m in lora_modules(shell):
        a = torch.randn(rank, m.in_features, generator=g, device=dev) / math.sqrt(m.in_features)
        b = torch.randn(m.out_features, rank, generator=g, device=dev) * 0.02
        out[name] = (a, b)
    return out


def make_batch(vocab: int, bs: int, seq: int, dev: torch.device, seed: int) -> dict[str, Any]:
    """Random tokens; no loss on each row's first eighth (a prompt) or on row 1's padding."""
    g = torch.Generator(device=dev).manual_seed(seed + 2)
    ids = torch.randint(3, vocab, (bs, seq), generator=g, device=dev)
    labels = ids.clone()
    labels[:, : max(1, seq // 8)] = -100
    if bs > 1:
        pad_from = seq - seq // 4
        ids[1, pad_from:] = PAD_ID
        labels[1, pad_from:] = -100
    return {"input_ids": ids, "labels": labels}


def free_memory(dev: torch.device) -> None:
    """Give the last model's memory back before the next is built (GPU; a no-op on CPU)."""
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def precision_context(dtype: str) -> contextlib.AbstractContextManager:
    """fp32 really in fp32 on the GPU (no TF32 matmuls), restored afterwards."""
    stack = contextlib.ExitStack()
    if dtype == "fp32" and torch.cuda.is_available():
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

        def restore() -> None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

        stack.callback(restore)
    return stack


# ----------------------------------------------------------------------------- the stacks


class Case:
    """What both stacks share: shape, weights, adapter values, batch, switches."""

    def __init__(self, args: argparse.Namespace, dev: torch.device) -> None:
        self.args, self.dev = args, dev
        self.cfg = build_config(args)
        self.weights = master_weights(self.cfg, dev, args.seed)
        self.lora = lora_values(self.cfg, args.rank, dev, args.seed)
        self.batch = make_batch(self.cfg.vocab_size, args.bs, args.seq, dev, args.seed)
        self.labelled = int((self.batch["labels"][:, 1:] != -100).sum())


def run_llamaforge(case: Case, method: str, dtype: str, kernels: str) -> tuple[float, Grads]:
    """One forward/backward as llamaforge's recipe trains; grads in fp32 by our names."""
    from llamaforge.adapters import apply_lora, lora_modules
    from llamaforge.io.hf import build_from_state_dict
    from llamaforge.losses import chunked_causal_lm_loss_fn
    from llamaforge.train.loop import autocast_context
    from llamaforge.train.recipe import base_dtype

    base = base_dtype(method, dtype)  # bf16 base under LoRA, fp32 masters for full
    model = build_from_state_dict(case.cfg, dict(case.weights), device=case.dev, dtype=base)
    if method == "lora":
        apply_lora(
            model, r=case.args.rank, alpha=case.args.rank, targets=TARGETS, lora_dtype=torch.float32
        )  # fp32 adapters over the bf16 base, as the recipe
        with torch.no_grad():
            for name, m in lora_modules(model):
                a, b = case.lora[name]
                m.lora_A["default"].copy_(a)
                m.lora_B["default"].copy_(b)
    else:
        model.requires_grad_(True)
    if kernels == "none":
        from llamaforge.kernels import Kernels

        model.set_kernels(Kernels.none())
    model.gradient_checkpointing = case.args.checkpointing
    model.train()
    with autocast_context(dtype, case.dev):
        loss_sum, count = chunked_causal_lm_loss_fn(model, case.batch)
    if int(count) != case.labelled:
        raise AssertionError(f"llamaforge counted {int(count)} labels, expected {case.labelled}")
    loss = loss_sum / count
    loss.backward()
    if method == "lora":
        grads = {}
        for name, m in lora_modules(model):
            grads[f"{name}.lora_A"] = grad_of(m.lora_A["default"], name)
            grads[f"{name}.lora_B"] = grad_of(m.lora_B["default"], name)
    else:
        grads = {n: grad_of(p, n) for n, p in model.named_parameters()}
    return loss.item(), grads


def grad_of(p: torch.Tensor, name: str) -> torch.Tensor:
    if p.grad is None:
        raise AssertionError(f"{name}: no gradient")
    return p.grad.detach().float().clone()


def run_hf(case: Case, method: str, dtype: str) -> tuple[float, Grads]:
    """transformers (+ peft) with the same weights and adapter values; grads by our names."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llamaforge.io.hf import config_to_hf, ours_to_hf
    from llamaforge.io.peft import hf_module_name

    d = config_to_hf(case.cfg)
    d.pop("torch_dtype", None)
    with torch.device(case.dev):
        model = AutoModelForCausalLM.from_config(
            LlamaConfig(**d), dtype=DTYPES[dtype], attn_implementation="sdpa"
        )
    sd = {ours_to_hf(k): v for k, v in case.weights.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise AssertionError(f"weights do not fit transformers: {missing[:3]} {unexpected[:3]}")
    model.config.use_cache = False
    if case.args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inner = model
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        if case.args.checkpointing:
            model.enable_input_require_grads()
        lora = LoraConfig(
            r=case.args.rank,
            lora_alpha=case.args.rank,
            lora_dropout=0.0,
            target_modules=list(TARGETS),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)  # adapters in fp32 (autocast_adapter_dtype)
        with torch.no_grad():
            for name, (a, b) in case.lora.items():
                m = inner.get_submodule(hf_module_name(name))
                m.lora_A["default"].weight.copy_(a)
                m.lora_B["default"].weight.copy_(b)
    model.train()
    loss = model(input_ids=case.batch["input_ids"], labels=case.batch["labels"]).loss
    loss.backward()
    if method == "lora":
        grads = {}
        for name in case.lora:
            m = inner.get_submodule(hf_module_name(name))
            grads[f"{name}.lora_A"] = grad_of(m.lora_A["default"].weight, name)
            grads[f"{name}.lora_B"] = grad_of(m.lora_B["default"].weight, name)
    else:
        params = dict(inner.named_parameters())
        grads = {n: grad_of(params[ours_to_hf(n)], n) for n in sorted(our_params(case))}
    return loss.item(), grads


def our_params(case: Case) -> set[str]:
    """Our parameter names (a tied lm_head is not a parameter of its own)."""
    names = set(case.weights)
    if case.cfg.tie_embeddings:
        names.discard("lm_head.weight")
    return names


# ----------------------------------------------------------------------------- comparing


def rel_errors(ours: Grads, ref: Grads) -> dict[str, Any]:
    """Global relative norm error over all tensors, and the worst single tensor."""
    if set(ours) != set(ref):
        raise AssertionError(f"different parameters: {sorted(set(ours) ^ set(ref))[:5]}")
    diff2 = ref2 = 0.0
    worst, worst_name, per = 0.0, "", []
    for name in sorted(ref):
        d = float((ours[name] - ref[name]).double().norm() ** 2)
        r = float(ref[name].double().norm() ** 2)
        diff2, ref2 = diff2 + d, ref2 + r
        e = math.sqrt(d / r) if r > 0 else (0.0 if d == 0 else math.inf)
        per.append(e)
        if e > worst or not worst_name:
            worst, worst_name = e, name
    per.sort()
    return {
        "grad_rel_err": math.sqrt(diff2 / ref2) if ref2 > 0 else math.inf,
        "grad_norm_ref": math.sqrt(ref2),
        "worst_tensor_rel_err": worst,
        "worst_tensor": worst_name,
        "median_tensor_rel_err": per[len(per) // 2],
        "tensors": len(per),
    }


def verdict(
    ours: tuple[float, Grads],
    ref: tuple[float, Grads],
    dtype: str,
    ref32: tuple[float, Grads] | None = None,
) -> dict[str, Any]:
    """PASS when the loss and the gradients agree within the precision's tolerance.

    In bf16, where an fp32 transformers run exists, a gradient error over the tolerance
    still passes if llamaforge's own bf16 error against fp32 is no larger than 1.25 x that
    of transformers' bf16 run: both stacks are then as close to the exact math as bf16 lets
    the reference be (the `criterion` field says which rule passed).
    """
    (loss, grads), (ref_loss, ref_grads) = ours, ref
    out: dict[str, Any] = {"loss_llamaforge": loss, "loss_hf": ref_loss}
    out["loss_abs_diff"] = abs(loss - ref_loss)
    out["loss_rel_diff"] = out["loss_abs_diff"] / max(abs(ref_loss), 1e-12)
    out.update(rel_errors(grads, ref_grads))
    tol = TOL[dtype]
    out["tolerance"] = tol
    loss_ok = math.isfinite(loss) and out["loss_rel_diff"] <= tol["loss"]
    out["criterion"] = None
    if loss_ok and out["grad_rel_err"] <= tol["grad"]:
        out["criterion"] = "grad rel err <= tolerance"
    if dtype != "fp32" and ref32 is not None:
        lf32 = rel_errors(grads, ref32[1])["grad_rel_err"]
        hf32 = rel_errors(ref_grads, ref32[1])["grad_rel_err"]
        out["grad_rel_err_vs_fp32_hf"] = {"llamaforge": lf32, "hf": hf32}
        if loss_ok and out["criterion"] is None and lf32 <= 1.25 * hf32:
            out["criterion"] = "llamaforge bf16 no further from fp32 than transformers bf16"
    out["status"] = "PASS" if out["criterion"] else "FAIL"
    return out


def attempt(fn: Callable[[], Any], dev: torch.device) -> tuple[Any, str | None]:
    """Run one stack; an exception becomes an error string (the other cases still run)."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - reported, and the run goes on
        traceback.print_exc()
        return None, f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        free_memory(dev)


def run_method(case: Case, method: str, dtypes: list[str], kernels: list[str]) -> list[dict]:
    """All cases of one method: per precision, each llamaforge variant against transformers."""
    rows, dev = [], case.dev
    hf: dict[str, tuple[Any, str | None]] = {}
    for dtype in dtypes:
        with precision_context(dtype):
            hf[dtype] = attempt(lambda d=dtype: run_hf(case, method, d), dev)
    ref32 = hf["fp32"][0] if "fp32" in hf else None
    for dtype in dtypes:
        for kern in kernels:
            row: dict[str, Any] = {"method": method, "dtype": dtype, "kernels": kern}
            start = time.perf_counter()
            with precision_context(dtype):
                ours, err = attempt(lambda d=dtype, k=kern: run_llamaforge(case, method, d, k), dev)
            row["llamaforge_s"] = round(time.perf_counter() - start, 2)
            ref, ref_err = hf[dtype]
            if ours is not None and ref is not None:
                found, err = attempt(lambda o=ours, r=ref, d=dtype: verdict(o, r, d, ref32), dev)
                row.update(found or {})
            elif ref_err:
                err = f"transformers: {ref_err}"
            if err:
                row.update(status="ERROR", error=err)
            rows.append(row)
            log(f"  {method} {dtype} kernels={kern}: {row['status']} {short(row)}")
            ours = None
            free_memory(dev)
    hf.clear()
    free_memory(dev)
    return rows


def short(row: dict[str, Any]) -> str:
    if "error" in row:
        return row["error"]
    if "grad_rel_err" not in row:
        return ""
    return f"loss rel diff {row['loss_rel_diff']:.2e}, grad rel err {row['grad_rel_err']:.2e}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- report


def fmt(x: Any, spec: str = ".2e") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    s = report["setup"]
    lines = [
        f"## Same math: llamaforge vs transformers + peft ({s['device_name']})",
        "",
        f"{s['preset']} with {s['n_layers']} layers (dim {s['dim']}, vocab {s['vocab_size']}), "
        f"batch {s['bs']} x {s['seq']}, {s['labelled']} labelled tokens; LoRA r{s['rank']} "
        f"alpha {s['rank']} on {','.join(TARGETS)}; activation checkpointing "
        f"{'on' if s['checkpointing'] else 'off'}",
        "",
        "| method | dtype | llamaforge kernels | loss llamaforge | loss hf | loss rel diff "
        "| grad rel err | worst tensor (rel err) | bf16 vs fp32 hf: lf / hf | tol grad | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["cases"]:
        if "grad_rel_err" not in r:
            cells = ["", "", "", "", "", "", ""]
            lines.append(
                f"| {r['method']} | {r['dtype']} | {r['kernels']} | "
                + " | ".join(cells)
                + f" | **{r['status']}**: {r.get('error', '').replace('|', '/')} |"
            )
            continue
        vs = r.get("grad_rel_err_vs_fp32_hf") or {}
        vs_cell = f"{fmt(vs.get('llamaforge'))} / {fmt(vs.get('hf'))}" if vs else "-"
        cells = [
            f"{r['loss_llamaforge']:.5f}",
            f"{r['loss_hf']:.5f}",
            fmt(r["loss_rel_diff"]),
            fmt(r["grad_rel_err"]),
            f"{r['worst_tensor']} ({fmt(r['worst_tensor_rel_err'])})",
            vs_cell,
            fmt(r["tolerance"]["grad"], ".0e"),
            f"**{r['status']}**",
        ]
        lines.append(
            f"| {r['method']} | {r['dtype']} | {r['kernels']} | " + " | ".join(cells) + " |"
        )
    lines += ["", f"SAME MATH: {report['status']} ({report['wall_s']:.1f} s)"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama3.2-1b", help="llamaforge preset (shape)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (fewer than the preset)")
    p.add_argument("--bs", type=int, default=2)
    p.add_argument("--seq", type=int, default=None, help="default 1024 (tiny: 64)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    p.add_argument("--methods", default="lora,full", help="comma list of lora, full")
    p.add_argument("--dtypes", default=None, help="default bf16,fp32 on CUDA, fp32 on CPU")
    p.add_argument(
        "--kernels",
        default=None,
        help="llamaforge kernel settings to run: default (the model's own), none (all off); "
        "default: both on CUDA where the model has kernels, else default",
    )
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--tiny", action="store_true", help="tiny model, 2 x 64 tokens (CPU test)")
    p.add_argument("--device", default="auto", help="auto, cuda, cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (tiny: 1)")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    args = p.parse_args(argv)
    args.seq = args.seq or (64 if args.tiny else 1024)
    return args


def choose(args: argparse.Namespace, dev: torch.device) -> tuple[list[str], list[str], list[str]]:
    methods = [m for m in args.methods.split(",") if m]
    if any(m not in ("lora", "full") for m in methods):
        raise SystemExit(f"--methods {args.methods!r}: use lora and/or full")
    dtypes = (args.dtypes or ("bf16,fp32" if dev.type == "cuda" else "fp32")).split(",")
    if any(d not in DTYPES for d in dtypes):
        raise SystemExit(f"--dtypes {args.dtypes!r}: use bf16 and/or fp32")
    ensure_llamaforge()
    from llamaforge.model.llama import Llama

    has_kernels = hasattr(Llama, "set_kernels")
    kernels = (args.kernels or ("default,none" if dev.type == "cuda" else "default")).split(",")
    if any(k not in ("default", "none") for k in kernels):
        raise SystemExit(f"--kernels {args.kernels!r}: use default and/or none")
    if not has_kernels:
        kernels = ["default"]  # this llamaforge has no switchable kernels
    return methods, dtypes, kernels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)
    start = time.perf_counter()
    dev = pick_device(args.device)
    methods, dtypes, kernels = choose(args, dev)
    case = Case(args, dev)
    cfg = case.cfg
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {platform.machine()}"
    setup = {
        "preset": TINY["preset"] if args.tiny else args.preset,
        "n_layers": cfg.n_layers,
        "dim": cfg.dim,
        "vocab_size": cfg.vocab_size,
        "bs": args.bs,
        "seq": args.seq,
        "labelled": case.labelled,
        "rank": args.rank,
        "checkpointing": args.checkpointing,
        "device_name": name,
        "methods": methods,
        "dtypes": dtypes,
        "kernels": kernels,
    }
    log(f"same math on {name}: {setup}")
    cases = []
    for method in methods:
        cases += run_method(case, method, dtypes, kernels)
    ok = bool(cases) and all(c["status"] == "PASS" for c in cases)
    report = {
        "setup": setup,
        "cases": cases,
        "status": "PASS" if ok else "FAIL",
        "wall_s": time.perf_counter() - start,
        "versions": versions("llamaforge", "transformers", "peft"),
    }
    if dev.type == "cuda":
        report["peak_alloc_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        log(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
