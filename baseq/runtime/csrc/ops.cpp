// The runtime's compiled operators (baseq/runtime/native.py): exact integer products with 4-bit weight codes held two
// to a byte, and the per-token activation quantization in one pass.
//
//   int4_mm(a [M, K] int8, packed [N, ceil(K/2)] uint8, zero [N] int32) -> [M, N] int32
//       out[m, n] = sum_k a[m, k] * (c[n, k] - zero[n]),   c[n, 2i] = packed[n, i] & 15, c[n, 2i+1] = packed[n, i] >> 4
//   int4_unpack(packed, zero, out [N, K] int8): out = c - zero (into a buffer the caller keeps: no fresh pages)
//   int8_mm(a [M, K] int8 in -127..127, w [N, K] int8) -> [M, N] int32: a few rows against int8 weights (the int8
//       vocabulary table's decoding GEMV, grouped or 8-bit weights at decode) where torch's int8 GEMM is slow
//       (CPUs without VNNI: baseq.runtime.kernels.gemm_kind).
//
// Every sum is an integer sum, so the result equals torch._int_mm on the unpacked weight bit for bit. The weight
// matrix is read once per call at half a byte per weight: at one token (decode) that read is the whole cost.
// x86 with AVX2: the codes (unsigned, <= 15) meet the activations (signed) in _mm256_maddubs_epi16, whose pair sums
// stay within 2 * 15 * 128 = 3840, so its int16 saturation never happens, then _mm256_madd_epi16 widens them to int32;
// with AVX512-VNNI, _mm256_dpbusd_epi32 sums four products straight into int32. Other CPUs run the plain loop.
// Above TILE_ROWS rows (a prompt on a CPU without VNNI: baseq.runtime.kernels) register tiles, see tile().
// The loops run on torch's threads through at::parallel_for (built with -fopenmp: runtime/native.py).
//
//   kv_scores(q [B, H, G, D] float32, codes [B, S, T, ceil(D/2)] uint8, n) -> [B, H, G, n] float32
//       out[b, h, g, t] = sum_d q[b, h, g, d] * c[b, h, t, d] for the first n tokens: a decoding query against the
//       4-bit K codes of a quantized KV cache (heads 0..H-1 of its S), read two a byte, never unpacked in memory.
//   kv_weighted(p [B, H, G, n] float32, codes, head0) -> [B, H, G, D] float32
//       out[b, h, g, d] = sum_t p[b, h, g, t] * c[b, head0 + h, t, d]: attention weights against the V codes.
//       Float sums, in an order of their own that depends neither on the thread count nor on AVX2 (its path adds
//       in the plain loop's order): tokens in slabs of KV_SLAB, each slab summed in token order, the slabs' sums
//       added in slab order; a dot product over eight lanes (lane l takes the columns l mod 8), then the lanes in
//       order. Not torch's order, so equal to its matmul on the unpacked codes only to float rounding (~1e-6).
//
//   quantize_rows(x [R, C] float32, clip (1 or R values) float32, bits) -> (a int8 [R, C], scale [R, 1], zero)
//       baseq.runtime.kernels.quantize_tokens in one pass per row instead of ~20 tensor operations: the same float32
//       operations in the same order (built with -ffp-contract=off, so no multiply-add is fused), so the same bits.
//       zero is empty when every row's codes are centred (a = q - z), else [R, 1] (a = q - 2^(b-1), see kernels.py).
//   kv_encode(x [R, D] float32, clip (1 or R values), bits) -> (codes uint8, scale [R, 1], zero [R, 1])
//       new tokens' K/V rows as the quantized cache stores them (kvcache.QuantizedLayer._encode: the same grid and
//       operations, so the same bits): clamp(round(x / s) + z, 0, 2^b - 1), two a byte at <= 4 bits.
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX2__)
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
// acc += the four-product sums of unsigned w and signed x bytes, in int32
inline __m256i dot4(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_epi32(acc, w, x); }
#else
inline __m256i dot4(__m256i acc, __m256i w, __m256i x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
#endif

inline int32_t hsum(__m256i v) {
  const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xB1)));
}

