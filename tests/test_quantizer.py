"""Tests for baseq.quant.quantizer (fake quantizers)."""

import pytest
import torch

from baseq.errors import BaseqError
from baseq.quant.quantizer import (
    ActQuantizer,
    KVQuantizer,
    WeightQuantConfig,
    fake_quantize_weight,
    round_ste,
    weight_qparams,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _levels_per_row(t):
    return [torch.unique(r).numel() for r in t.reshape(-1, t.shape[-1])]


# ------------------------------------------------------------------ round_ste


def test_round_ste_forward_and_grad():
    x = torch.tensor([0.2, 0.7, -1.4, 2.5], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    (y * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0, 4.0]))


# ------------------------------------------------------------------ ActQuantizer


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_act_exactly_2b_levels_per_token(bits):
    x = torch.rand(6, 4096, generator=_gen(bits)) * 6 - 2  # uniform, asymmetric range
    y = ActQuantizer(bits=bits)(x)
    assert y.shape == x.shape
    assert all(n == 2**bits for n in _levels_per_row(y))


@pytest.mark.parametrize("clip", [1.0, 0.8])
def test_act_never_more_than_2b_levels(clip):
    x = torch.randn(3, 5, 1003, generator=_gen(1)) * torch.linspace(0.1, 10, 5)[:, None]
    y = ActQuantizer(bits=3, clip_ratio=clip)(x)
    assert all(n <= 8 for n in _levels_per_row(y))


def test_act_error_bounded_by_half_step():
    x = torch.randn(7, 33, generator=_gen(2))
    y = ActQuantizer(bits=4)(x)
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 15
    # integer zero point shifts the grid by < step/2, so the error stays within step/2
    assert ((y - x).abs() <= step / 2 + 1e-5).all()
    assert ((y - x).abs() > step / 4).any()  # it is really quantized


def test_act_per_token_scales_differ():
    x = torch.randn(2, 500, generator=_gen(3))
    x[1] *= 100.0
    y = ActQuantizer(bits=4)(x)
    d0 = torch.unique(y[0]).diff().min()
    d1 = torch.unique(y[1]).diff().min()
    assert d1 > 50 * d0
    # small token keeps a small error although it shares the tensor with a large one
    assert (y[0] - x[0]).abs().max() < 0.5


def test_act_clipping_reduces_range():
    x = torch.randn(4, 257, generator=_gen(4))
    y = ActQuantizer(bits=4, clip_ratio=0.7)(x)
    assert (y.abs().amax(-1) < x.abs().amax(-1)).all()
    y_lc = ActQuantizer(bits=4, learnable_clip=True, beta_init=0.0)(x)  # c = 0.5
    assert (y_lc.abs().amax(-1) < 0.8 * x.abs().amax(-1)).all()


def test_act_learnable_clip_gradients():
    q = ActQuantizer(bits=4, learnable_clip=True)
    assert q.beta.shape == () and q.beta.item() == pytest.approx(2.0)
    assert [n for n, _ in q.named_parameters()] == ["beta"]
    x = torch.randn(5, 64, generator=_gen(5), requires_grad=True)
    target = torch.randn(5, 64, generator=_gen(6))
    loss = ((q(x) - target) ** 2).sum()
    loss.backward()
    assert q.beta.grad is not None and q.beta.grad.abs().item() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_act_fixed_clip_has_no_params():
    q = ActQuantizer(bits=4, clip_ratio=0.9)
    assert list(q.parameters()) == []
    assert q.beta is None


def test_act_groups():
    q = ActQuantizer(bits=4, learnable_clip=True, groups=4, beta_init=3.0)
    assert q.beta.shape == (4,)
    x = torch.randn(3, 64, generator=_gen(7))
    x[:, :16] *= 1000.0
    y = q(x)
    # group 2 (unscaled) is quantized independently of the huge group 0
    assert (y[:, 16:] - x[:, 16:]).abs().max() < 1.0
    for g in range(4):
        assert all(n <= 16 for n in _levels_per_row(y[:, 16 * g:16 * (g + 1)]))
    y.sum().backward()
    assert (q.beta.grad != 0).all()
    with pytest.raises(BaseqError):
        q(torch.randn(2, 30))


