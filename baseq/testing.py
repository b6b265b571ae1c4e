"""Tiny random Llama-family models saved as local HF folders, for fast tests and examples.

Every size is configurable on purpose (odd hidden sizes, GQA, untied embeddings, q/k/v biases like Qwen2), so
code that hard-codes a shape fails here first. The tokenizer is a byte-level BPE with no merges: 256 byte tokens
plus <s>/</s>, so any text round-trips and no download is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ("<s>", "</s>")


def byte_tokenizer():
    """A 258-token byte-level tokenizer (no merges) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def tiny_llama(
    hidden: int = 48,
    ffn: int = 80,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    tied: bool = True,
    qkv_bias: bool = False,
    vocab: int = 258,
    max_positions: int = 512,
    seed: int = 0,
):
    """A random LlamaForCausalLM (or Qwen2ForCausalLM when ``qkv_bias``) in fp32, eval mode.

    Norm weights are randomised too, so norm folding is actually exercised.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    head_dim = head_dim or hidden // heads
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=257,
    )
    torch.manual_seed(seed)
    if qkv_bias:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=False, mlp_bias=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def save_tiny_llama(path: str | Path, **kwargs) -> Path:
    """Build :func:`tiny_llama` and save it, with the byte tokenizer, as a local HF folder."""
    path = Path(path)
    model = tiny_llama(**kwargs)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def tiny_block_context(seed: int = 0, noise: float = 0.0, method: str = "quarot", windows: int = 6, seqlen: int = 32,
                       **model_kw):
    """Block 0 of a rotated, quantized-structure tiny model with its FP inputs and targets, as the calibration engine
    hands it to the stages (``noise`` > 0: quantized-model inputs that drifted from the FP ones by that fraction of
    their standard deviation)."""
    from .calibrate.engine import BlockContext, capture_inputs
    from .calibrate.pipeline import act_spec
    from .config import QuantizeConfig
    from .quant.qmodel import quantize_structure, set_quantize
    from .rotation.fuse import rotate_model

    torch.manual_seed(seed)
    kw = {"hidden": 48, "ffn": 80, "heads": 4, "kv_heads": 2, "layers": 1, "seed": seed, **model_kw}
    model = tiny_llama(**kw)
    for p in model.parameters():
        p.requires_grad_(False)
    rotate_model(model, seed=0)
    ad = quantize_structure(model, act_spec(QuantizeConfig(method=method)))
    x, kwargs = capture_inputs(model, ad, torch.randint(0, 256, (windows, seqlen)), "cpu", 3)
    q = x + noise * x.std() * torch.randn_like(x) if noise else x
    layer = ad.layers[0]
    ctx = BlockContext(0, layer, x, q, None, kwargs, torch.device("cpu"), 3, progress=False)
    set_quantize(layer, False)
    ctx.fp_out = ctx.run(x)
    set_quantize(layer, True)
    return ctx
