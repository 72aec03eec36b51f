"""The GPU fast path (bench/gpu_check.sh runs these on the device machine; on CPU they skip):
varlen flash attention for packed documents, the fused cross-entropy in bf16, and a compiled
training step over batches with different document counts."""
import dataclasses

import pytest
import torch

from cptrain.model import attention
from cptrain.model.presets import preset
from cptrain.model.decoder import Decoder
from cptrain.trainer.loss import lm_loss

pytestmark = [pytest.mark.model, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEV = torch.device("cuda")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_doc_ids(b: int, s: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    marks = torch.rand(b, s, generator=g) < 1 / 300  # documents of ~300 tokens on average
    return marks.cumsum(dim=1).to(torch.int32).to(DEV)


@pytest.fixture(params=["fa2", "fa4"])
def flash_impl(request, monkeypatch):
    """torch's FlashAttention-2 varlen kernels, or FlashAttention-4 where flash-attn-4 is installed."""
    if request.param == "fa2":
        monkeypatch.setattr(attention, "_fa4", False)
    elif attention.fa4_interface(DEV) is None:
        pytest.skip("flash-attn-4 is not installed (or the GPU is not Hopper/Blackwell)")
    return request.param


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_varlen_flash_matches_dense_mask(kv_heads, flash_impl):
    if attention.resolve_backend("flash_attn", DEV) != "flash_attn":
        pytest.skip("no varlen flash kernels in this torch")
    b, s, h, hd = 2, 1024, 8, 64
    q = torch.randn(b, s, h, hd, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, s, kv_heads, hd, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    doc_ids = random_doc_ids(b, s, 0)
    cos = sin = torch.zeros(1, s, hd, device=DEV)
    flash = attention.attend(q, k, v, attention.build_context("flash_attn", doc_ids, cos, sin, b, s, DEV))
    grads = torch.autograd.grad(flash.float().square().sum(), (q, k, v))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention.attend(*ref_in, attention.AttentionContext(cos, sin, "sdpa", attention.doc_causal_mask(doc_ids)))
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_in)
    assert rel_err(flash, ref) < 1e-2  # bf16 operands: 1e-3..1e-2 against a float64 reference
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 2e-2


def test_fa4_custom_op_is_consistent():
    """The FA4 custom ops' fake (shape) functions and autograd registration agree with the kernels,
    so torch.compile can trace around them."""
    if attention.fa4_interface(DEV) is None:
        pytest.skip("flash-attn-4 is not installed (or the GPU is not Hopper/Blackwell)")
    b, s, h, hd = 2, 512, 4, 64
    q, k, v = (torch.randn(b * s, h, hd, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cu = attention._varlen_info(random_doc_ids(b, s, 3)).cu_seqlens
    torch.library.opcheck(torch.ops.cptrain.fa4_varlen_fwd, (q, k, v, cu, s, hd ** -0.5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_fa4_plain_causal_matches_sdpa():
    """Without document masking FA4 runs each row as one document; it must equal causal SDPA."""
    if attention.fa4_interface(DEV) is None:
        pytest.skip("flash-attn-4 is not installed (or the GPU is not Hopper/Blackwell)")
    b, s, h, hd = 3, 512, 4, 64
    q, k, v = (torch.randn(b, s, h, hd, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    cos = sin = torch.zeros(1, s, hd, device=DEV)
    ctx = attention.build_context("flash_attn", None, cos, sin, b, s, DEV)
    assert ctx.mask is not None  # the rows-as-documents layout, not SDPA
    ref = attention.attend(q, k, v, attention.build_context("sdpa", None, cos, sin, b, s, DEV))
    assert rel_err(attention.attend(q, k, v, ctx), ref) < 1e-2


def test_fused_cross_entropy_matches_plain_in_bf16():
    torch.manual_seed(0)
    model = Decoder(dataclasses.replace(preset("tiny"), vocab_size=4096)).to(DEV)
    batch = {"tokens": torch.randint(0, 4096, (4, 257), device=DEV)}
    grads = []
    for chunk in (0, 256):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, stats = lm_loss(model, batch, 1.0 / 1024, chunk)
        loss.backward()
        grads.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert abs(grads[0][0] - grads[1][0]) / grads[0][0] < 1e-3
    assert rel_err(grads[1][1], grads[0][1]) < 2e-2


@pytest.mark.usefixtures("flash_impl")
def test_compiled_doc_masked_step_matches_eager():
    """Compiled blocks + varlen attention + fused loss vs the plain eager path, on two batches with
    different document counts (the compiled step must not fail or recompile per batch)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("tiny"), vocab_size=4096, max_seq_len=512, attention="flash_attn")
    fast = Decoder(cfg).to(DEV)
    plain = Decoder(dataclasses.replace(cfg, attention="sdpa")).to(DEV)
    plain.load_state_dict(fast.state_dict())
    for block in fast.layers:
        block.compile()
    for seed in (1, 2):
        batch = {"tokens": torch.randint(0, 4096, (4, 513), device=DEV), "doc_ids": random_doc_ids(4, 513, seed)}
        losses = []
        for model, chunk in ((fast, 512), (plain, 0)):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = lm_loss(model, batch, 1.0 / 2048, chunk)
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) / losses[1] < 5e-3
