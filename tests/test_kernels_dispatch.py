"""How the model chooses between fused kernels and references, and packed-row attention."""

from __future__ import annotations

import pytest
import torch

from llamaforge.config import ConfigError, config_from_dict
from llamaforge.kernels import Kernels, use_kernel
from llamaforge.kernels.attention import varlen_attention, varlen_available
from llamaforge.losses import chunked_causal_lm_loss_fn
from llamaforge.model.llama import Segments, document_causal_mask
from tests.helpers import random_model

DOCS = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 1, 1, 1, 1, 1]])


def test_segments_from_doc_ids():
    seg = Segments.from_doc_ids(DOCS)
    assert seg.cu_seqlens.tolist() == [0, 3, 5, 6, 7, 12]
    assert seg.cu_seqlens.dtype == torch.int32
    assert seg.max_len == 5


def test_cpu_takes_the_reference_whatever_the_switches():
    x = torch.randn(3, 4)
    assert not use_kernel(True, x)
    assert not use_kernel(False, x)
    ids = torch.randint(0, 64, (2, 6))
    on = random_model("tiny-llama3")
    off = random_model("tiny-llama3")
    off.set_kernels(Kernels.none())
    assert all(m.kernels == Kernels.none() for m in off.modules() if hasattr(m, "kernels"))
    with torch.no_grad():
        assert torch.equal(on(ids), off(ids))


def test_doc_ids_equal_the_dense_document_mask_on_cpu():
    model = random_model("tiny-llama3")
    ids = torch.randint(0, 64, DOCS.shape)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        want = model(ids, positions=pos, mask=document_causal_mask(DOCS))
        got = model(ids, positions=pos, doc_ids=DOCS)
    assert torch.equal(want, got)


@pytest.mark.parametrize("frozen_head", [False, True])
def test_fused_ce_loss_equals_chunked_reference(frozen_head):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100
    batch = {"input_ids": ids, "labels": labels}
    results = []
    for kernels in (Kernels(), Kernels.none()):
        model = random_model("tiny-llama3").train()
        model.set_kernels(kernels)
        model.lm_head.weight.requires_grad_(not frozen_head)
        loss, n = chunked_causal_lm_loss_fn(model, batch)
        loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), n, grads))
    (l1, n1, g1), (l2, n2, g2) = results
    assert n1 == n2
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6, msg=k)


def test_kernel_switches_are_config_keys():
    raw = {"model": "m", "data": {"path": "d.jsonl"}}
    cfg = config_from_dict(raw, ["kernels.rope=false", "kernels.fused_ce=false"])
    assert cfg.kernels == Kernels(rope=False, fused_ce=False)
    assert config_from_dict(raw).kernels == Kernels()
    with pytest.raises(ConfigError, match="kernels.ropee"):
        config_from_dict(raw, ["kernels.ropee=false"])
    with pytest.raises(ConfigError, match="activation_offload"):
        config_from_dict(raw, ["activation_offload=true"])


@pytest.mark.skipif(not varlen_available(), reason="flash varlen attention needs CUDA")
def test_varlen_attention_equals_dense_document_mask():
    torch.manual_seed(0)
    b, h, kv, t, d = 2, 4, 2, 6, 64
    q = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, kv, t, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, kv, t, d, device="cuda", dtype=torch.bfloat16)
    docs = DOCS.cuda()
    seg = Segments.from_doc_ids(docs)
    got = varlen_attention(q, k, v, seg.cu_seqlens, seg.max_len)  # (B*T, H, D)
    mask = document_causal_mask(docs)
    rep = h // kv
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask
    )
    want = want.transpose(1, 2).reshape(b * t, h, d)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def _loss_and_grads(model, batch):
    loss, n = chunked_causal_lm_loss_fn(model, batch)
    (loss / n).backward()
    grads = {k: p.grad.float() for k, p in model.named_parameters() if p.grad is not None}
    return (loss / n).detach().float(), grads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="kernels run on CUDA")
@pytest.mark.parametrize("packed", [False, True])
def test_model_with_kernels_equals_references_on_cuda(packed):
    """Every kernel on (plus offloaded checkpointing) vs every reference, bf16 on the GPU."""
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 64), device="cuda")  # tiny-llama3 vocabulary
    batch = {"input_ids": ids, "labels": ids}
    if packed:
        docs = torch.zeros_like(ids)
        docs[:, 20:] = 1
        docs[1, 50:] = -1
        pos = torch.cat([torch.arange(20), torch.arange(44)]).expand(2, 64).cuda()
        batch.update(doc_ids=docs, positions=pos)
    out = []
    for kernels, offload in ((Kernels(), True), (Kernels.none(), False)):
        model = random_model("tiny-llama3").cuda().to(torch.bfloat16).train()
        model.set_kernels(kernels)
        model.gradient_checkpointing, model.offload_activations = True, offload
        out.append(_loss_and_grads(model, batch))
    (l1, g1), (l2, g2) = out
    assert abs(l1 - l2) < 2e-2 * abs(l2)
    for k in g2:
        err = (g1[k] - g2[k]).norm() / g2[k].norm().clamp(min=1e-12)
        assert err < 3e-2, (k, float(err))


def test_varlen_attention_casts_to_the_autocast_dtype(monkeypatch):
    """Under autocast (fp32 masters) RoPE hands fp32 q/k and bf16 v to the flash op, which
    takes 16-bit inputs only: all three reach it in the autocast dtype."""
    import llamaforge.kernels.attention as attn

    seen = []

    def fake(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return q

    monkeypatch.setattr(attn, "_varlen", lambda: (fake, {"is_causal": True}, True))
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    v = torch.randn(1, 2, 6, 8).bfloat16()
    seg = Segments.from_doc_ids(DOCS[:1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn.varlen_attention(q, k, v, seg.cu_seqlens, seg.max_len)
    attn.varlen_attention(q.bfloat16(), k.bfloat16(), v, seg.cu_seqlens, seg.max_len)
    assert seen == [(torch.bfloat16,) * 3] * 2


def test_packed_rows_in_fp32_without_autocast_take_the_dense_mask():
    from llamaforge.model.llama import _half_precision

    cpu = torch.device("cpu")
    assert not _half_precision(torch.float32, cpu)
    assert _half_precision(torch.bfloat16, cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _half_precision(torch.float32, cpu)


@pytest.mark.skipif(not varlen_available(), reason="flash varlen attention needs CUDA")
def test_fp32_masters_under_autocast_train_on_packed_rows():
    """The full fine-tuning default on a GPU (fp32 weights, bf16 autocast, packing) runs the
    varlen path and matches the dense document mask."""
    model = random_model("tiny-llama3").cuda()
    ids = torch.randint(0, 64, DOCS.shape, device="cuda")
    docs = DOCS.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = model(ids, doc_ids=docs)
        model.set_kernels(Kernels(varlen_attention=False))
        want = model(ids, doc_ids=docs)
    real = docs >= 0
    torch.testing.assert_close(got[real].float(), want[real].float(), atol=5e-2, rtol=5e-2)
