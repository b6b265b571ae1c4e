"""Tests for baseq.rotation.hadamard: constructions, fast transform, random rotations."""
import math
import warnings

import numpy as np
import pytest
import torch

from baseq.rotation.hadamard import (
    _core,
    _kron_factors,
    _paley,
    has_hadamard,
    hadamard_matrix,
    hadamard_order_factors,
    hadamard_transform,
    hadamard_transform_blocks,
    orthogonal_matrix,
    random_hadamard_matrix,
)

LLM_SIZES = {  # n -> expected (m, p): smallest dense core
    64: (1, 64),
    576: (36, 16),  # Paley II, q = 17
    1536: (12, 128),  # Paley I, q = 11
    2048: (1, 2048),
    4864: (76, 64),  # Paley II, q = 37
    8960: (140, 64),  # Paley I, q = 139
    11008: (344, 32),  # Paley I, q = 343 = 7^3
    14336: (28, 512),  # Paley I, q = 27 = 3^3
    18944: (148, 128),  # Paley II, q = 73
}
SMALL_SIZES = [1, 2, 4, 8, 12, 20, 24, 28, 36, 40, 48, 52, 60, 80, 96, 100, 160, 320, 640]


def _is_prime_power(q):
    if q < 2:
        return False
    p = min(d for d in range(2, q + 1) if q % d == 0)
    while q % p == 0:
        q //= p
    return q == 1


def _naive_core_ok(m):  # independent oracle of the orders the module should construct
    if m in (1, 2):
        return True
    if _is_prime_power(m - 1) and (m - 1) % 4 == 3:
        return True
    return m % 2 == 0 and _is_prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1


def _assert_hadamard(H, n):
    assert H.shape == (n, n)
    assert bool((H.abs() == 1).all())
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=H.dtype))


def _assert_orthogonal(Q, tol=1e-12):
    n = Q.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(Q.double() @ Q.double().T, eye, atol=tol, rtol=0)
    assert torch.allclose(Q.double().T @ Q.double(), eye, atol=tol, rtol=0)


# ----------------------------------------------------------------------------- order factors
@pytest.mark.parametrize("n,expected", sorted(LLM_SIZES.items()))
def test_order_factors_llm_sizes(n, expected):
    assert hadamard_order_factors(n) == expected
    assert has_hadamard(n)


@pytest.mark.parametrize(
    "n,expected",
    [(1, (1, 1)), (2, (1, 2)), (12, (12, 1)), (20, (20, 1)), (28, (28, 1)), (36, (36, 1)), (40, (20, 2)),
     (48, (12, 4)), (52, (52, 1)), (96, (12, 8)), (100, (100, 1)), (160, (20, 8)), (320, (20, 16)),
     (5 * 2**10, (20, 256)), (12 * 2**10, (12, 1024))],
)
def test_order_factors_small(n, expected):
    assert hadamard_order_factors(n) == expected


@pytest.mark.parametrize("n", [0, -4, 3, 5, 6, 7, 9, 10, 14, 18, 22, 92, 116, 184])
def test_order_factors_none(n):
    assert hadamard_order_factors(n) is None
    assert not has_hadamard(n)
    if n >= 1:
        with pytest.raises(ValueError):
            hadamard_matrix(n)
        with pytest.raises(ValueError):
            hadamard_transform(torch.randn(2, n))


def test_order_factors_smallest_core_against_oracle():
    for n in range(1, 2049):
        f = hadamard_order_factors(n)
        # smallest m with n = m * 2^j and an m the oracle can build
        ms = [n >> j for j in range(n.bit_length()) if n % (1 << j) == 0]
        want = min((m for m in ms if _naive_core_ok(m)), default=None)
        if want is None:
            assert f is None and not has_hadamard(n), n
        else:
            m, p = f
            assert (m, m * p) == (want, n) and p & (p - 1) == 0, n
            assert has_hadamard(n)
            assert n in (1, 2) or n % 4 == 0  # necessary condition for Hadamard orders


