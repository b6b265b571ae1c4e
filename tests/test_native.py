"""The compiled 4-bit weight kernel (baseq/runtime/native.py, csrc/ops.cpp): exact integer sums, the same outputs
as the int8 path, nibbles held by the packed runtime, and a clean fallback where nothing compiles."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from baseq.runtime import kernels, native
from baseq.runtime.kernels import INT4_ROWS, IntLinear, pack_nibbles, quantize_tokens

pytestmark = pytest.mark.skipif(os.environ.get("BASEQ_NATIVE") == "0", reason="BASEQ_NATIVE=0 turns the kernel off")


@pytest.fixture(scope="module")
def ops():
    ops = native.native_ops()
    assert ops is not None, "the 4-bit kernel did not build here (a C++ compiler and torch's headers are needed)"
    return ops


def _codes(n, k, seed, bits=4):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 2**bits, (n, k), generator=g).to(torch.uint8)
    z = torch.randint(0, 2**bits, (n,), generator=g).to(torch.int32)
    return c, z, (c.int() - z[:, None]).to(torch.int8)


# odd K (a half-used last byte), K past and short of the 64-byte slabs, rows in and past the groups of four
# past 8 rows the register tiles (AVX2): rows in and past tiles of four, weight rows past the L2 blocks of 64 and an
# odd last one, K with and without a tail past the 64-column slabs
@pytest.mark.parametrize("m, k, n", [(1, 1, 3), (1, 37, 11), (2, 64, 9), (3, 130, 17), (4, 200, 5), (5, 255, 33),
                                     (8, 1536, 40), (11, 96, 7), (9, 1, 2), (13, 201, 67), (16, 640, 129),
                                     (30, 63, 5)])
def test_int4_mm_is_the_int8_product_bit_for_bit(ops, m, k, n):
    c, z, w = _codes(n, k, seed=m + k)
    # the whole int8 range: the kept tokens' digit rows reach ±127, and -128 is the saturation corner
    a = torch.randint(-128, 128, (m, k), generator=torch.Generator().manual_seed(k)).to(torch.int8)
    a[0, 0] = -128
    got = ops.int4_mm(a, pack_nibbles(c), z)
    assert got.dtype == torch.int32 and torch.equal(got, a.long().mm(w.long().t()).int())
    out = torch.full((n, k), 99, dtype=torch.int8)
    ops.int4_unpack(pack_nibbles(c), z, out)
    assert torch.equal(out, w)


@pytest.mark.parametrize("bound", [1, 15, 127, 128])
def test_int4_mm_tiles_never_overflow_their_int16_sums(ops, bound):
    """The tiles sum products in int16 lanes for as many slabs as the activations' largest |a| allows: at that bound,
    every product at its largest (codes 15, zero point 0) and of one sign, over a down_proj-wide K."""
    k, n = 8960, 3
    c = torch.full((n, k), 15, dtype=torch.uint8)
    z = torch.zeros(n, dtype=torch.int32)
    for sign in (1, -1):
        a = torch.full((12, k), sign * bound).clamp(-128, 127).to(torch.int8)
        if bound == 128 and sign == 1:
            a[0, 0] = -128  # the bound, once
        got = ops.int4_mm(a, pack_nibbles(c), z)
        assert torch.equal(got, a.long().mm(torch.full((n, k), 15, dtype=torch.long).t()).int())


@pytest.mark.parametrize("m, k, n", [(1, 1, 3), (1, 37, 11), (2, 64, 9), (3, 130, 17), (4, 200, 5), (5, 255, 33),
                                     (8, 1536, 40)])
def test_int8_mm_is_the_int8_product_bit_for_bit(ops, m, k, n):
    g = torch.Generator().manual_seed(m + k)
    a = torch.randint(-127, 128, (m, k), generator=g).to(torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g).to(torch.int8)
    a[0], w[0] = 127, -128  # the largest pair sums the unsigned-by-signed product meets: 2 · 128 · 127
    got = ops.int8_mm(a, w)
    assert got.dtype == torch.int32 and torch.equal(got, a.long().mm(w.long().t()).int())


def test_int8_mm_refuses_what_it_cannot_sum_in_one_line(ops):
    with pytest.raises(RuntimeError, match="activations must lie in -127..127"):
        ops.int8_mm(torch.full((1, 8), -128, dtype=torch.int8), torch.ones(2, 8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="weights hold 8 columns, activations 9"):
        ops.int8_mm(torch.ones(1, 9, dtype=torch.int8), torch.ones(2, 8, dtype=torch.int8))


def test_a_few_rows_use_the_compiled_int8_gemv_where_the_int8_gemm_is_slow(ops, monkeypatch):
    """On a CPU without VNNI (kernels.gemm_kind 'float'), a decoding step's product with int8 weights (the int8
    vocabulary table, grouped weights) is ``int8_mm``, not torch's slow int8 GEMM — the same integers; an
    activation of -128 (never a digit row) takes torch's."""
    monkeypatch.setitem(kernels._GEMM, "kind", "float")
    calls, real = [], torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(1) or real(a, b))
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (3, 100), generator=g).to(torch.int8)
    w = torch.randint(-127, 128, (30, 100), generator=g).to(torch.int8)
    assert torch.equal(kernels.int_mm(a, w), a.int() @ w.int().t()) and not calls
    a[1, 5] = -128
    assert torch.equal(kernels.int_mm(a, w), a.int() @ w.int().t()) and calls == [1]


