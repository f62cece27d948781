"""The CPU route: an AVX-512 LUT matvec and dequantizer in a small C++ shared library, built on first use; the same
library holds LLM.int8's fused w8a8 matvec for decode (``int8_matvec``: per-token int8 quantization of x with
torch's exact rounding, int32 dot products by AVX-512 VNNI, scales, static outlier columns and bias in one call; the
caller is :class:`moeq.runtime.int8.Int8Linear`; benchmarks/int8_fused.py), and QMoE's ``ternary-dict`` kernels
(``moeq_td_matvec``: y from the dictionary-coded rows without forming W; ``moeq_td_decode``: W in x's dtype; the
caller is :class:`moeq.runtime.ternary_dict.TernaryDictLinear`; benchmarks/qmoe_speed.py), and the uint8-code
kernels of matryoshka widths 5..8 (``moeq_u8_matvec``: y from one byte a weight plus an offset and float32 group
scales, W never formed; ``moeq_u8_dequant``: W in x's dtype for prefill tiles; the caller is
:class:`moeq.runtime.matryoshka.MatryoshkaLinear`; benchmarks/matryoshka_speed.py).

Plain C++ (no torch headers: a cold build takes ~1-3 s instead of ~45-70 s for a torch extension, and needs no
ninja), compiled with ``$CXX`` or ``c++`` (-O3 -march=native -fopenmp) and loaded with ctypes. OpenMP threads:
the library links ``libgomp.so.1``, which resolves to the copy torch has already loaded (same soname), so it shares
torch's thread pool; each call asks for ``torch.get_num_threads()`` threads.

Cache: moeq's cache root (``moeq.zoo.cache.cache_root``: ``$MOEQ_CACHE``, ``$XDG_CACHE_HOME/moeq`` or ``~/.cache/moeq``), under ``kernels/lut_<hash>.so``; the
hash covers the source, the flags, the compiler's version and the CPU's feature flags (-march=native binaries are
not portable), so another process loads the cached library and another CPU builds its own. Written to a temporary
name and renamed: concurrent first builds are safe.

Without AVX-512F/BW the same source compiles to a portable loop over the same layout (correct; ~13x slower than
the AVX-512 kernel and ~4x slower than bf16 dense at one token, measured with -mno-avx512f). If the
build or the load fails (no compiler, a compile error), :func:`library` returns None after one warning line and
callers take the pure-torch route.

Layout of ``packed`` (one row per output feature): see :mod:`moeq.kernels.lut`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = r"""
#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MOEQ_AVX512 1
#endif

namespace {

enum Dtype { F32 = 0, BF16 = 1, F16 = 2 };

// ---------------------------------------------------------------- portable decode (any width, any CPU)
// One dequantized row: w[k] = lut[code] * scale[k / G] (float32, the reference's rounding), block by block
// (layout: moeq/kernels/lut.py): a scaled table per group, then one lookup per code.
inline void dequant_row_portable(const uint8_t* row, const float* lut, const float* s, int64_t G, int64_t K,
                                 int bits, float* w) {
  const int B = bits == 4 ? 32 : 64, shift = bits == 4 ? 4 : 2, mask = bits == 4 ? 15 : 3;
  const uint8_t* hi = row + K / 4;                    // 3 bits: the bit plane after the crumb plane
  float t[16];
  for (int64_t g = 0; g < K / G; ++g) {
    for (int i = 0; i < (1 << bits); ++i) t[i] = lut[i] * s[g];
    for (int64_t b = g * G / B; b < (g + 1) * G / B; ++b) {
      for (int c = 0; c < B / 16; ++c)
        for (int j = 0; j < 16; ++j) {
          const int64_t k = b * B + 16 * c + j;
          int code = (row[b * 16 + j] >> (shift * c)) & mask;
          if (bits == 3) code |= ((hi[k >> 3] >> (k & 7)) & 1) << 2;
          w[k] = t[code];
        }
    }
  }
}

inline float dot_portable(const float* w, const float* x, int64_t K) {
  float a = 0.f;
#pragma omp simd reduction(+ : a)
  for (int64_t k = 0; k < K; ++k) a += w[k] * x[k];
  return a;
}

inline uint16_t to_bf16(float f) {      // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

#ifdef MOEQ_AVX512
// ---------------------------------------------------------------- AVX-512: one zmm holds a 16-entry table
// A row's table is built once ("base") and scaled per group (tbl = base * s[g]): vpermps then yields scaled
// weights directly. 16 weights = 1 permute, whose index is the low 4 bits of each dword lane (the higher bits are
// ignored, so no mask is needed after a shift).
struct Tables { __m512 lo, hi; };       // hi: codes 4..7 of a 3-bit row (selected by the bit plane)

inline Tables base_tables(const float* lut, int bits) {
  alignas(64) float lo[16], hi[16];
  for (int i = 0; i < 16; ++i) {
    lo[i] = bits == 4 ? lut[i] : lut[i & 3];      // 2/3 bits: 4 entries repeated, index bits 2-3 don't matter
    hi[i] = bits == 3 ? lut[4 + (i & 3)] : 0.f;
  }
  return {_mm512_load_ps(lo), _mm512_load_ps(hi)};
}

template <int BITS> constexpr int block_inputs() { return BITS == 4 ? 32 : 64; }

template <int BITS>
inline Tables scaled(const Tables& base, float s) {
  const __m512 sv = _mm512_set1_ps(s);
  return {_mm512_mul_ps(base.lo, sv), BITS == 3 ? _mm512_mul_ps(base.hi, sv) : base.hi};
}

// The 16 weights of chunk t (inputs 16t..16t+15 of the block) from the block's widened bytes v.
template <int BITS>
inline __m512 chunk(__m512i v, int t, const Tables& tb, const uint8_t* hi_block) {
  const __m512i idx = _mm512_srli_epi32(v, t * (BITS == 4 ? 4 : 2));
  __m512 w = _mm512_permutexvar_ps(idx, tb.lo);
  if constexpr (BITS == 3) {
    uint16_t m;
    std::memcpy(&m, hi_block + 2 * t, 2);
    w = _mm512_mask_permutexvar_ps(w, (__mmask16)m, idx, tb.hi);
  }
  return w;
}

inline __m512i widen(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }

// One block of the row into the accumulators; OFF (the block's parity) picks the chains at compile time.
template <int BITS, int MT, int NA, int OFF>
inline void block_dot(__m512 (&acc)[MT][NA], const uint8_t* row, const uint8_t* hi, int64_t b, const Tables& tb,
                      const float* x, int64_t ldx) {
  constexpr int B = block_inputs<BITS>(), T = B / 16;
  const __m512i v = widen(row + b * 16);
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) {
    const __m512 w = chunk<BITS>(v, t, tb, hi + b * 8);
    const float* xk = x + b * B + 16 * t;
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      __m512& a = acc[m][(OFF * T + t) % NA];
      a = _mm512_fmadd_ps(w, _mm512_loadu_ps(xk + m * ldx), a);
    }
  }
}

// y[m * ldy] = sum_k w[k] * x[m * ldx + k] for MT rows of x and one packed row (MT * NA independent FMA chains).
template <int BITS, int MT>
inline void row_dot(const uint8_t* row, const Tables& base, const float* s, int64_t G, int64_t K,
                    const float* x, int64_t ldx, float* y, int64_t ldy) {
  constexpr int B = block_inputs<BITS>();
  constexpr int NA = MT <= 2 ? 4 : MT == 4 ? 2 : 1;
  __m512 acc[MT][NA];
  for (int m = 0; m < MT; ++m)
    for (int a = 0; a < NA; ++a) acc[m][a] = _mm512_setzero_ps();
  const uint8_t* hi = row + K / 4;
  int64_t b = 0;
  for (int64_t g = 0; g < K / G; ++g) {
    const Tables tb = scaled<BITS>(base, s[g]);
    const int64_t e = (g + 1) * G / B;
    for (; b + 1 < e; b += 2) {
      block_dot<BITS, MT, NA, 0>(acc, row, hi, b, tb, x, ldx);
      block_dot<BITS, MT, NA, 1>(acc, row, hi, b + 1, tb, x, ldx);
    }
    if (b < e) block_dot<BITS, MT, NA, 0>(acc, row, hi, b++, tb, x, ldx);
  }
  for (int m = 0; m < MT; ++m) {
    __m512 a = acc[m][0];
    for (int i = 1; i < NA; ++i) a = _mm512_add_ps(a, acc[m][i]);
    y[m * ldy] = _mm512_reduce_add_ps(a);
  }
}

template <int BITS>
void matvec_row(const float* x, int64_t M, const uint8_t* row, const Tables& base, const float* s, int64_t G,
                int64_t K, float* y, int64_t N) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) row_dot<BITS, 8>(row, base, s, G, K, x + m * K, K, y + m * N, N);
  for (; m + 4 <= M; m += 4) row_dot<BITS, 4>(row, base, s, G, K, x + m * K, K, y + m * N, N);
  for (; m + 2 <= M; m += 2) row_dot<BITS, 2>(row, base, s, G, K, x + m * K, K, y + m * N, N);
  for (; m < M; ++m) row_dot<BITS, 1>(row, base, s, G, K, x + m * K, K, y + m * N, N);
}