inline __m256i load(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
#endif

// f(std::integral_constant<int, MB>{}) for MB = mb in 1..4: the row-block sizes the kernels are instantiated for
template <typename F>
inline void with_rows(int mb, F&& f) {
  switch (mb) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// out[m] = sum_i lo(p[i]) * e[m][i] + hi(p[i]) * o[m][i] over i < n2, for MB activation rows at once: each 32-byte
// slab of codes is split into nibbles once and meets every row; two accumulators per row keep the additions of
// consecutive slabs independent (one chain would wait on the previous sum's latency).
template <int MB>
inline void dot_rows(const uint8_t* p, const int8_t* const* e, const int8_t* const* o, int64_t n2, int32_t* out) {
  int64_t i = 0;
  for (int m = 0; m < MB; ++m) out[m] = 0;
#if defined(__AVX2__)
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256i acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  for (; i + 64 <= n2; i += 64) {
    for (int h = 0; h < 2; ++h) {
      const __m256i w = load(p + i + 32 * h);
      const __m256i lo = _mm256_and_si256(w, low);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
      for (int m = 0; m < MB; ++m) {
        acc[m][h] = dot4(acc[m][h], lo, load(e[m] + i + 32 * h));
        acc[m][h] = dot4(acc[m][h], hi, load(o[m] + i + 32 * h));
      }
    }
  }
  for (; i + 32 <= n2; i += 32) {
    const __m256i w = load(p + i);
    const __m256i lo = _mm256_and_si256(w, low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
    for (int m = 0; m < MB; ++m) {
      acc[m][0] = dot4(acc[m][0], lo, load(e[m] + i));
      acc[m][1] = dot4(acc[m][1], hi, load(o[m] + i));
    }
  }
  for (int m = 0; m < MB; ++m) out[m] = hsum(_mm256_add_epi32(acc[m][0], acc[m][1]));
#endif
  for (; i < n2; ++i) {
    const int32_t lo = p[i] & 15, hi = p[i] >> 4;
    for (int m = 0; m < MB; ++m) out[m] += lo * e[m][i] + hi * o[m][i];
  }
}

void check_args(const at::Tensor& packed, const at::Tensor& zero) {
  TORCH_CHECK(packed.device().is_cpu() && zero.device().is_cpu(), "int4 kernels run on the CPU");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(),
              "packed codes: a contiguous [N, ceil(K/2)] uint8 tensor");
  TORCH_CHECK(zero.scalar_type() == at::kInt && zero.dim() == 1 && zero.size(0) == packed.size(0),
              "zero points: [N] int32");
}

// ------------------------------------------------------------------------------- many rows: register tiles

#if defined(__AVX2__)
// Tiles of MR activation rows x NR weight rows (a prompt's products). Each 32-byte slab of codes (64 columns) is split
// into nibbles once and meets MR rows; each activation slab meets NR weight rows, so the loads are shared both ways.
// The unsigned-by-signed products go through _mm256_maddubs_epi16 (pair sums within 2 * 15 * 128) and are summed in
// int16 lanes for `span` slabs (each adds at most 4 * 15 * |a|max to a lane, span chosen so int16 cannot overflow),
// then widened to int32 by _mm256_madd_epi16: two instructions per 32 products (maddubs, add) instead of three. The
// same code with or without VNNI (the result is an integer sum either way).
template <int MR, int NR>
inline void tile(const uint8_t* const* w, const int8_t* const* e, const int8_t* const* o, int64_t slabs,
                 int64_t span, int32_t (*out)[2]) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256i acc[MR][NR], wide[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) wide[m][j] = _mm256_setzero_si256();
  for (int64_t s0 = 0; s0 < slabs; s0 += span) {
    const int64_t s1 = std::min(slabs, s0 + span);
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) acc[m][j] = _mm256_setzero_si256();
    for (int64_t s = s0; s < s1; ++s) {
      __m256i lo[NR], hi[NR];
      for (int j = 0; j < NR; ++j) {
        const __m256i v = load(w[j] + 32 * s);
        lo[j] = _mm256_and_si256(v, low);
        hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      }
      for (int m = 0; m < MR; ++m) {
        const __m256i ev = load(e[m] + 32 * s), ov = load(o[m] + 32 * s);
        for (int j = 0; j < NR; ++j) {
          acc[m][j] = _mm256_add_epi16(acc[m][j], _mm256_maddubs_epi16(lo[j], ev));
          acc[m][j] = _mm256_add_epi16(acc[m][j], _mm256_maddubs_epi16(hi[j], ov));
        }
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) wide[m][j] = _mm256_add_epi32(wide[m][j], _mm256_madd_epi16(acc[m][j], ones));
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) out[m][j] = hsum(wide[m][j]);
}

template <int MR>
inline void tile_cols(int nr, const uint8_t* const* w, const int8_t* const* e, const int8_t* const* o, int64_t slabs,
                      int64_t span, int32_t (*out)[2]) {
  if (nr == 2) {
    tile<MR, 2>(w, e, o, slabs, span, out);
  } else {
    tile<MR, 1>(w, e, o, slabs, span, out);
  }
}
#endif

constexpr int64_t TILE_ROWS = 8;  // above this many rows, int4_mm runs register tiles (AVX2) instead of dot_rows
constexpr int64_t L2_ROWS = 64;   // weight rows whose codes stay in the L2 cache while every activation row meets them

// Each row's loop is a function of its own, its sizes arguments: inside at::parallel_for's OpenMP region a lambda's
// by-reference captures live in memory that any int8 store may alias (char types alias everything), so the compiler
// reloaded them at every element and did not vectorize (the unpack ran 8x slower); arguments stay in registers.

// one activation row as its even and odd columns (the codes' low and high nibbles); returns the row's sum, and its
// largest |a| in *bound
inline int32_t split_row(const int8_t* __restrict src, int64_t k, int8_t* __restrict ev, int8_t* __restrict od,
                         int32_t* bound) {
  for (int64_t i = 0; i < k / 2; ++i) {
    ev[i] = src[2 * i];
    od[i] = src[2 * i + 1];
  }
  if (k % 2) ev[k / 2] = src[k - 1];
  int32_t sum = 0, most = 0;
  for (int64_t j = 0; j < k; ++j) {
    sum += src[j];
    most = std::max(most, std::abs(static_cast<int32_t>(src[j])));
  }
  *bound = most;
  return sum;
}

// The activations as even and odd columns, zero past K up to `width` bytes each, each row's sum; returns the largest
// |a| of all rows.
int32_t split_columns(const int8_t* ap, int64_t m_rows, int64_t k, int64_t width, std::vector<int8_t>& even,
                      std::vector<int8_t>& odd, std::vector<int32_t>& row_sum) {
  even.assign(m_rows * width, 0);
  odd.assign(m_rows * width, 0);
  row_sum.assign(m_rows, 0);
  std::vector<int32_t> row_bound(m_rows, 0);
  int8_t* ev = even.data();
  int8_t* od = odd.data();
  int32_t* sums = row_sum.data();
  int32_t* bounds = row_bound.data();
  at::parallel_for(0, m_rows, 16, [=](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      sums[m] = split_row(ap + m * k, k, ev + m * width, od + m * width, bounds + m);
    }
  });
  return m_rows ? *std::max_element(row_bound.begin(), row_bound.end()) : 0;
}

