"""Serving throughput: the llamaforge engine against transformers + peft `generate`.

Each run submits C requests at once (prompts of `--prompt-len` random tokens, exactly
`--output-len` greedy output tokens each, no stop id), spread round-robin over A LoRA adapters
(rank `--rank`, all seven projections), and reports output tokens/s, time to first token and
inter-token latency (p50/p99 over every token of every request) and peak memory.

- llamaforge: one `Engine` (continuous batching, `max_batch` = C, one slot-pool KV cache,
  gathered LoRA weights so every adapter shares one batch).
- hf: transformers' LlamaForCausalLM (sdpa) + peft with the same A adapters: static batches
  grouped by adapter, as peft needs (`set_adapter`, then `generate` for the group), groups one
  after another. Per-token times come from a logits processor (generate syncs every step).
- bound: the batch-1 decode speed if every step only read the weights once at the copy
  bandwidth measured in the same run (`dst.copy_(src)` of a large buffer, read + write).

Both stacks use the same random weights (llamaforge's model, copied into transformers by the
checkpoint key map). Models are llamaforge presets (random init: speed only).

    python benchmarks/serve_throughput.py --preset llama3.1-8b --out serve_8b.json
    python benchmarks/serve_throughput.py --preset smollm2-135m --out serve_135m.json
    python benchmarks/serve_throughput.py --tiny            # CPU smoke test, seconds

Goals (issue 11): batch-1 decode of 8B at >= 70% of the bound; at 64 concurrent >= 5x hf;
16 adapters at 64 concurrent >= 0.8x one adapter. `--profile` prints the top operators of ten
engine steps at the largest concurrency (what bounds a goal that is missed).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(dev: torch.device) -> float | None:
    if dev.type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    try:
        import resource
    except ImportError:
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 2)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def copy_bandwidth(dev: torch.device, mib: int) -> float:
    """Bytes per second of dst.copy_(src) (read + write), median of 10."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        sync(dev)
        t = time.perf_counter()
        dst.copy_(src)
        sync(dev)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() / statistics.median(times[2:])


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every weight but the embedding table (one row is read)
    unless the output projection shares it."""
    skip = set() if model.cfg.tie_embeddings else {id(model.embed_tokens.weight)}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def build_model(preset_name: str, dev: torch.device, dtype: torch.dtype):
    from llamaforge.model.llama import Llama
    from llamaforge.model.presets import preset

    cfg = preset(preset_name)
    with torch.device(dev):
        model = Llama(cfg)
    model.to(dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.reset_rope()
    return model.eval()


def set_adapters(model, count: int, rank: int) -> list[str]:
    """Replace the model's adapters with `count` fresh ones (B non-zero) and name them."""
    from llamaforge.adapters import add_adapter, lora_modules

    for _, m in lora_modules(model):
        for name in list(m.lora_A):
            m.remove_adapter(name)
    names = [f"ad{i}" for i in range(count)]
    for name in names:
        add_adapter(model, name, r=rank, alpha=2 * rank, targets=TARGETS, dtype=model.dtype)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for name in names:
                m.lora_B[name].normal_(0.0, 0.01)
    return names


def random_prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def run_llamaforge(
    model, prompts, names, args, profile: bool, graphs: str, fuse: bool = True
) -> dict[str, Any]:
    from llamaforge.model.generate import SamplingParams
    from llamaforge.serve.engine import Engine, Request

    dev = model.device
    c = len(prompts)
    engine = Engine(
        model,
        max_batch=c,
        max_len=args.prompt_len + args.output_len + 1,
        prefill_chunk=args.prefill_chunk,
        prefill_budget=args.prefill_budget,
        max_loras=len(names),
        max_lora_rank=args.rank,
        graphs=graphs,
        fuse_projections=fuse,
    )
    params = SamplingParams(max_new_tokens=args.output_len, stop_ids=())
    # warm-up: the same requests, 8 tokens each (kernels compiled, decode graphs of these
    # shapes captured, as a server does before it takes traffic)
    warm = SamplingParams(max_new_tokens=8, stop_ids=())
    engine.generate(prompts, warm, [names[i % len(names)] for i in range(c)])
    reset_peak(dev)
    sync(dev)
    t0 = time.perf_counter()
    reqs = [engine.submit(Request(p, params, names[i % len(names)])) for i, p in enumerate(prompts)]
    prof_table = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        while any(r.reading_prompt for r in reqs):
            engine.step()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            for _ in range(10):
                engine.step()
            sync(dev)
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        prof_table = prof.key_averages().table(sort_by=key, row_limit=20)
    engine.wait(reqs)
    sync(dev)
    wall = time.perf_counter() - t0
    ttft = [r.times[1] - r.times[0] for r in reqs]
    itl = [b - a for r in reqs for a, b in zip(r.times[1:], r.times[2:], strict=False)]
    out = sum(len(r.output) for r in reqs)
    res = summary(out, wall, ttft, itl, peak_gb(dev))
    res["pool_gb"] = round(engine.pool.nbytes() / 2**30, 2)
    res["graphs"] = graphs
    res["fused_projection_groups"] = engine.fused_groups
    res["graphs_captured"] = engine.runner.captured if engine.runner is not None else 0
    if engine.runner is not None and engine.runner.attention:  # timed per captured bucket
        res["attention"] = {
            f"{rows}x{width}": {"chosen": name, "us": {k: round(v, 1) for k, v in t.items()}}
            for (rows, width), (name, t) in engine.runner.attention.items()
        }
    if engine.runner is not None and engine.runner.gemv:  # one-row buckets: ms a replay
        res["one_row_gemv_ms"] = {
            f"{rows}x{width}x{cols}": t for (rows, width, cols), t in engine.runner.gemv.items()
        }
    res["outputs"] = [r.output for r in reqs]
    if prof_table is not None:
        res["profile"] = prof_table
    return res


