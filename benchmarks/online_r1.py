"""Cost of the online-R1 scheme (post-norm families: R1 applied at each sublayer input) against fused R1.

Builds one random Llama of SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 KV heads, ffn 1536, vocab
49152), quantizes it twice with QuaRot W4A4KV4 and round-to-nearest weights (no calibration needed) — once with R1
fused (the Llama path) and once with R1 online at the qkv and gate/up inputs (the path Gemma 2/3 and OLMo 2 take,
forced here on the same Llama) — writes both packed folders, and runs ``baseq bench`` on the pair:

    python benchmarks/online_r1.py OUT_DIR [--threads 1] [--prefill 512] [--decode 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

import checkout  # noqa: F401,E402  (benchmarks/checkout.py: this checkout's baseq first)


def build(out: Path, online: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from baseq.calibrate.pipeline import act_spec, quantize_model
    from baseq.config import QuantizeConfig
    from baseq.models import arch
    from baseq.runtime.packed import save_packed
    from baseq.testing import byte_tokenizer

    fused = arch.ArchSpec.r1_fusable
    if online:  # the Llama spec takes R1 the post-norm families' way (exact for any family)
        arch.ArchSpec.r1_fusable = property(lambda self: False)
    try:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                             tie_word_embeddings=True, bos_token_id=256, eos_token_id=257)
        model = LlamaForCausalLM(config).eval()
        cfg = QuantizeConfig.from_dict({"method": "quarot", "weights": "rtn"})
        tok = byte_tokenizer()
        quantize_model(model, tok, cfg, progress=False, log_fn=lambda m: None)
        b = cfg.bits
        folder = out / ("online-r1" if online else "fused-r1")
        save_packed(model, tok, folder, act_spec(cfg), {"method": cfg.label, "bits": b.label}, w_bits=b.w_bits,
                    w_group=b.w_group, embed_bits=b.embed_bits, overwrite=True)
        return folder
    finally:
        arch.ArchSpec.r1_fusable = fused


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    fused, online = build(a.out, False), build(a.out, True)
    subprocess.run([sys.executable, "-m", "baseq", "bench", "--model", str(online), "--baseline", str(fused),
                    "--threads", str(a.threads), "--prefill", str(a.prefill), "--decode", str(a.decode),
                    "--repeats", str(a.repeats), "--json", str(a.out / "bench.json")], check=True)


if __name__ == "__main__":
    main()