// 16 float32 values rounded to bfloat16 (nearest even) or float16.
inline __m256i half16(__m512 w, int dtype) {
  if (dtype == BF16) {
#ifdef __AVX512BF16__
    return (__m256i)_mm512_cvtneps_pbh(w);                 // round to nearest even, one instruction
#else
    const __m512i u = _mm512_castps_si512(w);
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF);
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
#endif
  }
  return _mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// 16 float32 weights stored as float32, bfloat16 or float16.
inline void store16(void* d, int64_t i, __m512 w, int dtype) {
  if (dtype == F32) { _mm512_storeu_ps((float*)d + i, w); return; }
  _mm256_storeu_si256((__m256i*)((uint16_t*)d + i), half16(w, dtype));
}

template <int BITS>
void dequant_row(const uint8_t* row, const Tables& base, const float* s, int64_t G, int64_t K, void* w, int dtype) {
  constexpr int B = block_inputs<BITS>(), T = B / 16;
  const uint8_t* hi = row + K / 4;
  int64_t b = 0;
  for (int64_t g = 0; g < K / G; ++g) {
    const Tables tb = scaled<BITS>(base, s[g]);
    for (const int64_t e = (g + 1) * G / B; b < e; ++b) {
      const __m512i v = widen(row + b * 16);
      for (int t = 0; t < T; ++t) store16(w, b * B + 16 * t, chunk<BITS>(v, t, tb, hi + b * 8), dtype);
    }
  }
}
#endif


// ---------------------------------------------------------------- int8 w8a8 matvec (LLM.int8 at decode)
#if defined(MOEQ_AVX512) && defined(__AVX512VL__)
#define MOEQ_AVX512VL 1           // 128/256-bit masked loads and stores
#endif
// Per row m of x: xs = x * c (float32), amax = max(max|xs|, 1e-8), codes = rint(xs * ((1 / amax) * 127)) (torch's
// `xs * (127 / amax)` is `xs * (amax.reciprocal() * 127)`, half to even), held as code + 128 in uint8 (padding: 0);
// acc[n] = sum_k (code + 128) * Q[n, k] - 128 * sum_k Q[n, k] (exact int32), y = float(acc) * (amax * sq[n])
// + sum_j x[m, idx[j]] * wo[j, n] + bias[n].
inline float load_elem(const void* x, int64_t i, int dtype) {
  if (dtype == F32) return ((const float*)x)[i];
  if (dtype == BF16) {
    const uint32_t u = (uint32_t)((const uint16_t*)x)[i] << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return (float)((const _Float16*)x)[i];
}

inline void store_elem(void* y, int64_t i, float v, int dtype) {
  if (dtype == F32) ((float*)y)[i] = v;
  else if (dtype == BF16) ((uint16_t*)y)[i] = v != v ? (uint16_t)0x7FC0 : to_bf16(v);
  else ((_Float16*)y)[i] = (_Float16)v;
}

// One row of x -> xs (scratch) and its codes + 128 in a[0, K); returns amax, or NaN where a value of xs is not finite
// (torch's route then yields NaN for the whole row).
inline float quantize_row(const void* x, int dtype, const float* c, int64_t K, float* xs, uint8_t* a) {
  float amax = 0.f;
  bool bad = false;
  int64_t k = 0;
#ifdef MOEQ_AVX512VL
  __m512 mx = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
    __m512 v;
    if (dtype == F32) {
      v = _mm512_maskz_loadu_ps(m, (const float*)x + k);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)x + k);
      v = dtype == BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
    }
    v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, c + k));
    _mm512_mask_storeu_ps(xs + k, m, v);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
  }
  amax = _mm512_reduce_max_ps(mx);
  bad = nan != 0;
#else
  for (; k < K; ++k) {
    const float v = load_elem(x, k, dtype) * c[k];
    xs[k] = v;
    const float av = std::fabs(v);
    bad |= v != v;
    amax = av > amax ? av : amax;
  }
#endif
  if (bad || amax == __builtin_inff()) return __builtin_nanf("");
  amax = amax < 1e-8f ? 1e-8f : amax;
  const float r = 1.0f / amax;
  const float mult = r * 127.0f;
  k = 0;
#ifdef MOEQ_AVX512VL
  const __m512 mv = _mm512_set1_ps(mult);
  const __m512i off = _mm512_set1_epi32(128);
  for (; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
    const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xs + k), mv);
    const __m512i q = _mm512_add_epi32(_mm512_cvt_roundps_epi32(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), off);
    _mm_mask_storeu_epi8(a + k, m, _mm512_cvtepi32_epi8(q));
  }
#else
  for (; k < K; ++k) a[k] = (uint8_t)((int)__builtin_nearbyintf(xs[k] * mult) + 128);
#endif
  return amax;
}

#if defined(MOEQ_AVX512VL) && defined(__AVX512VNNI__)
#define MOEQ_VNNI 1
// Lane r of the result = the sum of the 16 lanes of a[r].
inline __m512i reduce16(const __m512i (&a)[16]) {
  __m512i t[8], u[4];
  for (int i = 0; i < 8; ++i)    // per 128-bit lane: [a2i, a2i+1, a2i, a2i+1] partial sums
    t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)    // per 128-bit lane: [a4i .. a4i+3]
    u[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]), _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
  const __m512i s0 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x88), _mm512_shuffle_i32x4(u[0], u[1], 0xDD));
  const __m512i s1 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2], u[3], 0x88), _mm512_shuffle_i32x4(u[2], u[3], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(s0, s1, 0x88), _mm512_shuffle_i32x4(s0, s1, 0xDD));
}

// sum_k a[k] * w_r[k] for the 16 rows w_r = w + row[r] * K (a: uint8, 64-byte aligned, zero padded to 64).
inline __m512i dot16(const uint8_t* a, const int8_t* w, const int64_t (&row)[16], int64_t K) {
  __m512i acc[16];
  const int8_t* p[16];
  for (int r = 0; r < 16; ++r) {
    acc[r] = _mm512_setzero_si512();
    p[r] = w + row[r] * K;
  }
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    const __m512i av = _mm512_load_si512(a + k);
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_dpbusd_epi32(acc[r], av, _mm512_loadu_si512(p[r] + k));
  }
  if (k < K) {
    const __mmask64 m = ~0ULL >> (64 - (K - k));
    const __m512i av = _mm512_load_si512(a + k);
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_dpbusd_epi32(acc[r], av, _mm512_maskz_loadu_epi8(m, p[r] + k));
  }
  return reduce16(acc);
}

inline void store16m(void* d, int64_t i, __m512 w, int dtype, __mmask16 m) {
  if (dtype == F32) { _mm512_mask_storeu_ps((float*)d + i, m, w); return; }
  _mm256_mask_storeu_epi16((uint16_t*)d + i, m, half16(w, dtype));
}
#endif

struct Int8Layer {              // one layer's constants (built once, Python side: cpu.Int8Layer); 8-byte fields
  const float* c;              // [K] 1/smooth, 0 on the outlier columns
  const int8_t* w;             // [N, K]
  const int32_t* comp;         // [N] 128 * sum_k Q[n, k]
  const float* sq;             // [N] weight scale / 127
  const int64_t* idx;          // [n_out] outlier columns
  const float* wo;             // [n_out, N] their weights
  const float* bias;           // [N] or null
  int64_t K, N, n_out;
};

struct Int8Args {
  const Int8Layer* L;
  const uint8_t* a;            // [M, Kp] codes + 128
  const float* amax;           // [M] (NaN: a non-finite row)
  const float* xo;             // [M, n_out] the outlier inputs
  int64_t M, Kp;
  void* y;
  int out_dtype;
};

// Output rows [n0, n1) of every row of x (n0 a multiple of 16 on the AVX-512 path).
inline void int8_rows(const Int8Args& g, int64_t n0, int64_t n1) {
  const Int8Layer& L = *g.L;
  const int64_t K = L.K, N = L.N, J = L.n_out;
#ifdef MOEQ_VNNI
  for (int64_t nb = n0; nb < n1; nb += 16) {
    const int64_t valid = n1 - nb < 16 ? n1 - nb : 16;
    const __mmask16 nm = valid == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
    int64_t row[16];
    for (int r = 0; r < 16; ++r) row[r] = nb + (r < valid ? r : valid - 1);   // past N: repeat the last row
    const __m512i comp = _mm512_maskz_loadu_epi32(nm, L.comp + nb);
    const __m512 sq = _mm512_maskz_loadu_ps(nm, L.sq + nb);
    for (int64_t m = 0; m < g.M; ++m) {
      const float amax = g.amax[m];
      __m512 y;
      if (amax != amax) {
        y = _mm512_set1_ps(__builtin_nanf(""));
      } else {
        const __m512i acc = _mm512_sub_epi32(dot16(g.a + m * g.Kp, L.w, row, K), comp);
        y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(_mm512_set1_ps(amax), sq));
        for (int64_t j = 0; j < J; ++j)
          y = _mm512_fmadd_ps(_mm512_set1_ps(g.xo[m * J + j]), _mm512_maskz_loadu_ps(nm, L.wo + j * N + nb), y);
        if (L.bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(nm, L.bias + nb));
      }
      store16m(g.y, m * N + nb, y, g.out_dtype, nm);
    }
  }
