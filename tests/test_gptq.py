"""Tests for baseq.quant.gptq (GPTQ and RTN)."""

import copy

import pytest
import torch
from torch import nn

from baseq.errors import BaseqError
from baseq.quant.gptq import GPTQ, rtn_quantize_
from baseq.quant.quantizer import WeightQuantConfig

IN, OUT, N = 96, 40, 1536


def _data(seed=0, n=N, in_f=IN, out_f=OUT):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, in_f, generator=g)
    a = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    x = z @ a + 0.3 * torch.randn(1, in_f, generator=g)  # correlated, non-zero mean
    x[:, [3, 17, 60]] *= 12.0  # outlier channels
    layer = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f**0.5)
    return x, layer


def _gptq(layer, x, cfg, batches=3, **kw):
    q = copy.deepcopy(layer)
    gp = GPTQ(q)
    for chunk in x.chunk(batches):
        gp.add_batch(chunk.reshape(2, -1, x.shape[1]) if chunk.shape[0] % 2 == 0 else chunk)
    loss = gp.quantize(cfg, **kw)
    return q, loss


def _rtn(layer, cfg):
    q = copy.deepcopy(layer)
    rtn_quantize_(q, cfg)
    return q


def _out_err(x, ref, q):
    with torch.no_grad():
        return float(((ref(x) - q(x)) ** 2).sum())