def summary(tokens: int, wall: float, ttft: list[float], itl: list[float], peak) -> dict:
    return {
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_s": round(tokens / wall, 1),
        "ttft_p50_ms": ms(pct(ttft, 0.5)),
        "ttft_p99_ms": ms(pct(ttft, 0.99)),
        "itl_p50_ms": ms(pct(itl, 0.5)),
        "itl_p99_ms": ms(pct(itl, 0.99)),
        "peak_gb": peak,
    }


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 2)


def hf_peft_model(model, names: list[str], rank: int, dropout: float = 0.0):
    """transformers + peft with llamaforge's weights and `names` adapters (B copied too)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llamaforge.adapters import lora_modules
    from llamaforge.io.hf import config_to_hf, ours_to_hf
    from llamaforge.io.peft import our_module_name

    d = config_to_hf(model.cfg)
    d.pop("torch_dtype", None)
    with torch.device(model.device):
        hf = AutoModelForCausalLM.from_config(
            LlamaConfig(**d), dtype=model.dtype, attn_implementation="sdpa"
        )
    base = {ours_to_hf(k): v for k, v in model.state_dict().items() if "lora_" not in k}
    hf.load_state_dict(base, strict=False)
    conf = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), lora_dropout=dropout
    )
    peft_model = get_peft_model(hf, conf, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, conf)
    with torch.no_grad():  # the same adapter weights as llamaforge's
        ours = dict(lora_modules(model))
        for mod_name, m in peft_model.named_modules():
            if not hasattr(m, "lora_A") or not isinstance(m.lora_A, torch.nn.ModuleDict):
                continue
            src = ours.get(our_module_name(mod_name.removeprefix("base_model.model.")))
            if src is None:
                continue
            for name in names:
                m.lora_A[name].weight.copy_(src.lora_A[name])
                m.lora_B[name].weight.copy_(src.lora_B[name])
    return peft_model.eval()


def run_hf(peft_model, prompts, names, args) -> dict[str, Any]:
    from transformers import LogitsProcessor, LogitsProcessorList

    dev = next(peft_model.parameters()).device
    groups: dict[str, list[int]] = {}
    for i in range(len(prompts)):
        groups.setdefault(names[i % len(names)], []).append(i)

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def gen(ids: torch.Tensor, n: int, clock: Clock | None = None):
        procs = LogitsProcessorList([clock] if clock else [])
        return peft_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            logits_processor=procs,
            pad_token_id=0,
        )

    with torch.inference_mode():
        peft_model.set_adapter(names[0])
        gen(torch.tensor([prompts[0][:16]], device=dev), 4)
        reset_peak(dev)
        sync(dev)
        t0 = time.perf_counter()
        ttft, itl, out = [], [], 0
        outputs: dict[int, list[int]] = {}
        for name, idx in groups.items():
            peft_model.set_adapter(name)
            clock = Clock()
            ids = torch.tensor([prompts[i] for i in idx], device=dev)
            res = gen(ids, args.output_len, clock)
            out += (res.shape[1] - ids.shape[1]) * len(idx)
            outputs.update(zip(idx, res[:, ids.shape[1] :].tolist(), strict=True))
            ttft += [clock.times[0] - t0] * len(idx)
            itl += [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)] * len(idx)
        sync(dev)
        wall = time.perf_counter() - t0
    res = summary(out, wall, ttft, itl, peak_gb(dev))
    res["outputs"] = [outputs[i] for i in range(len(prompts))]
    return res


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "peft"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


# name, decode graphs, fused projections (an engine without fusion runs each projection on
# its own even on a model an earlier engine fused: the groups only act in their engine's forwards)
LLAMAFORGE_STACKS = (
    ("llamaforge", "auto", True),
    ("llamaforge-unfused", "auto", False),
    ("llamaforge-nographs", "off", True),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="llama3.1-8b")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes, CPU fp32")
    p.add_argument("--concurrency", default="1,8,64")
    p.add_argument("--adapters", default="1,4,16")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--prefill-budget", type=int, default=2048)
    p.add_argument(
        "--stacks",
        default="llamaforge,hf",
        help="llamaforge (decode graphs on a GPU, q/k/v and gate/up fused), llamaforge-unfused"
        " (the same, each projection on its own), llamaforge-nographs (plain decode), hf",
    )
    p.add_argument("--dtype", default=None, help="bf16 (CUDA default) or fp32 (CPU default)")
    p.add_argument("--bandwidth-mib", type=int, default=2048)
    p.add_argument("--profile", action="store_true", help="profile at the largest C and A")
    p.add_argument("--profile-at", default=None, help="C,A: profile that run instead")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.concurrency, args.adapters = "tiny-llama3", "1,4", "1,2"
        args.prompt_len, args.output_len, args.rank = 24, 8, 4
        args.prefill_chunk, args.prefill_budget, args.bandwidth_mib = 32, 64, 64
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    stacks = [s for s in args.stacks.split(",") if s]
    conc = [int(x) for x in args.concurrency.split(",")]
    counts = [int(x) for x in args.adapters.split(",")]
    model = build_model(args.preset, dev, dtype)
    bw = copy_bandwidth(dev, args.bandwidth_mib)
    wbytes = weight_bytes(model)
    report: dict[str, Any] = {
        "setup": {
            "preset": args.preset,
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."),
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "rank": args.rank,
            "versions": versions(),
        },
        "bound": {
            "copy_gb_s": round(bw / 1e9, 1),
            "weight_gb": round(wbytes / 1e9, 3),
            "b1_decode_tok_s": round(bw / wbytes, 1),
        },
        "runs": [],
    }
    for a in counts:
        names = set_adapters(model, a, args.rank)
        peft_model = None
        for c in conc:
            prompts = random_prompts(c, args.prompt_len, model.cfg.vocab_size)
            row: dict[str, Any] = {"concurrency": c, "adapters": a}
            for stack, graphs, fuse in LLAMAFORGE_STACKS:
                if stack not in stacks:
                    continue
                at = args.profile_at or (f"{max(conc)},{max(counts)}" if args.profile else "")
                prof = at == f"{c},{a}"
                row[stack] = run_llamaforge(model, prompts, names, args, prof, graphs, fuse)
                if "profile" in row[stack]:
                    log(row[stack].pop("profile"))
                if stack != "llamaforge":
                    mine = row[stack].pop("outputs")
                    if stack == "llamaforge-unfused" and "llamaforge" in row:  # same greedy text?
                        fused = row["llamaforge"]["outputs"]
                        row["unfused_same_outputs"] = sum(
                            x == y for x, y in zip(fused, mine, strict=True)
                        ) / len(mine)
            if "hf" in stacks:
                try:
                    if peft_model is None:
                        peft_model = hf_peft_model(model, names, args.rank)
                    row["hf"] = run_hf(peft_model, prompts, names, args)
                except ImportError as e:
                    row["hf"] = {"skipped": str(e)}
            outs = [
                row[s].pop("outputs") for s in ("llamaforge", "hf") if "outputs" in row.get(s, {})
            ]
            if len(outs) == 2:  # greedy: equal in fp32, a check that both ran the same model
                row["same_outputs"] = sum(x == y for x, y in zip(*outs, strict=True)) / c
            report["runs"].append(row)
            log(json.dumps(row))
        del peft_model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    report["goals"] = goals(report, conc, counts)
    print_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


def goals(report: dict[str, Any], conc: list[int], counts: list[int]) -> dict[str, Any]:
    """The three ratios the issue sets goals for (None where a run is missing)."""
    runs = {(r["concurrency"], r["adapters"]): r for r in report["runs"]}

    def lf(c, a, key="tok_s"):
        return runs.get((c, a), {}).get("llamaforge", {}).get(key)

    out: dict[str, Any] = {}
    b1 = lf(min(conc), min(counts), "itl_p50_ms")
    if b1 and min(conc) == 1:
        out["b1_decode_fraction_of_bound"] = round(1e3 / b1 / report["bound"]["b1_decode_tok_s"], 3)
    top = max(conc)
    ours, hf = lf(top, min(counts)), runs.get((top, min(counts)), {}).get("hf", {}).get("tok_s")
    if ours and hf:
        out[f"x_hf_at_{top}"] = round(ours / hf, 2)
    many = lf(top, max(counts))
    if ours and many and max(counts) != min(counts):
        out[f"{max(counts)}_adapters_over_{min(counts)}_at_{top}"] = round(many / ours, 3)
    return out


def print_table(report: dict[str, Any]) -> None:
    print("| C | adapters | stack | tok/s | TTFT p50/p99 ms | ITL p50/p99 ms | peak GB |")
    print("|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        for stack in ("llamaforge", "llamaforge-unfused", "llamaforge-nographs", "hf"):
            s = r.get(stack)
            if not s or "skipped" in s:
                continue
            print(
                f"| {r['concurrency']} | {r['adapters']} | {stack} | {s['tok_s']} | "
                f"{s['ttft_p50_ms']}/{s['ttft_p99_ms']} | {s['itl_p50_ms']}/{s['itl_p99_ms']} "
                f"| {s['peak_gb']} |"
            )
    print(f"bound: {report['bound']}; goals: {report['goals']}")


if __name__ == "__main__":
    main()