at::Tensor int4_mm(const at::Tensor& a_in, const at::Tensor& packed, const at::Tensor& zero) {
  check_args(packed, zero);
  TORCH_CHECK(a_in.scalar_type() == at::kChar && a_in.dim() == 2 && a_in.device().is_cpu(),
              "activations: [M, K] int8 on the CPU");
  const at::Tensor a = a_in.contiguous();
  const int64_t m_rows = a.size(0), k = a.size(1), n = packed.size(0), n2 = packed.size(1);
  TORCH_CHECK(n2 == (k + 1) / 2, "packed codes hold ", 2 * n2, " columns, activations ", k);
  std::vector<int8_t> even, odd;
  std::vector<int32_t> row_sum;
  [[maybe_unused]] const int32_t bound = split_columns(a.data_ptr<int8_t>(), m_rows, k, n2, even, odd, row_sum);
  at::Tensor out = at::empty({m_rows, n}, a.options().dtype(at::kInt));
  int32_t* op = out.data_ptr<int32_t>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const int32_t* zp = zero.data_ptr<int32_t>();
#if defined(__AVX2__)
  if (m_rows > TILE_ROWS) {
    const int64_t span = std::max<int64_t>(1, 32767 / (4 * 15 * std::max<int32_t>(bound, 1)));
    const int64_t slabs = n2 / 32, tail = slabs * 32;
    at::parallel_for(0, (n + L2_ROWS - 1) / L2_ROWS, 1, [&](int64_t begin, int64_t end) {
      const uint8_t* w[2];
      const int8_t* e[4];
      const int8_t* o[4];
      int32_t sums[4][2];
      for (int64_t nb = begin; nb < end; ++nb) {
        const int64_t r_end = std::min(n, (nb + 1) * L2_ROWS);
        for (int64_t m0 = 0; m0 < m_rows; m0 += 4) {
          const int mr = static_cast<int>(std::min<int64_t>(4, m_rows - m0));
          for (int i = 0; i < mr; ++i) {
            e[i] = even.data() + (m0 + i) * n2;
            o[i] = odd.data() + (m0 + i) * n2;
          }
          for (int64_t r = nb * L2_ROWS; r < r_end; r += 2) {
            const int nr = static_cast<int>(std::min<int64_t>(2, r_end - r));
            for (int j = 0; j < nr; ++j) w[j] = pp + (r + j) * n2;
            with_rows(mr, [&](auto rows) { tile_cols<decltype(rows)::value>(nr, w, e, o, slabs, span, sums); });
            for (int i = 0; i < mr; ++i) {
              for (int j = 0; j < nr; ++j) {
                int32_t s = sums[i][j];
                for (int64_t c = tail; c < n2; ++c) s += (w[j][c] & 15) * e[i][c] + (w[j][c] >> 4) * o[i][c];
                op[(m0 + i) * n + r + j] = s - zp[r + j] * row_sum[m0 + i];
              }
            }
          }
        }
      }
    });
    return out;
  }
#endif
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    const int8_t* e[4];
    const int8_t* o[4];
    int32_t sums[4];
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* row = pp + r * n2;
      for (int64_t m0 = 0; m0 < m_rows; m0 += 4) {
        const int mb = static_cast<int>(std::min<int64_t>(4, m_rows - m0));
        for (int j = 0; j < mb; ++j) {
          e[j] = even.data() + (m0 + j) * n2;
          o[j] = odd.data() + (m0 + j) * n2;
        }
        with_rows(mb, [&](auto rows) { dot_rows<decltype(rows)::value>(row, e, o, n2, sums); });
        for (int j = 0; j < mb; ++j) op[(m0 + j) * n + r] = sums[j] - zp[r] * row_sum[m0 + j];
      }
    }
  });
  return out;
}

// out[m] = sum_i w[i] * a[m][i] over i < k, for MB rows of int8 activations (none -128) against one row of int8
// weights: |w| meets sign(w) * a in the unsigned-by-signed product (pair sums within 2 * 128 * 127 = 32512, so
// _mm256_maddubs_epi16 never saturates), the same integer sums as the plain loop.
template <int MB>
inline void dot8_rows(const int8_t* w, const int8_t* const* a, int64_t k, int32_t* out) {
  int64_t i = 0;
  for (int m = 0; m < MB; ++m) out[m] = 0;
#if defined(__AVX2__)
  __m256i acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  for (; i + 64 <= k; i += 64) {
    for (int h = 0; h < 2; ++h) {
      const __m256i wv = load(w + i + 32 * h);
      const __m256i wa = _mm256_abs_epi8(wv);
      for (int m = 0; m < MB; ++m) acc[m][h] = dot4(acc[m][h], wa, _mm256_sign_epi8(load(a[m] + i + 32 * h), wv));
    }
  }
  for (; i + 32 <= k; i += 32) {
    const __m256i wv = load(w + i);
    const __m256i wa = _mm256_abs_epi8(wv);
    for (int m = 0; m < MB; ++m) acc[m][0] = dot4(acc[m][0], wa, _mm256_sign_epi8(load(a[m] + i), wv));
  }
  for (int m = 0; m < MB; ++m) out[m] = hsum(_mm256_add_epi32(acc[m][0], acc[m][1]));
#endif
  for (; i < k; ++i) {
    for (int m = 0; m < MB; ++m) out[m] += static_cast<int32_t>(w[i]) * a[m][i];
  }
}

at::Tensor int8_mm(const at::Tensor& a_in, const at::Tensor& w) {
  TORCH_CHECK(a_in.scalar_type() == at::kChar && a_in.dim() == 2 && a_in.device().is_cpu(),
              "activations: [M, K] int8 on the CPU");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.device().is_cpu() && w.is_contiguous(),
              "weights: a contiguous [N, K] int8 tensor on the CPU");
  TORCH_CHECK(w.size(1) == a_in.size(1), "weights hold ", w.size(1), " columns, activations ", a_in.size(1));
  const at::Tensor a = a_in.contiguous();
  const int64_t m_rows = a.size(0), k = a.size(1), n = w.size(0);
  const int8_t* ap = a.data_ptr<int8_t>();
  for (int64_t j = 0; j < m_rows * k; ++j) TORCH_CHECK(ap[j] != -128, "int8_mm: activations must lie in -127..127");
  at::Tensor out = at::empty({m_rows, n}, a.options().dtype(at::kInt));
  int32_t* op = out.data_ptr<int32_t>();
  const int8_t* wp = w.data_ptr<int8_t>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    const int8_t* rows[4];
    int32_t sums[4];
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t m0 = 0; m0 < m_rows; m0 += 4) {
        const int mb = static_cast<int>(std::min<int64_t>(4, m_rows - m0));
        for (int j = 0; j < mb; ++j) rows[j] = ap + (m0 + j) * k;
        with_rows(mb, [&](auto block) { dot8_rows<decltype(block)::value>(wp + r * k, rows, k, sums); });
        for (int j = 0; j < mb; ++j) op[(m0 + j) * n + r] = sums[j];
      }
    }
  });
  return out;
}