def test_the_kernels_run_on_the_threads_torch_is_given(ops):
    """at::parallel_for is an OpenMP pragma compiled into the extension: built without OpenMP, every kernel ran on
    one thread whatever torch.set_num_threads said."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the kernels are built with OpenMP on Linux only")
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert ops.parallel_threads() == n
    finally:
        torch.set_num_threads(before)


def test_int4_mm_refuses_mismatched_operands_in_one_line(ops):
    c, z, _ = _codes(4, 10, 0)
    with pytest.raises(RuntimeError, match="packed codes hold 10 columns, activations 12"):
        ops.int4_mm(torch.zeros(1, 12, dtype=torch.int8), pack_nibbles(c), z)
    with pytest.raises(RuntimeError, match="zero points"):
        ops.int4_mm(torch.zeros(1, 10, dtype=torch.int8), pack_nibbles(c), z.long())


def _linear(nibbles: bool, monkeypatch, bits=4):
    parts = [_codes(n, 50, seed, bits)[:2] for seed, n in enumerate((20, 12))]
    with monkeypatch.context() as mp:
        if not nibbles:
            mp.setattr(kernels, "native_ops", lambda: None)
        g = torch.Generator().manual_seed(3)
        return IntLinear([c for c, _ in parts], [z[:, None].to(torch.uint8) for _, z in parts],
                         [torch.rand(c.shape[0], 1, generator=g) * 0.1 for c, _ in parts],
                         [torch.randn(c.shape[0], generator=g) for c, _ in parts], bits)


@pytest.mark.parametrize("rows", [1, 3, INT4_ROWS, INT4_ROWS + 1, 40])
def test_a_linear_on_nibbles_gives_the_int8_linears_outputs_bit_for_bit(ops, monkeypatch, rows):
    held, int8 = _linear(True, monkeypatch), _linear(False, monkeypatch)
    assert held.codes4 is not None and held.weight is None and held.codes4.shape == (32, 25)
    assert int8.codes4 is None and int8.weight.dtype == torch.int8
    assert torch.equal(held.integers(), int8.integers())
    x = torch.randn(rows, 50, generator=torch.Generator().manual_seed(rows)) * 3
    x[0] = 0.25  # a constant token: offset codes and the zero-point correction
    a, s, z = quantize_tokens(x, 0.9, 4)
    assert torch.equal(held(a, s, z), int8(a, s, z))
    # kept (float) tokens ride as digit rows in the same product
    keep = torch.zeros(rows, dtype=torch.bool)
    keep[-1] = True
    assert torch.equal(held(a, s, z, kept=(keep, x[keep])), int8(a, s, z, kept=(keep, x[keep])))
    assert torch.equal(held.forward_float(x), int8.forward_float(x))


@pytest.mark.parametrize("rows", [1, 2, INT4_ROWS])
@pytest.mark.parametrize("bits", [4, 8])
def test_a_decoding_points_one_call_is_its_tensor_operations_bit_for_bit(ops, monkeypatch, rows, bits):
    """``ActPoint.forward`` at a few rows (``point_int4``: scale, shift, codes, product, epilogue in one call) gives the
    operations it replaces the same bits: centred codes and offset ones (a zero point that does not fit), with and
    without the point's asymmetric scale and shift, a rotation before it."""
    from baseq.rotation.fuse import OnlineRotation
    from baseq.runtime import modules

    lin = _linear(True, monkeypatch)
    g = torch.Generator().manual_seed(rows + bits)
    scale, shift = torch.rand(50, generator=g) + 0.5, torch.randn(50, generator=g) * 0.3
    with pytest.warns(UserWarning, match="no Hadamard"):
        rotation = OnlineRotation(50, 1)  # (a dense orthogonal one at 50)
    for sc, sh, rot in ((None, None, None), (scale, shift, None), (None, shift, rotation)):
        point = modules.ActPoint(bits, torch.tensor(0.87), sc, sh, rot)
        x = torch.randn(rows, 50, generator=g) * 2
        x[-1] = x[-1] * 0.1 + 50  # far from 0: a zero point outside the centred codes' range
        calls = []
        monkeypatch.setattr(ops, "point_int4", lambda *a, f=ops.point_int4: calls.append(1) or f(*a), raising=False)
        fast = point(x, lin)
        monkeypatch.setattr(modules, "native_ops", lambda: None)
        slow = point(x, lin)
        monkeypatch.undo()
        assert calls and torch.equal(fast, slow)
        if sc is None and rot is None:  # the offset case happened
            assert quantize_tokens(point.prepare(x), point.clip, bits)[2] is not None