#else
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = L.w + n * K;
    for (int64_t m = 0; m < g.M; ++m) {
      const float amax = g.amax[m];
      float y = __builtin_nanf("");
      if (amax == amax) {
        const uint8_t* a = g.a + m * g.Kp;
        int32_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += (int32_t)a[k] * (int32_t)wr[k];
        const float f = amax * L.sq[n];
        y = (float)(s - L.comp[n]) * f;
        for (int64_t j = 0; j < J; ++j) y = __builtin_fmaf(g.xo[m * J + j], L.wo[j * N + n], y);
        if (L.bias) y += L.bias[n];
      }
      store_elem(g.y, m * N + n, y, g.out_dtype);
    }
  }
#endif
}

// ---------------------------------------------------------------- ternary-dict (QMoE): compute from the codewords
// Row r of a ternary-dict weight is codewords[off[r] .. off[r + 1]); phrase j of a row starts at base_j, the sum of
// the lengths of the phrases before it. Each codeword is looked up in a table of phrase records (built from the
// dictionary: moeq/runtime/ternary_dict.py, ``phrase_records``), 8 bytes each, 65536 of them so that every uint16
// indexes one (those past the dictionary are one-symbol zero phrases):
//   byte 0     len      phrase length (1..255)
//   byte 1     nnz      its nonzero symbols; those past the 4th are in ex_ent[ex_off[c] .. ex_off[c + 1])
//   bytes 2-5  pos[4]   positions of nonzeros 0..3 in the phrase, ascending; unused slots repeat the last nonzero
//                       (0 in an all-zero phrase), so pos[3] is the largest where nnz <= 4
//   byte 6     codes    2 bits a slot, slot s at bits 2s: 0 = zero, 1 = +1 (w = hi), 2 = -1 (w = lo); unused slots
//                       repeat the last nonzero's code (the decoder's repeated write stores the same value)
//   byte 7     codes    the same with the unused slots 0 (the matvec counts each nonzero once)
//   ex_ent     uint16   pos << 2 | code
// e.g. the phrase 0 0 +1 0 -1: len 5, nnz 2, pos 2 4 4 4, codes 0b10_10_10_01 = 0xA9 and 0b00_00_10_01 = 0x09.
// Memory safety without trusting the codewords (the codec's check_rows already guarantees valid rows, which need
// none of this): positions are bytes, a phrase's base is clamped to K before x is read and x is held with TD_PAD
// zero floats after its K inputs, so every read is below K + 255; the decoder writes a position only below K.
struct TdCode {
  const uint16_t* cw;          // [n_codewords]
  const int64_t* off;          // [N + 1]: 0, non-decreasing, n_codewords (checked by the caller)
  const _Float16* lo;          // [N]
  const _Float16* hi;          // [N]
  const uint8_t* rec;          // [65536, 8]
  const int32_t* ex_off;       // [65537]: non-decreasing, within ex_ent (checked by the caller)
  const uint16_t* ex_ent;
  int64_t N, K;
};

constexpr int64_t TD_PAD = 256;

typedef float td_v4 __attribute__((vector_size(16)));    // 4 slots of a phrase (SSE, NEON or scalar code)

struct TdCoef {                 // codes byte (record byte 7) -> 1.0 in the slots that add to the +1 / -1 sum
  td_v4 p[256], m[256];
  TdCoef() {
    for (int b = 0; b < 256; ++b)
      for (int s = 0; s < 4; ++s) {
        const int c = (b >> (2 * s)) & 3;
        p[b][s] = c == 1 ? 1.f : 0.f;
        m[b][s] = c == 2 ? 1.f : 0.f;
      }
  }
};
const TdCoef td_coef;

inline void td_extra_m1(const TdCode& L, uint16_t c, const float* xb, float& sp, float& sm) {
  for (int32_t e = L.ex_off[c]; e < L.ex_off[c + 1]; ++e) {
    const uint16_t v = L.ex_ent[e];
    const float xv = xb[(v >> 2) & 255];
    sp += (v & 3) == 1 ? xv : 0.f;
    sm += (v & 3) == 2 ? xv : 0.f;
  }
}

// One phrase of a row into the 4-slot sums (no branch on the slot count: unused slots have coefficient 0). The
// record is one 8-byte load, its fields shifted out (fewer load uops than byte loads).
inline int64_t td_step_m1(const TdCode& L, uint16_t c, int64_t base, const float* xp, td_v4& ap, td_v4& am,
                          float& sp, float& sm) {
  uint64_t q;
  std::memcpy(&q, L.rec + 8 * (int64_t)c, 8);
  const float* xb = xp + (base < L.K ? base : L.K);
  const td_v4 v = {xb[(q >> 16) & 255], xb[(q >> 24) & 255], xb[(q >> 32) & 255], xb[(q >> 40) & 255]};
  ap += v * td_coef.p[q >> 56];
  am += v * td_coef.m[q >> 56];
  if (__builtin_expect(((q >> 8) & 255) > 4, 0)) td_extra_m1(L, c, xb, sp, sm);
  return base + (int64_t)(q & 255);
}

// One row of x (xp: float32 [K + TD_PAD], zero tail): y = hi * (sum of x at the +1 positions) + lo * (at the -1).
inline float td_row_m1(const TdCode& L, int64_t r, const float* xp) {
  const uint16_t* c = L.cw + L.off[r];
  const int64_t nc = L.off[r + 1] - L.off[r];
  td_v4 ap0 = {0, 0, 0, 0}, am0 = ap0, ap1 = ap0, am1 = ap0;   // two chains: phrases alternate
  float sp = 0.f, sm = 0.f;
  int64_t base = 0, j = 0;
  for (; j + 1 < nc; j += 2) {
    base = td_step_m1(L, c[j], base, xp, ap0, am0, sp, sm);
    base = td_step_m1(L, c[j + 1], base, xp, ap1, am1, sp, sm);
  }
  if (j < nc) td_step_m1(L, c[j], base, xp, ap0, am0, sp, sm);
  const td_v4 p = ap0 + ap1, m = am0 + am1;
  sp += (p[0] + p[1]) + (p[2] + p[3]);
  sm += (m[0] + m[1]) + (m[2] + m[3]);
  return (float)L.hi[r] * sp + (float)L.lo[r] * sm;
}

#ifdef MOEQ_AVX512
struct TdMasks {                // codes byte (record byte 7) -> lane masks of slot s: [2s] all ones where it adds to
  alignas(16) uint16_t k[256][8];   // the +1 sum, [2s + 1] to the -1 sum (loaded by kmovw: no mask arithmetic)
  TdMasks() {
    for (int b = 0; b < 256; ++b)
      for (int s = 0; s < 4; ++s) {
        const int c = (b >> (2 * s)) & 3;
        k[b][2 * s] = c == 1 ? 0xFFFF : 0;
        k[b][2 * s + 1] = c == 2 ? 0xFFFF : 0;
      }
  }
};
const TdMasks td_kmask;

// Several rows of x (xt: x transposed, float32 [K + TD_PAD, ld], zero tail rows and columns): the +1 / -1 sums of
// 16 * T columns, one masked vector add per nonzero; slot s accumulates in its own registers (4 chains).
template <int T>
inline void td_sums_mt(const TdCode& L, int64_t r, const float* xt, int64_t ld, float* sp, float* sm) {
  __m512 ap[4][T], am[4][T];
  for (int s = 0; s < 4; ++s)
    for (int t = 0; t < T; ++t) ap[s][t] = am[s][t] = _mm512_setzero_ps();
  const uint16_t* c = L.cw + L.off[r];
  const int64_t nc = L.off[r + 1] - L.off[r], K = L.K;
  int64_t base = 0;
  for (int64_t j = 0; j < nc; ++j) {
    const uint8_t* q = L.rec + 8 * (int64_t)c[j];
    const float* xb = xt + (base < K ? base : K) * ld;
    const unsigned codes = q[7];
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      const __mmask16 kp = td_kmask.k[codes][2 * s], km = td_kmask.k[codes][2 * s + 1];
      const float* xs = xb + (int64_t)q[2 + s] * ld;
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        const __m512 v = _mm512_loadu_ps(xs + 16 * t);
        ap[s][t] = _mm512_mask_add_ps(ap[s][t], kp, ap[s][t], v);
        am[s][t] = _mm512_mask_add_ps(am[s][t], km, am[s][t], v);
      }
    }
    if (__builtin_expect(q[1] > 4, 0)) {
      for (int32_t e = L.ex_off[c[j]]; e < L.ex_off[c[j] + 1]; ++e) {
        const uint16_t v = L.ex_ent[e];
        const __mmask16 kp = (__mmask16)(0u - ((v & 3) == 1)), km = (__mmask16)(0u - ((v & 3) == 2));
        const float* xs = xb + (int64_t)((v >> 2) & 255) * ld;
        for (int t = 0; t < T; ++t) {
          const __m512 x = _mm512_loadu_ps(xs + 16 * t);
          ap[0][t] = _mm512_mask_add_ps(ap[0][t], kp, ap[0][t], x);
          am[0][t] = _mm512_mask_add_ps(am[0][t], km, am[0][t], x);
        }
      }
    }
    base += q[0];
  }
  for (int t = 0; t < T; ++t) {
    _mm512_storeu_ps(sp + 16 * t, _mm512_add_ps(_mm512_add_ps(ap[0][t], ap[1][t]), _mm512_add_ps(ap[2][t], ap[3][t])));
    _mm512_storeu_ps(sm + 16 * t, _mm512_add_ps(_mm512_add_ps(am[0][t], am[1][t]), _mm512_add_ps(am[2][t], am[3][t])));
  }
}
#endif

