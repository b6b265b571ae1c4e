"""The fake-quantized structure: KV quantization per KV head before repeat_kv, ActPoint's shift/scale algebra,
set_quantize, 16-bit identity, and the number of activation levels."""

from __future__ import annotations

import pytest
import torch

from baseq.quant.qmodel import ActPoint, ActSpec, KVPoint, QuantLinear, QuantRMSNorm, points, quantize_structure, \
    set_quantize
from baseq.quant.quantizer import ActQuantizer
from baseq.rotation.fuse import OnlineRotation, rotate_model
from baseq.testing import tiny_llama

REL_TOL = 1e-4


def _ids(seed=0, batch=2, seq=24):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(ids, use_cache=False).logits.float()


def _rel(a, ref):
    return ((a - ref).abs().max() / ref.abs().max()).item()


class _Spy:
    """Wraps ``module.forward`` (and an activation quantizer's ``codes``, which inference uses instead) and records
    (input, fake-quantized output) of every call."""

    def __init__(self, module):
        self.calls = []
        self.orig = module.forward

        def fwd(x, *a, **k):
            y = self.orig(x, *a, **k)
            self.calls.append((x.detach().clone(), y.detach().clone()))
            return y

        module.forward = fwd
        if hasattr(module, "codes"):
            orig_codes = module.codes

            def codes(x):
                c, s = orig_codes(x)
                self.calls.append((x.detach().clone(), (c * s).to(x.dtype)))
                return c, s

            module.codes = codes


# ------------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 12), (6, 2, 16), (3, 1, 12)])
def test_kv_quantized_per_kv_head_before_repeat_kv(heads, kv_heads, head_dim):
    kw = dict(hidden=48, ffn=80, heads=heads, kv_heads=kv_heads, head_dim=head_dim, layers=2, seed=2)
    model = tiny_llama(**kw)
    quantize_structure(model, ActSpec(a_bits=16, kv_bits=4))
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.kv_point, KVPoint)
    k_spy, v_spy = _Spy(attn.kv_point.k), _Spy(attn.kv_point.v)
    ids = _ids(batch=2, seq=24)
    _logits(model, ids)

    assert len(k_spy.calls) == 1 and len(v_spy.calls) == 1
    for x, y in (k_spy.calls[0], v_spy.calls[0]):
        # the KV heads, not the query heads: quantization happens before repeat_kv
        assert x.shape == (2, kv_heads, 24, head_dim)
        assert y.shape == x.shape
        assert not torch.equal(x, y)  # really quantized at 4 bits
        # per token and per KV head: each (b, h, t) vector takes at most 16 values
        levels = torch.tensor([len(torch.unique(v)) for v in y.reshape(-1, head_dim)])
        assert levels.max() <= 16

    # per-head scales: multiply KV head 0 of the keys by 100 → head 0's codes scale, the other heads are untouched
    x, y = k_spy.calls[0]
    x2 = x.clone()
    x2[:, 0] *= 100
    y2 = attn.kv_point.k(x2)
    if kv_heads > 1:
        assert torch.equal(y2[:, 1:], y[:, 1:])
    torch.testing.assert_close(y2[:, 0], 100 * y[:, 0], rtol=1e-5, atol=1e-4)


def test_scaling_one_kv_head_in_the_model_leaves_other_heads_codes():
    """End to end: scale the k_proj rows of KV head 0 by 100; the quantized keys of head 1 do not change."""
    head_dim = 12
    model = tiny_llama(hidden=48, ffn=80, heads=4, kv_heads=2, layers=1, seed=4)
    quantize_structure(model, ActSpec(a_bits=16, kv_bits=4))
    attn = model.model.layers[0].self_attn
    spy = _Spy(attn.kv_point.k)
    ids = _ids(3)
    _logits(model, ids)
    with torch.no_grad():
        attn.k_proj.weight[:head_dim] *= 100
    _logits(model, ids)
    (x1, y1), (x2, y2) = spy.calls
    assert (x2[:, 0].abs().max() / x1[:, 0].abs().max()).item() == pytest.approx(100, rel=1e-3)
    assert torch.equal(x2[:, 1], x1[:, 1])
    assert torch.equal(y2[:, 1], y1[:, 1])
    assert not torch.equal(y2[:, 0], y1[:, 0])