// one row of codes, two a byte, as int8 c - z (see split_row on why a function of its own)
inline void unpack_row(const uint8_t* __restrict row, int64_t k, int32_t z, int8_t* __restrict dst) {
  for (int64_t i = 0; i < k / 2; ++i) {
    dst[2 * i] = static_cast<int8_t>((row[i] & 15) - z);
    dst[2 * i + 1] = static_cast<int8_t>((row[i] >> 4) - z);
  }
  if (k % 2) dst[k - 1] = static_cast<int8_t>((row[k / 2] & 15) - z);
}

void int4_unpack(const at::Tensor& packed, const at::Tensor& zero, at::Tensor& out) {
  check_args(packed, zero);
  const int64_t n = packed.size(0), n2 = packed.size(1), k = out.dim() == 2 ? out.size(1) : -1;
  TORCH_CHECK(out.scalar_type() == at::kChar && out.is_contiguous() && out.device().is_cpu() && out.size(0) == n &&
              n2 == (k + 1) / 2, "unpack target: a contiguous [N, K] int8 tensor for ", 2 * n2, " packed columns");
  int8_t* op = out.data_ptr<int8_t>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const int32_t* zp = zero.data_ptr<int32_t>();
  at::parallel_for(0, n, 64, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) unpack_row(pp + r * n2, k, zp[r], op + r * k);
  });
}

// ------------------------------------------------------------------------------------------ attention on KV codes

constexpr int64_t KV_SLAB = 256;  // tokens summed together before the slabs' sums are added (kv_weighted)
constexpr int LANES = 8;

#if defined(__AVX2__)
// eight bytes of codes as float: their low nibbles (even columns) and high nibbles (odd columns)
inline void codes8(const uint8_t* row, __m256& lo, __m256& hi) {
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4));
}
#endif

#if defined(__AVX2__)
// NB queries' eight-lane sums over the first vec columns: acc[q * LANES + l] = sum over j = l mod 8 of
// qe[q][j] * lo[j] + qo[q][j] * hi[j], added in column order
template <int NB>
inline void query_block(const float* qe, const float* qo, const float* lo, const float* hi, int64_t d2, int64_t vec,
                        float* acc) {
  __m256 a[NB];
  for (int q = 0; q < NB; ++q) a[q] = _mm256_setzero_ps();
  for (int64_t j = 0; j < vec; j += LANES) {
    const __m256 l = _mm256_loadu_ps(lo + j), h = _mm256_loadu_ps(hi + j);
    for (int q = 0; q < NB; ++q) {
      a[q] = _mm256_add_ps(a[q], _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(qe + q * d2 + j), l),
                                               _mm256_mul_ps(_mm256_loadu_ps(qo + q * d2 + j), h)));
    }
  }
  for (int q = 0; q < NB; ++q) _mm256_storeu_ps(acc + q * LANES, a[q]);
}
#endif

// scores[g] = sum_i qe[g][i] * lo_i + qo[g][i] * hi_i for one token's codes (d2 bytes), G queries: eight lanes
// (lane l takes i = l mod 8), then the lanes in order. The vector and the plain paths add in the same order.
// acc: scratch of G * LANES + 2 * d2 floats.
inline void token_scores(const uint8_t* row, const float* qe, const float* qo, int64_t G, int64_t d2, float* acc,
                         float* scores) {
  std::fill(acc, acc + G * LANES, 0.0f);
  int64_t i = 0;
#if defined(__AVX2__)
  const int64_t vec = d2 / LANES * LANES;
  if (vec) {
    float* lo = acc + G * LANES;  // the token's codes as float, once for every query
    float* hi = lo + d2;
    for (; i < vec; i += LANES) {
      __m256 l, h;
      codes8(row + i, l, h);
      _mm256_storeu_ps(lo + i, l);
      _mm256_storeu_ps(hi + i, h);
    }
    // queries four (then two, one) at a time: independent addition chains (one would wait on each sum's latency)
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) query_block<4>(qe + g * d2, qo + g * d2, lo, hi, d2, vec, acc + g * LANES);
    for (; g + 2 <= G; g += 2) query_block<2>(qe + g * d2, qo + g * d2, lo, hi, d2, vec, acc + g * LANES);
    for (; g < G; ++g) query_block<1>(qe + g * d2, qo + g * d2, lo, hi, d2, vec, acc + g * LANES);
  }
#endif
  for (; i < d2; ++i) {
    const float lo = static_cast<float>(row[i] & 15), hi = static_cast<float>(row[i] >> 4);
    for (int64_t g = 0; g < G; ++g) acc[g * LANES + i % LANES] += qe[g * d2 + i] * lo + qo[g * d2 + i] * hi;
  }
  for (int64_t g = 0; g < G; ++g) {
    float s = 0;
    for (int l = 0; l < LANES; ++l) s += acc[g * LANES + l];
    scores[g] = s;
  }
}

// acc[g] (even columns, then odd: [G, 2, d2]) += w[t][g] * codes of token t, for tokens t = 0..nt-1 (nt <= 4) in
// order: each accumulator element sees the same additions in the same order as one token at a time would give it
// (the vector path only keeps it in a register across the group's tokens). cf: scratch of 4 * 2 * d2 floats.
inline void tokens_weighted(const uint8_t* const* rows, const float* w, int nt, int64_t G, int64_t d2, float* acc,
                            float* cf) {
  int64_t i = 0;
#if defined(__AVX2__)
  const int64_t vec = d2 / LANES * LANES;
  for (int t = 0; t < nt; ++t) {
    for (int64_t j = 0; j < vec; j += LANES) {
      __m256 l, h;
      codes8(rows[t] + j, l, h);
      _mm256_storeu_ps(cf + t * 2 * d2 + j, l);
      _mm256_storeu_ps(cf + t * 2 * d2 + d2 + j, h);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    for (int half = 0; half < 2; ++half) {
      float* a = acc + g * 2 * d2 + half * d2;
      for (int64_t j = 0; j < vec; j += LANES) {
        __m256 r = _mm256_loadu_ps(a + j);
        for (int t = 0; t < nt; ++t) {
          r = _mm256_add_ps(r, _mm256_mul_ps(_mm256_set1_ps(w[t * G + g]), _mm256_loadu_ps(cf + t * 2 * d2 + half * d2 + j)));
        }
        _mm256_storeu_ps(a + j, r);
      }
    }
  }
  i = vec;
#endif
  for (; i < d2; ++i) {
    for (int t = 0; t < nt; ++t) {
      const float lo = static_cast<float>(rows[t][i] & 15), hi = static_cast<float>(rows[t][i] >> 4);
      for (int64_t g = 0; g < G; ++g) {
        acc[g * 2 * d2 + i] += w[t * G + g] * lo;
        acc[g * 2 * d2 + d2 + i] += w[t * G + g] * hi;
      }
    }
  }
}

void check_kv(const at::Tensor& x, const at::Tensor& codes, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu(), "KV kernels run on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 4, what, ": a [B, H, G, *] float32 tensor");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 4 && codes.stride(3) == 1 &&
              codes.size(0) == x.size(0), "KV codes: [B, S, T, ceil(D/2)] uint8, rows contiguous, batch of ", what);
}