// The same for any CPU: M columns of xt; each slot adds its row of xt to both sums with 0/1 coefficients (no branch
// on the sign, the loop over m vectorizes).
inline void td_sums_portable(const TdCode& L, int64_t r, const float* xt, int64_t ld, int64_t M, float* sp,
                             float* sm) {
  for (int64_t m = 0; m < M; ++m) sp[m] = sm[m] = 0.f;
  const uint16_t* c = L.cw + L.off[r];
  const int64_t nc = L.off[r + 1] - L.off[r], K = L.K;
  auto add = [&](const float* xs, float cp, float cm) {
    for (int64_t m = 0; m < M; ++m) {
      sp[m] += cp * xs[m];
      sm[m] += cm * xs[m];
    }
  };
  int64_t base = 0;
  for (int64_t j = 0; j < nc; ++j) {
    const uint8_t* q = L.rec + 8 * (int64_t)c[j];
    const float* xb = xt + (base < K ? base : K) * ld;
    const td_v4 cp = td_coef.p[q[7]], cm = td_coef.m[q[7]];
    for (int s = 0; s < 4; ++s) add(xb + (int64_t)q[2 + s] * ld, cp[s], cm[s]);
    if (q[1] > 4)
      for (int32_t e = L.ex_off[c[j]]; e < L.ex_off[c[j] + 1]; ++e) {
        const unsigned code = L.ex_ent[e] & 3;
        add(xb + (int64_t)((L.ex_ent[e] >> 2) & 255) * ld, code == 1 ? 1.f : 0.f, code == 2 ? 1.f : 0.f);
      }
    base += q[0];
  }
}

// x [M, K] (dtype) -> float32 xt[k * ld + m] (ld = 1 for one row: x itself), zero in the TD_PAD tail rows and in
// the columns m >= M.
template <typename Load>
inline void td_transpose(Load load, int64_t M, int64_t K, int64_t ld, float* xt) {
  std::memset(xt, 0, (size_t)((K + TD_PAD) * ld) * sizeof(float));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xt[k * ld + m] = load(m * K + k);
}

// One dense row of W (E: the bits of float32, bfloat16 or float16): zeros, then each phrase's nonzeros written at
// base + pos (4 slots at once where the record holds them all and they lie inside the row, else one by one,
// each position checked against K).
template <typename E>
inline void td_decode_row(const TdCode& L, int64_t r, E* w, E vhi, E vlo) {
  const E val[4] = {E(0), vhi, vlo, E(0)};
  const int64_t K = L.K;
  std::memset(w, 0, (size_t)K * sizeof(E));
  const uint16_t* c = L.cw + L.off[r];
  const int64_t nc = L.off[r + 1] - L.off[r];
  int64_t base = 0;
  for (int64_t j = 0; j < nc; ++j) {
    const uint8_t* q = L.rec + 8 * (int64_t)c[j];
    if (__builtin_expect(q[1] <= 4 && base + q[5] < K, 1)) {
      E* wb = w + base;
      const unsigned cd = q[6];
      wb[q[2]] = val[cd & 3];
      wb[q[3]] = val[(cd >> 2) & 3];
      wb[q[4]] = val[(cd >> 4) & 3];
      wb[q[5]] = val[cd >> 6];
    } else {
      for (int s = 0; s < 4; ++s) {
        const unsigned code = (q[7] >> (2 * s)) & 3;
        if (code && base + q[2 + s] < K) w[base + q[2 + s]] = val[code];
      }
      if (q[1] > 4)
        for (int32_t e = L.ex_off[c[j]]; e < L.ex_off[c[j] + 1]; ++e) {
          const int64_t p = base + ((L.ex_ent[e] >> 2) & 255);
          if ((L.ex_ent[e] & 3) && p < K) w[p] = val[L.ex_ent[e] & 3];
        }
    }
    base += q[0];
  }
}

inline uint16_t td_f16_bits(_Float16 h) {
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

inline uint32_t td_f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Rows [r0, r1) in a loop, or split over `threads` OpenMP threads.
template <typename F>
inline void td_for_rows(int64_t r0, int64_t r1, int threads, F body) {
  if (threads <= 1) {
    for (int64_t r = r0; r < r1; ++r) body(r);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = r0; r < r1; ++r) body(r);
}

// ---------------------------------------------------------------- uint8 codes + offset (matryoshka at 5..8 bits)
// One byte per weight, row-major c [N, K] (any K), float32 scales s [N, ng], group g = inputs [g * G, min((g + 1) *
// G, K)), one additive offset per width: W[o, k] = s[o, g] * (c[o, k] + off). The weight is formed as
// fma(c, s, off * s): with s a float16 value times a power of two (11 significant bits) and c, 2 * off integers
// below 2^8 in magnitude, c * s and off * s are exact, so w = (c + off) * s rounded once, the float32 weight the
// torch reference (lut[c] * scale) computes, bit for bit. AVX-512: 16 bytes -> 16 dwords (vpmovzxbd) -> 16 floats
// (vcvtdq2ps) -> one fma gives 16 scaled weights; a group's last partial chunk is masked (zero codes and zero x).
#ifdef MOEQ_AVX512VL
inline __m512 u8_weights(const uint8_t* p, __mmask16 m, __m512 sv, __m512 ov) {
  const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p)));
  return _mm512_fmadd_ps(c, sv, ov);
}

inline __mmask16 u8_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

// 16 inputs of RB rows of codes and MT rows of x into the accumulators (TAIL: the lanes of mk only).
template <int RB, int MT, bool TAIL>
inline void u8_step(__m512 (&acc)[RB][MT], const uint8_t* c, int64_t K, int64_t k, const float* x, int64_t ldx,
                    const __m512 (&sv)[RB], const __m512 (&ov)[RB], __mmask16 mk) {
  __m512 xv[MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m)
    xv[m] = TAIL ? _mm512_maskz_loadu_ps(mk, x + m * ldx + k) : _mm512_loadu_ps(x + m * ldx + k);
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r) {
    const __m512 w = TAIL ? u8_weights(c + r * K + k, mk, sv[r], ov[r])
                          : _mm512_fmadd_ps(_mm512_cvtepi32_ps(widen(c + r * K + k)), sv[r], ov[r]);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_fmadd_ps(w, xv[m], acc[r][m]);
  }
}

// y for RB rows of codes (c: the first, row stride K; s: its scales, stride ng) and MT rows of x (float32, stride
// ldx), written to y[y0 + m * N + r] as out_dtype: RB * MT accumulators; each 16 inputs of x are loaded once for
// the RB rows and each 16 weights are formed once for the MT rows.
template <int RB, int MT>
inline void u8_block(const uint8_t* c, const float* s, int64_t ng, int64_t G, int64_t K, float off, const float* x,
                     int64_t ldx, void* y, int64_t y0, int64_t N, int out_dtype) {
  __m512 acc[RB][MT];
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += G, ++g) {
    const int64_t k1 = k0 + G < K ? k0 + G : K;
    __m512 sv[RB], ov[RB];
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      sv[r] = _mm512_set1_ps(s[r * ng + g]);
      ov[r] = _mm512_set1_ps(off * s[r * ng + g]);
    }
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) u8_step<RB, MT, false>(acc, c, K, k, x, ldx, sv, ov, 0xFFFF);
    if (k < k1) u8_step<RB, MT, true>(acc, c, K, k, x, ldx, sv, ov, u8_mask(k1 - k));    // a group's partial tail
  }
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) store_elem(y, y0 + m * N + r, _mm512_reduce_add_ps(acc[r][m]), out_dtype);
}

// Output rows [o0, o1) for rows [m, m + MT) of x: blocks of RB rows of codes, the rest one at a time.
template <int RB, int MT>
inline void u8_rows(const uint8_t* c, const float* s, int64_t ng, int64_t G, int64_t K, float off, const float* x,
                    int64_t m, void* y, int64_t N, int out_dtype, int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + RB <= o1; o += RB)
    u8_block<RB, MT>(c + o * K, s + o * ng, ng, G, K, off, x + m * K, K, y, m * N + o, N, out_dtype);
  for (; o < o1; ++o) u8_block<1, MT>(c + o * K, s + o * ng, ng, G, K, off, x + m * K, K, y, m * N + o, N, out_dtype);
}

// One row of W into w (DT: float32, bfloat16 or float16), full chunks unmasked, a group's tail masked.
template <int DT>
inline void u8_dequant_row(const uint8_t* row, const float* s, int64_t G, int64_t K, float off, void* w) {
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += G, ++g) {
    const int64_t k1 = k0 + G < K ? k0 + G : K;
    const __m512 sv = _mm512_set1_ps(s[g]), ov = _mm512_set1_ps(off * s[g]);
    int64_t k = k0;
#pragma GCC unroll 4
    for (; k + 16 <= k1; k += 16) store16(w, k, u8_weights(row + k, 0xFFFF, sv, ov), DT);
    if (k < k1) {
      const __mmask16 m = u8_mask(k1 - k);
      const __m512 v = u8_weights(row + k, m, sv, ov);
      if (DT == F32) _mm512_mask_storeu_ps((float*)w + k, m, v);
      else _mm256_mask_storeu_epi16((uint16_t*)w + k, m, half16(v, DT));
    }
  }
}
#endif

