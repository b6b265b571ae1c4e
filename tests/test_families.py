"""Every supported architecture family, on tiny random models of its real transformers class (odd sizes, GQA,
randomised norms, head_dim ≠ hidden / heads where the family allows it):

* the rotated full-precision model computes the original function (QuaRot's R1 fused, or online for post-norm
  families);
* the packed integer runtime computes the simulated (fake-quant) model's function at W4A4KV4 and W4A8KV8;
* decoding token by token past a sliding window equals the simulated model (and the window really matters);
* everything else is refused with one line, exit code 2, nothing written.

Regressions: Qwen3's packed runtime skipped q_norm / k_norm; Gemma 3's post_attention_layernorm (a norm on the
attention output) was folded into gate/up; Gemma 2 died with "sdpa attention does not support softcap".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baseq.calibrate.pipeline import act_spec, quantize_model
from baseq.cli import main
from baseq.config import BitsConfig, CalibConfig, QuantizeConfig, TrainConfig
from baseq.errors import BaseqError
from baseq.load import load
from baseq.models.adapter import ModelAdapter
from baseq.models.arch import FAMILIES as SPECS
from baseq.quant.qmodel import set_quantize
from baseq.rotation.fuse import rotate_model
from baseq.runtime.packed import new_cache, save_packed
from baseq.testing import FAMILIES, byte_tokenizer, tiny_model

SLIDING = ("mistral", "gemma2", "gemma3")


@pytest.fixture(scope="module")
def text_file(words_file) -> str:
    return words_file


def _ids(seq: int = 24, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def test_every_family_has_a_tiny_model_and_every_tiny_model_a_family():
    assert {ModelAdapter(tiny_model(f, layers=1)).spec.family for f in FAMILIES} == {s.family for s in SPECS}


@pytest.mark.parametrize("family", FAMILIES)
def test_rotated_full_precision_model_is_the_original(family):
    model = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        ad = rotate_model(model, seed=1)
        got = model(ids).logits
    assert _rel(got, ref) < 1e-4
    # the fused families rotate the residual stream between the two ends, the post-norm ones at each sublayer input
    online_inputs = [m for m in model.modules() if type(m).__name__ == "InputPoint"]
    assert len(online_inputs) == (0 if ad.spec.r1_fusable else 2 * ad.shape.layers)


def _quantize(family: str, text_file: str, method: str, **bits):
    model = tiny_model(family)
    cfg = QuantizeConfig(method=method, bits=BitsConfig(**bits),
                         calib=CalibConfig(data=text_file, samples=4, seqlen=32, batch_size=2),
                         train=TrainConfig(epochs=1))
    quantize_model(model, byte_tokenizer(), cfg, progress=False, log_fn=lambda m: None)
    return model, cfg


@pytest.mark.parametrize("family,loss,expected", [("gemma3", "auto", "token"), ("olmo2", "auto", "token"),
                                                   ("llama", "auto", "mse"), ("qwen2", "auto", "mse"),
                                                   ("gemma3", "mse", "mse"), ("llama", "both", "both")])
def test_the_default_block_loss_is_settled_by_the_family(family, loss, expected, text_file, monkeypatch):
    import baseq.calibrate.stages as stages

    seen = []
    real = stages.block_loss
    monkeypatch.setattr(stages, "block_loss", lambda out, target, kind="mse": seen.append(kind) or real(out, target,
                                                                                                       kind))
    model = tiny_model(family, layers=1)
    cfg = QuantizeConfig(calib=CalibConfig(data=text_file, samples=2, seqlen=16, batch_size=2),
                         train=TrainConfig(epochs=1, loss=loss))
    said = []
    report = quantize_model(model, byte_tokenizer(), cfg, progress=False, log_fn=said.append)
    assert set(seen) == {expected} and report["config"]["train"]["loss"] == expected
    assert any(m.startswith("block loss: token (--train-loss auto") for m in said) == (loss == "auto"
                                                                                       and expected == "token")
    assert cfg.train.loss == loss  # the caller's config is not changed


def _save(model, cfg, out: Path) -> Path:
    b = cfg.bits
    return save_packed(model, byte_tokenizer(), out, act_spec(cfg), {"method": cfg.label, "bits": b.label},
                       w_bits=b.w_bits, w_group=b.w_group, embed_bits=b.embed_bits)


@pytest.mark.filterwarnings("ignore:no Hadamard matrix")
@pytest.mark.parametrize("method,bits", [("baseq", {}), ("quarot", {"a_bits": 8, "kv_bits": 8})],
                         ids=["W4A4KV4-baseq", "W4A8KV8-quarot"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_runtime_computes_the_simulated_model(family, method, bits, text_file, tmp_path):
    model, cfg = _quantize(family, text_file, method, **bits)
    out = _save(model, cfg, tmp_path / "packed")
    rt, _ = load(str(out))
    ids = _ids()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        got = rt(ids, use_cache=False).logits
        set_quantize(model, False)
        unquantized = model(ids, use_cache=False).logits
    assert _rel(got, ref) < 1e-6
    assert _rel(unquantized, ref) > 1e-3  # the comparison is between quantized models
    meta = json.loads((out / "baseq.json").read_text())
    spec = ModelAdapter(tiny_model(family, layers=1)).spec
    assert meta["family"] == spec.family
    assert ("r1" in meta["online_rotations"]) == (not spec.r1_fusable)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        names = {k.split(".", 2)[2] for k in f.keys() if k.startswith("layers.0.")}
    assert ("q_norm" in names) == (spec.qk_norm is not None)  # Qwen3's q/k norms are stored and applied
    assert ("post_attn_norm" in names) == bool(spec.post_norms)


@pytest.mark.parametrize("family", SLIDING)
def test_decoding_past_the_sliding_window_is_the_simulated_model(family, text_file, tmp_path):
    model, cfg = _quantize(family, text_file, "quarot", a_bits=8, kv_bits=8)
    assert model.config.sliding_window == 8
    rt, _ = load(str(_save(model, cfg, tmp_path / "packed")))
    ids = _ids(seq=24, batch=1)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        cache = new_cache(rt)
        steps = [rt(ids[:, :5], cache=cache, use_cache=True).logits]
        for i in range(5, ids.shape[1]):  # one token at a time, attention on the quantized cache's codes
            steps.append(rt(ids[:, i:i + 1], cache=cache, use_cache=True).logits)
        got = torch.cat(steps, dim=1)
        model.config.sliding_window = 1000  # the same model attending to every token
        unwindowed = model(ids, use_cache=False).logits
    assert cache.get_seq_length() == 24
    # decoding differs from the batched forward only by float rounding (the few-row LM head runs in float16, the
    # attention on codes sums in another order); forgetting the window would be off by far more
    err = _rel(got, ref)
    assert err < 2e-2
    assert _rel(unwindowed[:, 9:], ref[:, 9:]) > 10 * err
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


# ------------------------------------------------------------------------------------------------ refusals


def _unsupported(kind: str):
    import transformers as tf

    common = dict(vocab_size=258, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    if kind == "qwen3-moe":
        return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=4,
                                                        num_experts_per_tok=2))
    if kind == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**common, num_local_experts=4))
    if kind == "olmo":  # Llama-shaped, but parameter-free LayerNorms: no family describes it
        return tf.OlmoForCausalLM(tf.OlmoConfig(**common))
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=258, n_embd=48, n_layer=2, n_head=4, bos_token_id=256,
                                            eos_token_id=257))


REFUSED = {
    "qwen3-moe": "unsupported model Qwen3MoeForCausalLM: layer 0 mlp has experts (MoE is not supported yet)",
    "mixtral": "unsupported model MixtralForCausalLM: layer 0 mlp has experts (MoE is not supported yet)",
    "olmo": "unsupported model OlmoForCausalLM: model_type 'olmo' is none of the supported families",
    "gpt2": "unsupported model GPT2LMHeadModel: no model.layers",
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_everything_else_is_refused_in_one_line_before_any_work(kind, tmp_path, capsys):
    src = tmp_path / "model"
    _unsupported(kind).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    capsys.readouterr()
    code = main(["quantize", "--model", str(src), "--out", str(tmp_path / "out"), "--json",
                 str(tmp_path / "r.json"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"baseq: error: {REFUSED[kind]}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing written


def test_a_family_whose_weights_do_not_match_is_refused():
    model = tiny_model("qwen3", layers=2)
    del model.model.layers[1].self_attn.k_norm
    with pytest.raises(BaseqError, match=r"^unsupported model Qwen3ForCausalLM: layer 1 has no self_attn.k_norm"):
        ModelAdapter(model)
    model = tiny_model("gemma2", layers=1)
    model.config.hidden_activation = "relu"
    with pytest.raises(BaseqError, match="MLP activation hidden_activation='relu'"):
        ModelAdapter(model)


@pytest.mark.parametrize("family", ["phi3", "gemma", "gemma3", "olmo2", "qwen3"])
@pytest.mark.parametrize("method,rotations", [("spinquant", None), ("ostquant", None), ("quarot", "calibrated")])
def test_learned_rotations_are_refused_where_they_cannot_be_fused(family, method, rotations):
    """Learned R1/R2/scales are fitted on the plain Llama block; other families get one clear line, before any
    training (the seeded Hadamards work for every family)."""
    from baseq.calibrate.pipeline import check_model

    cfg = QuantizeConfig(method=method)
    if rotations:
        cfg.rotation.kind = rotations
    with pytest.raises(BaseqError, match="rotations are learned and fused on plain Llama-like blocks"):
        check_model(tiny_model(family, layers=1), cfg.validate())
    check_model(tiny_model(family, layers=1), QuantizeConfig(method="quarot").validate())
    assert {s.family for s in SPECS if s.learned_rotations} == {"Llama", "Mistral", "Qwen2 / 2.5"}


@pytest.mark.parametrize("family", [f for f in FAMILIES if not ModelAdapter(tiny_model(f, layers=1)).spec.r1_fusable])
def test_online_r1_keeps_the_pre_norm_weights(family):
    """With R1 online, the quantized sublayer input is the norm's real output rotated, (x̂ ⊙ g) R1: the pre-norm
    scales stay in the norms (regression: folding them into q/k/v and gate/up made 4-bit activation error come back
    multiplied by Gemma 3's uneven scales, perplexity 9e7 on gemma3-270m)."""
    model = tiny_model(family, layers=2)
    spec = ModelAdapter(model).spec
    before = [[layer.get_submodule(n).weight.detach().clone() for n in spec.pre_norms] for layer in model.model.layers]
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    rotate_model(model, seed=0)
    for layer, ws in zip(model.model.layers, before):
        for n, w in zip(spec.pre_norms, ws):
            assert torch.equal(layer.get_submodule(n).weight, w), n
    # q_proj only took R1 (orthogonal): its row norms are unchanged, which a folded norm scale would not leave
    q = model.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(q.norm(dim=1), q_before.norm(dim=1), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ LongRoPE

LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": 16, "short_factor": [1.0] * 9,
            "long_factor": [4.0 + 0.5 * i for i in range(9)]}  # 9 = 24-wide heads × 0.75 / 2


def _greedy_by_full_forwards(model, ids, n):
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, ids.shape[1]:].tolist()


