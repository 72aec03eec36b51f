"""The decoder and its attention backends on CPU: shapes, meta build + init, GQA, document masking,
parameter/FLOP counts, Llama-3 RoPE scaling against transformers, backend fallbacks, training."""
import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from cptrain.errors import UserError
from cptrain.model import attention
from cptrain.model.config import ModelConfig, flops_per_token, hardware_flops_per_token, param_counts
from cptrain.model.hf_config import to_hf_config
from cptrain.model.presets import preset
from cptrain.model.decoder import Decoder
from cptrain.model.rope import rope_init

pytestmark = pytest.mark.model


def build(cfg: ModelConfig, seed: int = 0) -> Decoder:
    m = Decoder(cfg)
    torch.manual_seed(seed)
    m.init_weights()
    return m.eval()


def tokens(b: int, s: int, vocab: int = 512, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def test_shapes():
    cfg = preset("tiny")
    m = build(cfg)
    t = tokens(3, 17)
    h = m.hidden(t)
    assert h.shape == (3, 17, cfg.dim)
    assert m.head(h).shape == m(t).shape == (3, 17, cfg.vocab_size)
    assert torch.equal(m.head(h), m(t))


def test_meta_build_then_init_is_deterministic():
    cfg = preset("tiny")
    with torch.device("meta"):
        meta = Decoder(cfg)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    eager = build(cfg, seed=0)  # built on CPU, same seed: the same init
    for (name, a), (_, b) in zip(meta.state_dict().items(), eager.state_dict().items()):
        assert torch.equal(a, b), name
    t = tokens(2, 16)
    assert torch.equal(meta.eval()(t), eager(t))
    assert not torch.equal(build(cfg, seed=1).tok_embeddings.weight, eager.tok_embeddings.weight)


def test_init_statistics():
    cfg = dataclasses.replace(preset("tiny"), dim=256, ffn_dim=512, n_layers=8, n_heads=4, n_kv_heads=4)
    m = build(cfg)
    layer = m.layers[3]
    assert layer.attention.wq.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    scaled = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    assert layer.attention.wo.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert layer.feed_forward.w2.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert torch.equal(layer.ffn_norm.weight, torch.ones(cfg.dim))


def _mha_copy(gqa: Decoder) -> Decoder:
    """The same model with every kv head repeated explicitly (n_kv_heads = n_heads)."""
    cfg = gqa.cfg
    mha = Decoder(dataclasses.replace(cfg, n_kv_heads=cfg.n_heads)).eval()
    sd = gqa.state_dict()
    rep = cfg.n_heads // cfg.n_kv_heads
    for i in range(cfg.n_layers):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            heads = sd[key].view(cfg.n_kv_heads, cfg.head_size, cfg.dim)
            sd[key] = heads.repeat_interleave(rep, dim=0).reshape(cfg.n_heads * cfg.head_size, cfg.dim)
    mha.load_state_dict(sd)
    return mha


@pytest.mark.parametrize("with_docs", [False, True])  # enable_gqa path and repeated-kv masked path
def test_gqa_equals_repeated_kv_heads(with_docs):
    gqa = build(preset("tiny"))
    assert gqa.cfg.n_kv_heads < gqa.cfg.n_heads
    t = tokens(2, 24)
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24]) if with_docs else None
    torch.testing.assert_close(gqa(t, doc_ids), _mha_copy(gqa)(t, doc_ids), atol=1e-5, rtol=0)


def test_packed_documents_equal_separate_runs():
    m = build(preset("tiny"))
    a, b, c = tokens(1, 7, seed=2), tokens(1, 9, seed=3), tokens(1, 16, seed=4)
    packed = torch.cat([torch.cat([a, b], 1), c])  # [2, 16]: row 0 holds two documents
    doc_ids = torch.tensor([[5] * 7 + [6] * 9, [0] * 16])  # any ids: runs of equal ids are documents
    out = m(packed, doc_ids)
    torch.testing.assert_close(out[0, :7], m(a)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, 7:], m(b)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], m(c)[0], atol=1e-5, rtol=0)
    # Without doc_ids the second document sees the first: the comparison above is not vacuous.
    assert (m(packed)[0, 7:] - m(b)[0]).abs().max() > 1e-2


