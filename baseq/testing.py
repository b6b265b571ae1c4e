"""Tiny random models (Llama-family, and every supported family's real transformers class) saved as local HF
folders, for fast tests and examples.

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


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "olmo2")


def tiny_model(family: str, hidden: int = 96, ffn: int = 160, layers: int = 3, heads: int = 4, kv_heads: int = 2,
               head_dim: int | None = 16, vocab: int = 258, tied: bool | None = None, window: int = 8,
               max_positions: int = 512, seed: int = 0, init: float = 0.08, rope: dict | None = None):
    """A random model of the real transformers class of ``family`` (one of :data:`FAMILIES`), fp32, eval mode.

    Odd sizes and GQA by default; ``head_dim`` ≠ hidden / heads where the family allows it (Phi-3 and OLMo 2 derive
    it); every norm weight randomised (around 1 for ``w·x̂`` norms, around 0 for Gemma's ``(1 + w)·x̂``), biases
    too. Sliding-window families get a ``window``-token window (Gemma 2/3: local and global layers); Llama gets
    llama3 RoPE scaling, Phi-3 a partial rotary factor, Gemma 2 soft-capping small enough to matter. ``init``: the
    weights' std (larger than a fresh model's, so attention patterns and soft-capping are not trivial). ``rope``:
    Phi-3's RoPE parameters instead of the default ones (e.g. LongRoPE's)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                  rms_norm_eps=1e-5, bos_token_id=256, eos_token_id=257, pad_token_id=257, initializer_range=init)
    hd = {} if head_dim is None else {"head_dim": head_dim}
    local_global = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    builders = {
        "llama": lambda: (tf.LlamaForCausalLM, tf.LlamaConfig(**common, **hd, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
        "mistral": lambda: (tf.MistralForCausalLM, tf.MistralConfig(**common, **hd, sliding_window=window)),
        "qwen2": lambda: (tf.Qwen2ForCausalLM, tf.Qwen2Config(**common, **hd)),
        "qwen3": lambda: (tf.Qwen3ForCausalLM, tf.Qwen3Config(**common, **hd)),
        "phi3": lambda: (tf.Phi3ForCausalLM, tf.Phi3Config(**common, rope_parameters=rope or {
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
            **({"original_max_position_embeddings": rope["original_max_position_embeddings"]} if rope else {}))),
        "gemma": lambda: (tf.GemmaForCausalLM, tf.GemmaConfig(**common, **hd, hidden_act="gelu_pytorch_tanh")),
        "gemma2": lambda: (tf.Gemma2ForCausalLM, tf.Gemma2Config(
            **common, **hd, sliding_window=window, layer_types=local_global, query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
        "gemma3": lambda: (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(
            **common, **hd, sliding_window=window, layer_types=local_global, query_pre_attn_scalar=24)),
        "olmo2": lambda: (tf.Olmo2ForCausalLM, tf.Olmo2Config(**common)),
    }
    if rope is not None and family != "phi3":
        raise ValueError("rope: Phi-3 only")
    if family not in builders:
        raise ValueError(f"unknown family {family!r} (one of {', '.join(FAMILIES)})")
    cls, config = builders[family]()
    if tied is not None:
        config.tie_word_embeddings = tied
    if family == "qwen2":
        config.attention_bias = True  # Qwen2 has q/k/v biases by construction; kept explicit
    torch.manual_seed(seed)
    model = cls(config)
    offset = 1.0 if family.startswith("gemma") else 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 - offset + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def save_tiny_model(path: str | Path, family: str, **kwargs) -> Path:
    """Build :func:`tiny_model` and save it, with the byte tokenizer, as a local HF folder."""
    path = Path(path)
    tiny_model(family, **kwargs).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def save_tiny_llama(path: str | Path, **kwargs) -> Path:
    """Build :func:`tiny_llama` and save it, with the byte tokenizer, as a local HF folder."""
    path = Path(path)
    model = tiny_llama(**kwargs)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def save_tiny_gguf(path: str | Path, quantize: bool = True, **kwargs) -> Path:
    """Build :func:`tiny_llama` and write it as a llama GGUF file (with the byte tokenizer), as llama.cpp's converter
    would: q/k rows permuted for its RoPE layout, 2-D weights whose rows are a multiple of 32 stored as Q8_0 when
    ``quantize``. Returns the path; ``tiny_llama(**kwargs)`` rebuilds the source model."""
    import gguf
    import numpy as np

    path = Path(path)
    model, tok = tiny_llama(**kwargs), byte_tokenizer()
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])])
    w.add_token_types([1] * 256 + [3] * len(SPECIALS))
    w.add_token_scores([0.0] * (256 + len(SPECIALS)))
    w.add_token_merges([])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)

    def add(name: str, t: torch.Tensor, heads: int = 0) -> None:
        a = t.detach().float().numpy()
        if heads:  # llama.cpp's layout of q/k rows: the two halves of each head's rotary pairs interleaved
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        if quantize and a.ndim == 2 and a.shape[1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(a))

    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    add("token_embd.weight", model.model.embed_tokens.weight)
    for i, layer in enumerate(model.model.layers):
        for hf, name in parts.items():
            heads = {"self_attn.q_proj": c.num_attention_heads, "self_attn.k_proj": c.num_key_value_heads}.get(hf, 0)
            add(f"blk.{i}.{name}.weight", layer.get_submodule(hf).weight, heads)
    add("output_norm.weight", model.model.norm.weight)
    if not c.tie_word_embeddings:
        add("output.weight", model.lm_head.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
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


def folder_tensors(folder: str | Path) -> dict:
    """Every tensor of a saved folder, whichever of its safetensors shards holds it."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out