def test_kv_bits_16_is_identity_and_kv_4_changes_output():
    model = tiny_llama(hidden=48, ffn=80, heads=4, kv_heads=2, layers=1, seed=5)
    ids = _ids(4)
    ref = _logits(model, ids)
    quantize_structure(model, ActSpec(a_bits=16, kv_bits=16))
    attn = model.model.layers[0].self_attn
    spy = _Spy(attn.kv_point.k)
    assert _rel(_logits(model, ids), ref) <= REL_TOL
    x, y = spy.calls[0]
    assert torch.equal(x, y)
    # same model, 4-bit KV: the output changes, but not wildly
    model4 = tiny_llama(hidden=48, ffn=80, heads=4, kv_heads=2, layers=1, seed=5)
    quantize_structure(model4, ActSpec(a_bits=16, kv_bits=4))
    out4 = _logits(model4, ids)
    assert 1e-4 < _rel(out4, ref) < 0.5


# ------------------------------------------------------------------------------------------- ActPoint


def _point(channels=12, bits=4, clip=0.9, rotation=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = ActPoint(channels, bits, clip, learnable_clip=False, rotation=rotation)
    with torch.no_grad():
        p.scale.copy_(0.5 + torch.rand(channels, generator=g))
        p.shift.copy_(torch.randn(channels, generator=g))
    x = 2 * torch.randn(2, 5, channels, generator=g) + 0.3
    return p, x


@pytest.mark.parametrize("clip", [0.9, 1.0])
def test_actpoint_is_q_of_scaled_minus_shift_plus_shift(clip):
    p, x = _point(clip=clip)
    s, b = p.scale.detach(), p.shift.detach()
    q = ActQuantizer(4, clip_ratio=clip)
    expected = q(x * s - b) + b
    y = p(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    # the shift matters (so the check above is not vacuous): Q(x·s) differs
    assert (y - q(x * s)).abs().max() > 1e-3
    # per token: ≤ 16 distinct values of y − b
    for row in (y - b).reshape(-1, 12):
        assert len(torch.unique(row)) <= 16


def test_actpoint_shift_folded_drops_plus_shift():
    p, x = _point(seed=1)
    s, b = p.scale.detach(), p.shift.detach()
    p.shift_folded.fill_(True)
    torch.testing.assert_close(p(x), ActQuantizer(4, clip_ratio=0.9)(x * s - b), rtol=0, atol=1e-6)


def test_actpoint_passthrough_when_not_quantizing():
    p, x = _point(seed=2)
    p.quantize = False
    y = p(x)
    torch.testing.assert_close(y, x * p.scale.detach(), rtol=1e-6, atol=1e-6)  # − b + b cancels
    p.shift_folded.fill_(True)
    torch.testing.assert_close(p(x), x * p.scale.detach() - p.shift.detach(), rtol=1e-6, atol=1e-6)


def test_actpoint_rotates_first():
    rot = OnlineRotation(12, seed=1)
    p, x = _point(rotation=rot, seed=3)
    s, b = p.scale.detach(), p.shift.detach()
    expected = ActQuantizer(4, clip_ratio=0.9)(rot(x) * s - b) + b
    torch.testing.assert_close(p(x), expected, rtol=0, atol=1e-6)


def test_actpoint_16_bits_is_identity_when_scale_one():
    p = ActPoint(10, 16, 0.9, learnable_clip=True, rotation=None)
    assert p.quantizer.beta is None  # no learnable clip at 16 bits
    x = torch.randn(3, 10)
    with torch.no_grad():
        p.shift.copy_(torch.randn(10))
    torch.testing.assert_close(p(x), x, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- model-level switches


def test_structure_replaces_every_block_module():
    model = tiny_llama(hidden=48, ffn=80, heads=4, kv_heads=2, layers=2, qkv_bias=True)
    ad = quantize_structure(model, ActSpec())
    for layer in ad.layers:
        assert isinstance(layer.input_layernorm, QuantRMSNorm)
        assert isinstance(layer.post_attention_layernorm, QuantRMSNorm)
        for lin in ad.linears(layer).values():
            assert isinstance(lin, QuantLinear) and lin.bias is not None
        assert layer.self_attn.o_proj.act is not None and layer.mlp.down_proj.act is not None
        assert layer.self_attn.q_proj.act is None
    # 4 activation points + 1 KV point per block
    pts = points(model)
    assert sum(isinstance(p, ActPoint) for p in pts) == 4 * 2
    assert sum(isinstance(p, KVPoint) for p in pts) == 2
    assert model.config._attn_implementation == "baseq"


def test_set_quantize_toggles_every_point():
    kw = dict(hidden=48, ffn=80, heads=4, kv_heads=2, layers=2, seed=6)
    fp = tiny_llama(**kw)
    ids = _ids(5)
    ref = _logits(fp, ids)
    model = tiny_llama(**kw)
    rotate_model(model)
    quantize_structure(model, ActSpec(a_bits=4, kv_bits=4))
    pts = points(model)
    assert len(pts) == 10
    assert all(p.quantize for p in pts)
    quantized = _logits(model, ids)
    assert _rel(quantized, ref) > 1e-3

    set_quantize(model, False)
    assert not any(p.quantize for p in pts)
    assert _rel(_logits(model, ids), ref) <= REL_TOL  # rotations stay, and they are exact

    set_quantize(model.model.layers[1], True)  # a sub-module: only its points
    assert [p.quantize for p in pts] == [False] * 5 + [True] * 5

    set_quantize(model, True)
    assert all(p.quantize for p in pts)
    assert torch.equal(_logits(model, ids), quantized)


@pytest.mark.parametrize("kw", [dict(hidden=48, ffn=80, heads=4, kv_heads=2),
                                dict(hidden=96, ffn=96, heads=6, kv_heads=2, head_dim=16, tied=False, qkv_bias=True)])
def test_16_bit_structure_equals_fp(kw):
    fp = tiny_llama(layers=2, **kw)
    ids = _ids(6)
    ref = _logits(fp, ids)
    quantize_structure(fp, ActSpec(a_bits=16, kv_bits=16))
    assert all(not p.quantizer.enabled for p in points(fp) if isinstance(p, ActPoint))
    assert all(not p.k.enabled and not p.v.enabled for p in points(fp) if isinstance(p, KVPoint))
    assert _rel(_logits(fp, ids), ref) <= REL_TOL


# ------------------------------------------------------------------------------------------- levels


def _grid_steps(levels: torch.Tensor) -> torch.Tensor:
    """Distances of sorted levels from the lowest one, in units of the smallest gap."""
    return (levels - levels[0]) / levels.diff().min()


def test_o_proj_input_levels_on_random_model_at_most_16_on_one_grid():
    """a_bits=4 on a random rotated model: per token at most 2^4 values, all on one evenly spaced grid of ≤ 16
    points. (Which inner codes are used depends on the data: a token's sparse tails can leave some empty; see the
    next test for a case where all 16 are populated.)"""
    model = tiny_llama(hidden=96, ffn=160, heads=6, kv_heads=2, head_dim=16, layers=1, seed=7)
    rotate_model(model)
    quantize_structure(model, ActSpec(a_bits=4, kv_bits=4))
    spy = _Spy(model.model.layers[0].self_attn.o_proj.act.quantizer)
    _logits(model, _ids(7, batch=2, seq=16))
    (x, y), = spy.calls
    assert y.shape == (2, 16, 96) and not torch.equal(x, y)
    counts = []
    for row in y.reshape(-1, 96):
        levels = torch.unique(row)
        counts.append(len(levels))
        steps = _grid_steps(levels)
        torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)  # integer multiples of the step
        assert steps[-1].round() <= 15
    assert max(counts) <= 16 and min(counts) >= 8


@pytest.mark.parametrize("a_bits", [4, 2, 3])
def test_o_proj_input_has_exactly_2_pow_bits_levels_per_token(a_bits):
    """A constructed case where every code is populated: v_proj has zero weights and a bias spread evenly over
    [-1, 1] (Qwen2-style q/k/v biases), so every value vector, hence every attention output, is that bias. The
    o_proj input of every token then holds 32 evenly spaced values, denser than the 2^bits quantization steps of
    the (clipped) range, so each token takes exactly 2^bits distinct values."""
    model = tiny_llama(hidden=96, ffn=160, heads=6, kv_heads=2, head_dim=16, layers=1, qkv_bias=True, seed=8)
    attn = model.model.layers[0].self_attn
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        attn.v_proj.weight.zero_()
        attn.v_proj.bias.copy_(torch.linspace(-1, 1, 32)[perm])
    quantize_structure(model, ActSpec(a_bits=a_bits, kv_bits=16, a_clip=0.9))
    spy = _Spy(attn.o_proj.act.quantizer)
    _logits(model, _ids(8, batch=2, seq=12))
    (x, y), = spy.calls
    assert x.shape == (2, 12, 96)
    # the input really is the repeated bias (repeat_kv: query heads 0-2 read KV head 0, 3-5 KV head 1)
    b = torch.linspace(-1, 1, 32)[perm]
    expected = torch.cat([b[:16]] * 3 + [b[16:]] * 3)
    torch.testing.assert_close(x, expected.expand_as(x), rtol=0, atol=1e-5)
    for row in y.reshape(-1, 96):
        levels = torch.unique(row)
        assert len(levels) == 2**a_bits
        torch.testing.assert_close(_grid_steps(levels), torch.arange(2.0**a_bits), rtol=0, atol=1e-3)
