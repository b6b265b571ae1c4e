"""Weight scales learned after GPTQ: exact folding onto the integer grid, gradients, and a lower block loss."""

from __future__ import annotations

import torch

from baseq.calibrate import weight_scale
from baseq.calibrate.stages import BaseqTrainStage, GPTQStage
from baseq.config import QuantizeConfig, TrainConfig
from baseq.models.adapter import LlamaAdapter
from baseq.quant.quantizer import WeightQuantConfig

from baseq.testing import tiny_block_context


def _gptq_ctx(seed=0):
    ctx = tiny_block_context(seed)
    GPTQStage(WeightQuantConfig(bits=4), QuantizeConfig().gptq).run(ctx)
    return ctx


def test_fold_keeps_codes_and_the_trained_function():
    ctx = _gptq_ctx()
    lins = LlamaAdapter.linears(ctx.layer)
    codes_before = {n: torch.round(m.weight / m.weight_scale) + m.weight_zero for n, m in lins.items()}
    gammas = weight_scale.attach(ctx.layer)
    with torch.no_grad():
        for g in gammas:
            g.copy_(1 + 0.05 * torch.randn_like(g))
    trained = ctx.run(ctx.q_in)
    weight_scale.fold(ctx.layer)
    for n, m in lins.items():
        assert not hasattr(m, "parametrizations")
        codes = torch.round(m.weight / m.weight_scale) + m.weight_zero
        assert torch.equal(codes, codes_before[n]), n  # same integers, new scales
        assert torch.equal(m.weight_scale, m.weight_scale.half().float())  # float16 values, as stored packed
        torch.testing.assert_close((codes - m.weight_zero) * m.weight_scale, m.weight, rtol=0, atol=0)
    torch.testing.assert_close(ctx.run(ctx.q_in), trained, rtol=2e-3, atol=2e-3)  # only the fp16 rounding moved


def test_training_weight_scales_lowers_the_loss_and_gets_gradients():
    losses = {}
    for on in (False, True):
        ctx = _gptq_ctx(1)
        cfg = TrainConfig(bias=False, scale=False, clip=False, weight_scale=on, epochs=4, batch_size=2,
                          lr_weight_scale=5e-3)
        gptq_scales = [m.weight_scale.clone() for m in LlamaAdapter.linears(ctx.layer).values()]
        BaseqTrainStage(cfg).run(ctx)
        losses[on] = (ctx.log["loss_before"], ctx.log["loss_after"])
        moved = [not torch.equal(m.weight_scale, s) for m, s in zip(LlamaAdapter.linears(ctx.layer).values(),
                                                                     gptq_scales)]
        assert all(moved) if on else not any(moved)
    assert losses[False][0] == losses[False][1]  # nothing to train: unchanged
    assert losses[True][1] < 0.97 * losses[True][0], losses
