"""The packed format and the integer runtime: codes and kernels exact, packed folders small, the runtime model
computing the fake-quant model's function (logits to float tolerance), the quantized KV cache, and clean errors on
damaged folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from baseq.calibrate.pipeline import act_spec, quantize_model
from baseq.config import BitsConfig, CalibConfig, QuantizeConfig, TrainConfig
from baseq.data import eval_windows
from baseq.errors import BaseqError
from baseq.eval.perplexity import perplexity
from baseq.load import load
from baseq.quant.quantizer import _minmax_fake_quant
from baseq.runtime.kernels import INT4_ROWS, IntLinear, dequantize_tokens, pack_nibbles, quantize_tokens, unpack_nibbles
from baseq.runtime.kvcache import QuantizedKVCache, QuantizedKVLayer
from baseq.runtime.native import native_ops
from baseq.runtime.packed import save_packed
from baseq.runtime.save import save_fake
from baseq.testing import byte_tokenizer, tiny_llama

SEQLEN = 32
TEXT = "\n".join(f"Line {i}: a quick brown fox jumps over {i * 7} lazy dogs, then rests." for i in range(60)) + "\n"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("rt-text") / "sample.txt"
    f.write_text(TEXT, encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


# ------------------------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("clip", [1.0, 0.9])
@pytest.mark.parametrize("constant_token", [False, True])
def test_token_codes_are_the_fake_quantizers_grid(bits, clip, constant_token):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(7, 37, generator=g) * 3 + torch.randn(7, 1, generator=g)
    if constant_token:  # its zero point is huge: the codes are offset instead of centred
        x[3] = 0.25
    a, s, z = quantize_tokens(x, clip, bits)
    assert a.dtype == torch.int8 and s.shape == (7, 1)
    assert (z is not None) == (constant_token or bits == 8)  # 8 bits: centred codes can leave int8
    if z is not None:
        assert int(a.min()) >= -(2 ** (bits - 1)) and int(a.max()) <= 2 ** (bits - 1) - 1
    assert torch.equal(dequantize_tokens(a, s, z), _minmax_fake_quant(x, clip, bits))  # bit for bit


@pytest.mark.parametrize("n", [1, 6, 7, 48])
def test_nibble_packing_round_trips(n):
    codes = torch.randint(0, 16, (5, n), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, (n + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed, n), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4 if n > 1 else 0)


def _grid(out_f, in_f, bits, groups, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g).to(torch.uint8)
    zero = torch.randint(0, 2**bits, (out_f, groups), generator=g).to(torch.uint8)
    scale = (torch.rand(out_f, groups, generator=g) * 0.1 + 0.01).half().float()
    bias = torch.randn(out_f, generator=g)
    w = (codes.float() - zero.float().repeat_interleave(in_f // groups, 1)) * scale.repeat_interleave(in_f // groups, 1)
    return codes, zero, scale, bias, w


@pytest.mark.parametrize("w_bits,a_bits,groups", [(4, 4, 1), (4, 8, 1), (4, 4, 3), (8, 8, 1), (8, 4, 2), (3, 6, 1)])
def test_int_linear_matches_float_matmul_of_the_dequantized_operands(w_bits, a_bits, groups):
    k = 48
    parts = [_grid(n, k, w_bits, groups, seed) for seed, n in enumerate((20, 12, 12))]
    lin = IntLinear([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], [p[3] for p in parts],
                    bits=w_bits)
    held = lin.weight if lin.codes4 is None else lin.codes4  # int8 codes, or 4-bit ones two to a byte
    assert held.dtype in (torch.int8, torch.uint8)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(1)) * 2
    x[4] = 0.5  # a constant token: offset codes (zero-point correction with the weight row sums)
    a, s, z = quantize_tokens(x, 0.9, a_bits)
    got_offset = lin(a, s, z)
    a, s, z = quantize_tokens(x[torch.arange(9) != 4], 0.9, a_bits)
    assert z is None or a_bits == 8  # centred codes
    ref_c = dequantize_tokens(a, s, z).double() @ torch.cat([p[4] for p in parts]).double().t() \
        + torch.cat([p[3] for p in parts]).double()
    assert torch.allclose(lin(a, s, z).double(), ref_c, rtol=1e-5, atol=1e-5)
    a, s, z = quantize_tokens(x, 0.9, a_bits)
    ref = dequantize_tokens(a, s, z).double() @ torch.cat([p[4] for p in parts]).double().t() \
        + torch.cat([p[3] for p in parts]).double()
    got = got_offset
    assert got.shape == (9, 44) and got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)
    if w_bits <= 7:  # weight-only path (16-bit activations): the same weights against float inputs
        ref16 = x.double() @ torch.cat([p[4] for p in parts]).double().t() + torch.cat([p[3] for p in parts]).double()
        assert torch.allclose(lin.forward_float(x).double(), ref16, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["int8", "float"])
def test_int_linear_never_calls_an_int32_matmul(kind, monkeypatch):
    """The integer path is torch._int_mm (int8 × int8 → int32) where the CPU has a fast one, else one float32 GEMM
    of the integers (exact); an int32 matmul fallback would be slow."""
    from baseq.runtime import kernels

    monkeypatch.setitem(kernels._GEMM, "kind", kind)
    parts = [_grid(16, 32, 4, 1, 0)]
    lin = IntLinear([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], [p[3] for p in parts], 4)
    calls, mms = [], []
    real, real_mm = torch._int_mm, torch.mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append((a.dtype, b.dtype)) or real(a, b))
    monkeypatch.setattr(torch, "mm", lambda a, b: mms.append((a.dtype, b.dtype)) or real_mm(a, b))
    a, s, z = quantize_tokens(torch.randn(INT4_ROWS + 4, 32), 1.0, 4)  # past the rows the nibble kernel takes
    lin(a, s, z)
    assert (calls, mms) == (([(torch.int8, torch.int8)], []) if kind == "int8" else
                            ([], []) if kernels.tiles() else  # the compiled tiles on the nibbles
                            ([], [(torch.float32, torch.float32)]))


@pytest.mark.parametrize("m, k, n, a_bound, w_bound", [
    (9, 577, 40, 15, 15),  # 4-bit activations and weights: one GEMM
    (17, 8960, 24, 127, 15),  # --keep-massive's digit rows against 4-bit weights, 1.5B's down_proj width: split
    (12, 3000, 20, 128, 128),  # the int8 corners (8-bit weights keep c − 128): split in 2,730-column pieces
    (10, 64, 8, 0, 15),  # all-zero activations
])
def test_the_float_gemm_is_the_int8_gemm_bit_for_bit(m, k, n, a_bound, w_bound):
    from baseq.runtime.kernels import float_int_mm

    g = torch.Generator().manual_seed(k)
    a = torch.randint(-a_bound, a_bound + 1, (m, k), generator=g).clamp(-128, 127).to(torch.int8)
    w = torch.randint(-w_bound, w_bound + 1, (n, k), generator=g).clamp(-128, 127).to(torch.int8)
    a[0], w[0] = -min(a_bound, 128), -min(w_bound, 128)  # the largest sums: past 2^24 where the pieces are needed
    ref = a.long() @ w.long().t()
    assert torch.equal(torch._int_mm(a, w.t()).long(), ref)  # (torch's own, the reference)
    got = float_int_mm(a, w, w_bound)
    assert got.dtype == torch.int32 and torch.equal(got.long(), ref)
    assert torch.equal(float_int_mm(a, w.float(), w_bound), got)  # the integers handed over as floats (kept buffers)


def test_the_float_gemm_gives_way_where_float32_gemms_may_round(monkeypatch):
    """Under torch.set_float32_matmul_precision('high' / 'medium') a float32 GEMM may run in TF32 / bfloat16: the
    integer sums would not be exact, so torch's int8 GEMM runs instead."""
    from baseq.runtime.kernels import float_int_mm

    calls, real = [], torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(1) or real(a, b))
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "medium")
    a = torch.randint(-8, 8, (9, 40), dtype=torch.int8)
    w = torch.randint(-8, 8, (7, 40), dtype=torch.int8)
    assert torch.equal(float_int_mm(a, w, 8), a.int() @ w.int().t()) and calls == [1]