# ----------------------------------------------------------------------------- matrices
def test_all_constructible_orders_up_to_256_are_hadamard():
    count = 0
    for n in range(1, 257):
        if has_hadamard(n):
            _assert_hadamard(hadamard_matrix(n), n)
            count += 1
    assert count > 50


@pytest.mark.parametrize("q", [3, 7, 11, 19, 23, 27, 43, 47, 243, 343, 5, 9, 13, 17, 25, 29, 37, 49, 73, 81, 121, 125, 169])
def test_paley_cores_including_extension_fields(q):
    H = torch.from_numpy(_paley(q).astype(np.int64))
    m = q + 1 if q % 4 == 3 else 2 * (q + 1)
    _assert_hadamard(H, m)


@pytest.mark.parametrize("n", [12, 40, 576])
def test_hadamard_matrix_full(n):
    _assert_hadamard(hadamard_matrix(n), n)
    assert hadamard_matrix(n, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("n", [1536, 2048, 4864])
def test_hadamard_matrix_mid_sizes_rows(n):
    H = hadamard_matrix(n, dtype=torch.float32)  # integer sums < 2^24 are exact in fp32
    assert H.shape == (n, n) and bool((H.abs() == 1).all())
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:24]
    assert torch.equal(H[idx] @ H.T, n * torch.eye(n)[idx])
    x = torch.randn(3, n, dtype=torch.float32)
    assert torch.allclose(hadamard_transform(x), x @ H.T / math.sqrt(n), atol=2e-5, rtol=0)


@pytest.mark.parametrize("n", [8960, 11008, 14336, 18944])
def test_large_sizes_via_core_and_transform(n):
    m, p = LLM_SIZES[n]
    core = hadamard_matrix(m)  # these m are their own smallest factorisation
    assert hadamard_order_factors(m) == (m, 1)
    _assert_hadamard(core, m)
    gen = torch.Generator().manual_seed(0)
    # columns of T against an independent formula: H[a*p+b, c*p+d] = core[a, c] * (-1)^popcount(b & d)
    cols = torch.randint(0, n, (4,), generator=gen).tolist() + [0, n - 1]
    eye_rows = torch.zeros(len(cols), n, dtype=torch.float64)
    eye_rows[torch.arange(len(cols)), torch.tensor(cols)] = 1
    out = hadamard_transform(eye_rows)
    b = torch.arange(p)
    for row, i in zip(out, cols):
        c, d = divmod(i, p)
        parity = torch.tensor([bin(v).count("1") % 2 for v in (b & d).tolist()], dtype=torch.float64)
        expected = torch.kron(core[:, c], 1 - 2 * parity) / math.sqrt(n)
        assert torch.allclose(row, expected, atol=1e-12, rtol=0)
    # orthogonality: Gram matrix of a random batch is preserved
    x = torch.randn(8, n, dtype=torch.float64, generator=gen)
    y = hadamard_transform(x)
    assert torch.allclose(y @ y.T, x @ x.T, atol=1e-9 * n, rtol=0)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- fast transform
