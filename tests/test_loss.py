"""The fused chunked cross-entropy (train.loss_chunk_tokens > 0) computes the same loss and
gradients as the plain path, on CPU in float32 (tests/test_gpu_paths.py checks bf16 on GPU)."""
import dataclasses

import pytest
import torch

from cptrain.model.presets import preset
from cptrain.model.decoder import Decoder
from cptrain.trainer.loss import lm_loss, token_losses

pytestmark = pytest.mark.model


def grads_of(model, batch, chunk):
    model.zero_grad()
    loss, stats = lm_loss(model, batch, 0.01, chunk)
    loss.backward()
    return loss.detach(), stats, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [16, 7])  # 7 does not divide the 3 x 40 tokens: a short last chunk
def test_fused_loss_matches_plain(tied, chunk):
    torch.manual_seed(0)
    model = Decoder(dataclasses.replace(preset("tiny"), tie_embeddings=tied))
    model.init_weights()
    tokens = torch.randint(0, 512, (3, 41))
    doc_ids = (torch.arange(41) >= 20).int().expand(3, 41)
    batch = {"tokens": tokens, "doc_ids": doc_ids}
    loss0, stats0, g0 = grads_of(model, batch, 0)
    loss1, stats1, g1 = grads_of(model, batch, chunk)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats1["sample_loss"], stats0["sample_loss"], rtol=1e-6, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-7, msg=name)
    with torch.no_grad():  # evaluation's chunked path
        torch.testing.assert_close(token_losses(model, batch, chunk), token_losses(model, batch, 0), rtol=1e-6, atol=0)


def test_fused_loss_under_bf16_autocast_keeps_an_fp32_head_gradient():
    """Under bf16 autocast the chunks' logits and their gradients are bf16, while the head's gradient is
    accumulated over the chunks in fp32 (for fp32 weights): it matches the plain path's to bf16 precision."""
    torch.manual_seed(0)
    model = Decoder(dataclasses.replace(preset("tiny"), tie_embeddings=False))
    model.init_weights()
    batch = {"tokens": torch.randint(0, 512, (3, 41))}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss0, _, g0 = grads_of(model, batch, 0)
        loss1, _, g1 = grads_of(model, batch, 7)
    assert g1["output.weight"].dtype == torch.float32
    torch.testing.assert_close(loss1, loss0, rtol=2e-3, atol=0)
    for name in g0:
        scale = g0[name].abs().max()
        torch.testing.assert_close(g1[name] / scale, g0[name] / scale, rtol=0, atol=2e-2, msg=name)


@pytest.mark.parametrize("cap", [None, 30.0])
def test_the_compiled_chunk_kernel_matches_its_eager_form(cap):
    """On a GPU the chunk's softmax and gradient run compiled (trainer/loss.py _chunk_fn); here the same
    function compiled for the CPU against its eager form, on bf16 logits, with row weights and a soft-cap."""
    from cptrain.model.decoder import softcap
    from cptrain.trainer.loss import _ce_and_dlogits

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(24, 1000, generator=g) * 8).bfloat16()
    t, w = torch.randint(0, 1000, (24,), generator=g), torch.rand(24, generator=g)
    loss, d = torch.compile(_ce_and_dlogits, dynamic=False)(logits, t, cap, w)
    want_loss, want_d = _ce_and_dlogits(logits, t, cap, w)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.float(), want_d.float(), rtol=0, atol=1e-2 * want_d.float().abs().max().item())
    ref = torch.nn.functional.cross_entropy(softcap(logits.float(), cap), t, reduction="none")
    torch.testing.assert_close(want_loss, ref, rtol=1e-5, atol=1e-5)
