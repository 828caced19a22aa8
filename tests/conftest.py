"""Session fixtures for the real SmolLM2-135M-Instruct (loaded once per test run)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smol_path():
    """Path of the bundled SmolLM2-135M-Instruct GGUF."""
    from llamaforge.io.load import builtin_path

    return builtin_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol(smol_path):
    """(model, tokenizer) loaded by llamaforge, fp32 on CPU."""
    from llamaforge.io.load import load_model

    return load_model(smol_path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def smol_ref(smol_path):
    """transformers' own load of the same GGUF file (the independent reference)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smol_path.parent), gguf_file=smol_path.name, dtype=torch.float32
    )
    tok = transformers.AutoTokenizer.from_pretrained(
        str(smol_path.parent), gguf_file=smol_path.name
    )
    return model.eval(), tok