at::Tensor kv_scores(const at::Tensor& q_in, const at::Tensor& codes, int64_t n) {
  check_kv(q_in, codes, "queries");
  const at::Tensor q = q_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), d2 = codes.size(3);
  TORCH_CHECK(d2 == (D + 1) / 2 && H <= codes.size(1) && n >= 0 && n <= codes.size(2),
              "kv_scores: ", H, " heads of ", D, " against codes ", codes.sizes(), " for ", n, " tokens");
  // the queries split into even and odd columns (zero past D), as the codes are
  std::vector<float> qe(B * H * G * d2, 0.0f), qo(B * H * G * d2, 0.0f);
  const float* qp = q.data_ptr<float>();
  for (int64_t r = 0; r < B * H * G; ++r) {
    for (int64_t j = 0; j < D; ++j) (j % 2 ? qo : qe)[r * d2 + j / 2] = qp[r * D + j];
  }
  at::Tensor out = at::empty({B, H, G, n}, q.options());
  float* op = out.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const int64_t sb = codes.stride(0), sh = codes.stride(1), st = codes.stride(2);
  at::parallel_for(0, B * H * n, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(G * LANES + 2 * d2), scores(G);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t bh = idx / n, t = idx % n, b = bh / H, h = bh % H;
      token_scores(cp + b * sb + h * sh + t * st, qe.data() + bh * G * d2, qo.data() + bh * G * d2, G, d2,
                   acc.data(), scores.data());
      for (int64_t g = 0; g < G; ++g) op[(bh * G + g) * n + t] = scores[g];
    }
  });
  return out;
}

at::Tensor kv_weighted(const at::Tensor& p_in, const at::Tensor& codes, int64_t head0) {
  check_kv(p_in, codes, "weights");
  const at::Tensor p = p_in.contiguous();
  const int64_t B = p.size(0), H = p.size(1), G = p.size(2), n = p.size(3), d2 = codes.size(3), D = 2 * d2;
  TORCH_CHECK(head0 >= 0 && head0 + H <= codes.size(1) && n <= codes.size(2),
              "kv_weighted: heads ", head0, "..", head0 + H, " of ", n, " tokens against codes ", codes.sizes());
  const int64_t slabs = std::max<int64_t>(1, (n + KV_SLAB - 1) / KV_SLAB);
  // per (b, h, slab): the slab's sums as even / odd columns [G, 2, d2]
  std::vector<float> part(B * H * slabs * G * 2 * d2, 0.0f);
  const float* pp = p.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const int64_t sb = codes.stride(0), sh = codes.stride(1), st = codes.stride(2);
  at::parallel_for(0, B * H * slabs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(4 * G), cf(4 * 2 * d2);
    const uint8_t* rows[4];
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t bh = idx / slabs, slab = idx % slabs, b = bh / H, h = bh % H;
      float* acc = part.data() + idx * G * 2 * d2;
      const int64_t stop = std::min(n, (slab + 1) * KV_SLAB);
      for (int64_t t0 = slab * KV_SLAB; t0 < stop; t0 += 4) {
        const int nt = static_cast<int>(std::min<int64_t>(4, stop - t0));
        for (int t = 0; t < nt; ++t) {
          rows[t] = cp + b * sb + (head0 + h) * sh + (t0 + t) * st;
          for (int64_t g = 0; g < G; ++g) w[t * G + g] = pp[(bh * G + g) * n + t0 + t];
        }
        tokens_weighted(rows, w.data(), nt, G, d2, acc, cf.data());
      }
    }
  });
  at::Tensor out = at::zeros({B, H, G, D}, p.options());
  float* op = out.data_ptr<float>();
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t slab = 0; slab < slabs; ++slab) {
      const float* acc = part.data() + (bh * slabs + slab) * G * 2 * d2;
      for (int64_t g = 0; g < G; ++g) {
        float* dst = op + (bh * G + g) * D;
        for (int64_t i = 0; i < d2; ++i) {
          dst[2 * i] += acc[g * 2 * d2 + i];
          dst[2 * i + 1] += acc[g * 2 * d2 + d2 + i];
        }
      }
    }
  }
  return out;
}

constexpr float ACT_SCALE_EPS = 1e-6f;  // kernels.ACT_SCALE_EPS

// Each row's (scale, zero) of the fake quantizer (kernels.token_grid, the same float32 operations in the same order):
// the row's [min, max] shrunk towards its midpoint by its clip.
void row_grids(const float* xp, int64_t rows, int64_t c, const float* cp, bool one_clip, float maxq, float* sp,
               float* zp) {
  at::parallel_for(0, rows, 16, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * c;
      float lo = row[0], hi = row[0];
      for (int64_t j = 1; j < c; ++j) {
        lo = std::min(lo, row[j]);
        hi = std::max(hi, row[j]);
      }
      const float mid = (hi + lo) * 0.5f;
      const float half = (hi - lo) * 0.5f * cp[one_clip ? 0 : r];
      const float s = std::max(2.0f * half / maxq, ACT_SCALE_EPS);
      sp[r] = s;
      zp[r] = std::nearbyint((half - mid) / s);
    }
  });
}

