"""The `llamaforge` command line.

Verbs: train, eval, score, generate, chat, serve, ui, perplexity, convert, merge, export,
quantize, self-instruct (`llamaforge VERB -h`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import UserError

MODEL_HELP = "a Hugging Face folder, a .gguf file, or the built-in name smollm2-135m-instruct"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: auto)")


def _add_sampling_args(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every verb."""
    parser = argparse.ArgumentParser(
        prog="llamaforge", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="verb", required=True)

    g = sub.add_parser("generate", help="complete a prompt")
    _add_model_args(g)
    g.add_argument("--prompt", required=True, action="append", help="repeatable: one row each")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--system", default=None, help="system prompt (with --chat)")
    g.add_argument("--template", default="auto", help="chat format (with --chat)")
    _add_sampling_args(g, 128)

    c = sub.add_parser("chat", help="interactive chat with streaming output")
    _add_model_args(c)
    c.add_argument("--system", default=None)
    c.add_argument("--template", default="auto", help="auto, chatml, llama2, llama3, ...")
    _add_sampling_args(c, 512)

    p = sub.add_parser("perplexity", help="perplexity of a text file; prints one JSON line")
    _add_model_args(p)
    p.add_argument("text_file")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: ctx)")
    p.add_argument("--batch-size", type=int, default=4)

    v = sub.add_parser("convert", help="write a Hugging Face folder (weights, config, tokenizer)")
    _add_model_args(v)
    v.add_argument("out_dir")

    t = sub.add_parser("train", help="train per a YAML config (stages pt, sft)")
    t.add_argument("config", help="YAML file")
    t.add_argument("overrides", nargs="*", help="key=value (dotted keys: optim.lr=1e-4)")

    e = sub.add_parser("eval", help="validation loss/perplexity and generation metrics")
    e.add_argument("config", help="YAML file (the data and model to evaluate)")
    e.add_argument("overrides", nargs="*", help="key=value")
    e.add_argument("--adapter", default=None, help="a PEFT adapter folder to apply")

    s = sub.add_parser("score", help="score preference pairs with a reward model; one JSON line")
    s.add_argument("rm", help="a reward-model folder written by stage rm (its model/ folder)")
    s.add_argument("--data", required=True, help="preference file, or 'chitchat' with --format")
    s.add_argument("--format", default="preference", help="preference, chitchat_next_turn, ...")
    s.add_argument("--split", default="all", help="all, train, validation or test")
    s.add_argument("--template", default="auto", help="chat format (default: the model's)")
    s.add_argument("--max-seq-len", type=int, default=1024)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--out", default=None, help="write per-pair scores as JSONL here")
    s.add_argument("--device", default=None)
    s.add_argument("--dtype", default=None)

    m = sub.add_parser("merge", help="merge a LoRA/QLoRA adapter into its base, save HF")
    _add_model_args(m)
    m.add_argument("adapter_dir")
    m.add_argument("out_dir")
    for q in (g, c):
        q.add_argument(
            "--adapter",
            action="append",
            default=[],
            metavar="[NAME=]DIR",
            help="load a PEFT LoRA adapter (repeatable; first one active unless --use)",
        )
        q.add_argument("--use", default=None, help="adapter NAME to use ('none' = base)")
    g.add_argument(
        "--row-adapters",
        default=None,
        help="comma list, one adapter NAME (or none) per --prompt, in one batched call",
    )
    for q in (g, c):
        add_quantize_arg(q)
    from .io.gguf_write import DEFAULT_TYPE, EXPORT_TYPES

    x = sub.add_parser("export", help="write a llama.cpp GGUF file (adapter merged first)")
    _add_model_args(x)
    x.add_argument("out_file", help="OUT.gguf")
    x.add_argument("--adapter", default=None, help="a PEFT LoRA/QLoRA adapter folder to merge")
    x.add_argument("--type", default=DEFAULT_TYPE, choices=EXPORT_TYPES, help="tensor type")
    x.add_argument("--name", default=None, help="general.name (default: the file's stem)")
    qz = sub.add_parser("quantize", help="int8 / NF4 weight-only quantised folder for serving")
    _add_model_args(qz)
    qz.add_argument("out_dir")
    qz.add_argument("--bits", type=int, choices=[8, 4], required=True)
    qz.add_argument("--adapter", default=None, help="a PEFT adapter folder to merge first")
    from .serve.launch import add_serve_args
    from .synth.self_instruct import add_args as add_self_instruct_args

    add_self_instruct_args(sub.add_parser("self-instruct", help="grow Alpaca data with a model"))

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server: one base, many adapters")
    _add_model_args(s)
    add_serve_args(s)
    from .ui.launch import add_ui_args

    add_ui_args(sub.add_parser("ui", help="web page: runs dashboard and chat"), MODEL_HELP)
    return parser


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    """--quantize 8|4: weight-only quantisation at load time (generate, chat, serve)."""
    p.add_argument(
        "--quantize",
        type=int,
        choices=[8, 4],
        default=None,
        help="quantise the weights at load time: 8 = int8 per channel, 4 = NF4",
    )


