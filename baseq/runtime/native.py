"""The runtime's compiled operators (``csrc/ops.cpp``), each exact against the torch code it replaces.

* **4-bit weight codes, two a byte** (``int4_mm``, ``int4_unpack``). A decode step multiplies one token by every
  weight of the model, so its time is the time to read the weights (1.5B: 1.31 GB of int8 codes a token, read at the
  memory's ~18–26 GB/s). Nibbles halve that read and the resident weights; the sums stay integer sums, equal to the
  int8 GEMM's bit for bit. Longer inputs (a prompt) unpack one linear's codes at a time into a kept buffer and keep
  torch's int8 GEMM, which is faster there where the CPU has VNNI; without VNNI (``kernels.gemm_kind``) ``int4_mm``
  multiplies them itself, in register tiles on the nibbles (AVX2's ``maddubs``, int16 sums widened before they could
  overflow): 2–2.6× a float32 GEMM of the same integers at 512 rows.
* **Decoding attention on the 4-bit KV codes** (``kv_scores``, ``kv_weighted``): a query against the stored K codes
  and the attention weights against the V codes, read two a byte where the cache keeps them, instead of unpacking
  the whole cache into float codes at every step (a cost that grew with the context: at 8,192 tokens ~6 ms a layer,
  more than the layer's linears). Float sums in an order of their own, so equal to the torch path to rounding
  (~1e-6 relative), and the same bits whatever the thread count.
* **A few rows against int8 weights** (``int8_mm``): the int8 vocabulary table's decoding product and grouped or 8-bit
  weights at decode, where torch's int8 GEMM has no fast kernel (CPUs without VNNI: 60 ms against ~2 for SmolLM2's
  head; ``kernels.gemm_kind``). Integer sums, equal to torch's bit for bit.
* **Per-token activation quantization in one pass** (``quantize_rows``): the same float32 operations as
  :func:`~baseq.runtime.kernels.quantize_tokens`, in the same order, instead of ~20 tensor operations a call (a
  decode step makes four calls a layer).
* **A decoding step in fewer calls.** A small model's decoding step was mostly the cost of calling ~130 small tensor
  operations a layer, not of their arithmetic. ``point_int4``: a quantization point and its 4-bit linear at a few
  rows (scale, shift, codes, nibble product, epilogue — the same bits); ``kv_step``: the new token's K/V coded into
  the cache (the same codes as ``kv_encode``) and the attention on the codes (equal to the torch path to rounding,
  as ``kv_scores`` / ``kv_weighted``); ``rope``: the rotary embedding (the same bits).

The source is compiled on first use with torch's extension builder (``-O3``, ``-march=native`` on x86: the machine
that runs it builds it; ``-ffp-contract=off``: no fused multiply-adds, so float results match torch's; ``-fopenmp``
on Linux: the loops run on torch's threads) into
``$BASEQ_CACHE/ext/<key>``, the key naming the source, torch and the CPU, so a cache shared between machines never
hands one another's binary; later processes load it in milliseconds. Where nothing can be compiled (no C++ compiler,
no torch headers) one line says so and the runtime runs its torch code, as before. ``BASEQ_NATIVE=0`` turns them off.
Tests: ``tests/test_native.py`` (and the packed-model tests in ``tests/test_cli_runtime.py``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

from ..assets import cache_dir

SOURCE = Path(__file__).with_name("csrc") / "ops.cpp"
_state: dict[str, object] = {}


def cpu_flags() -> str:
    """The CPU's instruction-set line of /proc/cpuinfo (``flags`` on x86, ``Features`` on ARM), or "" elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _cpu_key() -> str:
    """What the compiled code depends on besides its source: the CPU's instruction sets, torch, Python."""
    return f"{platform.machine()}|{cpu_flags()}|{torch.__version__}|{sys.version_info[:2]}"


def _flags(openmp: bool = True) -> list[str]:
    """The compiler's flags. ``-fopenmp``: ATen's ``at::parallel_for`` is an OpenMP pragma compiled into the caller, so
    without it every kernel ran on one thread whatever ``torch.set_num_threads`` said (the OpenMP calls resolve to
    torch's own runtime, loaded before the extension; Linux only: Apple's clang has no -fopenmp)."""
    return (["-O3", "-ffp-contract=off"] + (["-fopenmp"] if openmp and sys.platform.startswith("linux") else [])
            + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []))


def build_dir(flags: list[str] | None = None) -> Path:
    flags = _flags() if flags is None else flags
    digest = hashlib.sha256(SOURCE.read_bytes() + _cpu_key().encode() + " ".join(flags).encode()).hexdigest()[:16]
    return cache_dir() / "ext" / f"baseq_ops-{digest}"


def _loaded() -> bool:
    """Whether this process has the operators already (``torch.ops`` makes any namespace on request)."""
    try:
        torch.ops.baseq_ops.int4_mm
    except (AttributeError, RuntimeError):
        return False
    return True


def _build() -> object | None:
    if os.environ.get("BASEQ_NATIVE", "1") == "0":
        return None
    if _loaded():
        return torch.ops.baseq_ops
    from torch.utils.cpp_extension import load

    try:  # the ninja wheel (a dependency) puts its binary beside the package; torch looks for it on PATH
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    def compile_with(flags: list[str]) -> object:
        where = build_dir(flags)
        where.mkdir(parents=True, exist_ok=True)
        if not any(where.glob("*.so")):
            print("baseq: compiling the runtime's kernels once for this machine (~10 s)", file=sys.stderr)
        load("baseq_ops", sources=[str(SOURCE)], extra_cflags=flags, build_directory=str(where),
             is_python_module=False, verbose=False)
        return torch.ops.baseq_ops

    def first_line(e: Exception) -> str:
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]

    try:
        try:
            return compile_with(_flags())
        except Exception as e:  # noqa: BLE001 -- a compiler without OpenMP (e.g. clang without libomp): one thread
            if _flags() == _flags(openmp=False):
                raise
            ops = compile_with(_flags(openmp=False))
            print(f"baseq: the runtime's kernels could not be built with OpenMP ({first_line(e)}); built to run "
                  f"on one thread", file=sys.stderr)
            return ops
    except Exception as e:  # noqa: BLE001 -- any build failure means: run without it
        print(f"baseq: the runtime's kernels could not be built ({first_line(e)}); running without them (int8 "
              f"weights in memory, slower decoding)", file=sys.stderr)
        return None


def native_ops() -> object | None:
    """``torch.ops.baseq_ops`` (``int4_mm``, ``int4_unpack``, ``int8_mm``, ``kv_scores``, ``kv_weighted``,
    ``quantize_rows``, ``kv_encode``, ``point_int4``, ``kv_step``, ``rope``; ``int4_tiles`` and ``parallel_threads``
    report how it was built), built
    or loaded once per process; None where it cannot be (or ``BASEQ_NATIVE=0``)."""
    if "ops" not in _state:
        _state["ops"] = _build()
    return _state["ops"]