// one row's codes on its grid (see split_row on why a function of its own)
inline void code_row(const float* __restrict row, int64_t c, float s, float z, float maxq, float off, bool centred,
                     int8_t* __restrict dst) {
  if (centred) {  // clamp(round(x / s), -z, maxq - z)
    const float lo = -z, hi = maxq - z;
    for (int64_t j = 0; j < c; ++j) {
      dst[j] = static_cast<int8_t>(std::min(std::max(std::nearbyint(row[j] / s), lo), hi));
    }
  } else {  // clamp(round(x / s) + z, 0, maxq) - 2^(b-1)
    for (int64_t j = 0; j < c; ++j) {
      dst[j] = static_cast<int8_t>(std::min(std::max(std::nearbyint(row[j] / s) + z, 0.0f), maxq) - off);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x_in, const at::Tensor& clip_in,
                                                             int64_t bits) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() >= 1,
              "quantize_rows: float32 activations on the CPU");
  TORCH_CHECK(bits >= 2 && bits <= 8, "quantize_rows: 2 to 8 bits");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor clip = clip_in.to(at::kFloat).contiguous();
  const int64_t c = x.size(-1), rows = c ? x.numel() / c : 0;
  TORCH_CHECK(clip.numel() == 1 || clip.numel() == rows, "quantize_rows: one clip, or one per row");
  const float maxq = static_cast<float>((1 << bits) - 1);
  std::vector<int64_t> row_shape(x.sizes().begin(), x.sizes().end());
  row_shape.back() = 1;
  at::Tensor scale = at::empty(row_shape, x.options());
  at::Tensor zero = at::empty(row_shape, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = clip.data_ptr<float>();
  float* sp = scale.data_ptr<float>();
  float* zp = zero.data_ptr<float>();
  row_grids(xp, rows, c, cp, clip.numel() == 1, maxq, sp, zp);
  float widest = 0.0f;
  for (int64_t r = 0; r < rows; ++r) widest = std::max(widest, std::fabs(zp[r]));
  const bool centred = widest <= static_cast<float>(128 - (1 << bits));
  const float off = static_cast<float>(1 << (bits - 1));
  at::Tensor a = at::empty(x.sizes(), x.options().dtype(at::kChar));
  int8_t* ap = a.data_ptr<int8_t>();
  at::parallel_for(0, rows, 64, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) code_row(xp + r * c, c, sp[r], zp[r], maxq, off, centred, ap + r * c);
  });
  if (centred) {
    return {a, scale, at::empty({0}, x.options())};
  }
  return {a, scale, zero.sub_(off)};
}

// A quantization point and its 4-bit linear for the few rows of a decoding step, in one call (what ActPoint.forward
// does in ~8 tensor operations and as many Python calls): x·scale − shift (each optional), the rows' codes
// (quantize_rows), the nibble product (int4_mm), (acc − z·wsum)·s as IntLinear.forward computes it (one rounding per
// operation), then torch's own addcmul for bias + t·scale_row (its kernel may fuse the multiply-add), so the output
// is the same bits.
at::Tensor point_int4(const at::Tensor& x_in, const c10::optional<at::Tensor>& scale,
                      const c10::optional<at::Tensor>& shift, const at::Tensor& clip, int64_t bits,
                      const at::Tensor& packed, const at::Tensor& zero, const at::Tensor& wsum_in,
                      const at::Tensor& scale_row, const at::Tensor& bias) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2,
              "point_int4: [M, K] float32 activations on the CPU");
  at::Tensor x = x_in;
  if (scale.has_value()) x = x.mul(*scale);
  if (shift.has_value()) x = x.sub(*shift);
  auto [a, s, z] = quantize_rows(x, clip, bits);
  const at::Tensor acc = int4_mm(a, packed, zero);
  const int64_t m_rows = acc.size(0), n = acc.size(1);
  const at::Tensor wsum = wsum_in.to(at::kFloat).contiguous();
  TORCH_CHECK(wsum.numel() == n, "point_int4: wsum needs one value per output channel");
  at::Tensor t = at::empty({m_rows, n}, x.options());
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.numel() ? z.data_ptr<float>() : nullptr;
  const float* wp = wsum.data_ptr<float>();
  float* tp = t.data_ptr<float>();
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t j = 0; j < n; ++j) {
      float v = static_cast<float>(ap[m * n + j]);
      if (zp) v = v - zp[m] * wp[j];
      tp[m * n + j] = v * sp[m];
    }
  }
  return at::addcmul(bias, t, scale_row);
}

}  // namespace

// one row's stored KV codes, clamp(round(x / s) + z, 0, maxq), two a byte (even columns low) at <= 4 bits
inline void kv_code_row(const float* __restrict row, int64_t c, float s, float z, float maxq, bool nibbles,
                        uint8_t* __restrict dst) {
  for (int64_t j = 0; j < c; ++j) {
    const uint8_t q = static_cast<uint8_t>(std::min(std::max(std::nearbyint(row[j] / s) + z, 0.0f), maxq));
    if (!nibbles) {
      dst[j] = q;
    } else if (j % 2) {
      dst[j / 2] |= static_cast<uint8_t>(q << 4);
    } else {
      dst[j / 2] = q;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_encode(const at::Tensor& x_in, const at::Tensor& clip_in,
                                                         int64_t bits) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2 && x_in.size(1) > 0,
              "kv_encode: [R, D] float32 on the CPU");
  TORCH_CHECK(bits >= 2 && bits <= 8, "kv_encode: 2 to 8 bits");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor clip = clip_in.to(at::kFloat).contiguous();
  const int64_t rows = x.size(0), c = x.size(1);
  TORCH_CHECK(clip.numel() == 1 || clip.numel() == rows, "kv_encode: one clip, or one per row");
  const float maxq = static_cast<float>((1 << bits) - 1);
  at::Tensor scale = at::empty({rows, 1}, x.options());
  at::Tensor zero = at::empty({rows, 1}, x.options());
  const bool nibbles = bits <= 4;
  const int64_t width = nibbles ? (c + 1) / 2 : c;
  at::Tensor codes = at::empty({rows, width}, x.options().dtype(at::kByte));
  const float* xp = x.data_ptr<float>();
  float* sp = scale.data_ptr<float>();
  float* zp = zero.data_ptr<float>();
  uint8_t* op = codes.data_ptr<uint8_t>();
  row_grids(xp, rows, c, clip.data_ptr<float>(), clip.numel() == 1, maxq, sp, zp);
  at::parallel_for(0, rows, 64, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) kv_code_row(xp + r * c, c, sp[r], zp[r], maxq, nibbles, op + r * width);
  });
  return {codes, scale, zero};
}