def test_only_four_bit_codes_per_output_channel_are_held_as_nibbles(ops, monkeypatch):
    assert _linear(True, monkeypatch, bits=3).codes4 is not None
    assert _linear(True, monkeypatch, bits=8).codes4 is None
    c, z, _ = _codes(6, 12, 0)
    bound_for_a_gpu = IntLinear([c], [z[:, None].to(torch.uint8)], [torch.ones(6, 1)], [None], 4, nibbles=False)
    assert bound_for_a_gpu.codes4 is None and bound_for_a_gpu.weight.dtype == torch.int8
    grouped = IntLinear([c], [torch.stack([z, z], 1).to(torch.uint8)], [torch.ones(6, 2)], [None], 4)
    assert grouped.codes4 is None and grouped.weight is not None


@pytest.mark.parametrize("k, groups, nibbles", [(50, 1, True), (37, 1, True), (37, 1, False), (48, 2, True)])
def test_codes_read_two_a_byte_build_the_same_linear(ops, k, groups, nibbles):
    """A packed folder's 4-bit codes go into IntLinear as stored (``packed_k``): every buffer equals the one built
    from unpacked codes — also where they must be unpacked (int8 for a GPU, weight groups) and for an odd K."""
    g = torch.Generator().manual_seed(k)
    parts = [_codes(n, k, seed)[:2] for seed, n in enumerate((20, 12, 7))]
    zeros = [z[:, None].expand(-1, groups).to(torch.uint8) for _, z in parts]
    scales = [torch.rand(c.shape[0], groups, generator=g) for c, _ in parts]
    biases = [torch.randn(20, generator=g), None, torch.randn(7, generator=g)]
    plain = IntLinear([c for c, _ in parts], zeros, scales, biases, 4, nibbles=nibbles)
    packed = IntLinear([pack_nibbles(c) for c, _ in parts], zeros, scales, biases, 4, nibbles=nibbles, packed_k=k)
    assert (packed.n, packed.k, packed.groups, packed.splits) == (plain.n, plain.k, plain.groups, plain.splits)
    assert (packed.codes4 is not None) == (nibbles and groups == 1)
    for (name, a), (name_b, b) in zip(plain.named_buffers(), packed.named_buffers()):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b), name