def test_doc_positions_and_mask():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, 3, 3]])
    assert attention.doc_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    mask = attention.doc_causal_mask(doc_ids)
    assert mask.shape == (2, 1, 6, 6)
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False]
    assert torch.equal(mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())


def test_doc_masking_off_is_plain_causal():
    cfg = dataclasses.replace(preset("tiny"), doc_masking=False)
    m = build(cfg)
    t = tokens(2, 20)
    doc_ids = torch.tensor([[0] * 8 + [1] * 12, [0] * 5 + [1] * 15])
    assert torch.equal(m(t, doc_ids), m(t))
    masked = build(preset("tiny"))  # same weights, masking on: differs
    assert not torch.allclose(masked(t, doc_ids), m(t), atol=1e-3)


def test_param_counts_tied_and_untied():
    untied = dataclasses.replace(preset("tiny"), tie_embeddings=False)
    tied = dataclasses.replace(untied, tie_embeddings=True)
    for cfg in (untied, tied):
        with torch.device("meta"):
            m = Decoder(cfg)
        assert param_counts(cfg)[0] == sum(p.numel() for p in m.parameters())
    assert param_counts(untied)[0] - param_counts(tied)[0] == untied.vocab_size * untied.dim
    assert param_counts(untied)[1] == param_counts(tied)[1]
    assert param_counts(tied)[0] - param_counts(tied)[1] == tied.vocab_size * tied.dim


def test_presets_match_published_parameter_counts():
    # Exact totals of the released checkpoints (sum of numel of their safetensors).
    published = {"1B": 1_235_814_400, "3B": 3_212_749_824, "7B": 6_738_415_616, "8B": 8_030_261_248}
    for name, total in published.items():
        assert param_counts(preset(name))[0] == total, name