// One decoding step of attention on a quantized cache layer, in one call (what QuantizedKVLayer.append and
// modules.attend_codes do in ~35 tensor operations): the new token's K and V (kv: [B, 2·KVH, D], K heads first),
// less their centres, coded into the store at position n exactly as kv_encode codes them (codes [B, 2·KVH, cap,
// ⌈D/2⌉] uint8, scale / zero [B, 2·KVH, cap, 1] float32, written in place), then the queries q [B, H, D] against
// the n + 1 stored tokens: kv_scores, s_t (q·C_t − z_t Σq) + q·μ_K, scaled, soft-capped, masked (mask [B, n + 1]:
// bool, true = attend, or additive), softmax, kv_weighted of p_t s_t, less Σ p_t s_t z_t, plus μ_V. Float sums in
// an order of their own: equal to attend_codes to rounding, as kv_scores / kv_weighted are. Returns [B, H, D].
at::Tensor kv_step(const at::Tensor& q_in, const at::Tensor& kv_in, const c10::optional<at::Tensor>& k_shift,
                   const c10::optional<at::Tensor>& v_shift, at::Tensor codes, at::Tensor scale, at::Tensor zero,
                   const at::Tensor& clip_in, int64_t bits, int64_t n, double scaling, c10::optional<double> softcap,
                   const c10::optional<at::Tensor>& mask_in) {
  TORCH_CHECK(q_in.device().is_cpu() && q_in.scalar_type() == at::kFloat && q_in.dim() == 3 &&
              kv_in.scalar_type() == at::kFloat && kv_in.dim() == 3, "kv_step: q [B, H, D], kv [B, 2·KVH, D] float32");
  TORCH_CHECK(bits >= 2 && bits <= 4, "kv_step: 2 to 4 bits (codes two a byte)");
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(2), S = kv_in.size(1), KVH = S / 2;
  const int64_t d2 = (D + 1) / 2, N = n + 1;
  TORCH_CHECK(kv_in.size(0) == B && kv_in.size(2) == D && S % 2 == 0 && KVH > 0 && H % KVH == 0,
              "kv_step: ", H, " query heads against ", S, " K/V heads");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 4 && codes.is_contiguous() && codes.size(0) == B &&
              codes.size(1) == S && codes.size(3) == d2 && n >= 0 && N <= codes.size(2),
              "kv_step: codes ", codes.sizes(), " for ", N, " tokens");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && zero.scalar_type() == at::kFloat && scale.is_contiguous() &&
              zero.is_contiguous() && scale.sizes() == zero.sizes() && scale.size(2) == codes.size(2) &&
              scale.numel() == B * S * codes.size(2), "kv_step: scale and zero [B, 2·KVH, capacity, 1] float32");
  const int64_t G = H / KVH, cap = codes.size(2);
  // the new token's rows, centred
  at::Tensor k = kv_in.narrow(1, 0, KVH), v = kv_in.narrow(1, KVH, KVH);
  if (k_shift.has_value()) k = k.sub(k_shift->reshape({KVH, D}));
  if (v_shift.has_value()) v = v.sub(v_shift->reshape({KVH, D}));
  const at::Tensor x = at::cat({k, v}, 1).contiguous();  // [B, S, D]
  const at::Tensor clip = clip_in.to(at::kFloat).contiguous();
  TORCH_CHECK(clip.numel() == S, "kv_step: one clip per K/V head");
  const float maxq = static_cast<float>((1 << bits) - 1);
  std::vector<float> clips(B * S), rs(B * S), rz(B * S);
  for (int64_t r = 0; r < B * S; ++r) clips[r] = clip.data_ptr<float>()[r % S];
  row_grids(x.data_ptr<float>(), B * S, D, clips.data(), false, maxq, rs.data(), rz.data());
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float *sp = scale.data_ptr<float>(), *zp = zero.data_ptr<float>();
  for (int64_t r = 0; r < B * S; ++r) {  // row r = (b, head): its token n
    kv_code_row(x.data_ptr<float>() + r * D, D, rs[r], rz[r], maxq, true, cp + (r * cap + n) * d2);
    sp[r * cap + n] = rs[r];
    zp[r * cap + n] = rz[r];
  }
  // scores on the codes, then the per-token arithmetic and the softmax
  const at::Tensor q = q_in.contiguous();
  const at::Tensor raw = kv_scores(q.view({B, KVH, G, D}), codes, N);  // [B, KVH, G, N]
  const float* qp = q.data_ptr<float>();
  const float* rp = raw.data_ptr<float>();
  at::Tensor ks = k_shift.has_value() ? k_shift->to(at::kFloat).reshape({KVH, D}).contiguous() : at::Tensor();
  at::Tensor vs = v_shift.has_value() ? v_shift->to(at::kFloat).reshape({KVH, D}).contiguous() : at::Tensor();
  at::Tensor mask;
  if (mask_in.has_value()) {
    mask = mask_in->contiguous();
    TORCH_CHECK(mask.numel() == B * N, "kv_step: mask [B, ", N, "]");
  }
  const bool mask_bool = mask.defined() && mask.scalar_type() == at::kBool;
  if (mask.defined() && !mask_bool) mask = mask.to(at::kFloat);
  at::Tensor pv = at::empty({B, KVH, G, N}, q.options());
  std::vector<float> zsum(B * KVH * G);
  float* pvp = pv.data_ptr<float>();
  const float cap_f = softcap.has_value() ? static_cast<float>(*softcap) : 0.0f;
  const float* ksp = ks.defined() ? ks.data_ptr<float>() : nullptr;
  const float* vsp = vs.defined() ? vs.data_ptr<float>() : nullptr;
  // one query row (b, kv head, group member) at a time: its N scores, softmax, weights p_t s_t and Σ p_t s_t z_t
  // (on several threads only when the rows hold enough tokens to pay for waking them: ~16k a thread)
  at::parallel_for(0, B * KVH * G, std::max<int64_t>(1, (int64_t{1} << 14) / N), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (KVH * G), h = row / G % KVH;
      const float* sk = sp + (b * S + h) * cap;
      const float* zk = zp + (b * S + h) * cap;
      const float* sv = sp + (b * S + KVH + h) * cap;
      const float* zv = zp + (b * S + KVH + h) * cap;
      const float* qr = qp + row * D;
      float qsum = 0.0f, qmu = 0.0f;
      for (int64_t i = 0; i < D; ++i) qsum += qr[i];
      if (ksp) {
        for (int64_t i = 0; i < D; ++i) qmu += qr[i] * ksp[h * D + i];
      }
      float* w = pvp + row * N;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < N; ++t) {
        float sc = (rp[row * N + t] - qsum * zk[t]) * sk[t];
        if (ksp) sc = sc + qmu;
        sc = sc * static_cast<float>(scaling);
        if (softcap.has_value()) sc = std::tanh(sc / cap_f) * cap_f;
        if (mask_bool) {
          if (!mask.data_ptr<bool>()[b * N + t]) sc = -std::numeric_limits<float>::infinity();
        } else if (mask.defined()) {
          sc = sc + mask.data_ptr<float>()[b * N + t];
        }
        w[t] = sc;
        top = std::max(top, sc);
      }
      float total = 0.0f;
      for (int64_t t = 0; t < N; ++t) {
        w[t] = std::exp(w[t] - top);
        total += w[t];
      }
      float zs = 0.0f;
      for (int64_t t = 0; t < N; ++t) {
        w[t] = w[t] / total * sv[t];
        zs += w[t] * zv[t];
      }
      zsum[row] = zs;
    }
  });
  const at::Tensor cv = kv_weighted(pv, codes, KVH);  // [B, KVH, G, 2·d2]
  at::Tensor out = at::empty({B, H, D}, q.options());
  float* op = out.data_ptr<float>();
  const float* cvp = cv.data_ptr<float>();
  for (int64_t row = 0; row < B * H; ++row) {
    const int64_t h = (row / G) % KVH;
    for (int64_t i = 0; i < D; ++i) {
      float o = cvp[row * 2 * d2 + i] - zsum[row];
      if (vsp) o = o + vsp[h * D + i];
      op[row * D + i] = o;
    }
  }
  return out;
}