# (batch, stored heads, capacity, head_dim, heads read, queries per head, tokens): GQA groups of 1–6, an odd head_dim
# (a padding nibble), a capacity past the stored tokens, tokens across the kernels' slabs of 256, none at all
KV_SHAPES = [(1, 4, 16, 128, 2, 6, 9), (2, 4, 300, 10, 2, 3, 290), (1, 2, 5, 22, 1, 4, 5), (3, 2, 40, 9, 1, 1, 33),
             (1, 6, 600, 64, 3, 2, 513), (1, 2, 4, 16, 1, 2, 0)]


@pytest.mark.parametrize("b, stored, cap, d, heads, g, n", KV_SHAPES)
def test_kv_kernels_are_the_products_on_the_unpacked_codes(ops, b, stored, cap, d, heads, g, n):
    """Attention's two products read 4-bit KV codes two a byte: equal to the float products on the unpacked codes to
    float rounding, and the same bits whatever the thread count (the kernels' summation order is their own)."""
    gen = torch.Generator().manual_seed(cap + d)
    c = torch.randint(0, 16, (b, stored, cap, d), generator=gen).to(torch.uint8)
    packed = pack_nibbles(c)
    q = torch.randn(b, heads, g, d, generator=gen) * 3
    p = torch.rand(b, heads, g, n, generator=gen)
    head0 = stored - heads
    scores, weighted = ops.kv_scores(q, packed, n), ops.kv_weighted(p, packed, head0)[..., :d]
    ref_s = q @ c[:, :heads, :n].float().transpose(-1, -2)
    ref_w = p @ c[:, head0:head0 + heads, :n].float()
    assert scores.shape == (b, heads, g, n) and weighted.shape == (b, heads, g, d)
    for got, ref in ((scores, ref_s), (weighted, ref_w)):  # sums of many terms: rounding relative to their size
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * max(1.0, ref.abs().amax().item() if ref.numel() else 0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.kv_scores(q, packed, n), ops.kv_weighted(p, packed, head0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], scores) and torch.equal(one[1][..., :d], weighted)


