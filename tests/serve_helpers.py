"""Shared pieces of the serving tests: a tiny base folder, PEFT adapters, a live server."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import torch

from llamaforge.adapters import add_adapter, lora_modules
from llamaforge.cli import build_parser
from llamaforge.io.hf import save_hf
from llamaforge.io.peft import save_peft_adapter
from tests.helpers import random_model

FIX = Path(__file__).parent / "fixtures" / "data"
KEY = "sk-test-key"


def make_base(d: Path) -> Path:
    """A tiny Hugging Face folder: random tiny-llama3 weights + the tiny fixture tokenizer."""
    d.mkdir(parents=True, exist_ok=True)
    save_hf(random_model("tiny-llama3", seed=3), d)
    shutil.copy(FIX / "tiny_tokenizer" / "tokenizer.json", d / "tokenizer.json")
    return d


def make_adapter(out: Path, seed: int, r: int = 4, targets=("q_proj", "v_proj", "down_proj")):
    """A PEFT LoRA folder for the tiny base with random, clearly non-zero weights."""
    model = random_model("tiny-llama3", seed=3)
    add_adapter(model, "x", r=r, alpha=2 * r, targets=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for p in (m.lora_A["x"], m.lora_B["x"]):
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return save_peft_adapter(model, out, adapter_name="x")


def serve_args(base: Path, *extra: str):
    """Parsed `llamaforge serve` arguments for the tiny base (chatml, small sizes)."""
    argv = ["serve", str(base), "--template", "chatml", "--max-len", "128", "--max-batch", "8"]
    return build_parser().parse_args(argv + list(extra))


class LiveServer:
    """Run an app with uvicorn on a free localhost port in a thread (a context manager)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()


def client(url: str, key: str = KEY):
    """The real openai client, no retries."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