// One row of codes -> float32 weights (any CPU; the same rounding: (c + off) is exact, one product).
inline void u8_row_portable(const uint8_t* row, const float* s, int64_t G, int64_t K, float off, float* w) {
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += G, ++g) {
    const int64_t k1 = k0 + G < K ? k0 + G : K;
    for (int64_t k = k0; k < k1; ++k) w[k] = ((float)row[k] + off) * s[g];
  }
}

}  // namespace

// Per-row symmetric int8 of a weight (moeq.quant.int8.absmax_rows): s = max(max_k |w|, 1e-12) / 127 in float32,
// codes = rint(w / s) (a true division, half to even: torch's `div_` then `round_`; |w / s| rounds to at most 127).
// w [N, K] float32 / bfloat16 / float16 with row stride ld (elements); codes [N, K] int8; scale [N]. NaN weights
// give an unspecified row (torch's route gives a NaN scale).
template <int DT>
inline void absmax_row(const void* w, int64_t K, int8_t* c, float* scale) {
  float a = 0.f;
  int64_t k = 0;
#ifdef MOEQ_AVX512
  auto load16 = [&](int64_t i, __mmask16 m) -> __m512 {
    if (DT == F32) return _mm512_maskz_loadu_ps(m, (const float*)w + i);
    const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)w + i);
    if (DT == F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  };
  __m512 va = _mm512_setzero_ps();
  for (; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
    va = _mm512_max_ps(va, _mm512_abs_ps(load16(k, m)));
  }
  a = _mm512_reduce_max_ps(va);
#else
  for (; k < K; ++k) a = std::max(a, std::fabs(load_elem(w, k, DT)));
#endif
  const float s = std::max(a, 1e-12f) / 127.0f;
  *scale = s;
#ifdef MOEQ_AVX512
  const __m512 vs = _mm512_set1_ps(s);
  for (k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
    const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load16(k, m), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_mask_storeu_epi8(c + k, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q)));
  }
#else
  for (k = 0; k < K; ++k) c[k] = (int8_t)std::nearbyint(load_elem(w, k, DT) / s);
#endif
}

extern "C" {

int moeq_lut_avx512() {
#ifdef MOEQ_AVX512
  return 1;
#else
  return 0;
#endif
}

// y[M, N] = x[M, K] @ W.T (float32), W dequantized on the fly from the packed rows. lut_stride: 0 (one table) or
// 2**bits (one per row); s: [N, K / G].
void moeq_lut_matvec(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t N, const float* lut,
                     int64_t lut_stride, const float* s, int64_t G, int bits, float* y, int threads) {
  const int64_t rb = K * bits / 8, ng = K / G;
#pragma omp parallel num_threads(threads)
  {
#ifndef MOEQ_AVX512
    std::vector<float> w(K);
#endif
#pragma omp for schedule(static)
    for (int64_t o = 0; o < N; ++o) {
      const uint8_t* row = packed + o * rb;
#ifdef MOEQ_AVX512
      const Tables base = base_tables(lut + o * lut_stride, bits);
      if (bits == 4) matvec_row<4>(x, M, row, base, s + o * ng, G, K, y + o, N);
      else if (bits == 3) matvec_row<3>(x, M, row, base, s + o * ng, G, K, y + o, N);
      else matvec_row<2>(x, M, row, base, s + o * ng, G, K, y + o, N);
#else
      dequant_row_portable(row, lut + o * lut_stride, s + o * ng, G, K, bits, w.data());
      for (int64_t m = 0; m < M; ++m) y[m * N + o] = dot_portable(w.data(), x + m * K, K);
#endif
    }
  }
}

// Rows [r0, r1) of the dense weight into out ([r1 - r0, K]; dtype 0 float32, 1 bfloat16, 2 float16): float32
// dequantization, then one rounding.
void moeq_lut_dequant(const uint8_t* packed, int64_t r0, int64_t r1, int64_t K, const float* lut, int64_t lut_stride,
                      const float* s, int64_t G, int bits, int dtype, void* out, int threads) {
  const int64_t rb = K * bits / 8, ng = K / G, esize = dtype == F32 ? 4 : 2;
#pragma omp parallel num_threads(threads)
  {
#ifndef MOEQ_AVX512
    std::vector<float> w(K);
#endif
#pragma omp for schedule(static)
    for (int64_t o = r0; o < r1; ++o) {
      char* dst = (char*)out + (o - r0) * K * esize;
#ifdef MOEQ_AVX512
      const Tables base = base_tables(lut + o * lut_stride, bits);
      if (bits == 4) dequant_row<4>(packed + o * rb, base, s + o * ng, G, K, dst, dtype);
      else if (bits == 3) dequant_row<3>(packed + o * rb, base, s + o * ng, G, K, dst, dtype);
      else dequant_row<2>(packed + o * rb, base, s + o * ng, G, K, dst, dtype);
#else
      dequant_row_portable(packed + o * rb, lut + o * lut_stride, s + o * ng, G, K, bits, w.data());
      for (int64_t k = 0; k < K; ++k) {
        if (dtype == F32) ((float*)dst)[k] = w[k];
        else if (dtype == BF16) ((uint16_t*)dst)[k] = to_bf16(w[k]);
        else ((_Float16*)dst)[k] = (_Float16)w[k];
      }
#endif
    }
  }
}


void moeq_absmax_rows(const void* w, int dtype, int64_t N, int64_t K, int64_t ld, int8_t* codes, float* scale,
                      int threads) {
  const int64_t esize = dtype == F32 ? 4 : 2;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < N; ++n) {
    const void* row = (const char*)w + n * ld * esize;
    if (dtype == F32) absmax_row<F32>(row, K, codes + n * K, scale + n);
    else if (dtype == BF16) absmax_row<BF16>(row, K, codes + n * K, scale + n);
    else absmax_row<F16>(row, K, codes + n * K, scale + n);
  }
}

int moeq_int8_vnni() {
#ifdef MOEQ_VNNI
  return 1;
#else
  return 0;
#endif
}

// LLM.int8 w8a8 for a few rows of x (decode): y[M, N] (out_dtype) from x[M, K] (dtype 0 float32, 1 bfloat16,
// 2 float16) and one layer's constants (Int8Layer). Formula: int8_rows / quantize_row.
void moeq_int8_matvec(const Int8Layer* L, const void* x, int dtype, int64_t M, void* y, int out_dtype, int threads) {
  const int64_t K = L->K, N = L->N, J = L->n_out, Kp = (K + 63) / 64 * 64, esize = dtype == F32 ? 4 : 2;
  thread_local std::vector<uint8_t> abuf;     // scratch of the calling thread, grown on demand
  thread_local std::vector<float> fbuf;
  if ((int64_t)abuf.size() < M * Kp + 64) abuf.resize(M * Kp + 64);
  if ((int64_t)fbuf.size() < K + M + M * J) fbuf.resize(K + M + M * J);
  uint8_t* a = abuf.data() + (64 - (uintptr_t)abuf.data() % 64) % 64;    // 64-byte aligned rows
  float *xs = fbuf.data(), *amax = xs + K, *xo = amax + M;
  for (int64_t m = 0; m < M; ++m) {
    const void* xm = (const char*)x + m * K * esize;
    std::memset(a + m * Kp + K, 0, (size_t)(Kp - K));
    amax[m] = quantize_row(xm, dtype, L->c, K, xs, a + m * Kp);
    for (int64_t j = 0; j < J; ++j) xo[m * J + j] = load_elem(xm, L->idx[j], dtype);
  }
  const Int8Args g{L, a, amax, xo, M, Kp, y, out_dtype};
  const int64_t blocks = (N + 15) / 16;
  if (threads <= 1 || blocks < 2) {
    int8_rows(g, 0, N);
  } else {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) int8_rows(g, b * 16, b * 16 + 16 < N ? b * 16 + 16 : N);
  }
}

// ternary-dict: y[M, N] (out_dtype) = x[M, K] (dtype) @ W.T from the codewords (TdCode), W never formed: per row of
// W, the sums of x over its +1 and over its -1 positions, y = hi * sum+ + lo * sum- (float32). x is converted to
// float32 once: padded to K + TD_PAD for one row, transposed to [K + TD_PAD, Mp] (Mp: M rounded up to 16) for more.
void moeq_td_matvec(const TdCode* L, const void* x, int dtype, int64_t M, void* y, int out_dtype, int threads) {
  const int64_t K = L->K, N = L->N, ld = M == 1 ? 1 : (M + 15) / 16 * 16;
  thread_local std::vector<float> xbuf;      // scratch of the calling thread, grown on demand
  if ((int64_t)xbuf.size() < (K + TD_PAD) * ld) xbuf.resize((size_t)((K + TD_PAD) * ld));
  float* xt = xbuf.data();
  if (dtype == F32) td_transpose([x](int64_t i) { return ((const float*)x)[i]; }, M, K, ld, xt);
  else if (dtype == BF16) td_transpose([x](int64_t i) { return load_elem(x, i, BF16); }, M, K, ld, xt);
  else td_transpose([x](int64_t i) { return (float)((const _Float16*)x)[i]; }, M, K, ld, xt);
  if (M == 1) {
    td_for_rows(0, N, threads, [&](int64_t r) { store_elem(y, r, td_row_m1(*L, r, xt), out_dtype); });
    return;
  }
  td_for_rows(0, N, threads, [&](int64_t r) {
    float sp[64], sm[64];                     // 64 columns of x at a time
    const float h = (float)L->hi[r], l = (float)L->lo[r];
    for (int64_t m0 = 0; m0 < M; m0 += 64) {
      const int64_t mt = M - m0 < 64 ? M - m0 : 64;
#ifdef MOEQ_AVX512
      for (int64_t t = 0; t < mt; t += 32) {
        if (mt - t > 16) td_sums_mt<2>(*L, r, xt + m0 + t, ld, sp + t, sm + t);
        else td_sums_mt<1>(*L, r, xt + m0 + t, ld, sp + t, sm + t);
      }
#else
      td_sums_portable(*L, r, xt + m0, ld, mt, sp, sm);
#endif
      for (int64_t m = 0; m < mt; ++m) store_elem(y, (m0 + m) * N + r, h * sp[m] + l * sm[m], out_dtype);
    }
  });
}

