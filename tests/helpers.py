"""Shared test helpers: tiny configs and a random-weight model of each."""

from __future__ import annotations

import torch

from llamaforge.model.config import LlamaConfig
from llamaforge.model.llama import Llama
from llamaforge.model.presets import preset

TINY = ("tiny-llama2", "tiny-llama3", "tiny-smollm2")


def random_model(name: str, seed: int = 0, **overrides) -> Llama:
    """A tiny model with non-trivial random weights (norm weights too)."""
    torch.manual_seed(seed)
    cfg: LlamaConfig = preset(name, **overrides)
    model = Llama(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08)
    return model.eval()


def tiny_hf_folder(d, seed: int = 3):
    """A tiny Hugging Face folder: random tiny-llama3 weights + the tiny fixture tokenizer."""
    import shutil
    from pathlib import Path

    from llamaforge.io.hf import save_hf

    d = Path(d)
    save_hf(random_model("tiny-llama3", seed=seed), d)
    tok = Path(__file__).parent / "fixtures" / "data" / "tiny_tokenizer" / "tokenizer.json"
    shutil.copy(tok, d / "tokenizer.json")
    return d