def test_the_gemm_kind_follows_the_cpu_and_baseq_gemm(monkeypatch):
    from baseq.runtime import kernels

    for env, want in (("float", "float"), ("INT8", "int8")):
        monkeypatch.setitem(kernels._GEMM, "kind", None)
        kernels._GEMM.pop("kind")
        monkeypatch.setenv("BASEQ_GEMM", env)
        assert kernels.gemm_kind() == want
    kernels._GEMM.pop("kind")
    monkeypatch.delenv("BASEQ_GEMM")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    vnni = any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    assert kernels.gemm_kind() == ("int8" if vnni else "float")


@pytest.mark.parametrize("m, n, k", [(1, 24, 32), (3, 20, 30), (40, 16, 64)])
def test_the_padded_int8_gemm_for_cuda_copies_the_weight_only_for_odd_shapes(m, n, k, monkeypatch):
    """CUDA's int8 kernel needs M > 16 and K, N multiples of 8; the padding path (run here on the CPU) gives the
    plain product, and touches the weight only when K or N needs it — a decode step must not copy its weights."""
    import torch.nn.functional as F

    from baseq.runtime.kernels import padded_int_mm

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-15, 16, (m, k), generator=g).to(torch.int8)
    w = torch.randint(-15, 16, (n, k), generator=g).to(torch.int8)
    padded, real = [], F.pad
    monkeypatch.setattr(F, "pad", lambda t, p, *r, **kw: padded.append(tuple(t.shape)) or real(t, p, *r, **kw))
    got = padded_int_mm(a, w)
    assert got.shape == (m, n) and torch.equal(got, a.int() @ w.int().t())
    assert ((n, k) in padded) == bool(n % 8 or k % 8)
    assert ((m, k) in padded) == bool(m <= 16 or k % 8)