def quantize_loaded(model, args: argparse.Namespace):
    """The model quantised as --quantize asks (unchanged without it)."""
    if not getattr(args, "quantize", None):
        return model
    from .quantize import quantize_model

    return quantize_model(model, args.quantize)


def _sampling(args: argparse.Namespace, tok) -> object:
    from .model.generate import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop_ids=sorted(tok.stop_ids),
        stop_strings=args.stop,
        seed=args.seed,
    )


def _load(args: argparse.Namespace):
    from .io.load import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    model = quantize_loaded(model, args)
    adapters = getattr(args, "adapter", None) or []
    if adapters:
        _load_adapters(model, adapters, getattr(args, "use", None))
    return model, tok


def _load_adapters(model, specs: list[str], use: str | None) -> None:
    """Load `[NAME=]DIR` adapters; activate `use` (or the first; 'none' = base)."""
    from .adapters.lora import set_adapter
    from .io.peft import load_peft_adapter

    names = []
    for i, spec in enumerate(specs):
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = (Path(spec).name or f"adapter{i}"), spec
        if not Path(path).is_dir():
            raise UserError(f"--adapter {spec}: no such adapter folder")
        load_peft_adapter(model, path, adapter_name=name, activate=False)
        names.append(name)
    if use is not None and use != "none" and use not in names:
        raise UserError(f"--use {use}: not one of the loaded adapters {names}")
    set_adapter(model, None if use == "none" else (use or names[0]))


def _engine(model, tok, prompts: list[list[int]], params):
    """An engine sized for these prompts; it serves the model's loaded adapters."""
    from .serve.engine import OFFLINE_PREFILL_BUDGET, Engine

    max_len = max(len(p) for p in prompts) + params.max_new_tokens + 1
    return Engine(
        model, decode=tok.decode, max_batch=len(prompts), max_len=max_len,
        prefill_budget=OFFLINE_PREFILL_BUDGET, fuse_projections=True,
    )  # fmt: skip


def _active_adapter(model) -> str | None:
    """The adapter `_load_adapters` switched on (None: the base)."""
    from .adapters.lora import lora_modules

    return next((m.active for _, m in lora_modules(model)), None)


def _stream(model, tok, ids: list[int], params) -> list[int]:
    """Generate for one prompt on the engine, printing text to stdout as it is produced."""
    from .model.generate import TextStream

    stream = TextStream(tok.decode, params.stop_strings)

    def show(_row: int, token: int) -> None:
        print(stream.push(token), end="", flush=True)

    engine = _engine(model, tok, [ids], params)
    out = engine.generate([ids], params, [_active_adapter(model)], on_token=show)
    print(stream.flush(), flush=True)
    return out[0]


def cmd_generate(args: argparse.Namespace) -> int:
    """Complete one or more prompts; a single prompt streams to the terminal."""
    from .data.templates import render_conversation

    model, tok = _load(args)
    prompts = []
    for text in args.prompt:
        if args.chat:
            msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": text}
            ]
            prompts.append(
                render_conversation(tok, msgs, args.template, add_generation_prompt=True)[0]
            )
        else:
            prompts.append(tok.encode(text, bos=tok.bos_id is not None and tok.add_bos))
    params = _sampling(args, tok)
    if args.row_adapters is None and len(prompts) == 1:
        _stream(model, tok, prompts[0], params)
        return 0
    outs = _generate_rows(model, prompts, params, tok, args.row_adapters)
    for text, out in zip(args.prompt, outs, strict=True):
        print(json.dumps({"prompt": text, "completion": tok.decode(out)}))
    return 0


