"""QuaRot's rotations leave the model's function unchanged in full precision, on tiny random Llama/Qwen2 models of
awkward shapes: fold norms, R1 and R2 fused into every block, R1 online at the two ends (the embedding table and LM
head untouched, still tied), R3/R4 online."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

from baseq.models.adapter import LlamaAdapter
from baseq.quant.qmodel import ActSpec, quantize_structure
from baseq.rotation.fuse import (OnlineRotation, ResidualRotation, RotatedEmbedding, RotatedNorm, fold_norms,
                                 rotate_model, untie_embeddings)
from baseq.rotation.hadamard import hadamard_matrix, has_hadamard
from baseq.testing import tiny_llama

REL_TOL = 1e-4  # max |Δlogit| / max |logit|, fp32

# (id, tiny_llama kwargs). head_dim 12 has a Hadamard (Paley, q = 11); 10 and 6 and ffn 70 have none, so the
# rotations fall back to a block-diagonal randomized Hadamard / a dense orthogonal matrix with a warning.
SHAPES = [
    ("gqa4/2-hd12-tied", dict(hidden=48, ffn=80, heads=4, kv_heads=2)),
    ("gqa6/2-hd16-untied", dict(hidden=96, ffn=160, heads=6, kv_heads=2, head_dim=16, tied=False)),
    ("mqa3/1-hd12-ffn96", dict(hidden=48, ffn=96, heads=3, kv_heads=1, head_dim=12)),
    ("qwen2-bias-untied", dict(hidden=48, ffn=80, heads=4, kv_heads=2, qkv_bias=True, tied=False)),
    ("hd10-ffn70-qwen2", dict(hidden=48, ffn=70, heads=4, kv_heads=2, head_dim=10, qkv_bias=True)),
    ("hd6-gqa6/2", dict(hidden=48, ffn=80, heads=6, kv_heads=2, head_dim=6, layers=1)),
]


def _ids(seed: int = 0, batch: int = 2, seq: int = 20) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, seq), generator=g)


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(ids, use_cache=False).logits.float()


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


def _no_hadamard_orders(record) -> set[int]:
    return {int(m.group(1)) for w in record if (m := re.search(r"no Hadamard matrix of order n=(\d+)", str(w.message)))}


def _head_dim(kw) -> int:
    return kw.get("head_dim") or kw["hidden"] // kw["heads"]


def test_head_dim_12_has_a_hadamard_but_6_and_10_do_not():
    # the shapes above rely on this: 12 takes the fast path, 6/10/70 the fallback
    assert has_hadamard(12) and has_hadamard(48) and has_hadamard(80) and has_hadamard(96) and has_hadamard(160)
    assert not has_hadamard(6) and not has_hadamard(10) and not has_hadamard(70)


@pytest.mark.parametrize("kw", [k for _, k in SHAPES], ids=[i for i, _ in SHAPES])
def test_rotate_model_and_online_rotations_keep_logits(kw):
    model = tiny_llama(**kw)
    ids = _ids()
    ref = _logits(model, ids)
    embed0 = model.model.embed_tokens.weight.detach().clone()
    o0 = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    hd, ffn = _head_dim(kw), kw["ffn"]

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ad = rotate_model(model, seed=0)
    # R1 uses hidden (always has a Hadamard here), R2 uses head_dim: a warning exactly when head_dim has none
    assert _no_hadamard_orders(rec) == ({hd} if not has_hadamard(hd) else set())
    assert ad.shape.head_dim == hd and ad.shape.kv_heads == kw["kv_heads"]

    # the rotation really did something (an identity "rotation" would trivially pass the logits check)
    assert (model.model.layers[0].self_attn.o_proj.weight - o0).abs().max() > 0.1 * o0.abs().max()
    assert isinstance(model.model.embed_tokens, RotatedEmbedding) and isinstance(model.model.norm, RotatedNorm)
    x = model.model.embed_tokens(ids)
    assert (x - model.model.embed_tokens.embed(ids)).abs().max() > 0.1 * x.abs().max()  # the stream is rotated

    rotated = _logits(model, ids)
    assert _rel(rotated, ref) <= REL_TOL

    # every block norm weight was folded into the linears after it; the final norm keeps its weight
    for layer in ad.layers:
        assert torch.all(layer.input_layernorm.weight == 1)
        assert torch.all(layer.post_attention_layernorm.weight == 1)
    assert not torch.all(ad.final_norm.weight == 1)
    # the two ends are untouched: same embedding table, and a tied head is still the same tensor
    assert torch.equal(model.model.embed_tokens.weight, embed0)
    tied = kw.get("tied", True)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    assert model.config.tie_word_embeddings is tied

    # online R3 (queries/keys) and R4 (down_proj input, inverse fused into W_down) at 16 bits: still the same model
    down0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        quantize_structure(model, ActSpec(a_bits=16, kv_bits=16))
    expected = {n for n in (hd, ffn) if not has_hadamard(n)}
    assert _no_hadamard_orders(rec) == expected
    structured = _logits(model, ids)
    assert _rel(structured, ref) <= REL_TOL
    # R4 was really applied: the online rotation sits before down_proj and its inverse changed W_down
    down = model.model.layers[0].mlp.down_proj
    assert down.act is not None and down.act.rotation is not None
    assert down.act.rotation.fast == has_hadamard(ffn)
    assert (down.weight - down0).abs().max() > 0.1 * down0.abs().max()
    assert model.model.layers[0].self_attn.kv_point.rotation is not None


def test_rotation_without_warning_filter_still_exact_for_odd_head_dim():
    """head_dim 10 (no construction): pytest.warns sees the fallback warning and the function is unchanged."""
    model = tiny_llama(hidden=48, ffn=80, heads=4, kv_heads=2, head_dim=10, layers=1, seed=3)
    ids = _ids(1)
    ref = _logits(model, ids)
    with pytest.warns(UserWarning, match=r"no Hadamard matrix of order n=10"):
        rotate_model(model, seed=5)
    assert _rel(_logits(model, ids), ref) <= REL_TOL


@pytest.mark.parametrize("tied", [True, False])
def test_untie_and_fold_norms_alone_are_exact(tied):
    model = tiny_llama(hidden=48, ffn=80, heads=4, kv_heads=2, layers=2, tied=tied, seed=1)
    ids = _ids(2)
    ref = _logits(model, ids)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    norms_before = [layer.input_layernorm.weight.clone() for layer in model.model.layers]
    assert not all(torch.all(n == 1) for n in norms_before)  # the builder randomises norms, so folding matters

    untie_embeddings(model)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():  # untied for real: changing the embeddings no longer changes the head
        head = model.lm_head.weight.clone()
        model.model.embed_tokens.weight[0].add_(1.0)
        assert torch.equal(model.lm_head.weight, head)
        model.model.embed_tokens.weight[0].sub_(1.0)

    ad = LlamaAdapter(model)
    fold_norms(ad)
    for layer in ad.layers:
        assert torch.all(layer.input_layernorm.weight == 1) and torch.all(layer.post_attention_layernorm.weight == 1)
    assert _rel(_logits(model, ids), ref) <= REL_TOL


def test_rotate_model_is_seeded():
    a, b, c = (tiny_llama(layers=1, seed=0) for _ in range(3))
    rotate_model(a, seed=7)
    rotate_model(b, seed=7)
    rotate_model(c, seed=8)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    ids = _ids(3)
    assert torch.equal(a.model.embed_tokens(ids), b.model.embed_tokens(ids))
    assert not torch.equal(a.model.embed_tokens(ids), c.model.embed_tokens(ids))


@pytest.mark.parametrize("n", [48, 576, 96, 10])
def test_residual_rotation_is_the_seeded_matrix_and_its_inverse(n):
    """The online R1 (fast transform when a Hadamard exists, dense otherwise) is exactly x R1 and x R1ᵀ."""
    from baseq.rotation.hadamard import orthogonal_matrix

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rot = ResidualRotation(n, seed=4)
        q = orthogonal_matrix(n, seed=4)
    assert rot.fast == has_hadamard(n)
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(rot(x), x @ q, atol=1e-12)
    assert torch.allclose(rot.inverse(x), x @ q.T, atol=1e-12)
    assert torch.allclose(rot.inverse(rot(x)), x, atol=1e-12)
    assert "matrix" not in rot.state_dict()  # rebuilt from (n, seed), never saved
    learned = ResidualRotation(n, matrix=q)
    assert torch.allclose(learned(x), x @ q, atol=1e-6) and "matrix" in learned.state_dict()


# ------------------------------------------------------------------------------------------- OnlineRotation


def _as_matrix(rot: OnlineRotation, n: int) -> torch.Tensor:
    """The matrix A of ``x ↦ x A`` (rows of A are the images of the unit vectors)."""
    return rot(torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [12, 16, 48, 80, 96, 160])
def test_online_rotation_fast_path(n):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning for sizes with a Hadamard
        rot = OnlineRotation(n, seed=3)
    assert rot.fast and rot.matrix is None
    assert "matrix" not in rot.state_dict()  # nothing to save: rebuilt from n
    A = _as_matrix(rot, n)
    torch.testing.assert_close(A @ A.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(A, hadamard_matrix(n).T / math.sqrt(n), atol=1e-12, rtol=0)
    x = torch.randn(3, 5, n)
    y = rot(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y, x)


@pytest.mark.parametrize("n", [6, 10, 70, 9])
def test_online_rotation_dense_fallback(n):
    with pytest.warns(UserWarning, match=rf"no Hadamard matrix of order n={n}"):
        rot = OnlineRotation(n, seed=3)
    assert not rot.fast
    assert rot.matrix is not None and rot.matrix.shape == (n, n)
    assert "matrix" not in rot.state_dict()  # rebuilt from (n, seed) at load, never saved
    A = _as_matrix(rot, n)
    torch.testing.assert_close(A, rot.matrix.double(), atol=0, rtol=0)
    torch.testing.assert_close(A @ A.T, torch.eye(n, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (A - torch.eye(n, dtype=torch.float64)).abs().max() > 0.1  # not the identity
    x = torch.randn(4, n)
    torch.testing.assert_close(rot(x).norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning):
        again = OnlineRotation(n, seed=3)
    assert torch.equal(again.matrix, rot.matrix)  # seeded: a reload rebuilds the same structure


# ------------------------------------------------------------------------------------------- real model


@pytest.mark.integration
def test_real_model_rotated_ppl_matches():
    from baseq.data import eval_windows
    from baseq.eval.perplexity import perplexity
    from baseq.models.loading import load_model

    model, tokenizer = load_model()  # the embedded SmolLM2-135M, real cache (see conftest)
    windows = eval_windows(tokenizer, "wiki", 128, 2)
    assert windows.shape == (2, 128)
    ppl_fp = perplexity(model, windows, batch_size=2, progress=False)
    rotate_model(model, seed=0)
    ppl_rot = perplexity(model, windows, batch_size=2, progress=False)
    quantize_structure(model, ActSpec(a_bits=16, kv_bits=16))
    ppl_struct = perplexity(model, windows, batch_size=2, progress=False)
    assert math.isfinite(ppl_fp) and 2 < ppl_fp < 100
    assert abs(ppl_rot / ppl_fp - 1) <= 1e-3, (ppl_fp, ppl_rot)
    assert abs(ppl_struct / ppl_fp - 1) <= 1e-3, (ppl_fp, ppl_struct)