# ------------------------------------------------------------------------------------------------ KV cache


def test_quantized_kv_layer_appends_without_requantizing_and_matches_the_fake_grid():
    g = torch.Generator().manual_seed(0)
    clip = torch.tensor([0.9, 0.95]).view(1, -1, 1, 1)
    layer = QuantizedKVLayer(4, clip, 1.0)
    k1, v1 = torch.randn(1, 2, 5, 12, generator=g), torch.randn(1, 2, 5, 12, generator=g)
    k, v = layer.update(k1, v1)
    assert k.shape == (1, 2, 5, 12) and layer.get_seq_length() == 5
    assert torch.equal(k, _minmax_fake_quant(k1, clip, 4)) and torch.equal(v, _minmax_fake_quant(v1, 1.0, 4))
    codes_before = layer.store.codes[:, :, :5].clone()
    for step in range(20):  # decoding, one token at a time: the buffer grows, old codes never change
        k2, v2 = torch.randn(1, 2, 1, 12, generator=g), torch.randn(1, 2, 1, 12, generator=g)
        k, v = layer.update(k2, v2)
    assert k.shape == (1, 2, 25, 12) and torch.equal(layer.store.codes[:, :, :5], codes_before)
    assert torch.equal(k[:, :, -1:], _minmax_fake_quant(k2, clip, 4))
    fp32_bytes = 2 * 2 * 25 * 12 * 4
    assert layer.nbytes() == 2 * 2 * 25 * (6 + 8) and layer.nbytes() < fp32_bytes / 3  # 4-bit codes + scale/zero
    layer.crop(-5)
    assert layer.get_seq_length() == 20


# ------------------------------------------------------------------------------------------------ packed models


def _quantized(method, kw, text_file, tokenizer, **bits):
    model = tiny_llama(**{"layers": 2, "seed": 2, **kw})
    cfg = QuantizeConfig(method=method, bits=BitsConfig(**bits),
                         calib=CalibConfig(data=str(text_file), samples=8, seqlen=SEQLEN, batch_size=4),
                         train=TrainConfig(epochs=1))
    quantize_model(model, tokenizer, cfg, progress=False, log_fn=lambda m: None)
    return model, cfg


def _save_packed(model, tokenizer, cfg, out, **kw):
    b = cfg.bits
    return save_packed(model, tokenizer, out, act_spec(cfg), {"method": cfg.label, "bits": b.label},
                       w_bits=b.w_bits, w_group=b.w_group, embed_bits=b.embed_bits, **kw)


CASES = [  # (method, tiny_llama kwargs, bits): awkward shapes, tied and untied, groups, 8-bit embeddings
    ("baseq", dict(hidden=48, ffn=80, heads=4, kv_heads=2, qkv_bias=True), {}),
    ("baseq", dict(hidden=96, ffn=160, heads=6, kv_heads=2, head_dim=16, tied=False), {"embed_bits": 8}),
    ("quarot", dict(hidden=48, ffn=96, heads=3, kv_heads=1, head_dim=12), {"w_group": 12}),
    ("quarot", dict(hidden=48, ffn=70, heads=4, kv_heads=2, head_dim=10), {"a_bits": 8, "kv_bits": 8}),
    ("gptq", dict(hidden=48, ffn=80, heads=4, kv_heads=2), {"w_bits": 4, "a_bits": 16, "kv_bits": 16}),
]


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose memory map holds ``t``'s data (from /proc/self/maps), or None for anonymous memory."""
    addr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= addr < hi:
            return fields[5] if len(fields) == 6 and fields[5].startswith("/") else None
    return None


