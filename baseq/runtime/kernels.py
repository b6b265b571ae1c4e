"""Integer kernels of the runtime: per-token activation codes, 4-bit packing, and the int8 GEMM with its zero points.

Zero-point arithmetic (the gemmlowp way). An activation row is quantized to unsigned codes ``q_k ∈ [0, 2^b − 1]``
with a per-token float scale ``s`` and an integer zero point ``z`` (exactly the fake quantizer's grid:
``x̂_k = (q_k − z)·s``). A weight row ``j`` is ``ŵ_jk = (c_jk − z_j)·t_j`` with codes ``c``, zero ``z_j``, scale ``t_j``
per output channel (or per group of input columns). Then

    y_j = Σ_k x̂_k ŵ_jk = s · t_j · Σ_k (q_k − z)(c_jk − z_j).

At load the weights become ``W_jk = c_jk − z_j`` in int8 (|W| ≤ 2^b − 1 fits for b ≤ 7). The activation side is
held as *centred* codes ``a_k = q_k − z`` in int8 — they fit whenever ``z`` lies in ``[2^b − 128, 128]``, i.e. for
every token whose clipped range contains or nearly contains zero — so ``Σ_k a_k W_jk`` is one int8 × int8 → int32 GEMM
(``torch._int_mm``; on CPUs without VNNI the compiled register tiles for 4-bit weights, else a float32 GEMM of the
same integers, exactly: :func:`int_mm`) and the
float epilogue is ``acc · s · t_j + bias_j``. For the rare batch with a token whose zero
point does not fit, the codes are offset instead (``a_k = q_k − 2^(b−1)``, ``z' = z − 2^(b−1)``) and the
precomputed row sums ``Σ_k W_jk`` give the correction ``− z' Σ_k W_jk``. 8-bit weights (|c − z| up to 255) keep
``c − 128`` and subtract ``(z_j − 128) Σ_k a_k``. Every integer is exact; the only rounding is the float epilogue
(and, in the reference fake-quant model, its float GEMM), so the two agree to float tolerance.

Rows that stay float (the ``--keep-massive`` tokens) ride in the same GEMM as three int8 "digit" rows each,
``x ≈ s·(d₀ + d₁/128 + d₂/128²)`` (:func:`~baseq.quant.qmodel.float_digits`): their integer sums are exact too, and
their own epilogue adds the three scaled sums — no second pass over the weight codes.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.qmodel import combine_digits, float_digits
from .native import cpu_flags, native_ops

ACT_SCALE_EPS = 1e-6  # the fake quantizer's guard against constant tokens (quant/quantizer.py)
# Up to this many rows a product reads the 4-bit codes directly; above, the codes are unpacked to int8 for torch's
# GEMM (python benchmarks/int4_kernel.py, 1.5B shapes, 2 threads: nibbles 119 ms a pass at 8 rows against 159 for
# unpack + int8, 217 against 196 at 16).
INT4_ROWS = 8


class _Unpacked:
    """Int8 buffers for codes unpacked from nibbles, kept between calls, each remembering whose codes it holds. Two
    suffice for a prompt: the MLP runs over token slabs (gate/up, down, gate/up, down, …: see
    :class:`~baseq.runtime.modules.RuntimeMLP`), so each linear is unpacked once per forward instead of once per slab.
    A fresh tensor per call would also fault in new pages each time unless the allocator keeps freed memory
    (:func:`keep_freed_memory`): over the 1.5B model's linears at one token, 146 ms a pass against 131 ms with a kept
    buffer (benchmarks/int4_kernel.py)."""

    slots = 2

    def __init__(self):
        self.held: list[tuple[tuple, Tensor]] = []  # (whose codes, buffer), most recently used last

    def get(self, owner: int, codes: Tensor, zero: Tensor, k: int, unpack, dtype: torch.dtype = torch.int8) -> Tensor:
        """``owner``: a number no other holder of codes gets in this process (memory addresses are reused).
        ``dtype``: int8, or float32 for :func:`float_int_mm` (the integers as floats, converted once per forward)."""
        key = (owner, codes._version, zero._version, codes.device, dtype)
        for i, (whose, buf) in enumerate(self.held):
            if whose == key:
                self.held.append(self.held.pop(i))
                return buf[:codes.shape[0] * k].view(codes.shape[0], k)
        numel = codes.shape[0] * k
        if len(self.held) < self.slots:
            buf = torch.empty(numel, dtype=dtype, device=codes.device)
        else:
            buf = self.held.pop(0)[1]  # the least recently used
            if buf.numel() < numel or buf.device != codes.device or buf.dtype != dtype:
                buf = torch.empty(numel, dtype=dtype, device=codes.device)
        w = buf[:numel].view(codes.shape[0], k)
        if dtype == torch.int8:
            unpack(codes, zero, w)
        else:
            ints = torch.empty(codes.shape[0], k, dtype=torch.int8, device=codes.device)
            unpack(codes, zero, ints)
            with torch.inference_mode():  # (the kept buffer may have been made in inference mode, or outside it)
                w.copy_(ints)
        self.held.append((key, buf))
        return w


_UNPACKED = _Unpacked()
_SERIALS = itertools.count()


def keep_freed_memory() -> bool:
    """Have glibc's malloc reuse freed memory for the next large temporary instead of mapping fresh pages for each one.

    The runtime creates many short-lived tensors of a few MB per layer (codes, accumulators, epilogues); by default
    glibc serves each from a fresh mmap and unmaps it on free, so every one pays page faults on first touch. Measured
    on the default model (1 thread, 512-token prefill): 840 ms → 608 ms; the full-precision model is unchanged.
    Process-wide; set after loading: while a model is built, its many differently sized temporaries would fragment
    the kept heap (Qwen2.5-1.5B: 5.1 GB resident after loading 2.2 GB of tensors). No-op off glibc."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------- activations