def test_flops_per_token_against_torchs_flop_counter(monkeypatch):
    """The model-FLOPs count against torch's FlopCounterMode on a real forward + backward: the matmuls
    (blocks and head) exactly; attention, run as explicit scores (which the counter sees as batched
    matmuls over the dense S x S), halved to its causal share."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(attention, "resolve_backend", lambda *args, **kwargs: "eager")
    cfg = dataclasses.replace(preset("tiny"), head_dim=32)  # attention width 128 != dim 64: the count uses heads x head_dim
    m = build(cfg).train()
    b, s = 2, 48
    with FlopCounterMode(display=False) as counter:
        m(tokens(b, s)).float().sum().backward()
    per_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention_flops = per_op.pop("aten.bmm")
    matmuls = sum(per_op.values())
    _, non_embedding = param_counts(cfg)
    norms_and_biases = cfg.n_layers * 2 * cfg.dim + cfg.dim  # parameters that are no matmul weight
    assert matmuls == 6 * (non_embedding - norms_and_biases + cfg.vocab_size * cfg.dim) * b * s
    ours = flops_per_token(cfg, s) - 6 * (non_embedding + cfg.vocab_size * cfg.dim)
    assert ours * b * s == pytest.approx(attention_flops * (s + 1) / (2 * s), rel=1e-9)
    # Sliding windows attend to fewer keys; activation checkpointing adds the blocks' forward.
    sliding = dataclasses.replace(preset("gemma3-270m"), vocab_size=512)
    assert flops_per_token(sliding, 8192) < flops_per_token(dataclasses.replace(sliding, layer_types=["full"] * 18), 8192)
    full = preset("8B")
    assert hardware_flops_per_token(full, 4096, True) - flops_per_token(full, 4096) == pytest.approx(
        (flops_per_token(full, 4096) - 6 * full.vocab_size * full.dim) / 3)


def rope_inv_freq(theta, head_dim, scaling):
    return rope_init(theta, head_dim, scaling)[0]


def test_rope_llama3_scaling_matches_transformers():
    for name in ("8B", "1B"):  # factor 8 and 32
        cfg = preset(name)
        hf_cfg = HFLlamaConfig(**to_hf_config(cfg))
        hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
        assert torch.equal(rope_inv_freq(cfg.rope_theta, cfg.head_size, cfg.rope_scaling), hf_inv_freq)
        assert not torch.equal(rope_inv_freq(cfg.rope_theta, cfg.head_size, None), hf_inv_freq)
    cfg = preset("7B")
    hf_inv_freq, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(HFLlamaConfig(**to_hf_config(cfg)))
    assert torch.equal(rope_inv_freq(cfg.rope_theta, cfg.head_size, None), hf_inv_freq)


@pytest.mark.parametrize("backend", ["flash_attn", "flex"])
def test_gpu_backends_fall_back_to_sdpa_on_cpu(backend, monkeypatch):
    monkeypatch.setattr(attention, "_warned", set())
    ref = build(preset("tiny"))
    m = build(dataclasses.replace(preset("tiny"), attention=backend))
    t, doc_ids = tokens(2, 16), torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    with pytest.warns(UserWarning, match=f"attention '{backend}'"):
        out = m(t, doc_ids)
    assert torch.equal(out, ref(t, doc_ids))
    out.float().logsumexp(-1).mean().backward()  # trains on CPU (flex has no CPU backward itself)
    assert all(p.grad is not None for p in m.parameters())


def test_flash_attn_rejects_fp32():
    q = torch.randn(1, 4, 2, 8)
    ctx = attention.AttentionContext(torch.ones(1, 4, 8), torch.zeros(1, 4, 8), "flash_attn", None)
    with pytest.raises(UserError, match="bf16"):
        attention.attend(q, q, q, ctx)


def test_varlen_layout_for_flash_attn():
    info = attention._varlen_info(torch.tensor([[0, 0, 1, 1, 1], [7, 7, 7, 7, 7]]))
    assert info.cu_seqlens.tolist() == [0, 2, 5, 10] and info.cu_seqlens.dtype == torch.int32
    assert info.max_seqlen == 5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_matches_dense_mask():
    # Runs FlexAttention's forward (which exists on CPU) with the block mask the GPU path builds.
    from torch.nn.attention.flex_attention import flex_attention
    doc_ids = torch.tensor([[0] * 50 + [1] * 78, [0] * 128])
    q, k, v = (torch.randn(2, 4, 128, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    block_mask = attention._flex_block_mask(doc_ids, 2, 128, torch.device("cpu"), None)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention.doc_causal_mask(doc_ids))
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=block_mask), dense, atol=1e-5, rtol=0)


def test_config_errors():
    with pytest.raises(UserError, match="valid presets: tiny, 125M"):
        preset("13B")
    cases = [({"dim": 66}, "not divisible by n_heads"), ({"n_kv_heads": 3}, "multiple of n_kv_heads"),
             ({"attention": "xformers"}, "use one of sdpa, flash_attn, flex"),
             ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling lacks"),
             ({"rope_scaling": {"factor": 8.0}}, "is not supported; use Llama-3 scaling"),
             ({"rope_theta": "1e4"}, "rope_theta must be a positive number")]
    for change, message in cases:
        with pytest.raises(UserError, match=message):
            dataclasses.replace(preset("tiny"), **change).validate()
    with pytest.raises(UserError, match="unknown model keys"):
        ModelConfig.from_dict({**preset("tiny").to_dict(), "n_expert": 8})


def test_training_reduces_loss():
    torch.manual_seed(0)
    m = build(preset("tiny")).train()
    batch = tokens(4, 33)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    doc_ids = torch.tensor([[0] * 12 + [1] * 20] * 4)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = m(inputs, doc_ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(512), abs=0.3)  # small init: near-uniform predictions
    assert losses[-1] < 1.5, losses  # memorizing 128 tokens: measured 6.26 -> 0.65


def test_the_residual_stream_runs_in_the_compute_dtype_under_autocast():
    """Under bf16 autocast the fp32 embedding's output is cast to bf16, so every block reads and adds a
    bf16 stream (as FSDP2's and DeepSpeed's bf16 weights give); without autocast it stays fp32."""
    torch.manual_seed(0)
    model = Decoder(preset("tiny"))
    model.init_weights()
    seen = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    tokens = torch.randint(0, 512, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.hidden(tokens)
    model.hidden(tokens)
    n = len(model.layers)
    assert seen == [torch.bfloat16] * n + [torch.float32] * n