// Rotary position embedding of x [B, heads, T, D] with cos / sin [B or 1, T, R] (R <= D even; dims from R on pass
// through): x·cos + rotate_half(x)·sin, each product and the sum rounded once as torch's three operations round
// them (modules._rope), so the same bits in one call instead of ~10.
at::Tensor rope(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 4 &&
              cos_in.scalar_type() == at::kFloat && sin_in.scalar_type() == at::kFloat && cos_in.dim() == 3 &&
              cos_in.sizes() == sin_in.sizes(), "rope: x [B, H, T, D], cos / sin [B, T, R] float32 on the CPU");
  const at::Tensor x = x_in.contiguous(), c = cos_in.contiguous(), sn = sin_in.contiguous();
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), R = c.size(2), half = R / 2;
  TORCH_CHECK((c.size(0) == B || c.size(0) == 1) && c.size(1) == T && R <= D && R % 2 == 0, "rope: cos / sin ",
              c.sizes(), " for x ", x.sizes());
  const int64_t cb = c.size(0) == 1 ? 0 : 1;  // one batch row of positions broadcast over the batch
  at::Tensor out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = sn.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H * T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * T) * cb, t = r % T;
      const float* row = xp + r * D;
      const float* cr = cp + (b * T + t) * R;
      const float* sr = sp + (b * T + t) * R;
      float* dst = op + r * D;
      for (int64_t j = 0; j < R; ++j) {
        const float rot = j < half ? -row[j + half] : row[j - half];
        const float a = row[j] * cr[j], p = rot * sr[j];
        dst[j] = a + p;
      }
      for (int64_t j = R; j < D; ++j) dst[j] = row[j];
    }
  });
  return out;
}

// The threads at::parallel_for runs this library's loops on (its OpenMP pragma is compiled here: without -fopenmp,
// one, whatever torch.set_num_threads says).
int64_t parallel_threads() {
  std::atomic<int64_t> most{0};
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
    const int64_t id = at::get_thread_num() + 1;
    int64_t seen = most.load();
    while (seen < id && !most.compare_exchange_weak(seen, id)) {
    }
  });
  return most.load();
}

bool int4_tiles() {
#if defined(__AVX2__)
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(baseq_ops, m) {
  m.def("int4_mm(Tensor a, Tensor packed, Tensor zero) -> Tensor", &int4_mm);
  m.def("int4_tiles() -> bool", &int4_tiles);
  m.def("parallel_threads() -> int", &parallel_threads);
  m.def("int8_mm(Tensor a, Tensor w) -> Tensor", &int8_mm);
  m.def("int4_unpack(Tensor packed, Tensor zero, Tensor(a!) out) -> ()", &int4_unpack);
  m.def("quantize_rows(Tensor x, Tensor clip, int bits) -> (Tensor, Tensor, Tensor)", &quantize_rows);
  m.def("point_int4(Tensor x, Tensor? scale, Tensor? shift, Tensor clip, int bits, Tensor packed, Tensor zero, "
        "Tensor wsum, Tensor scale_row, Tensor bias) -> Tensor", &point_int4);
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", &rope);
  m.def("kv_encode(Tensor x, Tensor clip, int bits) -> (Tensor, Tensor, Tensor)", &kv_encode);
  m.def("kv_scores(Tensor q, Tensor codes, int n) -> Tensor", &kv_scores);
  m.def("kv_step(Tensor q, Tensor kv, Tensor? k_shift, Tensor? v_shift, Tensor(a!) codes, Tensor(b!) scale, "
        "Tensor(c!) zero, Tensor clip, int bits, int n, float scaling, float? softcap, Tensor? mask) -> Tensor",
        &kv_step);
  m.def("kv_weighted(Tensor p, Tensor codes, int head0) -> Tensor", &kv_weighted);
}