def test_kv_kernels_refuse_mismatched_operands_in_one_line(ops):
    packed = pack_nibbles(torch.zeros(1, 4, 8, 16, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="kv_scores: 2 heads of 12 against codes"):
        ops.kv_scores(torch.zeros(1, 2, 3, 12), packed, 8)
    with pytest.raises(RuntimeError, match="for 9 tokens"):
        ops.kv_scores(torch.zeros(1, 2, 3, 16), packed, 9)
    with pytest.raises(RuntimeError, match="kv_weighted: heads 3..5"):
        ops.kv_weighted(torch.zeros(1, 2, 3, 8), packed, 3)
    with pytest.raises(RuntimeError, match="float32"):
        ops.kv_scores(torch.zeros(1, 2, 3, 16, dtype=torch.float64), packed, 8)


@pytest.mark.parametrize("softcap, shifted", [(None, False), (30.0, True)])
def test_decoding_attention_on_packed_codes_is_the_torch_path(ops, monkeypatch, softcap, shifted):
    """``attend_codes`` with the kernels (codes read two a byte) against its torch path (the cache unpacked into
    float codes), with float-kept rows, K/V centres, a soft cap and a padding mask: the same values to rounding."""
    from baseq.runtime import modules
    from baseq.runtime.kvcache import QuantizedKVLayer

    gen = torch.Generator().manual_seed(1)
    b, kvh, heads, d, n = 2, 2, 6, 16, 37
    k, v = torch.randn(b, kvh, n, d, generator=gen), torch.randn(b, kvh, n, d, generator=gen)
    keep = torch.zeros(b, n, dtype=torch.bool)
    keep[0, 0] = keep[1, 5] = True
    layer = QuantizedKVLayer(4, 0.9, 1.0)
    layer.update(k[:, :, :30], v[:, :, :30], keep=keep[:, :30])
    for i in range(30, n):
        layer.append(k[:, :, i:i + 1], v[:, :, i:i + 1], keep=keep[:, i:i + 1])
    shifts = (torch.randn(kvh, 1, d, generator=gen), torch.randn(kvh, 1, d, generator=gen)) if shifted else (None,) * 2
    mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
    mask[1, ..., :4] = False  # left padding of the second sequence
    q = torch.randn(b, heads, 1, d, generator=gen)
    got = modules.attend_codes(q, layer, d ** -0.5, mask, softcap, *shifts)
    monkeypatch.setattr(modules, "native_ops", lambda: None)
    ref = modules.attend_codes(q, layer, d ** -0.5, mask, softcap, *shifts)
    assert got.shape == (b, heads, d)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits, d, heads, kvh", [(4, 16, 6, 2), (4, 7, 3, 3), (3, 10, 4, 1), (2, 64, 12, 2)])
@pytest.mark.parametrize("softcap, shifted, mask", [(None, False, None), (None, True, "bool"), (30.0, True, "add")])
def test_a_decoding_steps_attention_in_one_call_is_append_and_attend_codes(ops, bits, d, heads, kvh, softcap,
                                                                              shifted, mask):
    """``QuantizedKVLayer.step`` (``kv_step``) stores the new token's K/V codes, scales and zeros bit for bit as
    ``append`` does, and attends as ``attend_codes`` does to rounding: K/V centres, a soft cap, bool and additive
    padding masks, GQA groups, odd head sizes; it declines (None) once a token is kept float."""
    from baseq.runtime import modules
    from baseq.runtime.kvcache import QuantizedKVLayer

    gen = torch.Generator().manual_seed(d + heads)
    b, n = 2, 21
    k, v = torch.randn(b, kvh, n, d, generator=gen) * 2, torch.randn(b, kvh, n, d, generator=gen)
    shifts = (torch.randn(kvh, 1, d, generator=gen), torch.randn(kvh, 1, d, generator=gen)) if shifted else (None,) * 2
    one, two = QuantizedKVLayer(bits, torch.rand(kvh, generator=gen) * 0.3 + 0.7, 0.95), None
    one.update(k[:, :, :n - 3] - (shifts[0] if shifted else 0), v[:, :, :n - 3] - (shifts[1] if shifted else 0))
    two = QuantizedKVLayer(bits, one.k_clip, one.v_clip)
    two.update(k[:, :, :n - 3] - (shifts[0] if shifted else 0), v[:, :, :n - 3] - (shifts[1] if shifted else 0))
    for i in range(n - 3, n):
        q = torch.randn(b, heads, 1, d, generator=gen)
        m = None
        if mask == "bool":
            m = torch.ones(b, 1, 1, i + 1, dtype=torch.bool)
            m[1, ..., :3] = False  # left padding
        elif mask == "add":
            m = torch.zeros(b, 1, 1, i + 1)
            m[1, ..., :3] = torch.finfo(torch.float32).min
        kn, vn = k[:, :, i:i + 1], v[:, :, i:i + 1]
        got = one.step(q, kn, vn, d ** -0.5, softcap, *shifts, mask=m)
        two.append(*((kn - shifts[0], vn - shifts[1]) if shifted else (kn, vn)), values=False)
        ref = modules.attend_codes(q, two, d ** -0.5, m, softcap, *shifts)
        assert got is not None and got.shape == (b, heads, d) and one.get_seq_length() == two.get_seq_length() == i + 1
        for mine, theirs in zip((one.store.codes, one.store.scale, one.store.zero),
                                (two.store.codes, two.store.scale, two.store.zero)):
            assert torch.equal(mine[:, :, :i + 1], theirs[:, :, :i + 1])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    kept = QuantizedKVLayer(bits, 0.9, 0.9)
    kept.update(k[:, :, :4], v[:, :, :4], keep=torch.tensor([[True, False, False, False]] * b))
    assert kept.step(torch.randn(b, heads, 1, d), k[:, :, 4:5], v[:, :, 4:5], 1.0) is None


@pytest.mark.parametrize("b, cb, heads, t, d, r", [(1, 1, 3, 1, 64, 64), (2, 2, 5, 7, 16, 16), (3, 1, 2, 4, 12, 8),
                                                   (1, 1, 4, 9, 10, 6)])
def test_rope_in_one_call_is_the_torch_formula_bit_for_bit(ops, monkeypatch, b, cb, heads, t, d, r):
    """``modules._rope`` through the compiled ``rope``: the same bits as transformers' formula, full and partial
    rotary (Phi-4-mini), positions per sequence or one row broadcast, a transposed (non-contiguous) input."""
    from baseq.runtime import modules

    g = torch.Generator().manual_seed(b * t + d)
    x = torch.randn(b, t, heads, d, generator=g).transpose(1, 2) * 5  # as the attention passes it
    angle = torch.rand(cb, t, r // 2, generator=g) * 100
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    got = modules._rope(x, cos, sin)
    monkeypatch.setattr(modules, "native_ops", lambda: None)
    ref = modules._rope(x, cos, sin)
    assert got.shape == ref.shape and torch.equal(got, ref)


@pytest.mark.parametrize("bits, d", [(4, 64), (4, 7), (3, 10), (2, 16), (8, 12)])
def test_kv_encode_stores_the_torch_codes_bit_for_bit(ops, monkeypatch, bits, d):
    """A decoding step's new K/V through the compiled kv_encode: the same codes, scales and zeros as the torch
    path (whose fake-quantized values the prompt's attention uses), per-head clips, a constant row among them."""
    from baseq.runtime.kvcache import QuantizedKVLayer

    g = torch.Generator().manual_seed(bits * 100 + d)
    k, v = torch.randn(2, 3, 5, d, generator=g) * 3, torch.randn(2, 3, 5, d, generator=g)
    k[1, 2, 4] = 0.25  # a constant row: the scale's lower bound
    got, ref = QuantizedKVLayer(bits, torch.tensor([0.9, 1.0, 0.8]), 0.95), QuantizedKVLayer(bits, 0.9, 0.95)
    ref.k_clip = got.k_clip
    assert got.append(k, v, values=False) is None
    with monkeypatch.context() as mp:
        mp.setattr("baseq.runtime.kvcache.native_ops", lambda: None)
        ref.append(k, v, values=False)
    for a, b in zip((got.store.codes, got.store.scale, got.store.zero), (ref.store.codes, ref.store.scale,
                                                                          ref.store.zero)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_a_failed_build_is_one_line_and_the_int8_path(monkeypatch, capsys, tmp_path):
    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("BASEQ_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_loaded", lambda: False)

    def broken(*a, **k):
        raise RuntimeError("Error building extension 'baseq_ops'\nc++: not found")

    monkeypatch.setattr(ext, "load", broken)
    assert native.native_ops() is None and native.native_ops() is None  # tried once
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("baseq: the runtime's kernels could not be built (Error building extension 'baseq_ops'); "
                       "running without them (int8 weights in memory, slower decoding)")
    assert len([line for line in err if "could not be built" in line]) == 1


def test_a_compiler_without_openmp_builds_the_kernels_for_one_thread(monkeypatch, capsys, tmp_path):
    import torch.utils.cpp_extension as ext

    if not sys.platform.startswith("linux"):
        pytest.skip("the kernels are built with OpenMP on Linux only")
    monkeypatch.setenv("BASEQ_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_loaded", lambda: False)
    seen = []

    def no_openmp(*a, extra_cflags, build_directory, **k):
        seen.append((extra_cflags, build_directory))
        if "-fopenmp" in extra_cflags:
            raise RuntimeError("Error building extension 'baseq_ops'\nfatal error: omp.h: No such file")

    monkeypatch.setattr(ext, "load", no_openmp)
    assert native.native_ops() is not None
    assert [("-fopenmp" in flags) for flags, _ in seen] == [True, False] and seen[0][1] != seen[1][1]
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("baseq: the runtime's kernels could not be built with OpenMP (Error building extension "
                       "'baseq_ops'); built to run on one thread")


def test_the_build_folder_names_the_source_and_the_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("BASEQ_CACHE", str(tmp_path))
    first = native.build_dir()
    assert first.parent == tmp_path / "ext"
    monkeypatch.setattr(native, "_cpu_key", lambda: "another machine")
    assert native.build_dir() != first


def _torch_quantize_tokens(x, clip, bits, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setattr(kernels, "native_ops", lambda: None)
        return quantize_tokens(x, clip, bits)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("shape", [(1, 7), (5, 96), (2, 3, 50), (40, 1)])
def test_quantize_rows_is_quantize_tokens_bit_for_bit(ops, monkeypatch, bits, shape):
    g = torch.Generator().manual_seed(bits + len(shape))
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[-1])  # wide ranges: clamps and roundings
    x.view(-1, shape[-1])[0] = 0.7  # a constant row: the scale's floor
    if shape[0] > 1:
        x.view(-1, shape[-1])[1] = x.view(-1, shape[-1])[1].abs() + 1  # all positive: its zero point far below 0
    for clip in (0.9, torch.tensor(0.83), torch.rand(*shape[:-1], 1, generator=g) * 0.5 + 0.5):
        a, s, z = ops.quantize_rows(x, torch.as_tensor(clip, dtype=torch.float32), bits)
        ra, rs, rz = _torch_quantize_tokens(x, clip, bits, monkeypatch)
        assert a.dtype == torch.int8 and torch.equal(a, ra) and torch.equal(s, rs)
        assert (rz is None and z.numel() == 0) or torch.equal(z, rz)
        got = quantize_tokens(x, clip, bits)  # the runtime's entry point takes the operator
        assert torch.equal(got[0], ra) and (got[2] is None) == (rz is None)
    if bits == 4 and shape[0] > 1:  # the offset case happened (the positive row's zero point does not fit)
        assert rz is not None


def test_unpacked_buffers_serve_their_own_linear_and_unpack_each_once_per_pass(ops, monkeypatch):
    """A prompt's MLP slabs call gate/up, down, gate/up, down, …: each linear is unpacked once, and never another
    linear's codes are used — also for same-shaped linears built after others were freed (addresses are reused)."""
    calls = []
    real = ops.int4_unpack

    class Counting:
        def __getattr__(self, name):
            return getattr(ops, name)

        def int4_unpack(self, codes, zero, out):
            calls.append(codes.shape)
            return real(codes, zero, out)

    monkeypatch.setattr(kernels, "native_ops", lambda: Counting())
    monkeypatch.setattr(kernels, "_UNPACKED", kernels._Unpacked())
    rows = INT4_ROWS + 3
    lins = [_linear(True, monkeypatch) for _ in range(3)]
    for _ in range(3):  # a fresh linear each time, maybe at a freed one's address
        del lins[0]
        lins.append(_linear(True, monkeypatch))
    a = torch.randint(-15, 16, (rows, 50), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    refs = [a.int() @ lin.integers().int().t() for lin in lins]
    calls.clear()
    for _ in range(4):  # two linears alternating: unpacked once each
        for lin, ref in zip(lins[:2], refs):
            assert torch.equal(lin._mm(a), ref)
    assert len(calls) == 2
    for lin, ref in zip(lins, refs):  # and a third: it takes the least recently used buffer
        assert torch.equal(lin._mm(a), ref)
    assert len(calls) == 3 and len(kernels._UNPACKED.held) == 2  # the first two were still held


def test_baseq_native_0_turns_the_kernels_off(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("BASEQ_NATIVE", "0")
    assert native.native_ops() is None
    lin = _linear(True, monkeypatch)  # the torch code: int8 codes in memory
    assert lin.codes4 is None and lin.weight.dtype == torch.int8


def test_a_cache_that_cannot_be_written_is_one_line_too(monkeypatch, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("BASEQ_CACHE", str(blocker))  # its ext/ folder cannot be made
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_loaded", lambda: False)
    assert native.native_ops() is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("baseq: the runtime's kernels could not be built (")