@pytest.mark.filterwarnings("ignore:no Hadamard matrix")
@pytest.mark.parametrize("method,kw,bits", [
    ("baseq", dict(hidden=48, ffn=80, heads=4, kv_heads=2), {"keep_massive": 1.5}),  # digit rows in the GEMM too
    ("quarot", dict(hidden=48, ffn=96, heads=3, kv_heads=1, head_dim=12), {"w_group": 12}),
    ("quarot", dict(hidden=48, ffn=70, heads=4, kv_heads=2, head_dim=10), {"w_bits": 8, "a_bits": 8, "kv_bits": 8}),
], ids=["baseq-keep", "quarot-groups", "quarot-w8a8"])
def test_the_gemm_kind_changes_no_bit_of_a_packed_model(method, kw, bits, text_file, tokenizer, tmp_path,
                                                          monkeypatch):
    """torch's int8 GEMM and the float32 one (the CPUs without VNNI) through a whole packed model: the same logits,
    bit for bit, for a prompt (past the rows the nibble kernel takes) and each decoding step."""
    from baseq.runtime import kernels

    model, cfg = _quantized(method, kw, text_file, tokenizer, **bits)
    rt, _ = load(str(_save_packed(model, tokenizer, cfg, tmp_path / "packed")))
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))

    def run(kind, tiles=True):
        monkeypatch.setitem(kernels._GEMM, "kind", kind)
        ops = kernels.native_ops()
        monkeypatch.setitem(kernels._GEMM, "tiles", tiles and ops is not None and bool(ops.int4_tiles()))
        with torch.no_grad():
            out = rt.generate(ids[:1, :12], max_new_tokens=4, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
            return rt(ids, use_cache=False).logits, torch.stack(out.logits)

    mms, real = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: mms.append(a.dtype) or real(a, b))
    digits, real_digits = [], kernels.float_digits
    monkeypatch.setattr(kernels, "float_digits", lambda x: digits.append(len(x)) or real_digits(x))
    got = run("float", tiles=False)
    assert mms  # the float path ran
    assert bool(digits) == bool(bits.get("keep_massive"))  # kept tokens' digit rows rode in its GEMMs
    ref = run("int8")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    got = run("float")  # the compiled tiles where the CPU has them (AVX2)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.filterwarnings("ignore:no Hadamard matrix")
@pytest.mark.parametrize("method,kw,bits", CASES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_packed_runtime_computes_the_fake_quant_model(method, kw, bits, text_file, tokenizer, tmp_path):
    model, cfg = _quantized(method, kw, text_file, tokenizer, **bits)
    out = _save_packed(model, tokenizer, cfg, tmp_path / "packed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed"]
    meta = json.loads((out / "baseq.json").read_text())
    assert meta["format"] == "baseq-packed/1"
    rt, tok = load(str(out))
    assert rt.baseq_config["format"] == "baseq-packed/1"
    windows = eval_windows(tokenizer, str(text_file), SEQLEN, 3)
    with torch.no_grad():
        ref = model(windows, use_cache=False).logits
        got = rt(windows, use_cache=False).logits
    # the simulated model computes its linears exactly on integer codes too (qmodel.exact_linear), with the runtime's
    # epilogue: the two agree to the last bits (the LM head's float GEMMs are blocked differently)
    rel = (got - ref).abs() / ref.abs().max()
    assert rel.max() < 1e-6, rel.max()
    p_ref, p_rt = perplexity(model, windows, progress=False), perplexity(rt, windows, progress=False)
    assert p_rt == pytest.approx(p_ref, rel=1e-6)
    # an untied embedding stays a (copy-on-write) map of its file: only the rows looked up become resident
    table = rt.model.embed_tokens.table
    emb = table.weight if table.weight is not None else table.codes
    if Path("/proc/self/maps").is_file():  # Linux: where each tensor's memory comes from
        where = _mapped_file(emb)
        if kw.get("tied", True):
            assert where is None  # read whole by the head anyway: memory of its own
        else:
            assert where is not None and Path(where).parent == out.resolve() and where.endswith(".safetensors")
            before = Path(where).read_bytes()
            emb.view(torch.uint8)[:4] += 1  # a write to the map never reaches the file
            assert Path(where).read_bytes() == before
    if cfg.bits.a_bits >= 16:  # weight-only models run float GEMMs (IntLinear.use_float_weights)
        return
    # 4-bit codes per output channel are held two to a byte where the kernel builds (runtime/native.py)
    lins = [m for m in rt.modules() if isinstance(m, IntLinear)]
    assert lins and all((m.codes4 is not None) == (m.bits <= 4 and m.groups == 1 and native_ops() is not None)
                        for m in lins)
    # nothing float32 of the size of a weight matrix in the runtime model
    big_float = [n for n, b in rt.named_buffers() if b.is_floating_point() and b.dtype == torch.float32
                 and b.dim() == 2 and min(b.shape) > 8 and not n.endswith("rotation.matrix")]  # dense R3/R4 fallback
    assert not big_float, big_float


@pytest.mark.filterwarnings("ignore:no Hadamard matrix")
def test_packed_folder_is_small_and_4bit(text_file, tokenizer, tmp_path):
    model, cfg = _quantized("baseq", dict(hidden=96, ffn=192, heads=6, kv_heads=2, head_dim=16, vocab=258,
                                          layers=2), text_file, tokenizer)
    packed = _save_packed(model, tokenizer, cfg, tmp_path / "packed")
    fake = save_fake(model, tokenizer, tmp_path / "fake", act_spec(cfg), {"method": "baseq", "bits": "W4A4KV4"})
    from safetensors import safe_open

    with safe_open(packed / "model.safetensors", "pt") as f:
        lin_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                        if k.endswith((".codes", ".scale", ".zero")) and k.startswith("layers."))
        q = f.get_tensor("layers.0.q.codes")
    assert q.dtype == torch.uint8 and q.shape == (96, 48)  # two codes per byte
    fp32_lin = 2 * 4 * (2 * 96 * 96 + 2 * 32 * 96 + 3 * 96 * 192)  # 2 layers: q/o 96², k/v 32×96, gate/up/down 96×192
    assert lin_bytes <= 0.14 * fp32_lin
    size = lambda d: sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))  # noqa: E731
    assert size(packed) < 0.35 * size(fake)