// Rows [r0, r1) of the dense W into out ([r1 - r0, K]; dtype 0 float32, 1 bfloat16, 2 float16): lo / hi rounded
// once from float16 to the dtype (bfloat16: nearest even).
void moeq_td_decode(const TdCode* L, int64_t r0, int64_t r1, int dtype, void* out, int threads) {
  const int64_t K = L->K;
  if (dtype == F32) {
    td_for_rows(r0, r1, threads, [&](int64_t r) {
      td_decode_row<uint32_t>(*L, r, (uint32_t*)out + (r - r0) * K, td_f32_bits((float)L->hi[r]),
                              td_f32_bits((float)L->lo[r]));
    });
  } else {
    td_for_rows(r0, r1, threads, [&](int64_t r) {
      const uint16_t h = dtype == BF16 ? to_bf16((float)L->hi[r]) : td_f16_bits(L->hi[r]);
      const uint16_t l = dtype == BF16 ? to_bf16((float)L->lo[r]) : td_f16_bits(L->lo[r]);
      td_decode_row<uint16_t>(*L, r, (uint16_t*)out + (r - r0) * K, h, l);
    });
  }
}

// uint8 codes + offset (formula: u8_weights): y[M, N] (out_dtype) = x[M, K] (dtype) @ W.T, W never formed; x is
// converted to float32 once; blocks of U8_RB output rows split over the threads, up to 4 rows of x per pass over them.
constexpr int64_t U8_RB = 4;
void moeq_u8_matvec(const void* x, int dtype, int64_t M, int64_t K, const uint8_t* c, int64_t N, const float* s,
                    int64_t G, float off, void* y, int out_dtype, int threads) {
  const int64_t ng = (K + G - 1) / G;
  thread_local std::vector<float> xbuf;      // scratch of the calling thread, grown on demand
  const float* xf = (const float*)x;
  if (dtype != F32) {
    if ((int64_t)xbuf.size() < M * K) xbuf.resize((size_t)(M * K));
    for (int64_t i = 0; i < M * K; ++i) xbuf[i] = load_elem(x, i, dtype);
    xf = xbuf.data();
  }
  td_for_rows(0, (N + U8_RB - 1) / U8_RB, threads, [&](int64_t b) {
    const int64_t o0 = b * U8_RB, o1 = o0 + U8_RB < N ? o0 + U8_RB : N;
#ifdef MOEQ_AVX512VL
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) u8_rows<4, 4>(c, s, ng, G, K, off, xf, m, y, N, out_dtype, o0, o1);
    if (M - m == 3) u8_rows<4, 3>(c, s, ng, G, K, off, xf, m, y, N, out_dtype, o0, o1);
    else if (M - m == 2) u8_rows<4, 2>(c, s, ng, G, K, off, xf, m, y, N, out_dtype, o0, o1);
    else if (M - m == 1) u8_rows<4, 1>(c, s, ng, G, K, off, xf, m, y, N, out_dtype, o0, o1);
#else
    thread_local std::vector<float> w;
    if ((int64_t)w.size() < K) w.resize((size_t)K);
    for (int64_t o = o0; o < o1; ++o) {
      u8_row_portable(c + o * K, s + o * ng, G, K, off, w.data());
      for (int64_t m = 0; m < M; ++m) store_elem(y, m * N + o, dot_portable(w.data(), xf + m * K, K), out_dtype);
    }
#endif
  });
}

// Rows [r0, r1) of the dense W into out ([r1 - r0, K]; dtype 0 float32, 1 bfloat16, 2 float16): the float32 weight
// (u8_weights), then one rounding (nearest even).
void moeq_u8_dequant(const uint8_t* c, int64_t r0, int64_t r1, int64_t K, const float* s, int64_t G, float off,
                     int dtype, void* out, int threads) {
  const int64_t ng = (K + G - 1) / G;
  td_for_rows(r0, r1, threads, [&](int64_t o) {
    const uint8_t* row = c + o * K;
    const float* so = s + o * ng;
    const int64_t base = (o - r0) * K;
#ifdef MOEQ_AVX512VL
    if (dtype == F32) u8_dequant_row<F32>(row, so, G, K, off, (float*)out + base);
    else if (dtype == BF16) u8_dequant_row<BF16>(row, so, G, K, off, (uint16_t*)out + base);
    else u8_dequant_row<F16>(row, so, G, K, off, (uint16_t*)out + base);
#else
    thread_local std::vector<float> w;
    if ((int64_t)w.size() < K) w.resize((size_t)K);
    u8_row_portable(row, so, G, K, off, w.data());
    for (int64_t k = 0; k < K; ++k) store_elem(out, base + k, w[k], dtype);
#endif
  });
}

}  // extern "C"
"""

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
TILE_BYTES = 4 << 20          # prefill: dequantize this many bytes of W per GEMM (half a tile per core: L2)
INT8_PARALLEL_MIN = 1 << 19   # int8 matvec: weights below which one thread beats two (benchmarks/int8_fused.py)
TERNARY_PARALLEL_MIN = 1 << 12  # ternary-dict: one thread below this many codewords (~100k weights; not measured:
                                # a parallel region costs a few us, a 4096-codeword row walk ~10 us)
U8_MATVEC_MAX_M = {"avx512": 8, "portable": 1}   # uint8 codes: the matvec up to this many rows of x, tile + GEMM
                                                  # above, by library flavor (benchmarks/KERNELS.md)
U8_PARALLEL_MIN = 1 << 16     # uint8 codes: one thread below this many weights (not measured, as TERNARY_PARALLEL_MIN)
U8_TILE_BYTES = 8 << 20       # uint8 codes, prefill: bytes of W decoded per GEMM (fewer, larger GEMMs than the
                              # LUT route's: the tile decode runs at the store rate, benchmarks/KERNELS.md)
TERNARY_RECORDS = 1 << 16     # ternary-dict phrase records: one per uint16 codeword (moeq.runtime.ternary_dict)

_state: dict = {}
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_FLOAT = ctypes.c_float
_SIGNATURES = {
    "moeq_lut_avx512": ([], _INT),
    "moeq_lut_matvec": ([_P, _I64, _I64, _P, _I64, _P, _I64, _P, _I64, _INT, _P, _INT], None),
    "moeq_lut_dequant": ([_P, _I64, _I64, _I64, _P, _I64, _P, _I64, _INT, _INT, _P, _INT], None),
    "moeq_int8_vnni": ([], _INT),
    "moeq_int8_matvec": ([_P, _P, _INT, _I64, _P, _INT, _INT], None),
    "moeq_td_matvec": ([_P, _P, _INT, _I64, _P, _INT, _INT], None),
    "moeq_td_decode": ([_P, _I64, _I64, _INT, _P, _INT], None),
    "moeq_u8_matvec": ([_P, _INT, _I64, _I64, _P, _I64, _P, _I64, _FLOAT, _P, _INT, _INT], None),
    "moeq_u8_dequant": ([_P, _I64, _I64, _I64, _P, _I64, _FLOAT, _INT, _P, _INT], None),
    "moeq_absmax_rows": ([_P, _INT, _I64, _I64, _I64, _P, _P, _INT], None),
}


def cache_dir() -> Path:
    from moeq.zoo.cache import cache_root  # one cache root for everything moeq builds
    return cache_root() / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _fingerprint(cxx: str, flags: list[str]) -> str:
    """Hash of everything the binary depends on: source, flags, compiler version, CPU flags."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        cpu = ""
    return hashlib.sha256("\0".join([SOURCE, *flags, version, cpu]).encode()).hexdigest()[:16]


def build(directory: Path | None = None, flags: list[str] = FLAGS) -> Path:
    """Compile the library (or find it in the cache); returns its path. Raises OSError / SubprocessError."""
    cxx = _compiler()
    if cxx is None:
        raise OSError("no C++ compiler found (set CXX)")
    directory = directory or cache_dir()
    path = directory / f"lut_{_fingerprint(cxx, flags)}.so"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src, out = Path(tmp) / "lut.cpp", Path(tmp) / "lut.so"
        src.write_text(SOURCE)
        subprocess.run([cxx, *flags, str(src), "-o", str(out)], check=True, capture_output=True, text=True,
                       timeout=600)
        os.replace(out, path)             # atomic: a concurrent build of the same hash wins or loses whole
    return path