def token_grid(x: Tensor, clip: Tensor | float, bits: int) -> tuple[Tensor, Tensor]:
    """Per-row ``(scale, zero)`` ``[..., 1]`` of the fake quantizer (:func:`baseq.quant.quantizer._minmax_fake_quant`,
    the same operations in the same order): the row's ``[min, max]`` shrunk towards its midpoint by ``clip``."""
    maxq = 2**bits - 1
    lo = x.amin(dim=-1, keepdim=True)  # (torch.aminmax is 3× slower than these two on the CPU)
    hi = x.amax(dim=-1, keepdim=True)
    mid = (hi + lo) * 0.5
    half = (hi - lo) * 0.5 * clip
    scale = torch.clamp(2.0 * half / maxq, min=ACT_SCALE_EPS)
    return scale, torch.round((half - mid) / scale)


def quantize_tokens(x: Tensor, clip: Tensor | float, bits: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row asymmetric quantization of ``x [..., C]`` (float32) onto the fake quantizer's grid.

    Returns ``(a, s, z)``: int8 codes of x's shape and float32 ``s`` ``[..., 1]``. Usually ``z`` is None and ``a`` the
    centred codes ``q − zero``; when some zero point does not fit, ``a = q − 2^(b−1)`` and ``z = zero − 2^(b−1)``.
    Either way ``(a − z)·s`` (``z`` = 0 when None) is bit for bit the fake-quantized ``x``."""
    ops = native_ops() if x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() else None
    if ops is not None and (not torch.is_tensor(clip) or clip.numel() in (1, x.numel() // x.shape[-1])):
        a, scale, zero = ops.quantize_rows(x, torch.as_tensor(clip, dtype=torch.float32), bits)  # the same, one pass
        return a, scale, zero if zero.numel() else None
    maxq = 2**bits - 1
    scale, zero = token_grid(x, clip, bits)
    r = torch.div(x, scale).round_()
    # round(x/s) + zero clamped to [0, maxq], then − zero: integer-valued floats, so this is exact
    if bool(zero.abs().max() <= 128 - 2**bits):
        return r.clamp_(-zero, maxq - zero).to(torch.int8), scale, None
    off = 2 ** (bits - 1)
    return r.add_(zero).clamp_(0, maxq).sub_(off).to(torch.int8), scale, zero - off


def dequantize_tokens(a: Tensor, s: Tensor, z: Tensor | None) -> Tensor:
    """``(a − z)·s`` in float32: the fake-quantized values of :func:`quantize_tokens`'s input."""
    return a.float() * s if z is None else (a.float() - z) * s


# ---------------------------------------------------------------------------------------------- packing


def pack_nibbles(codes: Tensor) -> Tensor:
    """Unsigned 4-bit codes ``[rows, n]`` (values 0..15) → uint8 ``[rows, ⌈n/2⌉]``, column 2i in the low nibble."""
    c = codes.to(torch.uint8)
    if c.shape[-1] % 2:
        c = F.pad(c, (0, 1))
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 codes ``[rows, n]``."""
    out = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)
    return out[..., :n]


# ---------------------------------------------------------------------------------------------- GEMM


# Products and partial sums of integers below 2^24 are exact in float32, whatever the order of the sums: an int8 GEMM
# computed as a float32 one is the same int32 result bit for bit (quant/qmodel.exact_linear uses this too).
FLOAT_EXACT = 1 << 24
# torch's CPU int8 GEMM is fast only with VNNI instructions; without them (x86 with AVX2 only: AMD Zen 1–3, Intel
# before Ice Lake / Alder Lake; other architectures) it ran ~36–60× slower than a float32 GEMM of the same shape
# (512 × 576 × 1536, 2 threads, AMD EPYC without AVX-512, 2026-12-07: 254 ms against 7 ms), and a 4-bit model's prefill
# 20× slower than its FP32 source. There the same sums come from float32 GEMMs (float_int_mm).
_GEMM: dict[str, object] = {}


def gemm_kind() -> str:
    """``int8`` (torch's int8 GEMM) where the CPU has VNNI, else ``float`` (:func:`float_int_mm`). ``BASEQ_GEMM=int8``
    or ``float`` chooses; the results are the same bits either way."""
    if "kind" not in _GEMM:
        import os

        kind = os.environ.get("BASEQ_GEMM", "").strip().lower()
        if kind not in ("int8", "float"):
            kind = "int8" if {"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_flags().split()) else "float"
        _GEMM["kind"] = kind
    return str(_GEMM["kind"])


def tiles() -> bool:
    """Whether the compiled ``int4_mm`` multiplies many rows in register tiles (x86 with AVX2): on a CPU whose GEMM
    kind is ``float`` that beats the float32 GEMM of the unpacked codes (1.5B shapes: 2–2.6× at 512 rows, more at
    fewer)."""
    if "tiles" not in _GEMM:
        ops = native_ops()
        _GEMM["tiles"] = ops is not None and bool(ops.int4_tiles())
    return bool(_GEMM["tiles"])


def int_mm(a: Tensor, w: Tensor, w_bound: int = 128) -> Tensor:
    """``a [M, K] int8 @ w[N, K]ᵀ int8 (or its integers as float32) → int32``: torch's int8 GEMM (w used
    column-major, its fast layout on the CPU), or, on a CPU without a fast one (:func:`gemm_kind`),
    :func:`float_int_mm` — or for a few rows, where converting ``w`` would cost more than the product, the compiled
    ``int8_mm`` (runtime/native.py). ``w_bound``: a bound on ``|w|``."""
    if a.device.type == "cuda":
        return padded_int_mm(a, w)
    if w.is_floating_point():  # the integers as float32 already (a kept buffer of float_int_mm's)
        return float_int_mm(a, w, w_bound)
    if gemm_kind() == "float":
        if a.shape[0] > INT4_ROWS:
            return float_int_mm(a, w, w_bound)
        ops = native_ops() if a.device.type == "cpu" and w.is_contiguous() else None
        if ops is not None and a.numel() and int(a.min()) > -128:  # a few rows: the compiled int8 GEMV
            return ops.int8_mm(a, w)
    return torch._int_mm(a, w.t())


def float_int_mm(a: Tensor, w: Tensor, w_bound: int = 128) -> Tensor:
    """:func:`int_mm` as float32 GEMMs, exactly: ``w`` (int8, or its integers as float32) ``[N, K]``, ``|w| ≤
    w_bound``. The input columns are split so that no partial sum can reach 2^24 (one GEMM for 4-bit activations and
    weights; ``--keep-massive``'s digit rows, up to 127, split 8,960 columns in two)."""
    if torch.get_float32_matmul_precision() != "highest":  # float32 GEMMs may round (TF32 / bfloat16): not exact
        return torch._int_mm(a, w.t() if w.dtype == torch.int8 else w.to(torch.int8).t())
    k = a.shape[1]
    a_bound = max(int(a.max()), -int(a.min())) if a.numel() else 0
    step = k if a_bound * w_bound == 0 else max(1, (FLOAT_EXACT - 1) // (a_bound * w_bound))
    af, wf = a.float(), w.float()
    if step >= k:
        return torch.mm(af, wf.t()).to(torch.int32)
    out = None
    for i in range(0, k, step):
        part = torch.mm(af[:, i:i + step], wf[:, i:i + step].t()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


def padded_int_mm(a: Tensor, w: Tensor) -> Tensor:
    """:func:`int_mm` for CUDA's kernel, which needs M > 16 and K, N multiples of 8: rows / columns of zeros are
    added where a shape needs them — to the weight only when K or N does (never for real models' shapes: a padded
    copy of the weight on every call, as ``F.pad`` makes even with nothing to add, would cost a decode step a full
    extra read and write of its weights)."""
    m, k = a.shape
    n = w.shape[0]
    pk, pn, pm = -k % 8, -n % 8, max(0, 17 - m)
    if pk or pm:
        a = F.pad(a, (0, pk, 0, pm))
    if pk or pn:
        w = F.pad(w, (0, pk, 0, pn))
    return torch._int_mm(a, w.t())[:m, :n]


class IntLinear(nn.Module):
    """One or several linears that read the same input, as one int8 weight matrix (outputs concatenated).

    Built from per-linear codes ``c [N, K]`` (uint8), zero points and scales ``[N, G]`` (``G`` groups of input
    columns; 1 = per output channel) and biases. ``forward(a, s, z)`` takes activation codes from
    :func:`quantize_tokens`; ``forward_float(x)`` serves 16-bit activations (weight-only quantization). ``nibbles``:
    hold 4-bit per-channel codes two to a byte where the compiled kernel runs (a model bound for a GPU keeps int8)."""

    def __init__(self, codes: list[Tensor], zeros: list[Tensor], scales: list[Tensor], biases: list[Tensor | None],
                 bits: int, nibbles: bool = True, packed_k: int | None = None):
        """``packed_k``: the codes arrive two a byte as :func:`pack_nibbles` wrote them (``[N_i, ⌈K/2⌉]``, as a packed
        folder stores them) for ``K = packed_k`` input columns; where they are held two a byte anyway they are taken
        as they are, without unpacking and packing again (a 1.5B model loads several seconds faster)."""
        super().__init__()
        zero = torch.cat(zeros).to(torch.int16)
        scale = torch.cat(scales).float()
        n = zero.shape[0]
        k = packed_k if packed_k is not None else codes[0].shape[1]
        groups = scale.shape[1]
        if k % groups:
            raise ValueError(f"{groups} weight groups do not divide {k} input columns")
        self.n, self.k, self.groups, self.bits = n, k, groups, bits
        self.w_bound = 2**bits - 1 if bits <= 7 else 128  # |c − z| below 8 bits, |c − 128| at 8
        gs = k // groups
        # 4-bit codes per output channel, for a CPU with the compiled kernel: two codes a byte (runtime/native.py)
        nibbles = nibbles and bits <= 4 and groups == 1 and codes[0].device.type == "cpu" and native_ops() is not None
        if nibbles:
            packed = torch.cat(codes) if packed_k is not None else pack_nibbles(torch.cat(codes))
            self.register_buffer("codes4", packed.contiguous())  # [N, ⌈K/2⌉] uint8
            self.register_buffer("zero4", zero[:, 0].int().contiguous())  # [N] int32
            self.register_buffer("weight", None)
            self.register_buffer("wzero", None)
            # Σ_k (c_jk − z_j), from the nibbles (an odd K's padding nibble is 0); exact in int32, as from int8 codes
            sums = ((packed & 15) + (packed >> 4)).sum(-1, dtype=torch.int32)  # a byte's two codes add to ≤ 30
            self.register_buffer("wsum", (sums - k * self.zero4).float()[:, None])  # [N, 1]
        else:
            if packed_k is not None:
                codes = [unpack_nibbles(cc, k) for cc in codes]
            c = torch.cat(codes).to(torch.int16)
            zero_full = zero.repeat_interleave(gs, dim=1)
            if bits <= 7:  # W = c − z fits int8 (|W| ≤ 127)
                w = (c - zero_full).to(torch.int8)
                self.register_buffer("wzero", None)  # folded into the codes
            else:  # keep c − 128 and correct for z − 128 separately
                w = (c - 128).to(torch.int8)
                self.register_buffer("wzero", (zero - 128).float())  # [N, G]
            self.register_buffer("wsum", w.view(n, groups, gs).sum(-1, dtype=torch.int32).float())  # [N, G]
            self.register_buffer("codes4", None)
            self.register_buffer("zero4", None)
            # int8 W: [N, K] per channel; [G, N, K/G] with groups, so each group's matrix is contiguous for the GEMM
            self.register_buffer("weight", w.contiguous() if groups == 1 else
                                 w.view(n, groups, gs).transpose(0, 1).contiguous())
        self.serial = next(_SERIALS)  # whose codes an unpacked buffer holds (_Unpacked)
        self.register_buffer("scale", scale.contiguous())  # [N, G]
        self.register_buffer("scale_t", scale.t().contiguous())  # [G, N]; row g = group g's scales
        self.register_buffer("scale_row", self.scale_t[0])  # per channel: [N]
        b = [bb if bb is not None else torch.zeros(cc.shape[0]) for bb, cc in zip(biases, codes)]
        self.register_buffer("bias", torch.cat(b).float())
        self.splits = [cc.shape[0] for cc in codes]

    def forward(self, a: Tensor, s: Tensor, z: Tensor | None, kept: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Codes from :func:`quantize_tokens` (``a [M, K]`` int8, ``s`` / ``z`` ``[M, 1]``) → float32 ``[M, N]``.
        ``kept``: ``(mask [M], x [m, K])``, rows computed from their float values instead (the ``--keep-massive``
        tokens): as three int8 digit rows each (:func:`~baseq.quant.qmodel.float_digits`) in the same GEMM."""
        m_rows = a.shape[0]
        if kept is not None:
            digits, ds = float_digits(kept[1])
            a = torch.cat([a, digits.to(torch.int8)])
        if self.groups == 1:
            acc = self._mm(a)
            y = torch.addcmul(self.bias, self._correct(acc[:m_rows], a[:m_rows], z, 0, self.k) * s, self.scale_row)
            if kept is not None:
                y[kept[0]] = torch.addcmul(self.bias, combine_digits(self._digit_sums(acc, a, m_rows, 0) * ds),
                                           self.scale_row)
            return y
        gs = self.k // self.groups
        out = out_d = None
        for g in range(self.groups):
            ag = a[:, g * gs:(g + 1) * gs]
            acc = int_mm(ag, self.weight[g], self.w_bound)
            part = self._correct(acc[:m_rows], ag[:m_rows], z, g, gs) * self.scale_t[g]
            out = part if out is None else out.add_(part)
            if kept is not None:
                part = self._digit_sums(acc, ag, m_rows, g) * self.scale_t[g]
                out_d = part if out_d is None else out_d.add_(part)
        y = torch.addcmul(self.bias, out, s)
        if kept is not None:
            y[kept[0]] = combine_digits(out_d * ds) + self.bias
        return y

    @property
    def held(self) -> str:
        """How this linear holds its weight in memory: ``4-bit, two a byte``, ``int8`` or ``float32`` (16-bit
        activations, :meth:`use_float_weights`)."""
        return "4-bit, two a byte" if self.codes4 is not None else "int8" if self.weight is not None else "float32"

    def _mm(self, a: Tensor) -> Tensor:
        """``Σ_k a_k W_jk`` per output channel, int32 ``[M, N]``: from the nibbles at a few rows (a decode step), else
        through :func:`int_mm` on the codes unpacked into a kept buffer (:class:`_Unpacked`; float32 integers where
        the GEMM is a float one)."""
        if self.codes4 is None:
            return int_mm(a, self.weight, self.w_bound)
        ops = native_ops() if a.device.type == "cpu" else None
        if ops is None:
            return int_mm(a, self.integers(), self.w_bound)
        if a.shape[0] <= INT4_ROWS:
            return ops.int4_mm(a, self.codes4, self.zero4)
        if gemm_kind() == "float":
            if tiles():  # the compiled register tiles on the nibbles (AVX2): no unpacking, ≥ 2× a float32 GEMM
                return ops.int4_mm(a, self.codes4, self.zero4)
            return int_mm(a, _UNPACKED.get(self.serial, self.codes4, self.zero4, self.k, ops.int4_unpack,
                                           torch.float32), self.w_bound)  # the integers as float32, kept
        return int_mm(a, _UNPACKED.get(self.serial, self.codes4, self.zero4, self.k, ops.int4_unpack))

    def _digit_sums(self, acc: Tensor, a: Tensor, m_rows: int, g: int) -> Tensor:
        """The digit rows' (rows ``m_rows:``) integer sums ``Σ_k d_k (c_jk − z_j)`` of group ``g`` as float32: the
        8-bit weights' zero-point term subtracted in integers first (digits reach 127, so float could round)."""
        acc = acc[m_rows:]
        if self.wzero is not None:
            rows = a[m_rows:].sum(-1, keepdim=True, dtype=torch.int32)
            acc = acc - rows * self.wzero[:, g].to(torch.int32)
        return acc.float()

    def _correct(self, acc: Tensor, a: Tensor, z: Tensor | None, g: int, k: int) -> Tensor:
        """The zero-point terms of group ``g`` (``k`` columns), if any: ``Σ_k (a_k − z) W_jk`` from ``Σ_k a_k W_jk``."""
        if z is None and self.wzero is None:
            return acc
        acc = acc.float()
        if z is not None:
            acc.sub_(z * self.wsum[:, g])
        if self.wzero is not None:
            rows = a.sum(-1, keepdim=True, dtype=torch.int32).float() - (0 if z is None else k * z)
            acc.sub_(rows * self.wzero[:, g])
        return acc

    def integers(self) -> Tensor:
        """The weight's integers ``c − z`` ``[N, K]``: int8 below 8 bits (the buffer itself per output channel, an
        int8 copy in ``[N, K]`` order with groups), else as integer-valued float32."""
        if self.codes4 is not None:
            return (unpack_nibbles(self.codes4, self.k).to(torch.int16) - self.zero4[:, None]).to(torch.int8)
        w = self.weight if self.groups == 1 else self.weight.transpose(0, 1).reshape(self.n, self.k)
        return w if self.wzero is None else w.float() - self.wzero.repeat_interleave(self.k // self.groups, dim=1)

    def dequantized(self) -> Tensor:
        """The float32 weight ``[N, K]`` these codes stand for."""
        return self.integers().float() * self.scale.repeat_interleave(self.k // self.groups, dim=1)

    def use_float_weights(self) -> None:
        """For 16-bit activations (W4A16, W8A16): keep the dequantized float32 weight instead of the codes. (torch's
        int8-weight × float kernel, ``_weight_int8pack_mm``, measured 10–100× slower than a float32 GEMM on this
        project's CPU, so weight-only models save disk, not memory or time.)"""
        self.register_buffer("wfloat", self.dequantized().contiguous())
        for name in ("weight", "wsum", "wzero", "codes4", "zero4"):
            self.register_buffer(name, None)

    def forward_float(self, x: Tensor) -> Tensor:
        """Float activations ``x [M, K]`` (16-bit activation models): a float32 GEMM with the dequantized weight."""
        if getattr(self, "wfloat", None) is None:
            self.use_float_weights()
        return F.linear(x.float(), self.wfloat, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.k}, out={self.splits}, groups={self.groups}, w_bits={self.bits}"