def test_generate_with_the_quantized_cache_matches_a_full_forward(text_file, tokenizer, tmp_path):
    model, cfg = _quantized("baseq", dict(hidden=48, ffn=80, heads=4, kv_heads=2), text_file, tokenizer)
    rt, _ = load(str(_save_packed(model, tokenizer, cfg, tmp_path / "p")))
    ids = eval_windows(tokenizer, str(text_file), 12, 1)
    with torch.no_grad():
        out = rt.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        assert isinstance(cache, QuantizedKVCache)  # generate keeps the cache quantized by default
        assert cache.get_seq_length() == 17 and 0 < cache.nbytes() < 2 * 2 * 2 * 17 * 12 * 4 / 3
        seq = out.sequences
        assert seq.shape == (1, 18)
        # every generated token is the argmax of a full (cache-free) forward over the prefix: the cache is exact
        full = rt(seq[:, :-1], use_cache=False).logits
        assert torch.equal(full[0, 11:].argmax(-1), seq[0, 12:])


def _greedy_by_full_forwards(model, ids, n):
    """Reference: each token the argmax of a cache-free forward computing the logits of every position."""
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq[0, ids.shape[1]:].tolist()


def test_prefill_computes_the_head_for_the_last_position_only(text_file, tokenizer, tmp_path):
    """The prompt's forward needs one row of logits: with a 151,936-token head (Qwen2.5) computing all 512 would
    cost about as much as a block. generate passes logits_to_keep=1 — for FP models (untied head here) and packed
    ones — and the tokens are those of full forwards."""
    from baseq.runtime.generate import generate

    fp = tiny_llama(hidden=48, ffn=80, heads=4, kv_heads=2, qkv_bias=True, tied=False, seed=5)
    q, cfg = _quantized("baseq", dict(hidden=48, ffn=80, heads=4, kv_heads=2), text_file, tokenizer)
    packed, _ = load(str(_save_packed(q, tokenizer, cfg, tmp_path / "p")))
    ids = eval_windows(tokenizer, str(text_file), 24, 1)
    for model in (fp.eval(), packed):
        rows = []
        hook = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
        try:
            stats = generate(model, ids, 5)
        finally:
            hook.remove()
        assert rows == [1] * 5  # prefill (24 positions) and 4 decode steps: one row of logits each
        hook_free = _greedy_by_full_forwards(model, ids, 5)
        assert stats.tokens == hook_free


# ------------------------------------------------------------------------------------------------ bad folders


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory, text_file, tokenizer):
    model, cfg = _quantized("quarot", dict(hidden=48, ffn=80, heads=4, kv_heads=2), text_file, tokenizer)
    return _save_packed(model, tokenizer, cfg, tmp_path_factory.mktemp("p") / "packed")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_packed_folders_fail_with_one_clear_line(packed_dir, tmp_path):
    bad = _copy(packed_dir, tmp_path / "truncated")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(BaseqError, match="model.safetensors' is truncated or corrupt"):
        load(str(bad))

    bad = _copy(packed_dir, tmp_path / "nofield")
    meta = json.loads((bad / "baseq.json").read_text())
    del meta["weights"]
    (bad / "baseq.json").write_text(json.dumps(meta))
    with pytest.raises(BaseqError, match="missing the field.*weights"):
        load(str(bad))

    bad = _copy(packed_dir, tmp_path / "future")
    meta["format"], meta["weights"] = "baseq-packed/9", {"bits": 4, "group_size": 0}
    (bad / "baseq.json").write_text(json.dumps(meta))
    with pytest.raises(BaseqError, match="has format 'baseq-packed/9'"):
        load(str(bad))

    bad = _copy(packed_dir, tmp_path / "shape")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BaseqError, match="config.json describes"):
        load(str(bad))

    bad = _copy(packed_dir, tmp_path / "notjson")
    (bad / "baseq.json").write_text("{not json")
    with pytest.raises(BaseqError, match="not valid JSON"):
        load(str(bad))

    bad = _copy(packed_dir, tmp_path / "relabelled")  # regression: loaded as A8, while its JSON said W4A4KV4
    meta = json.loads((packed_dir / "baseq.json").read_text())
    meta["act_spec"]["a_bits"] = 8
    (bad / "baseq.json").write_text(json.dumps(meta))
    with pytest.raises(BaseqError, match=r"contradicts itself: W4A8KV4 \(label: W4A4KV4\)"):
        load(str(bad))

    bad = _copy(packed_dir, tmp_path / "notokenizer")  # regression: a ValueError traceback
    for f in bad.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(BaseqError, match="its tokenizer does not load"):
        load(str(bad))