def test_act_dtype_and_identity():
    x = torch.randn(3, 40, generator=_gen(8)).to(torch.bfloat16)
    assert ActQuantizer(bits=4)(x).dtype == torch.bfloat16
    q16 = ActQuantizer(bits=16)
    assert not q16.enabled and ActQuantizer(bits=4).enabled
    assert q16(x) is x
    assert "bits=4" in repr(ActQuantizer(bits=4))


def test_act_constant_token_is_finite():
    x = torch.zeros(2, 10)
    x[1] = 3.0
    y = ActQuantizer(bits=4)(x)
    assert torch.isfinite(y).all()
    assert torch.allclose(y, x, atol=1e-4)


@pytest.mark.parametrize("bits", [1, 9, 0, 15, 32, 4.0, True])
def test_bad_bits_raise(bits):
    with pytest.raises(BaseqError):
        ActQuantizer(bits=bits)
    with pytest.raises(BaseqError):
        KVQuantizer(2, bits=bits)
    with pytest.raises(BaseqError):
        WeightQuantConfig(bits=bits)


def test_bad_clip_and_groups_raise():
    with pytest.raises(BaseqError):
        ActQuantizer(clip_ratio=0.0)
    with pytest.raises(BaseqError):
        ActQuantizer(clip_ratio=1.5)
    with pytest.raises(BaseqError):
        ActQuantizer(groups=0)
    with pytest.raises(BaseqError):
        WeightQuantConfig(group_size=-1)


# ------------------------------------------------------------------ KVQuantizer


def test_kv_per_head_independent():
    b, h, t, d = 2, 3, 7, 24
    x = torch.randn(b, h, t, d, generator=_gen(9))
    x[:, 0] *= 1000.0  # head 0 huge, heads 1, 2 small
    q = KVQuantizer(h, bits=4)
    y = q(x)
    assert y.shape == x.shape
    err_small = (y[:, 1:] - x[:, 1:]).abs().max()
    assert err_small < 0.5  # would be ~100 if scales were shared with head 0
    # same token in different heads gets different scales (quantization step)
    step0 = torch.unique(y[0, 0, 0]).diff().min()
    step1 = torch.unique(y[0, 1, 0]).diff().min()
    assert step0 > 100 * step1
    # per (b, h, t) at most 16 levels
    assert all(n <= 16 for n in _levels_per_row(y))


def test_kv_per_token_scales():
    x = torch.randn(1, 2, 5, 64, generator=_gen(10))
    x[0, :, 3] *= 50
    y = KVQuantizer(2, bits=4)(x)
    assert (y[0, :, 0] - x[0, :, 0]).abs().max() < 0.3
    assert all(n == 16 for n in _levels_per_row(KVQuantizer(2, bits=4)(torch.rand(1, 2, 3, 2000, generator=_gen(11)))))


def test_kv_learnable_beta_per_head():
    q = KVQuantizer(4, bits=3, learnable_clip=True, beta_init=1.5)
    assert q.beta.shape == (4,)
    assert torch.allclose(q.beta.detach(), torch.full((4,), 1.5))
    x = torch.randn(2, 4, 6, 16, generator=_gen(12), requires_grad=True)
    ((q(x) - x.detach() * 0.9) ** 2).sum().backward()
    assert (q.beta.grad != 0).all()
    assert x.grad.abs().sum() > 0
    assert "num_kv_heads=4" in repr(q)