@pytest.mark.parametrize("n", SMALL_SIZES)
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_transform_matches_matrix_fp64(n, lead):
    H = hadamard_matrix(n)
    x = torch.randn(*lead, n, dtype=torch.float64)
    y = hadamard_transform(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert torch.allclose(y, x @ H.T / math.sqrt(n), atol=1e-12, rtol=0)
    assert torch.allclose(hadamard_transform(x, scale=False), x @ H.T, atol=1e-10, rtol=0)


@pytest.mark.parametrize("p, expected", [(128, [128]), (256, [16, 16]), (2048, [32, 64]), (8192, [64, 128]),
                                         (32768, [32, 32, 32])])
def test_sylvester_part_splits_into_balanced_factors(p, expected):
    # a small trailing factor (256 as 128 x 2) made the head-dim-256 transform of Gemma 2/3 ~50x slower
    assert _kron_factors(1, p) == tuple(expected) and _kron_factors(20, p) == (20, *expected)


@pytest.mark.parametrize("n", [256, 2048, 20 * 256])
def test_transform_matches_matrix_with_several_sylvester_factors(n):
    x = torch.randn(3, 2, n, dtype=torch.float64)
    H = hadamard_matrix(n)
    assert torch.allclose(hadamard_transform(x), x @ H.T / math.sqrt(n), atol=1e-12, rtol=0)
    assert torch.allclose(hadamard_transform(x, transpose=True), x @ H / math.sqrt(n), atol=1e-12, rtol=0)


def test_transform_noncontiguous_input():
    n = 40
    x = torch.randn(n, 5, dtype=torch.float64).T  # (5, 40) non-contiguous
    assert torch.allclose(hadamard_transform(x), x @ hadamard_matrix(n).T / math.sqrt(n), atol=1e-12)


@pytest.mark.parametrize("n", [64, 96, 576])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_transform_dtypes(n, dtype, tol):
    x = torch.randn(4, n).to(dtype)
    y = hadamard_transform(x)
    assert y.dtype == dtype and y.shape == x.shape
    ref = x.double() @ hadamard_matrix(n).T / math.sqrt(n)
    assert torch.allclose(y.double(), ref, atol=tol * 4, rtol=tol)


def test_transform_rejects_integer_input():
    with pytest.raises(TypeError):
        hadamard_transform(torch.ones(2, 4, dtype=torch.int64))


@pytest.mark.parametrize("n", [12, 64, 160])
def test_transform_gradient(n):
    H = hadamard_matrix(n)
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, n, dtype=torch.float64)
    (hadamard_transform(x) * w).sum().backward()
    assert torch.allclose(x.grad, w @ H / math.sqrt(n), atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(hadamard_transform, (torch.randn(2, n, dtype=torch.float64, requires_grad=True),))


def test_transform_gradient_low_precision():
    x = torch.randn(2, 20, dtype=torch.float32, requires_grad=True)
    hadamard_transform(x.to(torch.bfloat16)).float().sum().backward()
    ref = torch.ones(2, 20) @ hadamard_matrix(20, dtype=torch.float32) / math.sqrt(20)
    assert torch.allclose(x.grad, ref, atol=5e-2)


def test_transform_is_involution_for_sylvester_and_orthogonal_otherwise():
    x = torch.randn(5, 256, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(hadamard_transform(x)), x, atol=1e-12)  # Sylvester is symmetric
    x = torch.randn(5, 576, dtype=torch.float64)
    H = hadamard_matrix(576) / math.sqrt(576)
    assert torch.allclose(hadamard_transform(x) @ H, x, atol=1e-12)


def test_core_cache_per_dtype():
    from baseq.rotation.hadamard import _applied, _plan

    hadamard_transform(torch.randn(2, 24))
    before, applied, planned = _core.cache_info(), _applied.cache_info(), _plan.cache_info().hits
    hadamard_transform(torch.randn(2, 24))  # the scaled factor matrices come from their own cache, built once
    assert _plan.cache_info().hits == planned + 1 and _applied.cache_info() == applied
    assert _core.cache_info() == before
    assert _core(12, torch.float32, torch.device("cpu")) is _core(12, torch.float32, torch.device("cpu"))
    assert _core(12, torch.float64, torch.device("cpu")).dtype == torch.float64


def test_transform_blocks():
    x = torch.randn(2, 3, 4 * 64, dtype=torch.float64)
    y = hadamard_transform_blocks(x, 64)
    H = hadamard_matrix(64) / 8
    ref = (x.reshape(2, 3, 4, 64) @ H.T).reshape(x.shape)
    assert y.shape == x.shape and torch.allclose(y, ref, atol=1e-12)
    x = torch.randn(3, 5 * 12, dtype=torch.float64)
    ref = (x.reshape(3, 5, 12) @ hadamard_matrix(12).T / math.sqrt(12)).reshape(3, 60)
    assert torch.allclose(hadamard_transform_blocks(x, 12), ref, atol=1e-12)
    with pytest.raises(ValueError):
        hadamard_transform_blocks(x, 7)  # does not divide 60
    with pytest.raises(ValueError):
        hadamard_transform_blocks(torch.randn(2, 12), 6)  # divides but no Hadamard of order 6


# ----------------------------------------------------------------------------- random rotations
@pytest.mark.parametrize("n", [64, 12, 40, 576])
def test_random_hadamard_matrix(n):
    Q = random_hadamard_matrix(n, seed=1)
    _assert_orthogonal(Q)
    assert torch.equal(Q, random_hadamard_matrix(n, seed=1))
    assert not torch.equal(Q, random_hadamard_matrix(n, seed=2))
    signs = Q * math.sqrt(n) / hadamard_matrix(n)  # diag(s) @ H: each row is a constant +-1
    assert torch.allclose(signs, signs[:, :1].expand(-1, n), atol=1e-12)
    assert bool((signs[:, 0].abs() - 1).abs().max() < 1e-12)
    Q32 = random_hadamard_matrix(n, seed=1, dtype=torch.float32)
    assert Q32.dtype == torch.float32 and torch.allclose(Q32.double(), Q, atol=1e-7)


@pytest.mark.parametrize("n", [64, 1536])
def test_orthogonal_matrix_hadamard_no_warning(n):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Q = orthogonal_matrix(n, seed=3)
    assert torch.equal(Q, random_hadamard_matrix(n, seed=3))


@pytest.mark.parametrize("n,block", [(92, 4), (6, 2), (184, 8), (22, 2)])
def test_orthogonal_matrix_block_fallback(n, block):
    assert not has_hadamard(n)
    with pytest.warns(UserWarning, match=rf"n={n}\b"):
        Q = orthogonal_matrix(n, seed=5)
    _assert_orthogonal(Q)
    mask = torch.kron(torch.eye(n // block), torch.ones(block, block)).bool()
    assert bool((Q[~mask] == 0).all()) and bool((Q[mask].abs() * math.sqrt(block) - 1).abs().max() < 1e-12)
    with pytest.warns(UserWarning):
        assert torch.equal(Q, orthogonal_matrix(n, seed=5))
    with pytest.warns(UserWarning):
        assert not torch.equal(Q, orthogonal_matrix(n, seed=6))


@pytest.mark.parametrize("n", [7, 13, 9, 101])
def test_orthogonal_matrix_qr_fallback_for_odd(n):
    assert not has_hadamard(n)
    with pytest.warns(UserWarning, match=rf"n={n}\b"):
        Q = orthogonal_matrix(n, seed=0)
    _assert_orthogonal(Q)
    with pytest.warns(UserWarning):
        assert torch.equal(Q, orthogonal_matrix(n, seed=0))


def test_orthogonal_matrix_random_kind():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Q = orthogonal_matrix(48, seed=11, kind="random")
    _assert_orthogonal(Q)
    assert torch.equal(Q, orthogonal_matrix(48, seed=11, kind="random"))
    assert not torch.equal(Q, orthogonal_matrix(48, seed=12, kind="random"))
    assert (Q.abs() * math.sqrt(48) - 1).abs().max() > 0.1  # not a Hadamard matrix
    Q32 = orthogonal_matrix(48, seed=11, kind="random", dtype=torch.float32)
    assert Q32.dtype == torch.float32 and torch.allclose(Q32.double(), Q, atol=1e-6)


def test_orthogonal_matrix_bad_arguments():
    with pytest.raises(ValueError):
        orthogonal_matrix(16, kind="givens")
    with pytest.raises(ValueError):
        orthogonal_matrix(0)


def test_factors_cached_in_inference_mode_still_train():
    """The Kronecker factors are cached for every later caller: made under ``torch.inference_mode`` (a perplexity
    evaluation first), they broke any later training step through a Hadamard (BASE-Q after an FP evaluation in the
    same process)."""
    from baseq.rotation.hadamard import _core, _sylvester

    _core.cache_clear(), _sylvester.cache_clear()
    with torch.inference_mode():
        hadamard_transform(torch.randn(2, 12 * 16))
    x = torch.randn(2, 12 * 16, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 12 * 16, requires_grad=True)
    (hadamard_transform(x).sum() + hadamard_transform(y).sum()).backward()
    assert x.grad is not None and y.grad is not None and torch.isfinite(y.grad).all()