def test_damaged_fake_folders_fail_with_one_clear_line(text_file, tokenizer, tmp_path):
    """Regressions: a missing config.json (ValueError) and a v1 folder relabelled v2 (KeyError) were tracebacks."""
    model, cfg = _quantized("quarot", dict(hidden=48, ffn=80, heads=4, kv_heads=2), text_file, tokenizer)
    fake = save_fake(model, tokenizer, tmp_path / "fake", act_spec(cfg), {"method": "quarot", "bits": "W4A4KV4"})
    bad = _copy(fake, tmp_path / "noconfig")
    (bad / "config.json").unlink()
    with pytest.raises(BaseqError, match="config.json' is not a valid model config"):
        load(str(bad))
    bad = _copy(fake, tmp_path / "notable")
    from safetensors.torch import load_file, save_file

    state = load_file(bad / "model.safetensors")
    meta = json.loads((bad / "baseq.json").read_text())
    assert meta["tied"]
    save_file({k: v for k, v in state.items() if "embed_tokens" not in k}, bad / "model.safetensors")
    with pytest.raises(BaseqError, match="does not match its baseq.json"):
        load(str(bad))


def test_packed_writer_refuses_what_it_cannot_store(text_file, tokenizer, tmp_path):
    model, cfg = _quantized("quarot", dict(hidden=48, ffn=80, heads=4, kv_heads=2), text_file, tokenizer)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1e-3  # off the grid
    with pytest.raises(BaseqError, match="q_proj: the weights are not on their recorded 4-bit grid"):
        _save_packed(model, tokenizer, cfg, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.filterwarnings("ignore:no Hadamard matrix")
def test_sharded_packed_folder_loads(text_file, tokenizer, tmp_path):
    model, cfg = _quantized("quarot", dict(hidden=48, ffn=80, heads=4, kv_heads=2), text_file, tokenizer)
    out = _save_packed(model, tokenizer, cfg, tmp_path / "sharded", shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 2
    rt, _ = load(str(out))
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.allclose(rt(ids, use_cache=False).logits, model(ids, use_cache=False).logits, atol=1e-2)
    assert math.isfinite(float(rt(ids, use_cache=False).logits.sum()))


@pytest.mark.filterwarnings("ignore:no Hadamard matrix")
@pytest.mark.parametrize("embed_bits", [16, 8])
def test_vocabulary_tables_are_written_slab_by_slab(embed_bits, text_file, tokenizer, tmp_path, monkeypatch):
    """The embedding and head tables' stored forms are made a slab of rows at a time as the shard is written, never
    as a whole copy (Qwen2.5-1.5B: 467 MB each, the peak of a lazy calibration's write), and load back exactly."""
    from baseq.io import Rows
    from baseq.runtime import packed as packed_mod

    model, cfg = _quantized("quarot", dict(hidden=48, ffn=80, heads=4, kv_heads=2, tied=False), text_file, tokenizer,
                            embed_bits=embed_bits)
    monkeypatch.setattr(packed_mod, "TABLE_ROWS", 7)
    slabs = []
    rows_slabs = Rows.slabs
    monkeypatch.setattr(Rows, "slabs", lambda self: (slabs.append(x.shape[0]) or x for x in rows_slabs(self)))
    out = _save_packed(model, tokenizer, cfg, tmp_path / "p")
    vocab = model.lm_head.weight.shape[0]
    assert max(slabs) == 7 and sum(slabs) == 2 * vocab  # embedding and head, 7 rows at a time
    rt, _ = load(str(out))
    ids = torch.arange(vocab)
    assert torch.equal(rt.lm_head.table.lookup(ids), model.lm_head.weight.float())
    assert torch.equal(rt.model.embed_tokens.table.lookup(ids), model.model.embed_tokens.weight.float())


def test_zero_shot_runs_on_the_runtime_model(text_file, tokenizer, tmp_path):
    """lm-eval drives the packed model like any transformers model, with the fake-quant model's scores."""
    from baseq.eval.zeroshot import zero_shot

    model, cfg = _quantized("quarot", dict(hidden=48, ffn=80, heads=4, kv_heads=2), text_file, tokenizer)
    rt, _ = load(str(_save_packed(model, tokenizer, cfg, tmp_path / "p")))
    words = ["yes", "no", "red", "blue", "up", "down", "cat", "dog", "hot", "cold", "sun", "moon"]
    examples = [{"input": f"Item {i}: pick one of these words, number {i}.",
                 "target_scores": {words[(2 * i) % 12]: 1, words[(2 * i + 1) % 12]: 0}} for i in range(10)]
    (tmp_path / "physical_intuition.json").write_text(json.dumps({"examples": examples}))
    ref = zero_shot(model, tokenizer, ["bb_physical_intuition"], tasks_dir=tmp_path, limit=10, batch_size=4)
    got = zero_shot(rt, tokenizer, ["bb_physical_intuition"], tasks_dir=tmp_path, limit=10, batch_size=4)
    assert got["bb_physical_intuition"]["n"] == 10
    assert got["bb_physical_intuition"]["acc"] == ref["bb_physical_intuition"]["acc"]
    assert got["bb_physical_intuition"]["acc_norm"] == ref["bb_physical_intuition"]["acc_norm"]


@pytest.mark.filterwarnings("ignore:no Hadamard matrix")
def test_fake_format_v1_folders_still_load(tokenizer, tmp_path):
    """A folder of the first fake-quant format (R1 fused into an untied embedding and a head with the final norm
    folded in; dense fallback rotation matrices saved) loads and computes the same function."""
    from safetensors.torch import save_file

    from baseq.models.adapter import LlamaAdapter
    from baseq.quant.qmodel import ActSpec, quantize_structure
    from baseq.rotation.fuse import _right_mul_, rotate_layer, untie_embeddings
    from baseq.rotation.hadamard import orthogonal_matrix

    model = tiny_llama(hidden=48, ffn=70, heads=4, kv_heads=2, layers=2, seed=4)  # ffn 70: dense R4 matrix
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    untie_embeddings(model)
    ad = LlamaAdapter(model)
    s = ad.shape
    _right_mul_(ad.lm_head.weight.data, ad.final_norm.weight.data.double())
    ad.final_norm.weight.data.fill_(1.0)
    q1 = orthogonal_matrix(s.hidden, seed=0)
    _right_mul_(ad.embed.weight.data, q1)
    _right_mul_(ad.lm_head.weight.data, q1)
    for layer in ad.layers:
        rotate_layer(layer, q1, orthogonal_matrix(s.head_dim, seed=1), s.heads, s.kv_heads)
    spec = ActSpec(a_bits=16, kv_bits=16)
    quantize_structure(model, spec)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    r4 = model.model.layers[0].mlp.down_proj.act.rotation
    state["model.layers.0.mlp.down_proj.act.rotation.matrix"] = r4.matrix.clone()  # v1 saved these
    out = tmp_path / "v1"
    out.mkdir()
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file(state, out / "model.safetensors")
    (out / "baseq.json").write_text(json.dumps({"format": "baseq-fake-quant/1", "act_spec": spec.__dict__,
                                                "method": "quarot-rtn", "bits": "W4A16"}))
    loaded, _ = load(str(out))
    with torch.no_grad():
        got = loaded(ids, use_cache=False).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-4


@pytest.mark.parametrize("bits", [16, 8])
def test_head_decode_gemv_is_close_to_the_exact_logits(bits):
    """Few rows (decoding) take a 16-bit / int8 GEMV; many rows take exact float32 slabs: they agree closely."""
    from baseq.quant.quantizer import quantize_embedding_
    from baseq.runtime.modules import Table
    from baseq.runtime.packed import pack_table

    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 48, generator=g) * 0.05
    quantize_embedding_(w, bits)
    parts = {k: v.whole() if k != "scale" else v for k, v in pack_table(w, bits).items()}
    table = Table(weight=parts.get("weight"), codes=parts.get("codes"), scale=parts.get("scale"))
    h = torch.randn(12, 48, generator=g)
    exact = table.logits(h, chunk=300)  # 12 rows: float32 slabs
    assert torch.allclose(exact, h @ w.t(), rtol=1e-5, atol=1e-5)
    few = table.logits(h[:3])
    assert ((few - exact[:3]).abs().max() / exact.abs().max()) < 1e-2
    assert torch.equal(table.lookup(torch.tensor([[3, 999]]))[0], w[[3, 999]])


def test_packed_tensors_are_read_at_their_offsets_exactly(tmp_path):
    """The loader reads each tensor with plain file reads at its header offsets (no memory map, whose pages would
    count in the resident size while loading): every dtype the format may hold comes back bit for bit."""
    from safetensors.torch import save_file

    from baseq.runtime.packed import _Tensors

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
               "bf16": torch.randn(2, 3, generator=g).bfloat16(), "i8": torch.randint(-128, 127, (4, 4), generator=g,
                                                                                         dtype=torch.int8),
               "u8": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8), "i32": torch.arange(6).int(),
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    save_file(tensors, tmp_path / "model.safetensors")
    t = _Tensors(tmp_path)
    for name, ref in tensors.items():
        got = t.take(name, tuple(ref.shape))
        assert got.dtype == ref.dtype and torch.equal(got, ref), name
    t.finish()
    with pytest.raises(BaseqError, match="has no tensor 'f32'"):
        t.take("f32")


