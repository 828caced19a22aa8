"""`llamaforge serve`: arguments, checks, model + adapters into an engine, then uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The serve verb's options (after the shared model/device/dtype ones)."""
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a PEFT LoRA folder served as model NAME (repeatable)",
    )
    p.add_argument(
        "--adapter-root",
        default=None,
        help="folder whose sub-folders the admin endpoint may load by name",
    )
    p.add_argument(
        "--enable-admin",
        action="store_true",
        help="POST/DELETE /v1/admin/adapters (needs --api-key and --adapter-root)",
    )
    from ..cli import add_quantize_arg

    add_quantize_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("LLAMAFORGE_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $LLAMAFORGE_API_KEY)",
    )
    p.add_argument("--served-model-name", default=None, help="the base model's id in the API")
    p.add_argument("--template", default="auto", help="chat format (auto, chatml, llama3, ...)")
    p.add_argument("--max-batch", type=int, default=16, help="concurrent rows (KV slots)")
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="tokens per row, prompt + output (default: min(context, 2048))",
    )
    p.add_argument(
        "--max-loras",
        type=int,
        default=None,
        help="adapter slots (default: the --adapter count, 4 more with admin)",
    )
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per row and step")
    p.add_argument("--max-queue", type=int, default=256, help="queued requests before 503")
    p.add_argument("--max-tokens", type=int, default=4096, help="cap on a request's max_tokens")
    p.add_argument("--log-level", default="info")


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    """`NAME=DIR` pairs, names checked and unique."""
    from .adapters import check_name

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise UserError(f"--adapter {spec}: expected NAME=DIR")
        check_name(name)
        if name in out:
            raise UserError(f"--adapter {spec}: the name {name!r} is given twice")
        out[name] = path
    return list(out.items())


def build(args: argparse.Namespace):
    """(app, engine) from parsed arguments; every check runs before the model loads."""
    from ..io.load import BUILTIN, load_model
    from .adapters import check_adapter_dir
    from .api import Limits, ServerSettings, create_app
    from .engine import Engine

    specs = parse_adapter_specs(args.adapter)
    dirs = [(n, check_adapter_dir(d, args.max_lora_rank)) for n, d in specs]
    root = None
    if args.adapter_root is not None:
        root = Path(args.adapter_root)
        if not root.is_dir():
            raise UserError(f"--adapter-root {root}: no such folder")
    if args.enable_admin and (args.api_key is None or root is None):
        raise UserError(
            "--enable-admin needs --api-key (or $LLAMAFORGE_API_KEY) and --adapter-root"
        )
    for flag, value in (("--max-batch", args.max_batch), ("--prefill-chunk", args.prefill_chunk)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    from ..cli import quantize_loaded

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    model = quantize_loaded(model, args)
    max_len = args.max_len or min(model.cfg.max_seq_len, 2048)
    max_loras = args.max_loras
    if max_loras is None:
        max_loras = len(dirs) + (4 if args.enable_admin else 0)
    if max_loras < len(dirs):
        raise UserError(f"--max-loras {max_loras} < the {len(dirs)} adapters given")
    engine = Engine(
        model,
        decode=tok.decode,
        max_batch=args.max_batch,
        max_len=max_len,
        prefill_chunk=args.prefill_chunk,
        max_queue=args.max_queue,
        max_loras=max_loras,
        max_lora_rank=args.max_lora_rank,
        fuse_projections=True,
    )
    for name, d in dirs:
        engine.load_adapter(name, d)
    model_id = args.served_model_name
    if model_id is None:
        model_id = args.model if args.model in BUILTIN else Path(args.model).name
    settings = ServerSettings(
        model_id=model_id,
        api_key=args.api_key,
        template=args.template,
        adapter_root=root,
        admin=args.enable_admin,
        limits=Limits(max_tokens=args.max_tokens),
    )
    return create_app(engine, tok, settings), engine, model_id


def warn_if_open(verb: str, args: argparse.Namespace) -> None:
    """A warning on stderr when the server listens beyond loopback without an API key."""
    if args.host not in LOOPBACK and args.api_key is None:
        print(
            f"llamaforge {verb}: warning: listening on {args.host} without --api-key",
            file=sys.stderr,
        )


def serve_command(args: argparse.Namespace) -> int:
    """Run the server in the foreground (Ctrl-C stops it)."""
    from .api import run_server

    app, engine, model_id = build(args)
    warn_if_open("serve", args)
    names = ", ".join(engine.adapters) or "none"
    print(
        f"llamaforge serve: http://{args.host}:{args.port}/v1  model {model_id!r}, adapters: "
        f"{names}, {engine.max_batch} rows x {engine.max_len} tokens",
        file=sys.stderr,
    )
    run_server(app, args.host, args.port, args.log_level)
    return 0
