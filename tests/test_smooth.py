"""Channel smoothing before the rotations: exact in full precision, chosen by the quantized error, wired in."""

from __future__ import annotations

import pytest
import torch

from baseq.calibrate.pipeline import build_stages
from baseq.calibrate.smooth import SmoothStage
from baseq.config import QuantizeConfig
from baseq.errors import BaseqError
from baseq.quant.qmodel import set_quantize
from baseq.quant.quantizer import WeightQuantConfig
from baseq.rotation.smooth import PAIRS, smooth_pair_
from baseq.testing import tiny_block_context


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("kw", [{}, {"hidden": 96, "ffn": 5 * 16, "heads": 6, "kv_heads": 3, "qkv_bias": True}])
def test_smoothing_keeps_the_fp_block_function(pair, kw):
    ctx = tiny_block_context(seed=2, **kw)
    width = {"down": ctx.layer.mlp.down_proj.in_features}.get(pair, ctx.fp_in.shape[-1])
    s = torch.exp(torch.randn(width, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    smooth_pair_(ctx.layer, pair, s)
    set_quantize(ctx.layer, False)
    torch.testing.assert_close(ctx.run(ctx.fp_in), ctx.fp_out, rtol=1e-4, atol=1e-4)


def _massive_down_inputs(ctx):
    """Make a few down_proj input channels massive (as in real LLMs) by scaling up_proj rows, compensated in W_down
    so the FP function is unchanged: a case smoothing should fix."""
    s = torch.ones(ctx.layer.mlp.down_proj.in_features, dtype=torch.float64)
    s[:3] = 1 / 60.0
    smooth_pair_(ctx.layer, "down", s)


def test_stage_picks_a_smoothing_that_lowers_the_quantized_error_and_stays_exact():
    ctx = tiny_block_context(seed=3)
    _massive_down_inputs(ctx)
    stage = SmoothStage(("down",), WeightQuantConfig(bits=4))
    stage.run(ctx)
    assert ctx.log["smooth_down_alpha"] > 0 and ctx.log["smooth_down_gain"] < 0.8, ctx.log
    set_quantize(ctx.layer, False)
    torch.testing.assert_close(ctx.run(ctx.fp_in), ctx.fp_out, rtol=1e-4, atol=1e-4)


def test_config_switch():
    cfg = QuantizeConfig.from_dict({"method": "baseq", "smooth": {"points": "down,gate_up", "alpha": 0.5}})
    stage = build_stages(cfg)[0]
    assert isinstance(stage, SmoothStage) and stage.pairs == ("down", "gate_up") and stage.alpha == 0.5
    assert not any(isinstance(s, SmoothStage) for s in build_stages(QuantizeConfig()))
    with pytest.raises(BaseqError, match="smoothing runs before the rotations and method gptq has none"):
        QuantizeConfig.from_dict({"method": "gptq", "smooth": {"points": "down"}})  # refused, not dropped
    with pytest.raises(BaseqError, match="unknown smoothing point"):
        QuantizeConfig.from_dict({"smooth": {"points": "down,o"}})


def test_smoothing_with_round_to_nearest_weights_calibrates(tmp_path):
    """RTN needs no data, smoothing does: the method must calibrate (it used to run its first stage data-free and
    fail with a traceback)."""
    from baseq.calibrate.pipeline import needs_calibration, quantize_model
    from baseq.testing import byte_tokenizer, tiny_llama

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 200)
    cfg = QuantizeConfig.from_dict({"method": "quarot", "weights": "rtn", "smooth": {"points": "qkv,down"},
                                    "calib": {"data": str(text), "samples": 4, "seqlen": 32, "batch_size": 2}})
    assert needs_calibration(cfg) and not needs_calibration(QuantizeConfig.from_dict({"method": "quarot",
                                                                                       "weights": "rtn"}))
    model = tiny_llama(layers=2)
    report = quantize_model(model, byte_tokenizer(), cfg, progress=False, log_fn=lambda m: None)
    assert len(report["blocks"]) == 2 and all("smooth_down_alpha" in b for b in report["blocks"])
    assert torch.isfinite(model(torch.randint(0, 256, (1, 16))).logits).all()