def load(path: Path) -> ctypes.CDLL:
    """The library at ``path`` with its function signatures declared."""
    lib = ctypes.CDLL(str(path))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded library, or None where it cannot be built or loaded (one warning line, once per process)."""
    if "lib" not in _state:
        try:
            _state["lib"] = load(build())
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", None) or str(err)
            first = (detail.strip().splitlines() or [type(err).__name__])[0][:200]
            # warn_explicit with no source file behind it: the warning prints as exactly one line
            warnings.warn_explicit(f"C++ LUT kernel unavailable, using the pure-torch route ({first})",
                                   RuntimeWarning, "moeq.kernels", 0)
            _state["lib"] = None
    return _state["lib"]


def int8_flavor() -> str:
    """``vnni`` (AVX-512 VNNI dot products) or ``portable`` (a plain int32 loop) for :func:`int8_matvec`."""
    return "vnni" if library().moeq_int8_vnni() else "portable"


def flavor() -> str:
    """``avx512`` (the vectorized kernel) or ``portable`` (the plain loop a CPU without AVX-512 gets)."""
    return "avx512" if library().moeq_lut_avx512() else "portable"


# ---------------------------------------------------------------- tensor-level calls (operands already checked)
def _lut_stride(lut: torch.Tensor) -> int:
    return 0 if lut.ndim == 1 else lut.shape[1]


def matvec(x2: torch.Tensor, packed: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor, group_size: int,
           bits: int) -> torch.Tensor:
    """x2 float32 [M, in] contiguous, operands contiguous (lut, scales float32) -> y float32 [M, out]."""
    m, k = x2.shape
    n = packed.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    library().moeq_lut_matvec(x2.data_ptr(), m, k, packed.data_ptr(), n, lut.data_ptr(), _lut_stride(lut),
                              scales.data_ptr(), group_size, bits, y.data_ptr(), torch.get_num_threads())
    return y


def dequantize_rows(packed: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int,
                    in_features: int, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
    """Rows [r0, r1) of W into ``out`` ([r1 - r0, in], contiguous, float32 / bfloat16 / float16)."""
    library().moeq_lut_dequant(packed.data_ptr(), r0, r1, in_features, lut.data_ptr(), _lut_stride(lut),
                               scales.data_ptr(), group_size, bits, DTYPES[out.dtype], out.data_ptr(),
                               torch.get_num_threads())
    return out


def dequantize(packed, lut, scales, group_size: int, bits: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(packed.shape[0], in_features, dtype=dtype)
    return dequantize_rows(packed, lut, scales, group_size, bits, in_features, 0, packed.shape[0], out)


def linear_tiled(x2: torch.Tensor, packed, lut, scales, group_size: int, bits: int, in_features: int) -> torch.Tensor:
    """x2 [M, in] @ W.T for larger M: W dequantized into one reused buffer of ~TILE_BYTES in x's dtype (it stays in
    L2, and no [out, in] tensor is allocated: fresh large buffers page-fault on every call), one GEMM per tile."""
    n = packed.shape[0]
    tile = max(16, TILE_BYTES // (in_features * x2.element_size()) // 16 * 16)
    buf = torch.empty(min(tile, n), in_features, dtype=x2.dtype)
    yt = torch.empty(n, x2.shape[0], dtype=x2.dtype)
    xt = x2.t()
    for r0 in range(0, n, tile):
        r1 = min(r0 + tile, n)
        w = dequantize_rows(packed, lut, scales, group_size, bits, in_features, r0, r1, buf[: r1 - r0])
        torch.mm(w, xt, out=yt[r0:r1])
    return yt.t().contiguous()


class Int8Layer(ctypes.Structure):
    """One layer's constants for ``moeq_int8_matvec`` (the C struct of the same name). Built once per layer: the
    call then passes 7 arguments (ctypes converts each at ~0.2 µs, which matters on 256-wide layers)."""

    _fields_ = [("c", _P), ("w", _P), ("comp", _P), ("sq", _P), ("idx", _P), ("wo", _P), ("bias", _P),
                ("K", _I64), ("N", _I64), ("n_out", _I64)]


def int8_layer(act_scale: torch.Tensor, qweight: torch.Tensor, comp: torch.Tensor, scale_q: torch.Tensor,
               outlier_idx: torch.Tensor | None = None, outlier_wt: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> tuple[Int8Layer, int, tuple]:
    """The constants of one w8a8 layer for :func:`int8_matvec`: act_scale float32 [K] (1/smooth, 0 on the outlier
    columns); qweight int8 [N, K]; comp int32 [N] = 128 * the row sums of qweight; scale_q float32 [N] (weight
    scale / 127); outlier_idx int64 [J] with outlier_wt float32 [J, N]; bias float32 [N]; all contiguous CPU
    tensors. Returns (struct, its address, the tensors it points into: keep them alive as long as the struct)."""
    n, k = qweight.shape
    j = 0 if outlier_idx is None else outlier_idx.numel()
    keep = (act_scale, qweight, comp, scale_q, outlier_idx, outlier_wt, bias)
    for t, dt in zip(keep, (torch.float32, torch.int8, torch.int32, torch.float32, torch.int64, torch.float32,
                            torch.float32)):
        if t is not None and (t.dtype != dt or not t.is_contiguous() or t.device.type != "cpu"):
            raise ValueError(f"int8 kernel operand must be a contiguous CPU {dt}, got {t.dtype} {list(t.shape)}")
    if j and not 0 <= int(outlier_idx.min()) <= int(outlier_idx.max()) < k:
        raise ValueError(f"outlier index out of range [0, {k})")
    def ptr(t):
        return None if t is None or t.numel() == 0 else t.data_ptr()
    st = Int8Layer(ptr(act_scale), ptr(qweight), ptr(comp), ptr(scale_q), ptr(outlier_idx) if j else None,
                   ptr(outlier_wt) if j else None, ptr(bias), k, n, j)
    return st, ctypes.addressof(st), keep


def int8_threads(weights: int) -> int:
    """Threads for an int8 matvec over ``weights`` int8 weights: one below ``INT8_PARALLEL_MIN`` (a parallel region
    costs more than it saves on small layers), else torch's."""
    return 1 if weights < INT8_PARALLEL_MIN else torch.get_num_threads()