def _levels(w, gs):
    out, inf = w.shape
    gs = gs or inf
    return [torch.unique(r).numel() for r in w.reshape(out * (inf // gs), gs)]


@pytest.mark.parametrize(
    "group_size,act_order,static_groups",
    [(0, False, False), (0, True, False), (32, False, False), (32, False, True), (32, True, True)],
)
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_beats_rtn(group_size, act_order, static_groups, sym):
    x, layer = _data()
    cfg = WeightQuantConfig(bits=4, group_size=group_size, sym=sym, clip_search=True)
    qg, loss = _gptq(layer, x, cfg, act_order=act_order, static_groups=static_groups, blocksize=40)
    qr = _rtn(layer, cfg)
    e_gptq, e_rtn = _out_err(x, layer, qg), _out_err(x, layer, qr)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert loss > 0 and torch.isfinite(torch.tensor(loss))
    lv = _levels(qg.weight.detach(), group_size)
    assert max(lv) <= 16
    assert qg.weight.dtype == layer.weight.dtype


def test_gptq_3bit_group16_and_levels():
    x, layer = _data(seed=1)
    cfg = WeightQuantConfig(bits=3, group_size=16, clip_search=False)
    qg, _ = _gptq(layer, x, cfg, act_order=True, static_groups=True)
    assert max(_levels(qg.weight.detach(), 16)) <= 8
    assert _out_err(x, layer, qg) < 0.8 * _out_err(x, layer, _rtn(layer, cfg))


def test_gptq_loss_matches_reconstruction_scale():
    # the GPTQ loss is a (local) estimate of the output error, so it should be within ~an order of magnitude
    x, layer = _data(seed=2)
    cfg = WeightQuantConfig(bits=4)
    qg, loss = _gptq(layer, x, cfg, act_order=False)
    dw = qg.weight.detach() - layer.weight.detach()
    h = 2 * x.T @ x / x.shape[0]
    direct = float(torch.einsum("oi,ij,oj->", dw, h, dw)) / 2
    assert 0.5 * direct < loss < 2 * direct


def test_act_order_with_dynamic_groups_uses_static():
    x, layer = _data(seed=3)
    cfg = WeightQuantConfig(bits=4, group_size=32)
    with pytest.warns(UserWarning, match="static groups"):
        q_dyn, _ = _gptq(layer, x, cfg, act_order=True, static_groups=False)
    q_sta, _ = _gptq(layer, x, cfg, act_order=True, static_groups=True)
    assert torch.equal(q_dyn.weight, q_sta.weight)
    assert max(_levels(q_dyn.weight.detach(), 32)) <= 16


def test_dead_inputs():
    x, layer = _data(seed=4)
    x[:, [0, 5, 50]] = 0.0
    for gs, ao in [(0, True), (32, False), (32, True)]:
        cfg = WeightQuantConfig(bits=4, group_size=gs)
        qg, loss = _gptq(layer, x, cfg, act_order=ao, static_groups=ao)
        w = qg.weight.detach()
        assert torch.isfinite(w).all() and loss == loss
        assert (w[:, [0, 5, 50]] == 0).all()
        assert _out_err(x, layer, qg) < 0.8 * _out_err(x, layer, _rtn(layer, cfg))


def test_deterministic_and_blocksize_invariant():
    x, layer = _data(seed=5)
    cfg = WeightQuantConfig(bits=4)
    a, la = _gptq(layer, x, cfg, blocksize=128)
    b, lb = _gptq(layer, x, cfg, blocksize=128)
    assert torch.equal(a.weight, b.weight) and la == lb
    # lazy batch updates are exact: the block size only changes rounding noise
    c, _ = _gptq(layer, x, cfg, blocksize=17)
    same = (a.weight == c.weight).float().mean()
    assert same > 0.98


def test_hessian_sum_and_hook():
    x, layer = _data(seed=6, n=300)
    gp = GPTQ(layer)
    gp.add_batch(x[:100])
    gp.add_batch(x[100:].reshape(4, 50, IN))
    ref = 2 * x.T @ x / x.shape[0]
    assert gp.nsamples == 300
    assert torch.allclose(gp.H, x.T @ x, rtol=1e-5, atol=1e-3)  # unnormalised: partial sums just add up
    assert torch.allclose(gp.hessian(), ref, rtol=1e-4, atol=1e-4)
    gp2 = GPTQ(layer)
    h = layer.register_forward_hook(gp2.hook)
    with torch.no_grad():
        layer(x.reshape(3, 100, IN))
    h.remove()
    assert torch.allclose(gp2.hessian(), ref, rtol=1e-4, atol=1e-4)
    gp2.free()
    assert gp2.H is None


def test_singular_hessian_retries_damping():
    x, layer = _data(seed=7, n=30)  # rank 30 < 96 -> H singular without damping
    cfg = WeightQuantConfig(bits=4)
    with pytest.warns(RuntimeWarning, match="damping"):
        qg, loss = _gptq(layer, x, cfg, batches=1, percdamp=0.0, act_order=False)
    assert torch.isfinite(qg.weight).all()


def test_bits16_noop_and_errors():
    x, layer = _data(seed=8)
    before = layer.weight.detach().clone()
    gp = GPTQ(layer)
    gp.add_batch(x)
    assert gp.quantize(WeightQuantConfig(bits=16)) == 0.0
    rtn_quantize_(layer, WeightQuantConfig(bits=16))
    assert torch.equal(layer.weight, before)

    gp = GPTQ(layer)
    with pytest.raises(BaseqError):
        gp.quantize(WeightQuantConfig(bits=4))  # no data
    gp.add_batch(x)
    with pytest.raises(BaseqError):
        gp.quantize(WeightQuantConfig(bits=4, group_size=36))  # 36 does not divide 96
    with pytest.raises(BaseqError):
        GPTQ(layer).add_batch(torch.randn(4, 95))
    with pytest.raises(BaseqError):
        rtn_quantize_(nn.Linear(80, 20), WeightQuantConfig(bits=4, group_size=32))
    with pytest.raises(BaseqError):
        GPTQ(nn.Conv1d(3, 3, 1))


def test_rtn_levels_and_dtype():
    layer = nn.Linear(80, 20).to(torch.bfloat16)
    w0 = layer.weight.detach().clone()
    rtn_quantize_(layer, WeightQuantConfig(bits=4, group_size=16))
    w = layer.weight.detach().float()
    assert layer.weight.dtype == torch.bfloat16
    assert max(_levels(w, 16)) <= 16
    assert not torch.equal(layer.weight, w0)
    assert (w - w0.float()).abs().max() < 0.2 * w0.float().abs().max()


def test_gptq_bf16_layer():
    x, layer = _data(seed=9)
    layer = layer.to(torch.bfloat16)
    gp = GPTQ(layer)
    gp.add_batch(x.to(torch.bfloat16))
    gp.quantize(WeightQuantConfig(bits=4))
    assert layer.weight.dtype == torch.bfloat16 and torch.isfinite(layer.weight.float()).all()
