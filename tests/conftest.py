"""Session fixtures for the real SmolLM2-135M-Instruct (loaded once per test run)."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels are tested in Triton's CPU interpreter; it must be chosen
# before triton is first imported (the model imports the kernels, and they import triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
def smol_ref(smol_path, smol_hf_tok):
    """transformers' own load of the same GGUF file (the independent reference)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smol_path.parent), gguf_file=smol_path.name, dtype=torch.float32
    )
    tok = transformers.AutoTokenizer.from_pretrained(
        str(smol_path.parent), gguf_file=smol_path.name
    )
    return model.eval(), tok


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run fastest (and deterministically) on one thread; the real model uses all."""
    if request.node.get_closest_marker("real"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smol_tok(smol_path):
    """llamaforge's tokenizer read from the bundled GGUF."""
    from llamaforge.data.tokenizer import load_tokenizer

    return load_tokenizer(smol_path)


@pytest.fixture(scope="session")
def smol_hf_tok(smol_path):
    """transformers' tokenizer built from the same GGUF (the reference)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(smol_path.parent), gguf_file=smol_path.name
    )
