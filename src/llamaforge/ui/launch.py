"""`llamaforge ui`: the runs dashboard, and with `--model` the chat on the same server.

One server, one port: with a model the page's routes are added to the app of
`llamaforge serve` (same options), so the chat calls its OpenAI-compatible API directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from ..serve.launch import add_serve_args, warn_if_open


def add_ui_args(p: argparse.ArgumentParser, model_help: str) -> None:
    """The ui verb's options: runs folders, an optional model, and the serve options."""
    p.add_argument(
        "runs_dirs",
        nargs="*",
        metavar="RUNS_DIR",
        help="folders searched for runs (default: ./runs when it exists)",
    )
    p.add_argument("--model", default=None, help=f"chat with this model: {model_help}")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: auto)")
    add_serve_args(p)
    p.set_defaults(port=8080)


def build_ui(args: argparse.Namespace):
    """(app, engine, model id), both None without --model; checks run before a model loads."""
    from .app import create_ui_app, ui_router
    from .runs import RunIndex

    dirs = args.runs_dirs or ([Path("runs")] if Path("runs").is_dir() else [])
    index = RunIndex(dirs)
    if args.model is None:
        if args.adapter:
            raise UserError("--adapter needs --model (the base the adapters belong to)")
        return create_ui_app(index, api_key=args.api_key), None, None
    from ..serve.launch import build

    app, engine, model_id = build(args)
    app.include_router(ui_router(index, api_key=args.api_key, chat=True))
    return app, engine, model_id


def ui_command(args: argparse.Namespace) -> int:
    """Serve the page in the foreground (Ctrl-C stops it)."""
    from ..serve.api import run_server

    app, _engine, model_id = build_ui(args)
    warn_if_open("ui", args)
    chat = f", chat with {model_id!r}" if model_id else " (no --model: dashboard only)"
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"llamaforge ui: http://{host}:{args.port}/{chat}", file=sys.stderr)
    run_server(app, args.host, args.port, args.log_level)
    return 0