@pytest.mark.filterwarnings("ignore:no Hadamard matrix")
def test_the_mlp_over_token_slabs_computes_the_same_values(text_file, tokenizer, tmp_path, monkeypatch):
    """A long prompt goes through each MLP a slab of tokens at a time (bounded temporaries); every operation in it
    is per token, so the logits are those of one pass over all tokens, bit for bit — last slab short included."""
    from baseq.runtime.modules import RuntimeMLP

    model, cfg = _quantized("baseq", dict(hidden=48, ffn=80, heads=4, kv_heads=2, qkv_bias=True), text_file,
                            tokenizer)
    rt, _ = load(str(_save_packed(model, tokenizer, cfg, tmp_path / "p")))
    windows = eval_windows(tokenizer, str(text_file), SEQLEN, 3)
    with torch.no_grad():
        whole = rt(windows, use_cache=False).logits
        monkeypatch.setattr(RuntimeMLP, "rows", 7)  # 96 tokens: 13 slabs of 7 and one of 5
        slabs = rt(windows, use_cache=False).logits
    assert torch.equal(slabs, whole)


def test_decoding_logits_of_an_int8_table_are_exact_to_float_rounding():
    """The few-row (decoding) head of an int8 table writes the hidden state as int8 digits: its logits equal the
    exact float32 ones to ~1e-5 relative even when the hidden state has outlier channels (SmolLM2's: absmax ≈ 12 ×
    rms). Regression: one int8 rounding of the hidden state moved logits by up to 4 % and changed greedy tokens."""
    from baseq.runtime.modules import Table

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (1000, 96), generator=g, dtype=torch.int8)
    table = Table(codes=codes, scale=torch.rand(1000, generator=g).half() * 0.01 + 1e-3)
    h = torch.randn(3, 96, generator=g)
    h[:, 5] *= 40  # an outlier channel
    exact = h @ (codes.float() * table.row_scale[:, None]).t()
    few = table.logits(h)  # 3 rows ≤ gemv_rows: the integer GEMV
    table.gemv_rows = 0
    assert torch.equal(table.logits(h), exact)  # the many-row path is the exact float32 product
    err = ((few - exact).abs().amax() / exact.abs().amax()).item()
    assert err < 1e-5, err