def _generate_rows(model, prompts, params, tok, row_adapters: str | None) -> list[list[int]]:
    """One engine run; with row_adapters each row runs its own adapter (or none)."""
    from .serve.engine import UnknownAdapter

    if row_adapters is None:
        names = [_active_adapter(model)] * len(prompts)
    else:
        names = [None if n.strip() in ("", "none") else n.strip() for n in row_adapters.split(",")]
    if len(names) != len(prompts):
        raise UserError(f"--row-adapters has {len(names)} names for {len(prompts)} prompts")
    try:
        return _engine(model, tok, prompts, params).generate(prompts, params, names)
    except UnknownAdapter as e:
        raise UserError(f"--row-adapters: unknown adapter {e}") from None


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive multi-turn chat; /reset clears history, /exit or EOF quits."""
    from .data.templates import render_conversation

    model, tok = _load(args)
    params = _sampling(args, tok)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("llamaforge chat: /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids, _ = render_conversation(tok, history, args.template, add_generation_prompt=True)
        print("assistant> ", end="", flush=True)
        out = _stream(model, tok, ids, params)
        history.append({"role": "assistant", "content": tok.decode(out).strip()})


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the model and its adapters over an OpenAI-compatible HTTP API."""
    from .serve.launch import serve_command

    return serve_command(args)


def cmd_ui(args: argparse.Namespace) -> int:
    """The runs dashboard and (with --model) the chat, on one local server."""
    from .ui.launch import ui_command

    return ui_command(args)


