"""``--keep-massive``: tokens whose residual stream is massive keep float activations, in the simulated model and the
packed runtime alike (the same bits), at calibration as at inference, in prefill as in decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baseq.calibrate.pipeline import act_spec, quantize_model
from baseq.config import BitsConfig, CalibConfig, QuantizeConfig, TrainConfig
from baseq.data import calib_windows, eval_windows
from baseq.load import load
from baseq.quant.qmodel import TokenGate, digits_linear, float_digits, token_rms, weight_ints
from baseq.runtime.kernels import IntLinear
from baseq.runtime.kvcache import QuantizedKVCache
from baseq.runtime.packed import new_cache, save_packed
from baseq.runtime.save import save_fake
from baseq.testing import byte_tokenizer, tiny_llama, tiny_model

RATIO = 1.1  # tiny random models have no attention sink: a low ratio keeps a share of ordinary tokens


@pytest.fixture(scope="module")
def text_file(words_file) -> str:
    return words_file


def _quantized(text_file, method="baseq", family=None, keep=RATIO, fit="with", **bits):
    model = tiny_model(family) if family else tiny_llama(hidden=48, ffn=80, heads=4, kv_heads=2, qkv_bias=True)
    cfg = QuantizeConfig(method=method, bits=BitsConfig(keep_massive=keep, keep_massive_fit=fit, **bits),
                         calib=CalibConfig(data=text_file, samples=4, seqlen=32, batch_size=2),
                         train=TrainConfig(epochs=1))
    report = quantize_model(model, byte_tokenizer(), cfg, progress=False, log_fn=lambda m: None)
    return model, cfg, report


def _packed(model, cfg, out):
    b = cfg.bits
    rt, _ = load(str(save_packed(model, byte_tokenizer(), out, act_spec(cfg), {"method": cfg.label, "bits": b.label},
                                 w_bits=b.w_bits, w_group=b.w_group, embed_bits=b.embed_bits)))
    return rt


def _gates(model) -> list[TokenGate]:
    return [layer.keep_gate for layer in model.model.layers]


@pytest.mark.filterwarnings("ignore:no Hadamard matrix")
@pytest.mark.parametrize("method,family,bits", [
    ("baseq", None, {}),  # Llama with q/k/v biases: per-channel weight scales, applied after the kept rows' sums
    ("quarot", None, {"w_group": 8}),  # weight groups: their scales inside each float slab of the codes
    ("quarot", None, {"w_bits": 8, "a_bits": 8, "kv_bits": 8}),  # 8-bit weights (c − z beyond int8 somewhere)
    ("baseq", "gemma3", {}),  # sandwich norms, q/k norms, local/global layers
    ("baseq", "olmo2", {}),  # no pre-norms: the points sit behind an online R1
    ("baseq", None, {"keep_massive_kv": "float"}),  # the kept tokens' K/V float as well
    ("quarot", "gemma3", {"keep_massive_kv": "float"}),  # ... with one KV head of 256 dims, local/global layers
], ids=["baseq-llama", "quarot-groups", "quarot-w8", "baseq-gemma3", "baseq-olmo2", "baseq-llama-kv",
        "quarot-gemma3-kv"])
def test_kept_tokens_are_float_and_the_runtime_computes_the_simulated_model(method, family, bits, text_file,
                                                                            tmp_path):
    model, cfg, report = _quantized(text_file, method, family, **bits)
    shares = [b["kept_share"] for b in report["blocks"]]
    assert all(0 < s < 0.5 for s in shares), shares  # some tokens, not most
    rt = _packed(model, cfg, tmp_path / "p")
    ids = eval_windows(byte_tokenizer(), text_file, 32, 3)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        sim_kept = [g.mask.sum().item() if g.mask is not None else 0 for g in _gates(model)]
        got = rt(ids, use_cache=False).logits
        rt_kept = [g.mask.sum().item() if g.mask is not None else 0 for g in _gates(rt)]
        # the same model with no token kept computes something else: the kept rows are not a no-op
        for g in _gates(model):
            g.threshold.fill_(float("inf"))
        none_kept = model(ids, use_cache=False).logits
    assert sim_kept == rt_kept and sum(rt_kept) > 0
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-6
    assert ((none_kept - ref).abs().max() / ref.abs().max()).item() > 1e-4


def test_the_kept_rows_share_the_integer_gemm_and_slabs_change_nothing(text_file, tmp_path, monkeypatch):
    """The kept tokens' rows go through the same integer GEMM as the other rows (one ``int_mm`` per linear and
    group, however many rows are kept: no extra pass over the codes), and the MLP's slabs of tokens, each with its
    own share of the kept rows, give the logits of one pass, bit for bit."""
    from baseq.runtime import kernels
    from baseq.runtime.modules import RuntimeMLP

    model, cfg, _ = _quantized(text_file)
    rt = _packed(model, cfg, tmp_path / "p")
    ids = eval_windows(byte_tokenizer(), text_file, 32, 3)
    rows = []
    int_mm = kernels.int_mm
    monkeypatch.setattr(kernels, "int_mm", lambda a, w, *r: rows.append(a.shape[0]) or int_mm(a, w, *r))
    with torch.no_grad():
        whole = rt(ids, use_cache=False).logits
    kept = sum(int(g.mask.sum()) for g in _gates(rt) if g.mask is not None)
    assert kept > 0
    assert len(rows) == 4 * len(_gates(rt))  # qkv, o, gate/up, down: one GEMM each per block
    assert sum(rows) == 4 * len(_gates(rt)) * ids.numel() + 4 * 3 * kept  # each kept row: its three digit rows
    monkeypatch.setattr(RuntimeMLP, "rows", 7)  # 96 tokens: 13 slabs of 7 and one of 5
    with torch.no_grad():
        slabs = rt(ids, use_cache=False).logits
    assert torch.equal(slabs, whole)


def test_a_kept_token_reaches_the_linear_unquantized(text_file):
    model, _, _ = _quantized(text_file)
    layer = model.model.layers[1]
    down = layer.mlp.down_proj
    point = down.act
    seen = {}
    hooks = [point.register_forward_hook(lambda m, args, out: seen.update(raw=args[0], x=out)),
             down.register_forward_hook(lambda m, args, out: seen.update(y=out))]
    with torch.no_grad():
        model(eval_windows(byte_tokenizer(), text_file, 32, 2), use_cache=False)
    for h in hooks:
        h.remove()
    keep = layer.keep_gate.mask
    assert keep is not None and keep.any() and not keep.all()
    prepared = point.rotation(seen["raw"]) * point.scale - point.shift  # what the point quantizes
    x = seen["x"]
    assert torch.equal(x[keep], prepared[keep])  # kept: the float value
    assert (x[~keep] - prepared[~keep]).abs().max() > 1e-3  # the others: on the 4-bit grid
    levels = max(len(torch.unique(row)) for row in x[~keep].reshape(-1, x.shape[-1]))
    assert levels <= 16
    assert torch.allclose(seen["y"][keep], F.linear(x[keep], down.weight, down.bias), rtol=1e-4, atol=1e-5)


def test_the_threshold_is_the_ratio_times_the_median_rms_entering_each_block(text_file):
    model, cfg, report = _quantized(text_file, keep=1.3)
    windows = calib_windows(byte_tokenizer(), text_file, 32, 4, 0)
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, k, i=i: inputs.update({i: a[0] if a else
                                             k["hidden_states"]}), with_kwargs=True)
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(windows, use_cache=False)  # the calibrated blocks give the quantized path's inputs again
    for h in hooks:
        h.remove()
    for i, gate in enumerate(_gates(model)):
        rms = token_rms(inputs[i]).flatten()
        assert float(gate.threshold) == pytest.approx(1.3 * float(rms.median()), rel=1e-5)
        assert report["blocks"][i]["kept_tokens"] == int((rms >= gate.threshold).sum())


def test_fit_without_fits_each_block_as_without_the_option_then_keeps_the_tokens(text_file):
    """``--keep-massive-fit without``: block 0 sees the same inputs as a run without the option, so its weights and
    BASE-Q corrections come out the same, bit for bit; its gate is set afterwards, and the blocks after it are fitted
    to its output with the tokens kept (so they differ)."""
    kept, _, report = _quantized(text_file, fit="without")
    plain, _, _ = _quantized(text_file, keep=0.0)
    first_k, first_p = kept.model.layers[0].state_dict(), plain.model.layers[0].state_dict()
    assert set(first_k) - set(first_p) == {"keep_gate.threshold"}
    assert all(torch.equal(first_k[n], first_p[n]) for n in first_p), [n for n in first_p
                                                                       if not torch.equal(first_k[n], first_p[n])]
    assert torch.isfinite(kept.model.layers[0].keep_gate.threshold) and report["blocks"][0]["kept_share"] > 0
    later = kept.model.layers[1].mlp.down_proj.weight, plain.model.layers[1].mlp.down_proj.weight
    assert not torch.equal(*later)


@pytest.mark.parametrize("kv", ["quantized", "float"])
def test_decoding_keeps_the_tokens_a_full_forward_keeps(kv, text_file, tmp_path):
    model, cfg, _ = _quantized(text_file, keep=1.05, keep_massive_kv=kv)
    rt = _packed(model, cfg, tmp_path / "p")
    ids = eval_windows(byte_tokenizer(), text_file, 20, 1)
    kept_in_decoding = []
    gate = _gates(rt)[1]
    hook = rt.model.layers[1].register_forward_hook(
        lambda m, a, out: kept_in_decoding.append(gate.mask is not None) if a[0].shape[1] == 1 else None)
    with torch.no_grad():
        ref = rt(ids, use_cache=False).logits
        cache = new_cache(rt)
        assert isinstance(cache, QuantizedKVCache)
        steps = [rt(ids[:, :8], cache=cache, use_cache=True).logits]
        for i in range(8, ids.shape[1]):  # one token at a time: the rule needs no other token to decide
            steps.append(rt(ids[:, i:i + 1], cache=cache, use_cache=True).logits)
    hook.remove()
    assert any(kept_in_decoding) and not all(kept_in_decoding)
    got = torch.cat(steps, dim=1)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 2e-2
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("kv", ["quantized", "float"])
def test_the_fake_format_keeps_the_gates(kv, text_file, tmp_path):
    model, cfg, _ = _quantized(text_file, keep_massive_kv=kv)
    out = save_fake(model, byte_tokenizer(), tmp_path / "fake", act_spec(cfg), {"method": "baseq", "bits": "W4A4KV4"})
    again, _ = load(str(out))
    assert [float(g.threshold) for g in _gates(again)] == [float(g.threshold) for g in _gates(model)]
    assert (again.model.layers[0].self_attn.kv_point.gate is not None) == (kv == "float")
    ids = eval_windows(byte_tokenizer(), text_file, 32, 2)
    with torch.no_grad():
        assert torch.equal(again(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


def test_float_digits_hold_a_row_to_two_to_the_minus_22_of_its_largest_entry():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 300, generator=g) * torch.tensor([1e-3, 1.0, 50.0, 3e4])[:, None]
    x[2, 7] = 4000.0  # a massive channel
    x[3] = 0.0  # a zero row
    digits, scale = float_digits(x)
    assert digits.shape == (12, 300) and scale.shape == (12, 1)
    assert torch.equal(digits, digits.round()) and digits.abs().max() <= 127  # int8 integers
    assert digits.view(4, 3, 300)[:, 1:].abs().max() <= 65
    back = (digits.double() * scale.double()).view(4, 3, 300).sum(1)
    top = x.abs().amax(-1, keepdim=True).double()
    assert ((back - x.double()).abs() <= 2.0**-21 * top + 1e-30).all()
    assert torch.equal(back[3], torch.zeros(300, dtype=torch.float64))
    assert ((back - x.double()).abs() > 2.0**-30 * top).any()  # three digits, not float64: some rounding is left


@pytest.mark.parametrize("bits,groups", [(4, 1), (4, 3), (8, 1), (8, 3)])
def test_kept_rows_as_digits_are_the_float_product_in_sim_and_runtime(bits, groups):
    g = torch.Generator().manual_seed(bits + groups)
    n, k, m = 37, 72, 5
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    zero = torch.randint(0, 2**bits, (n, groups), generator=g)
    scale = (torch.rand(n, groups, generator=g) + 0.5).to(torch.float16).float()
    bias = torch.randn(n, generator=g)
    w = (codes - zero.repeat_interleave(k // groups, 1)).float() * scale.repeat_interleave(k // groups, 1)
    x = torch.randn(m, k, generator=g) * 50  # massive tokens
    x[1, 3] = 3000.0
    sim = digits_linear(*float_digits(x), weight_ints(w, scale), scale, bias)
    ref = F.linear(x.double(), w.double(), bias.double())
    assert ((sim.double() - ref).abs().max() / ref.abs().max()).item() < 2e-6  # float32's error, not 4-bit's
    lin = IntLinear([codes.to(torch.uint8)], [zero.to(torch.uint8)], [scale], [bias], bits)
    a = torch.randint(-7, 8, (9, k), generator=g).to(torch.int8)  # other rows, quantized, around the kept ones
    s = torch.rand(9, 1, generator=g) + 0.1
    keep = torch.zeros(9, dtype=torch.bool)
    keep[[0, 4, 5, 6, 8]] = True
    y = lin(a, s, None, (keep, x))
    assert torch.equal(y[keep], sim)  # the runtime's kept rows are the simulated model's, bit for bit
    assert torch.equal(y[~keep], lin(a, s, None)[~keep])  # and the other rows are untouched by them


def _kv_io(model, layer: int, ids):
    """The raw (rotated) keys/values entering block ``layer``'s KV point and what it hands to attention."""
    point = model.model.layers[layer].self_attn.kv_point
    seen = {}
    hook = point.register_forward_hook(lambda m, args, out: seen.update(raw=m.rotate(*args[:2])[1], v=args[2],
                                                                         out=out))
    with torch.no_grad():
        model(ids, use_cache=False)
    hook.remove()
    return seen