@pytest.mark.parametrize("fmt", ["packed", "fake"])
def test_saved_folders_keep_the_generation_config_stop_tokens(fmt, text_file, tokenizer, tmp_path):
    """A chat model's end-of-turn ids often live only in generation_config.json (a list of eos ids): both formats
    keep it, so generation stops where the original stops. Regression: fake folders fell back to config.json's one."""
    from baseq.runtime.generate import eos_ids

    model, cfg = _quantized("quarot", dict(hidden=48, ffn=80, heads=4, kv_heads=2), text_file, tokenizer)
    model.generation_config.eos_token_id = [257, 245]
    if fmt == "packed":
        out = _save_packed(model, tokenizer, cfg, tmp_path / "p")
    else:
        out = save_fake(model, tokenizer, tmp_path / "f", act_spec(cfg), {"method": "quarot", "bits": "W4A4KV4"})
    back, tok = load(str(out))
    assert {257, 245} <= eos_ids(back, tok)


@pytest.mark.filterwarnings("ignore:no Hadamard matrix")
def test_a_bfloat16_fake_folder_reloads_as_the_model_it_saved(text_file, tokenizer, tmp_path):
    """Calibrated in bfloat16, the quantization points' parameters stay float32; reloading with --dtype bfloat16
    keeps them so, and computes what the saved model computed. Regression: they were cast to bfloat16 (perplexity
    319.5 in memory, 322.9 reloaded, on a tiny model)."""
    model = tiny_llama(layers=2, seed=2, hidden=48, ffn=80, heads=4, kv_heads=2).to(torch.bfloat16)
    cfg = QuantizeConfig(method="baseq", calib=CalibConfig(data=str(text_file), samples=4, seqlen=SEQLEN, batch_size=4),
                         train=TrainConfig(epochs=1))
    quantize_model(model, tokenizer, cfg, progress=False, log_fn=lambda m: None)
    out = save_fake(model, tokenizer, tmp_path / "f", act_spec(cfg), {"method": "baseq", "bits": "W4A4KV4"})
    back, _ = load(str(out), dtype=torch.bfloat16)
    windows = eval_windows(tokenizer, str(text_file), SEQLEN, 2)
    with torch.no_grad():
        assert torch.equal(back(windows, use_cache=False).logits, model(windows, use_cache=False).logits)
