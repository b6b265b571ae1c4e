"""Hadamard matrices, fast Hadamard transforms and random orthogonal matrices (QuaRot-style).

A Hadamard matrix of order n (entries +-1, H @ H.T == n * I) is built as ``kron(H_m, H_p)``:
``H_p`` is Sylvester's matrix for a power of two p (H_2p = [[H_p, H_p], [H_p, -H_p]]) and
``H_m`` a small dense *core* of order m, with m = 1, 2 or given by Paley's constructions:

* Paley I,  q a prime power = 3 (mod 4), m = q + 1:   H = I + [[0, 1^T], [-1, Q]]
* Paley II, q a prime power = 1 (mod 4), m = 2(q + 1): take C = [[0, 1^T], [1, Q]] and replace
  every 0 by [[1, -1], [-1, -1]] and every +-1 by +-[[1, 1], [1, -1]].

Q is the Jacobsthal matrix of GF(q), Q[i, j] = chi(a_i - a_j) with chi the quadratic character.
For q = p^k, k > 1, GF(q) is GF(p)[x] / (f) with f a monic irreducible polynomial found by
search (only for q <= 10^4).  The smallest possible m is chosen, so ``hadamard_transform`` costs an
O(n log p) Walsh-Hadamard butterfly plus an O(n m) matmul with the cached m x m core.
"""
from __future__ import annotations

import functools
import math
import operator
import warnings

import numpy as np
import torch

