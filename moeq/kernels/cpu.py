"""The CPU route: an AVX-512 LUT matvec and dequantizer in a small C++ shared library, built on first use.

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
#include <cstdint>
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

// 16 float32 weights stored as float32, bfloat16 (round to nearest even) or float16.
inline void store16(void* d, int64_t i, __m512 w, int dtype) {
  if (dtype == F32) { _mm512_storeu_ps((float*)d + i, w); return; }
  __m256i h;
  if (dtype == BF16) {
#ifdef __AVX512BF16__
    h = (__m256i)_mm512_cvtneps_pbh(w);                 // round to nearest even, one instruction
#else
    const __m512i u = _mm512_castps_si512(w);
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF);
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
    h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
#endif
  } else {
    h = _mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  _mm256_storeu_si256((__m256i*)((uint16_t*)d + i), h);
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

}  // namespace

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

}  // extern "C"
"""

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
TILE_BYTES = 4 << 20          # prefill: dequantize this many bytes of W per GEMM (half a tile per core: L2)

_state: dict = {}
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "moeq_lut_avx512": ([], _INT),
    "moeq_lut_matvec": ([_P, _I64, _I64, _P, _I64, _P, _I64, _P, _I64, _INT, _P, _INT], None),
    "moeq_lut_dequant": ([_P, _I64, _I64, _I64, _P, _I64, _P, _I64, _INT, _INT, _P, _INT], None),
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
