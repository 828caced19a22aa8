"""Ask llama.cpp itself about a GGUF file, through node-llama-cpp's prebuilt CPU binary.

`tools/llamacpp/check.mjs` does the work (tokenize, greedy decode, windowed perplexity);
this module finds Node.js and the project-local install (`scripts/setup.sh` puts it in
`tools/llamacpp/node_modules`; `LLAMAFORGE_LLAMACPP_DIR` points elsewhere) and speaks JSON.
It is a checker for exports, not a runtime llamaforge depends on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parents[3] / "tools" / "llamacpp"
# llama.cpp's worker threads spin while they wait for each other: on 2 cores shared with
# other work, 2 threads took 65 s for 4 short greedy answers of a tiny model, 1 thread 2 s.
THREADS = 1


def tools_dir() -> Path:
    """Folder holding check.mjs and node_modules/node-llama-cpp."""
    return Path(os.environ.get("LLAMAFORGE_LLAMACPP_DIR", TOOLS))


def unavailable_reason() -> str | None:
    """Why llama.cpp cannot run here (None when it can)."""
    if shutil.which("node") is None:
        return "Node.js is not installed (scripts/setup.sh installs it from Debian)"
    if not (tools_dir() / "node_modules" / "node-llama-cpp" / "package.json").is_file():
        return f"node-llama-cpp is not installed in {tools_dir()} (run scripts/setup.sh)"
    return None


def run_llamacpp(
    model: str | os.PathLike,
    *,
    tokenize: Sequence[str] = (),
    generate: Sequence[dict[str, Any]] = (),
    perplexity: dict[str, Any] | None = None,
    context: int = 512,
    threads: int = THREADS,
    timeout: float = 600,
) -> dict[str, Any]:
    """Run check.mjs on a GGUF file; returns its JSON answer (see the script's header)."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"llama.cpp unavailable: {reason}")
    req: dict[str, Any] = {"model": str(Path(model).resolve()), "context": context}
    req["threads"] = threads
    if tokenize:
        req["tokenize"] = list(tokenize)
    if generate:
        req["generate"] = list(generate)
    if perplexity is not None:
        req["perplexity"] = perplexity
    proc = subprocess.run(
        ["node", str(tools_dir() / "check.mjs")],
        input=json.dumps(req),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tools_dir(),
        env={**os.environ, "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true"},
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        raise RuntimeError(f"llama.cpp check failed on {model} (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def greedy_ids(
    model: str | os.PathLike,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int,
    stop_ids: Sequence[int] = (),
    threads: int = THREADS,
    timeout: float = 1800,
) -> list[list[int]]:
    """llama.cpp's greedy continuation of each prompt, as llamaforge's `generate` returns it.

    The prompts go in as token ids (no chat wrapper of node-llama-cpp's: llama.cpp sees the
    caller's tokens exactly) and a row ends at a stop id, which is dropped, or after
    `max_tokens`. The context is sized to the longest prompt plus `max_tokens`.
    """
    if not prompts:
        return []
    stops = sorted({int(t) for t in stop_ids})
    context = max(len(p) for p in prompts) + max_tokens + 1
    req = [{"ids": list(p), "max_tokens": max_tokens, "stop": stops} for p in prompts]
    res = run_llamacpp(model, generate=req, context=context, threads=threads, timeout=timeout)
    return [g[:-1] if g and g[-1] in stops else g for g in res["generate"]]