def cmd_self_instruct(args: argparse.Namespace) -> int:
    """Generate, filter and write Alpaca-format tasks; print the counts as JSON."""
    from .synth.self_instruct import command

    print(json.dumps(command(args), indent=1))
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    """Print {"tokens", "nll", "perplexity"} for a text file as one JSON line."""
    from .eval.perplexity import perplexity

    path = Path(args.text_file)
    if not path.is_file():
        raise UserError(f"{path}: no such text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    model, tok = _load(args)
    ids = tok.encode(text)
    res = perplexity(model, ids, window=args.window, batch_size=args.batch_size, progress=True)
    print(json.dumps({"tokens": res.tokens, "nll": res.nll, "perplexity": res.perplexity}))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Write a Hugging Face folder that transformers loads."""
    from .data.tokenizer import save_tokenizer
    from .io.hf import save_hf

    model, tok = _load(args)
    out = Path(args.out_dir)
    save_hf(model, out)
    save_tokenizer(tok, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _config(args: argparse.Namespace):
    from .config import load_config

    path = Path(args.config)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    return load_config(path, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    """Run a training config; print a JSON summary (metrics before/after) on stdout."""
    from .train.metrics import is_main_process
    from .train.recipe import run

    summary = run(_config(args))
    if is_main_process():  # under torchrun, rank 0 speaks for the job
        print(json.dumps(summary, indent=1))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a model (optionally with an adapter) on a config's held-out data."""
    from .train.recipe import evaluate_run

    cfg = _config(args)
    if args.adapter and not Path(args.adapter).is_dir():
        raise UserError(f"--adapter {args.adapter}: no such adapter folder")
    print(json.dumps(evaluate_run(cfg, args.adapter), indent=1))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge an adapter into its base (dequantising a QLoRA base first); save HF."""
    from .data.tokenizer import save_tokenizer
    from .io.hf import save_hf
    from .train.recipe import merge_adapter

    if not Path(args.adapter_dir).is_dir():
        raise UserError(f"{args.adapter_dir}: no such adapter folder")
    args.dtype = args.dtype or "float32"
    model, tok = _load(args)
    merged = merge_adapter(model, Path(args.adapter_dir))
    save_hf(merged, args.out_dir)
    save_tokenizer(tok, args.out_dir)
    print(f"wrote {args.out_dir}", file=sys.stderr)
    return 0


def _merged(args: argparse.Namespace):
    """(model, tokenizer) in float32 with `--adapter` merged (QLoRA: onto its NF4 base)."""
    from .io.load import load_model
    from .train.recipe import merge_adapter

    if args.adapter and not Path(args.adapter).is_dir():
        raise UserError(f"--adapter {args.adapter}: no such adapter folder")
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype or "float32")
    if args.adapter:
        model = merge_adapter(model, Path(args.adapter))
    return model, tok


def cmd_export(args: argparse.Namespace) -> int:
    """Write a GGUF file that llama.cpp runs; prints what was written as one JSON line."""
    from .io.gguf_write import export_gguf

    out = Path(args.out_file)
    model, tok = _merged(args)
    rep = export_gguf(model, tok, out, qtype=args.type, name=args.name or out.stem)
    print(json.dumps({"path": str(rep.path), "type": rep.qtype, "bytes": rep.bytes}))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Write a weight-only quantised folder that `load_model` reads back as stored."""
    from .quantize import quantize_model, save_quantized, weight_bytes

    model, tok = _merged(args)
    before = weight_bytes(model)
    model = quantize_model(model, args.bits)
    save_quantized(model, tok, args.out_dir, args.bits)
    info = {"path": args.out_dir, "bits": args.bits, "bytes_before": before}
    print(json.dumps(info | {"bytes_after": weight_bytes(model)}))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Print {"pairs", "accuracy", "mean_margin", "length_baseline"} for a pair file."""
    from .data.pipeline import build_dataset
    from .eval.reward import score_pairs
    from .io.atomic import write_text_atomic
    from .io.load import load_model

    if not Path(args.rm).is_dir():
        raise UserError(f"{args.rm}: no such reward-model folder")
    model, tok = load_model(args.rm, device=args.device, dtype=args.dtype)
    if getattr(model, "score", None) is None:
        raise UserError(f"{args.rm}: not a reward model (no score head; train one with stage rm)")
    spec = {
        "path": args.data,
        "format": args.format,
        "template": args.template,
        "max_seq_len": args.max_seq_len,
        "val_size": 0.0,
    }
    splits = build_dataset(spec, tok, use_cache=False)
    names = ("train", "validation", "test") if args.split == "all" else (args.split,)
    if any(n not in ("train", "validation", "test") for n in names):
        raise UserError(f"--split {args.split}: use all, train, validation or test")
    pairs = [ex for n in names for ex in getattr(splits, n)]
    if not pairs or "prompt_ids" not in pairs[0]:
        raise UserError(f"{args.data}: no preference pairs in split {args.split}")
    pad = tok.pad_id if tok.pad_id is not None else 0
    scores = score_pairs(model, pairs, pad_id=pad, batch_size=args.batch_size)
    if args.out:
        lines = [
            json.dumps({"chosen": c, "rejected": r, "margin": c - r})
            for c, r in zip(scores.chosen, scores.rejected, strict=True)
        ]
        write_text_atomic(Path(args.out), "".join(line + "\n" for line in lines))
    print(json.dumps(scores.summary()))
    return 0


COMMANDS = {
    "generate": cmd_generate,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "ui": cmd_ui,
    "self-instruct": cmd_self_instruct,
    "perplexity": cmd_perplexity,
    "convert": cmd_convert,
    "train": cmd_train,
    "eval": cmd_eval,
    "merge": cmd_merge,
    "score": cmd_score,
    "export": cmd_export,
    "quantize": cmd_quantize,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb](args)
    except (ValueError, RuntimeError, OSError) as e:
        if not _is_user_error(e):
            raise
        print(f"llamaforge {args.verb}: error: {e}", file=sys.stderr)
        return 2


def _is_user_error(e: BaseException) -> bool:
    """Errors about the user's input (they name file:line, key or path): one line, exit 2."""
    return isinstance(e, UserError | FileNotFoundError | NotADirectoryError)


if __name__ == "__main__":
    sys.exit(main())