def test_kv_clip_identity_and_shape_errors():
    x = torch.randn(1, 2, 3, 32, generator=_gen(13))
    y = KVQuantizer(2, bits=4, clip_ratio=0.6)(x)
    assert (y.abs().amax(-1) < x.abs().amax(-1)).all()
    q16 = KVQuantizer(2, bits=16)
    assert q16(x) is x and not q16.enabled
    with pytest.raises(BaseqError):
        KVQuantizer(3, bits=4)(x)
    with pytest.raises(BaseqError):
        KVQuantizer(2, bits=4)(x[0])
    xh = x.half()
    assert KVQuantizer(2, bits=4)(xh).dtype == torch.float16


# ------------------------------------------------------------------ weights


def _levels(w, group_size):
    out, inf = w.shape
    gs = group_size or inf
    return [torch.unique(g).numel() for g in w.reshape(out, inf // gs, gs).reshape(-1, gs)]


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [0, 16, 32])
@pytest.mark.parametrize("bits", [2, 4])
def test_weight_levels(sym, group_size, bits):
    w = torch.randn(36, 160, generator=_gen(14))
    cfg = WeightQuantConfig(bits=bits, group_size=group_size, sym=sym, clip_search=False)
    wq = fake_quantize_weight(w, cfg)
    assert wq.shape == w.shape
    lv = _levels(wq, group_size)
    assert max(lv) <= 2**bits
    # the levels are actually used (small groups cannot fill all of them)
    assert sum(lv) / len(lv) > 0.5 * 2**bits
    if group_size == 0 and not sym:
        assert min(lv) >= 2**bits - 2
    scale, zero = weight_qparams(w, cfg)
    ng = 1 if group_size == 0 else 160 // group_size
    assert scale.shape == zero.shape == (36, ng)
    assert torch.equal(zero, torch.round(zero))
    assert (zero >= 0).all() and (zero <= 2**bits - 1).all()
    if sym:
        assert (zero == 2 ** (bits - 1)).all()


def test_weight_sym_vs_asym():
    w = torch.rand(20, 48, generator=_gen(15)) + 0.5  # all positive rows
    asym = fake_quantize_weight(w, WeightQuantConfig(bits=4, sym=False, clip_search=False))
    sym = fake_quantize_weight(w, WeightQuantConfig(bits=4, sym=True, clip_search=False))
    # symmetric grids are symmetric around 0: q values are integer multiples of the scale
    s, z = weight_qparams(w, WeightQuantConfig(bits=4, sym=True, clip_search=False))
    k = sym / s
    assert torch.allclose(k, torch.round(k), atol=1e-4)
    assert (k >= -8).all() and (k <= 7).all()
    # symmetric max is exact up to the scale's rounding to a float16 value (relative 2**-11)
    assert torch.allclose(sym.amax(1), w.amax(1), rtol=2**-10, atol=0)
    assert torch.equal(s, s.half().float())  # scales are float16 values: the packed format stores them losslessly
    # for all-positive rows asymmetric is more accurate (range includes 0 either way)
    assert ((asym - w) ** 2).mean() < ((sym - w) ** 2).mean()
    # asym zero is 0 for all-positive rows (range [0, max])
    _, za = weight_qparams(w, WeightQuantConfig(bits=4, sym=False, clip_search=False))
    assert (za == 0).all()


def test_weight_zero_rows_and_exact_zero():
    w = torch.randn(5, 32, generator=_gen(16))
    w[2] = 0
    w[3, :7] = 0
    for sym in (False, True):
        wq = fake_quantize_weight(w, WeightQuantConfig(bits=4, sym=sym))
        assert torch.isfinite(wq).all()
        assert (wq[2] == 0).all()
        assert (wq[3, :7] == 0).all()  # zero is exactly representable


def test_weight_group_size_must_divide():
    w = torch.randn(20, 80)
    with pytest.raises(BaseqError):
        fake_quantize_weight(w, WeightQuantConfig(bits=4, group_size=32))
    with pytest.raises(BaseqError):
        weight_qparams(w, WeightQuantConfig(bits=4, group_size=48))
    fake_quantize_weight(w, WeightQuantConfig(bits=4, group_size=16))  # 80 = 5 * 16: fine


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits,group_size", [(4, 0), (3, 32), (2, 0)])
def test_clip_search_not_worse(sym, bits, group_size):
    g = _gen(17)
    # heavy-tailed weights (where clipping pays off)
    w = torch.randn(36, 96, generator=g) ** 3
    base = WeightQuantConfig(bits=bits, group_size=group_size, sym=sym, clip_search=False)
    srch = WeightQuantConfig(bits=bits, group_size=group_size, sym=sym, clip_search=True)
    e0 = ((fake_quantize_weight(w, base) - w) ** 2).sum()
    e1 = ((fake_quantize_weight(w, srch) - w) ** 2).sum()
    assert e1 < e0


@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_in_slabs_of_rows_gives_the_same_choice(sym, monkeypatch):
    """The clip search walks the rows in cache-sized slabs: every row's scale and zero equal those of one pass over
    the whole matrix (slab bigger than it), for slabs that do and do not divide the row count, dead rows included."""
    from baseq.quant import quantizer

    w = torch.randn(37, 301, generator=_gen(19)) ** 3
    w[5] = 0.0
    cfg = WeightQuantConfig(bits=4, sym=sym, clip_search=True)
    monkeypatch.setattr(quantizer, "CLIP_SEARCH_SLAB", w.numel() * 2)
    whole = weight_qparams(w, cfg)
    for rows in (1, 4, 10):
        monkeypatch.setattr(quantizer, "CLIP_SEARCH_SLAB", rows * w.shape[1])
        s, z = weight_qparams(w, cfg)
        assert torch.equal(s, whole[0]) and torch.equal(z, whole[1]), rows
    assert len(torch.unique(whole[0])) > 30  # the rows chose differently: the comparison has something to compare


def test_fake_quantize_weight_ste_and_dtype():
    w = torch.randn(20, 48, generator=_gen(18)).requires_grad_(True)
    cfg = WeightQuantConfig(bits=4, clip_search=False)
    gout = torch.randn(20, 48, generator=_gen(19))
    (fake_quantize_weight(w, cfg) * gout).sum().backward()
    assert torch.allclose(w.grad, gout)  # no clipping -> identity gradient
    # with clip search, clipped entries get zero grad, the rest identity
    w.grad = None
    fake_quantize_weight(w, WeightQuantConfig(bits=2, clip_search=True)).sum().backward()
    frac_one = (w.grad == 1).float().mean()
    assert ((w.grad == 0) | (w.grad == 1)).all() and frac_one > 0.8
    wb = w.detach().to(torch.bfloat16)
    assert fake_quantize_weight(wb, cfg).dtype == torch.bfloat16
    cfg16 = WeightQuantConfig(bits=16)
    assert not cfg16.enabled
    assert fake_quantize_weight(wb, cfg16) is wb


@pytest.mark.parametrize("bits", [16, 8])
def test_embedding_rounding_by_row_slabs_is_the_whole_table_rounding(bits):
    """quantize_embedding_ works a slab of rows at a time (bounded temporaries on a 151,936-row table); every row is
    rounded alone, so the result is the one-shot formula's, bit for bit, the last slab short included."""
    from baseq.quant.quantizer import embedding_scale, quantize_embedding_

    w = torch.randn(23, 9, generator=torch.Generator().manual_seed(1)) * 0.3
    w[5] *= 40  # one loud row: its scale must not leak into its slab's neighbours
    if bits == 16:
        want = w.half().float()
    else:
        s = embedding_scale(w)
        want = torch.clamp(torch.round(w / s), -127, 127) * s
    got = w.clone()
    quantize_embedding_(got, bits, rows=4)
    assert torch.equal(got, want)
    assert not torch.equal(got, w)
    with pytest.raises(BaseqError, match="16 or 8"):
        quantize_embedding_(w.clone(), 4)
