"""Quantizers (fake quantization with STE) and GPTQ / RTN weight quantization."""

from baseq.quant.gptq import GPTQ, rtn_quantize_
from baseq.quant.quantizer import (
    ActQuantizer,
    KVQuantizer,
    WeightQuantConfig,
    fake_quantize_weight,
    quantize_dequantize,
    round_ste,
    weight_qparams,
)

__all__ = [
    "GPTQ",
    "rtn_quantize_",
    "ActQuantizer",
    "KVQuantizer",
    "WeightQuantConfig",
    "fake_quantize_weight",
    "quantize_dequantize",
    "round_ste",
    "weight_qparams",
]