def test_generation_past_longrope_switch_recomputes_the_cache(text_file, tmp_path):
    """Phi-3's LongRoPE takes the long factors for a whole sequence once it passes original_max_position_embeddings
    (16 here): the keys cached with the short factors go stale, and transformers' generation recomputes them once.
    Regression: baseq's loop kept them, and its tokens left transformers' at that step — for FP and packed models."""
    from baseq.runtime.generate import generate, rope_switch

    fp = tiny_model("phi3", max_positions=64, rope=LONGROPE, seed=3)
    assert rope_switch(fp) == 16 and rope_switch(tiny_model("phi3", layers=1)) is None
    prompt = _ids(seq=12, batch=1)
    with torch.no_grad():
        hf = fp.generate(prompt, max_new_tokens=18, min_new_tokens=18, do_sample=False)[0, 12:].tolist()
    assert generate(fp, prompt, 18).tokens == hf == _greedy_by_full_forwards(fp, prompt, 18)

    model = tiny_model("phi3", max_positions=64, rope=LONGROPE)
    cfg = QuantizeConfig(method="quarot", bits=BitsConfig(a_bits=8, kv_bits=8),
                         calib=CalibConfig(data=text_file, samples=4, seqlen=32, batch_size=2))
    quantize_model(model, byte_tokenizer(), cfg, progress=False, log_fn=lambda m: None)
    rt, _ = load(str(_save(model, cfg, tmp_path / "packed")))
    assert rope_switch(rt) == 16
    assert generate(rt, prompt, 18).tokens == _greedy_by_full_forwards(rt, prompt, 18)
