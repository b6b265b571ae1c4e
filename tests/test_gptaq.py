"""Asymmetric GPTQ (GPTAQ-style): its statistics, its least-squares target, and the stacked GPTQ stage."""

from __future__ import annotations

import copy

import pytest
import torch

from baseq.calibrate.pipeline import build_stages
from baseq.calibrate.stages import SEQUENTIAL, GPTQStage, group_inputs
from baseq.config import QuantizeConfig
from baseq.errors import BaseqError
from baseq.models.adapter import LlamaAdapter
from baseq.quant.gptaq import AsymmetricStats, asymmetric_target
from baseq.quant.gptq import GPTQ
from baseq.quant.quantizer import WeightQuantConfig
from baseq.testing import tiny_block_context


def test_stats_are_the_sums_of_their_definitions():
    g = torch.Generator().manual_seed(0)
    xq, xf = torch.randn(3, 10, 7, generator=g), torch.randn(3, 10, 7, generator=g)
    st = AsymmetricStats(7)
    st.add_batch(xq[:1], xf[:1])
    st.add_batch(xq[1:], xf[1:])
    a, b = xq.reshape(-1, 7).double(), xf.reshape(-1, 7).double()
    assert st.nsamples == 30
    torch.testing.assert_close(st.H.double(), a.T @ a, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(st.C.double(), (b - a).T @ a, rtol=1e-5, atol=1e-4)
    with pytest.raises(BaseqError, match="same shape"):
        st.add_batch(xq, xf[:, :, :6])


def test_target_is_the_least_squares_fit_to_the_fp_output():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 9, generator=g, dtype=torch.float64)
    xq = x + 0.3 * torch.randn(400, 9, generator=g, dtype=torch.float64)  # noisy "quantized" inputs
    w = torch.randn(5, 9, generator=g, dtype=torch.float64)
    st = AsymmetricStats(9)
    st.add_batch(xq, x)
    u = asymmetric_target(w, st.H, st.C, alpha=1.0, percdamp=0.0).double()
    grad = xq.T @ (xq @ u.T - x @ w.T)  # normal equations of min ‖X̃ Uᵀ − X Wᵀ‖²
    assert grad.abs().max() < 1e-3 * (xq.T @ (xq @ w.T - x @ w.T)).abs().max()
    loss = lambda v: (xq @ v.T - x @ w.T).pow(2).sum()  # noqa: E731
    assert loss(u) < 0.95 * loss(w)
    half = asymmetric_target(w, st.H, st.C, alpha=0.5, percdamp=0.0).double()
    torch.testing.assert_close(half, (w + u) / 2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(asymmetric_target(w, st.H, st.C, alpha=0.0), w.float())
    with pytest.raises(BaseqError, match="alpha"):
        asymmetric_target(w, st.H, st.C, alpha=-1.0)


def _ctx(seed=0, noise=0.0):
    return tiny_block_context(seed, noise)


def test_stacked_group_solve_equals_one_solve_per_linear():
    ctx = _ctx()
    ref = copy.deepcopy(ctx.layer)
    wcfg, gcfg = WeightQuantConfig(bits=4), QuantizeConfig().gptq
    GPTQStage(wcfg, gcfg).run(ctx)
    lin = LlamaAdapter.linears(ref)
    for group in SEQUENTIAL:  # the textbook way: one Hessian per group, one GPTQ per linear
        h = GPTQ(lin[group[0]])
        for xq in group_inputs(ctx, ref, group[0], ctx.q_in):
            h.add_batch(xq)
        for name in group:
            s = GPTQ(lin[name])
            s.H, s.nsamples = h.H.clone(), h.nsamples
            s.quantize(wcfg, blocksize=gcfg.blocksize, percdamp=gcfg.percdamp, act_order=gcfg.act_order,
                       static_groups=gcfg.static_groups)
    for name, m in LlamaAdapter.linears(ctx.layer).items():
        torch.testing.assert_close(m.weight, lin[name].weight, rtol=0, atol=1e-6, msg=name)
    assert {k for k in ctx.log if k.startswith("gptq_")} == {"gptq_q_k_v", "gptq_o", "gptq_gate_up", "gptq_down"}


@pytest.mark.parametrize("seed", [0, 1])
def test_gptaq_fits_the_fp_output_better_than_gptq_on_drifted_inputs(seed):
    errs = {}
    for alpha in (0.0, 1.0):
        ctx = _ctx(seed, noise=0.3)  # quantized-model inputs that drifted from the FP ones
        GPTQStage(WeightQuantConfig(bits=4), QuantizeConfig().gptq, asymmetric=alpha).run(ctx)
        errs[alpha] = (ctx.run(ctx.q_in) - ctx.fp_out).pow(2).mean().item()
    assert errs[1.0] < 0.97 * errs[0.0], errs


def test_weights_gptaq_builds_the_asymmetric_stage():
    cfg = QuantizeConfig.from_dict({"method": "baseq", "weights": "gptaq", "gptq": {"asym_alpha": 0.5}})
    gptq = build_stages(cfg)[0]
    assert isinstance(gptq, GPTQStage) and gptq.asymmetric == 0.5
    assert build_stages(QuantizeConfig(method="quarot"))[0].asymmetric == 0.0
    assert QuantizeConfig(method="quarot", weights="gptaq").label == "quarot-gptaq"
    with pytest.raises(BaseqError, match="weights must be one of"):
        QuantizeConfig(weights="awq").validate()


def test_stacked_solve_records_each_linears_scales():
    ctx = _ctx()
    GPTQStage(WeightQuantConfig(bits=4), QuantizeConfig().gptq).run(ctx)
    for name, m in LlamaAdapter.linears(ctx.layer).items():
        assert m.weight_scale.shape == (m.out_features, 1) and m.weight_zero.shape == (m.out_features, 1)
        codes = torch.round(m.weight / m.weight_scale) + m.weight_zero
        assert codes.min() >= 0 and codes.max() <= 15, name
        torch.testing.assert_close((codes - m.weight_zero) * m.weight_scale, m.weight, rtol=0, atol=1e-6)


def test_16_bit_weights_are_left_alone():
    ctx = _ctx()
    before = {n: m.weight.clone() for n, m in LlamaAdapter.linears(ctx.layer).items()}
    GPTQStage(WeightQuantConfig(bits=16), QuantizeConfig().gptq, asymmetric=0.25).run(ctx)
    assert all(torch.equal(m.weight, before[n]) for n, m in LlamaAdapter.linears(ctx.layer).items())


def test_collecting_statistics_leaves_grad_mode_and_hooks_as_they_were():
    ctx = _ctx(noise=0.1)
    torch.set_grad_enabled(True)
    GPTQStage(WeightQuantConfig(bits=4), QuantizeConfig().gptq, asymmetric=0.25).run(ctx)
    assert torch.is_grad_enabled()
    assert all(not m._forward_pre_hooks for m in ctx.layer.modules())