_MAX_EXTENSION_FIELD = 10_000  # largest q = p^k (k > 1) for which GF(q) is built


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q == p**k, p prime, k >= 1; None otherwise."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # smallest prime factor
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _paley_q(m: int) -> int | None:
    """The q for which Paley I (q = m - 1) or Paley II (q = m/2 - 1) gives order m, else None."""
    candidates = [(m - 1, 3)] + ([(m // 2 - 1, 1)] if m % 2 == 0 else [])
    for q, residue in candidates:
        pk = _prime_power(q)
        if pk is not None and q % 4 == residue and (pk[1] == 1 or q <= _MAX_EXTENSION_FIELD):
            return q
    return None


def hadamard_order_factors(n: int) -> tuple[int, int] | None:
    """(m, p) with n == m * p, p a power of two and m the smallest order with a dense construction
    (m in {1, 2} or Paley I/II); None if no construction exists."""
    n = operator.index(n)
    if n < 1:
        return None
    p = n & -n  # largest power of two dividing n
    m = n // p
    while p >= 1:
        if m <= 2 or _paley_q(m) is not None:
            return m, p
        m, p = m * 2, p // 2
    return None


def has_hadamard(n: int) -> bool:
    """True if ``hadamard_matrix(n)`` can be built."""
    return hadamard_order_factors(n) is not None


def _has_factor(f: list[int], p: int) -> bool:
    """True if the monic polynomial f (coefficients low -> high) over GF(p) has a monic factor of
    degree 1 .. deg(f) // 2 (i.e. f is reducible)."""
    k = len(f) - 1
    for d in range(1, k // 2 + 1):
        for code in range(p**d):
            g = [(code // p**i) % p for i in range(d)] + [1]
            r = list(f)
            for s in range(k - d, -1, -1):  # long division: cancel the degree-(s + d) term
                c = r[s + d]
                for i in range(d + 1):
                    r[s + i] = (r[s + i] - c * g[i]) % p
            if not any(r[:d]):
                return True
    return False


def _irreducible(p: int, k: int) -> list[int]:
    """Low coefficients c_0..c_{k-1} of the first monic irreducible x^k + ... over GF(p)."""
    for code in range(p, p**k):  # c_0 != 0 (else x divides f)
        f = [(code // p**i) % p for i in range(k)] + [1]
        if f[0] and not _has_factor(f, p):
            return f[:k]
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # unreachable


def _gf_tables(q: int) -> tuple[np.ndarray, np.ndarray]:
    """For GF(q) with elements indexed 0..q-1 (base-p digits = polynomial coefficients):
    diff[i, j] = index of a_i - a_j and chi[i] = quadratic character of a_i."""
    p, k = _prime_power(q)
    weights = p ** np.arange(k, dtype=np.int64)
    digits = (np.arange(q, dtype=np.int64)[:, None] // weights) % p  # (q, k)
    diff = np.zeros((q, q), dtype=np.int64)
    for t in range(k):
        diff += ((digits[:, None, t] - digits[None, :, t]) % p) * weights[t]
    sq = np.zeros((q, 2 * k - 1), dtype=np.int64)  # squares as polynomials of degree <= 2k - 2
    for i in range(k):
        for j in range(k):
            sq[:, i + j] = (sq[:, i + j] + digits[:, i] * digits[:, j]) % p
    if k > 1:
        f = np.array(_irreducible(p, k), dtype=np.int64)
        for d in range(2 * k - 2, k - 1, -1):  # x^d = -x^(d-k) * (c_0 + ... + c_{k-1} x^(k-1))
            sq[:, d - k : d] = (sq[:, d - k : d] - sq[:, d : d + 1] * f) % p
    chi = -np.ones(q, dtype=np.int64)
    chi[(sq[:, :k] * weights).sum(1)] = 1
    chi[0] = 0
    return diff, chi


@functools.lru_cache(maxsize=None)
def _paley(q: int) -> np.ndarray:
    """Paley I (q = 3 mod 4, order q + 1) or Paley II (q = 1 mod 4, order 2(q + 1)) matrix, int8."""
    diff, chi = _gf_tables(q)
    Q = chi[diff]
    one = np.ones((1, q), dtype=np.int64)
    if q % 4 == 3:
        H = np.eye(q + 1, dtype=np.int64) + np.block([[np.zeros((1, 1), np.int64), one], [-one.T, Q]])
    elif q % 4 == 1:
        C = np.block([[np.zeros((1, 1), np.int64), one], [one.T, Q]])
        A, B = np.array([[1, 1], [1, -1]]), np.array([[1, -1], [-1, -1]])
        H = np.kron(C, A) + np.kron(np.eye(q + 1, dtype=np.int64), B)  # C has zeros only on its diagonal
    else:
        raise ValueError(f"Paley construction needs an odd prime power q, got {q}")
    H = H.astype(np.int8)
    H.flags.writeable = False
    return H


def _core_int(m: int) -> np.ndarray:
    if m <= 2:
        return np.array([[1]] if m == 1 else [[1, 1], [1, -1]], dtype=np.int8)
    q = _paley_q(m)
    if q is None:
        raise ValueError(f"no Paley construction of order {m}")
    return _paley(q)


@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)  # cached for every later caller: a tensor made in inference mode could not be saved for
def _core(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:  # backward by a training step
    """Cached un-normalised m x m core as a tensor (treat as read-only)."""
    return torch.tensor(_core_int(m), dtype=dtype, device=device)


@functools.lru_cache(maxsize=256)
def _factors_or_raise(n: int) -> tuple[int, int]:
    factors = hadamard_order_factors(n)
    if factors is None:
        raise ValueError(f"no Hadamard matrix construction (Sylvester x Paley) for n={n}")
    return factors


def hadamard_matrix(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Un-normalised +-1 matrix H = kron(H_m, H_p) with H @ H.T == n * I; ValueError if none exists."""
    m, p = _factors_or_raise(n)
    syl = torch.ones(1, 1, dtype=dtype, device=device)
    while syl.shape[0] < p:
        syl = torch.cat([torch.cat([syl, syl], 1), torch.cat([syl, -syl], 1)], 0)
    return torch.kron(torch.tensor(_core_int(m), dtype=dtype, device=device), syl)


@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)  # (as _core)
def _sylvester(p: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Cached un-normalised Sylvester matrix of order p (a power of two; treat as read-only)."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=256)
def _kron_factors(m: int, p: int) -> tuple[int, ...]:
    """H_n = H_m ⊗ H_p1 ⊗ H_p2 ⊗ ... (Sylvester is Kronecker-closed): the Paley core first, then the fewest
    Sylvester factors of order ≤ _MAX_FACTOR, as equal as powers of two allow, the larger ones last. Balanced on
    purpose: a small factor left at the end makes a batched GEMM with a tiny inner size — 256 as 128 × 2 took 11–29×
    the time of 16 × 16 at 2,048–512 rows, 2,048 as 128 × 16 1.4–1.15× that of 32 × 64 (docs/RESULTS.md, Gemma 3)."""
    factors = [m] if m > 1 else []
    bits, cap = p.bit_length() - 1, _MAX_FACTOR.bit_length() - 1
    count = -(-bits // cap)
    for i in range(count):  # the first count - bits % count factors get bits // count, the rest one more
        factors.append(1 << (bits // count + (i >= count - bits % count)))
    return tuple(factors)


@functools.lru_cache(maxsize=256)
@torch.inference_mode(False)  # (as _core)
def _applied(m: int, f: int, core: bool, dtype: torch.dtype, device: torch.device, transpose: bool,
             scale_n: int) -> torch.Tensor:
    """The matrix one factor applies along its axis (``new[j] = Σ_i a[j, i] old[i]``), times 1/√scale_n when
    scale_n > 0 — cached: a decoding step applies the same few transforms to one row each (read-only)."""
    h = _core(m, dtype, device) if core else _sylvester(f, dtype, device)
    a = h.T if transpose else h
    return a * (1.0 / math.sqrt(scale_n)) if scale_n else a


_MAX_FACTOR = 128


@functools.lru_cache(maxsize=256)
@torch.inference_mode(False)  # (as _core)
def _plan(n: int, dtype: torch.dtype, device: torch.device, transpose: bool, scale: bool) -> tuple:
    """``(f, after, matrix)`` per factor of :func:`hadamard_transform` on ``n`` (``after``: the size of the axes after
    the factor's; ``matrix``: what multiplies there — ``aᵀ`` as a view when the factor's axis is the last), cached: a
    decoding step makes this call a few times a layer on one row each, where looking each piece up cost more than
    the products."""
    m, p = _factors_or_raise(n)
    steps, after = [], n
    for k, f in enumerate(_kron_factors(m, p)):
        a = _applied(m, f, k == 0 and m > 1, dtype, device, transpose, n if scale and k == 0 else 0)
        after //= f
        steps.append((f, after, a.T if after == 1 else a))
    return tuple(steps)


def hadamard_transform(x: torch.Tensor, scale: bool = True, transpose: bool = False) -> torch.Tensor:
    """``x @ hadamard_matrix(n).T / sqrt(n)`` along the last dim (n = x.shape[-1]; no 1/sqrt(n) if
    ``scale`` is False; ``x @ hadamard_matrix(n) / sqrt(n)`` with ``transpose``, its inverse when scaled).
    Fast: H_n is a Kronecker product of the Paley core and Sylvester factors of order ≤ 128, so with ``x`` seen as
    ``[rows, f_0, f_1, …]`` each factor acts on its own axis: one (batched) GEMM per factor, in place of the axis —
    O(n · Σ factors) work, all of it in BLAS, and no transposed copies (two factors, 8,960 = 140 × 64: about half
    the time of transposing after each GEMM). The 1/√n scale rides on the first factor. fp16/bf16 are computed in
    fp32 and cast back; differentiable."""
    if not x.is_floating_point():
        raise TypeError(f"hadamard_transform needs a floating-point tensor, got {x.dtype}")
    n = x.shape[-1]
    y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    before = y.numel() // n if n else 0
    for f, after, a in _plan(n, y.dtype, y.device, transpose, scale):
        y = y.reshape(-1, f) @ a if after == 1 else torch.matmul(a, y.reshape(before, f, after))
        before *= f
    y = y.reshape(x.shape)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def hadamard_transform_blocks(x: torch.Tensor, block: int, scale: bool = True) -> torch.Tensor:
    """Normalised Hadamard of size ``block`` applied to each contiguous block of the last dim
    (e.g. per attention head); ValueError if ``block`` does not divide it or has no construction."""
    n = x.shape[-1]
    if block < 1 or n % block:
        raise ValueError(f"block size {block} does not divide the last dimension {n}")
    _factors_or_raise(block)
    y = hadamard_transform(x.reshape(*x.shape[:-1], n // block, block), scale=scale)
    return y.reshape(x.shape)


def _random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


def random_hadamard_matrix(n: int, seed: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Orthogonal ``diag(s) @ H / sqrt(n)`` with s a +-1 vector drawn from a generator seeded with ``seed``."""
    H = hadamard_matrix(n, dtype=dtype, device=device)
    return H.mul_((_random_signs(n, seed) / math.sqrt(n)).to(dtype=dtype, device=H.device)[:, None])


def _random_orthogonal(n: int, seed: int, dtype, device) -> torch.Tensor:
    """Seeded Haar-random orthogonal matrix: QR of a Gaussian with the signs of diag(R) fixed."""
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1
    return (Q * signs).to(dtype=dtype, device=device)


def orthogonal_matrix(n: int, seed: int = 0, kind: str = "hadamard", dtype=torch.float64, device=None) -> torch.Tensor:
    """Seeded n x n orthogonal matrix. kind='hadamard': randomized Hadamard, or (with a warning) a
    block-diagonal randomized Hadamard on the largest constructible divisor d > 1 of n, or a random
    orthogonal matrix if there is none (n odd). kind='random': random orthogonal (QR of a Gaussian)."""
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"matrix size must be positive, got {n}")
    if kind == "random":
        return _random_orthogonal(n, seed, dtype, device)
    if kind != "hadamard":
        raise ValueError(f"unknown rotation kind {kind!r} (expected 'hadamard' or 'random')")
    if has_hadamard(n):
        return random_hadamard_matrix(n, seed, dtype=dtype, device=device)
    d = next((d for d in range(n // 2, 1, -1) if n % d == 0 and has_hadamard(d)), 1)
    if d == 1:
        warnings.warn(f"no Hadamard matrix of order n={n}; using a random orthogonal matrix instead", stacklevel=2)
        return _random_orthogonal(n, seed, dtype, device)
    warnings.warn(
        f"no Hadamard matrix of order n={n}; using a block-diagonal randomized Hadamard "
        f"({n // d} blocks of size {d})",
        stacklevel=2,
    )
    blocks = torch.kron(torch.eye(n // d, dtype=torch.float64), hadamard_matrix(d) / math.sqrt(d))
    return (_random_signs(n, seed)[:, None] * blocks).to(dtype=dtype, device=device)