def test_kept_tokens_keys_and_values_reach_attention_float(text_file):
    """``--keep-massive-kv float``: in the simulated model the kept tokens' keys and values pass the KV point
    unquantized, the other tokens' are on the 4-bit grid; with the default ('quantized') every token's is."""
    ids = eval_windows(byte_tokenizer(), text_file, 32, 2)
    for kv in ("float", "quantized"):
        model, _, _ = _quantized(text_file, keep_massive_kv=kv)
        seen = _kv_io(model, 1, ids)
        keep = model.model.layers[1].keep_gate.mask
        assert keep is not None and keep.any() and not keep.all()
        _, key, value = seen["out"]
        sel = keep[:, None, :, None].expand_as(key)
        for got, raw in ((key, seen["raw"]), (value, seen["v"])):
            off_grid = (got - raw)[~sel].abs().max()
            assert off_grid > 1e-3  # the ordinary tokens: quantized
            kept_err = (got - raw)[sel].abs().max()
            assert (kept_err == 0) if kv == "float" else (kept_err > 1e-4), (kv, kept_err)


def test_the_cache_stores_kept_rows_float_and_attention_on_codes_uses_them():
    """The runtime cache with kept rows: reads give the kept tokens' float K/V and the others' dequantized codes;
    a decoding step's attention computed on the codes (``attend_codes``) is attention over those values; batch
    reordering moves the kept rows with their sequence."""
    from baseq.runtime.kvcache import QuantizedKVLayer
    from baseq.runtime.modules import attend_codes

    g = torch.Generator().manual_seed(0)
    b, kvh, heads, d, n = 2, 2, 4, 8, 11
    k, v = torch.randn(b, kvh, n, d, generator=g), torch.randn(b, kvh, n, d, generator=g)
    k[0, :, 0] *= 40  # a sink-like token whose 4-bit grid is coarse
    keep = torch.zeros(b, n, dtype=torch.bool)
    keep[0, 0] = keep[1, 3] = keep[1, 10] = True
    layer = QuantizedKVLayer(4, 1.0, 1.0)
    layer.update(k[:, :, :7], v[:, :, :7], keep=keep[:, :7])  # a prefill, then one token at a time
    for i in range(7, n):
        layer.append(k[:, :, i:i + 1], v[:, :, i:i + 1], keep=keep[:, i:i + 1])
    plain = QuantizedKVLayer(4, 1.0, 1.0)
    plain.update(k, v)
    fk, fv = plain.update(k[:, :, :0], v[:, :, :0])  # every token dequantized, none kept
    rk, rv = layer.update(k[:, :, :0], v[:, :, :0])
    m = keep[:, None, :, None].expand_as(k)
    assert torch.equal(rk[m], k[m]) and torch.equal(rv[m], v[m])
    assert torch.equal(rk[~m], fk[~m]) and torch.equal(rv[~m], fv[~m])
    assert (fk[m] - k[m]).abs().max() > 0.1  # the kept rows would have lost something on the grid
    q = torch.randn(b, heads, 1, d, generator=g)

    def reference(q, keys, values):
        keys, values = keys.repeat_interleave(heads // kvh, 1), values.repeat_interleave(heads // kvh, 1)
        return (torch.softmax(q @ keys.transpose(-1, -2) * d ** -0.5, -1) @ values).reshape(b, heads, d)

    got = attend_codes(q, layer, d ** -0.5, None)
    assert torch.allclose(got, reference(q, rk, rv), atol=1e-5)
    assert not torch.allclose(got, reference(q, fk, fv), atol=1e-3)
    layer.reorder_cache(torch.tensor([1, 0]))
    sk, sv = layer.update(k[:, :, :0], v[:, :, :0])
    assert torch.equal(sk, rk.flip(0)) and torch.equal(sv, rv.flip(0))
    assert layer.nbytes() > plain.nbytes()
    layer.reset()
    assert layer.kept() is None and layer.nbytes() == 0


def test_the_simulated_model_decodes_with_float_kept_keys(text_file):
    """The simulated model decoding with a cache (e.g. ``generate`` on a fake-quant folder) keeps the K/V of the
    tokens an earlier step kept: the steps' logits are those of one full forward."""
    from transformers import DynamicCache

    from baseq.runtime.generate import _cache_kw

    model, _, _ = _quantized(text_file, keep=1.05, keep_massive_kv="float")
    ids = eval_windows(byte_tokenizer(), text_file, 20, 1)
    kw = _cache_kw(model)  # transformers' name for it ("past_key_values" before 5.x's "cache")
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        cache = DynamicCache()
        steps = [model(ids[:, :8], **{kw: cache}, use_cache=True).logits]
        for i in range(8, ids.shape[1]):
            steps.append(model(ids[:, i:i + 1], **{kw: cache}, use_cache=True).logits)
    got = torch.cat(steps, dim=1)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_the_kv_means_leave_out_the_float_kept_tokens(text_file, monkeypatch):
    """With ``--keep-massive-kv float`` the K/V channel means (``--kv-shift``) are those of the tokens the cache
    quantizes: each block's shift is the mean of its keys / values over the tokens its gate does not keep."""
    from baseq.calibrate import stages
    from baseq.calibrate.train import Tap

    seen = []
    run = stages.KVShiftStage.run

    def spy(self, ctx):
        kv = ctx.layer.self_attn.kv_point
        keys, values, masks = [], [], []

        def grab(_, args, kwargs):
            keys.append(kv.rotate(args[0], args[1])[1].double())
            values.append(args[2].double())
            masks.append(kv.gate.mask.clone() if kv.gate.mask is not None else None)

        with torch.no_grad(), Tap(kv, grab, stop=True) as tap:
            for batch in ctx.q_in.split(ctx.batch_size):
                tap(ctx.forward, batch.to(ctx.device))
        run(self, ctx)
        seen.append((keys, values, masks, kv.k_shift.detach().clone(), kv.v_shift.detach().clone()))

    monkeypatch.setattr(stages.KVShiftStage, "run", spy)
    _quantized(text_file, method="quarot", keep_massive_kv="float", kv_shift="mean")
    some_kept = 0
    for keys, values, masks, k_shift, v_shift in seen:
        for got, xs in ((k_shift, keys), (v_shift, values)):
            every = [x.transpose(0, 1).flatten(1, 2) for x in xs]  # [kv_heads, tokens, head_dim]
            quantized = [e if m is None else x.transpose(1, 2)[~m].transpose(0, 1)
                         for x, e, m in zip(xs, every, masks)]
            want = torch.cat(quantized, dim=1).mean(dim=1)
            everything = torch.cat(every, dim=1).mean(dim=1)
            assert torch.allclose(got.double(), want, atol=1e-5), (got - want).abs().max()
            if any(m is not None for m in masks):
                some_kept += 1
                assert not torch.allclose(want, everything, atol=1e-4)
    assert some_kept > 0


def test_the_simulated_model_refuses_to_decode_past_a_sliding_window_with_float_kept_keys(text_file):
    """A sliding-window cache drops the oldest keys, which the simulated model's float-kept bookkeeping cannot follow:
    one BaseqError line (`baseq generate` on such a fake folder), not a RuntimeError traceback; the packed format
    decodes it."""
    from transformers import DynamicCache

    from baseq.errors import BaseqError
    from baseq.runtime.generate import _cache_kw

    model, _, _ = _quantized(text_file, family="mistral", keep=1.05, keep_massive_kv="float")
    ids = eval_windows(byte_tokenizer(), text_file, 20, 1)
    kw = _cache_kw(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), pytest.raises(BaseqError, match="cannot decode with a cache past a sliding window"):
        model(ids[:, :8], **{kw: cache}, use_cache=True)
        for i in range(8, ids.shape[1]):
            model(ids[:, i:i + 1], **{kw: cache}, use_cache=True)