def int8_matvec(layer: tuple, x2: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LLM.int8 w8a8 of a few rows of x in one call (formula: ``moeq_int8_matvec`` in SOURCE; the caller is
    :class:`moeq.runtime.int8.Int8Linear`): ``layer`` from :func:`int8_layer`, x2 [M, K] float32 / bfloat16 /
    float16 contiguous. Returns y [M, N] in ``out_dtype`` (x's dtype by default)."""
    st, addr, _ = layer
    m = x2.shape[0]
    if x2.shape[1] != st.K or not x2.is_contiguous() or x2.device.type != "cpu":
        raise ValueError(f"x must be a contiguous CPU [M, {st.K}], got {list(x2.shape)}")
    out_dtype = out_dtype or x2.dtype
    y = torch.empty(m, st.N, dtype=out_dtype)
    library().moeq_int8_matvec(addr, x2.data_ptr(), DTYPES[x2.dtype], m, y.data_ptr(), DTYPES[out_dtype],
                               int8_threads(st.N * st.K))
    return y


# ---------------------------------------------------------------- LLM.int8 weights: per-row absmax codes
def absmax_rows(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """Per-row symmetric int8 of ``w`` [N, K] (float32 / bfloat16 / float16 on the CPU, rows contiguous) into
    ``codes`` int8 [N, K] and ``scale`` float32 [N], in one pass over w (formula: ``moeq_absmax_rows`` in SOURCE,
    the same values as :func:`moeq.quant.int8.absmax_rows`' torch route)."""
    n, k = w.shape
    if w.dtype not in DTYPES or w.device.type != "cpu" or (k > 1 and w.stride(1) != 1):
        raise ValueError(f"w must be a CPU float32/bfloat16/float16 [N, K] with contiguous rows, got {w.dtype} "
                         f"{list(w.shape)} on {w.device}")
    if not (codes.is_contiguous() and scale.is_contiguous() and tuple(codes.shape) == (n, k)
            and tuple(scale.shape) == (n,) and codes.dtype == torch.int8 and scale.dtype == torch.float32):
        raise ValueError("codes must be a contiguous int8 [N, K] and scale a contiguous float32 [N]")
    if n and k:
        library().moeq_absmax_rows(w.data_ptr(), DTYPES[w.dtype], n, k, w.stride(0), codes.data_ptr(),
                                   scale.data_ptr(), torch.get_num_threads())


# ---------------------------------------------------------------- ternary-dict (QMoE): compute from the codewords
class TernaryCode(ctypes.Structure):
    """One ternary-dict weight for ``moeq_td_matvec`` / ``moeq_td_decode`` (the C struct TdCode; layout of the
    records in SOURCE and in :mod:`moeq.runtime.ternary_dict`)."""

    _fields_ = [("cw", _P), ("off", _P), ("lo", _P), ("hi", _P), ("rec", _P), ("ex_off", _P), ("ex_ent", _P),
                ("N", _I64), ("K", _I64)]


def ternary_code(codewords: torch.Tensor, row_offsets: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 rec: torch.Tensor, ex_off: torch.Tensor, ex_ent: torch.Tensor,
                 in_features: int) -> tuple[TernaryCode, int, tuple]:
    """The struct for one weight: codewords uint16 [C], row_offsets int64 [N + 1], lo / hi float16 [N], the phrase
    records uint8 [65536, 8], ex_off int32 [65537], ex_ent uint16 [E]; contiguous CPU tensors. The offsets (0,
    non-decreasing, C) and ex_off (non-decreasing, within ex_ent) are checked here, O(N + 65536): with them the
    kernels stay in bounds whatever the codewords hold (SOURCE). Returns (struct, its address, the tensors it
    points into: keep them alive as long as the struct)."""
    n = lo.numel()
    keep = (codewords, row_offsets, lo, hi, rec, ex_off, ex_ent)
    for name, t, dt, shape in (("codewords", codewords, torch.uint16, None), ("row_offsets", row_offsets, torch.int64,
                               (n + 1,)), ("lo", lo, torch.float16, (n,)), ("hi", hi, torch.float16, (n,)),
                               ("rec", rec, torch.uint8, (TERNARY_RECORDS, 8)),
                               ("ex_off", ex_off, torch.int32, (TERNARY_RECORDS + 1,)), ("ex_ent", ex_ent, torch.uint16, None)):
        if (t.dtype != dt or t.device.type != "cpu" or not t.is_contiguous() or (shape and tuple(t.shape) != shape)
                or t.ndim != (len(shape) if shape else 1)):
            raise ValueError(f"ternary kernel operand {name} must be a contiguous CPU {dt} "
                             f"{list(shape) if shape else '1-D'}, got {t.dtype} {list(t.shape)} on {t.device}")
    if not (n >= 1 and in_features >= 1 and int(row_offsets[0]) == 0 and int(row_offsets[-1]) == codewords.numel()
            and bool((row_offsets.diff() >= 0).all())):
        raise ValueError("row_offsets must run from 0 to the number of codewords, non-decreasing")
    if not (int(ex_off[0]) >= 0 and int(ex_off[-1]) <= ex_ent.numel() and bool((ex_off.diff() >= 0).all())):
        raise ValueError("ex_off must be non-decreasing and within ex_ent")
    def ptr(t):
        return t.data_ptr() if t.numel() else None
    st = TernaryCode(*(ptr(t) for t in keep), n, in_features)
    return st, ctypes.addressof(st), keep


def ternary_threads(codewords: int) -> int:
    """Threads for a ternary-dict kernel over ``codewords``: one below ``TERNARY_PARALLEL_MIN``, else torch's."""
    return 1 if codewords < TERNARY_PARALLEL_MIN else torch.get_num_threads()


def ternary_matvec(code: tuple, x2: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x2 [M, K] (float32 / bfloat16 / float16, contiguous, CPU) @ W.T from the codewords, W never formed (formula:
    ``moeq_td_matvec``); ``code`` from :func:`ternary_code`. Returns y [M, N] in ``out_dtype`` (x's by default)."""
    st, addr, keep = code
    if x2.ndim != 2 or x2.shape[1] != st.K or not x2.is_contiguous() or x2.device.type != "cpu":
        raise ValueError(f"x must be a contiguous CPU [M, {st.K}], got {list(x2.shape)}")
    out_dtype = out_dtype or x2.dtype
    y = torch.empty(x2.shape[0], st.N, dtype=out_dtype)
    if x2.shape[0]:
        library().moeq_td_matvec(addr, x2.data_ptr(), DTYPES[x2.dtype], x2.shape[0], y.data_ptr(),
                                 DTYPES[out_dtype], ternary_threads(keep[0].numel()))
    return y


def ternary_decode_rows(code: tuple, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
    """Rows [r0, r1) of the dense W into ``out`` ([r1 - r0, K], contiguous, float32 / bfloat16 / float16)."""
    st, addr, keep = code
    if not (0 <= r0 <= r1 <= st.N and tuple(out.shape) == (r1 - r0, st.K) and out.is_contiguous()
            and out.dtype in DTYPES and out.device.type == "cpu"):
        raise ValueError(f"out must be a contiguous CPU [{r1 - r0}, {st.K}] for rows {r0}..{r1} of {st.N}")
    library().moeq_td_decode(addr, r0, r1, DTYPES[out.dtype], out.data_ptr(), ternary_threads(keep[0].numel()))
    return out


def ternary_decode(code: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [N, K] weight in ``dtype``."""
    st = code[0]
    return ternary_decode_rows(code, 0, st.N, torch.empty(st.N, st.K, dtype=dtype))


def ternary_linear_tiled(code: tuple, x2: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] @ W.T for larger M: W decoded into one reused buffer of ~TILE_BYTES in x's dtype (as
    :func:`linear_tiled`), one GEMM per tile."""
    st = code[0]
    n, k = st.N, st.K
    tile = max(16, TILE_BYTES // (k * x2.element_size()) // 16 * 16)
    buf = torch.empty(min(tile, n), k, dtype=x2.dtype)
    yt = torch.empty(n, x2.shape[0], dtype=x2.dtype)
    xt = x2.t()
    for r0 in range(0, n, tile):
        r1 = min(r0 + tile, n)
        torch.mm(ternary_decode_rows(code, r0, r1, buf[: r1 - r0]), xt, out=yt[r0:r1])
    return yt.t().contiguous()


# ---------------------------------------------------------------- uint8 codes + offset (matryoshka at 5..8 bits)
def _check_u8(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> int:
    """ValueError unless codes (uint8 [N, K]) and scales (float32 [N, ceil(K / G)]) are contiguous CPU tensors of
    one weight; returns G (group_size 0: K)."""
    n, k = codes.shape if codes.ndim == 2 else (-1, -1)
    g = group_size or k
    if (codes.dtype != torch.uint8 or codes.ndim != 2 or not codes.is_contiguous() or codes.device.type != "cpu"
            or g <= 0):
        raise ValueError(f"codes must be a contiguous CPU uint8 [N, K], got {codes.dtype} {list(codes.shape)}")
    want = (n, -(-k // g))
    if (scales.dtype != torch.float32 or tuple(scales.shape) != want or not scales.is_contiguous()
            or scales.device.type != "cpu"):
        raise ValueError(f"scales must be a contiguous CPU float32 {list(want)}, got {scales.dtype} "
                         f"{list(scales.shape)}")
    return g


def u8_matvec(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int, offset: float,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x2 [M, K] (float32 / bfloat16 / float16, contiguous, CPU) @ W.T with W[o, k] = scales[o, k // G] * (codes[o, k]
    + offset), W never formed (formula: ``u8_weights`` in SOURCE; exact weights when the scales are float16 values
    times powers of two). Returns y [M, N] in ``out_dtype`` (x's by default)."""
    g = _check_u8(codes, scales, group_size)
    n, k = codes.shape
    if x2.ndim != 2 or x2.shape[1] != k or not x2.is_contiguous() or x2.device.type != "cpu" or x2.dtype not in DTYPES:
        raise ValueError(f"x must be a contiguous CPU float [M, {k}], got {x2.dtype} {list(x2.shape)}")
    out_dtype = out_dtype or x2.dtype
    y = torch.empty(x2.shape[0], n, dtype=out_dtype)
    if x2.shape[0] and n:
        library().moeq_u8_matvec(x2.data_ptr(), DTYPES[x2.dtype], x2.shape[0], k, codes.data_ptr(), n,
                                 scales.data_ptr(), g, offset, y.data_ptr(), DTYPES[out_dtype],
                                 u8_threads(n * k))
    return y


def u8_threads(weights: int) -> int:
    """Threads for a uint8-code kernel over ``weights`` weights: one below ``U8_PARALLEL_MIN``, else torch's."""
    return 1 if weights < U8_PARALLEL_MIN else torch.get_num_threads()


def u8_dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, group_size: int, offset: float, r0: int, r1: int,
                       out: torch.Tensor) -> torch.Tensor:
    """Rows [r0, r1) of W (as :func:`u8_matvec`) into ``out`` ([r1 - r0, K], contiguous, float32 / bfloat16 /
    float16): the float32 weight rounded once."""
    g = _check_u8(codes, scales, group_size)
    n, k = codes.shape
    if not (0 <= r0 <= r1 <= n and tuple(out.shape) == (r1 - r0, k) and out.is_contiguous()
            and out.dtype in DTYPES and out.device.type == "cpu"):
        raise ValueError(f"out must be a contiguous CPU [{r1 - r0}, {k}] for rows {r0}..{r1} of {n}")
    if r1 > r0 and k:
        library().moeq_u8_dequant(codes.data_ptr(), r0, r1, k, scales.data_ptr(), g, offset, DTYPES[out.dtype],
                                  out.data_ptr(), u8_threads((r1 - r0) * k))
    return out


def u8_dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int, offset: float,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [N, K] weight in ``dtype``."""
    n, k = codes.shape
    return u8_dequantize_rows(codes, scales, group_size, offset, 0, n, torch.empty(n, k, dtype=dtype))


def u8_linear_tiled(x2: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int,
                    offset: float) -> torch.Tensor:
    """x2 [M, K] @ W.T for larger M: W decoded into one reused buffer of ~U8_TILE_BYTES in x's dtype (as
    :func:`linear_tiled`), one GEMM per tile."""
    n, k = codes.shape
    tile = max(16, U8_TILE_BYTES // (max(k, 1) * x2.element_size()) // 16 * 16)
    buf = torch.empty(min(tile, n), k, dtype=x2.dtype)
    yt = torch.empty(n, x2.shape[0], dtype=x2.dtype)
    xt = x2.t()
    for r0 in range(0, n, tile):
        r1 = min(r0 + tile, n)
        torch.mm(u8_dequantize_rows(codes, scales, group_size, offset, r0, r1, buf[: r1 - r0]), xt, out=yt[r0:r1])
    return yt.t().contiguous()
