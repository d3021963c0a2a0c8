// Integer-dot matmul kernels for GGUF Q4_0, Q4_1 and Q8_0 weights (AVX512-VNNI, portable fallback).
//
// A weight tensor is repacked once into rows that SIMD loads directly (same size as GGUF):
//   [ quants: nb*QB bytes | scales d: nb f16 | mins m: nb f16 (Q4_1 only) ]
// Q4 quants keep GGUF's nibble bytes (low nibble = element i, high nibble = element i+16 of a
// block), so 64 bytes hold 4 blocks whose low nibbles are elements 0..15 and high nibbles 16..31.
// Q8 quants and the quantized activations use the matching "grouped" order: per group of 4
// blocks, the first halves (elements 0..15) of the 4 blocks, then their second halves. Q8 weights
// are stored xor 0x80 (offset binary) so that every weight is an unsigned byte for vpdpbusd.
//
// Every type is then w = d*u + m with an unsigned quant u, where m is the stored min (Q4_1),
// -8d (Q4_0) or -128d (Q8_0). With activations a = da*qa (8-bit, blocks of 32):
//   sum_i w_i a_i = d*da * sum_i u_i qa_i  +  m * (da * sum_i qa_i)     (per block)
// The first term is the integer dot product; the second uses the per-block activation sums.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__AVX512VNNI__) && defined(__F16C__)
#include <immintrin.h>
#define LH_AVX512 1
#endif

namespace {

constexpr int64_t QK = 32;    // weights per block
constexpr int64_t GROUP = 4;  // blocks per SIMD group (128 weights)
constexpr int64_t HALF = 16;  // bytes of one half block in grouped order

enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };

struct Format {
  int64_t quant_bytes;  // packed quant bytes per block
  int64_t block_bytes;  // bytes per block, GGUF and packed alike
  bool has_min;
  float min_coef;       // m = min_coef * d when the block stores no min
};

template <int64_t QT>
constexpr Format format_for() {
  if constexpr (QT == Q4_0) return {16, 18, false, -8.f};
  else if constexpr (QT == Q4_1) return {16, 20, true, 1.f};
  else return {32, 34, false, -128.f};
}

Format format_of(int64_t qtype) {
  switch (qtype) {
    case Q4_0: return format_for<Q4_0>();
    case Q4_1: return format_for<Q4_1>();
    case Q8_0: return format_for<Q8_0>();
  }
  TORCH_CHECK(false, "GGUF kernels support Q4_0, Q4_1 and Q8_0, not ggml type ", qtype);
}

inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

// Byte offset of block b's first half in a grouped row of nb blocks; its second half follows
// after grouped_gap(b, nb) bytes (16 * the number of blocks in b's group).
inline int64_t grouped_offset(int64_t b) { return (b / GROUP) * GROUP * QK + (b % GROUP) * HALF; }
inline int64_t grouped_gap(int64_t b, int64_t nb) {
  return HALF * std::min(GROUP, nb - b / GROUP * GROUP);
}

int64_t blocks_per_row(const torch::Tensor& w, const Format& f) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2, "packed weights must be uint8 [rows, bytes]");
  TORCH_CHECK(w.size(1) % f.block_bytes == 0, "row of ", w.size(1), " bytes is not whole blocks of ",
              f.block_bytes);
  return w.size(1) / f.block_bytes;
}

// ---------------------------------------------------------------------------------------------
// Repacking and dequantization

template <int64_t QT>
void repack_row(const uint8_t* src, uint8_t* dst, int64_t nb) {
  constexpr Format f = format_for<QT>();
  uint8_t* quants = dst;
  uint8_t* scales = dst + nb * f.quant_bytes;
  uint8_t* mins = scales + 2 * nb;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* block = src + b * f.block_bytes;
    std::memcpy(scales + 2 * b, block, 2);
    if constexpr (QT == Q4_1) {
      std::memcpy(mins + 2 * b, block + 2, 2);
      std::memcpy(quants + HALF * b, block + 4, HALF);
    } else if constexpr (QT == Q4_0) {
      std::memcpy(quants + HALF * b, block + 2, HALF);
    } else {
      uint8_t* lo = quants + grouped_offset(b);
      uint8_t* hi = lo + grouped_gap(b, nb);
      for (int64_t i = 0; i < HALF; ++i) {
        lo[i] = block[2 + i] ^ 0x80;
        hi[i] = block[2 + HALF + i] ^ 0x80;
      }
    }
  }
}

template <int64_t QT>
void dequantize_row(const uint8_t* row, float* out, int64_t nb) {
  constexpr Format f = format_for<QT>();
  const uint8_t* quants = row;
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(row + nb * f.quant_bytes);
  const uint16_t* mins = scales + nb;
  for (int64_t b = 0; b < nb; ++b) {
    const float d = half_to_float(scales[b]);
    const float m = f.has_min ? half_to_float(mins[b]) : f.min_coef * d;
    float* o = out + b * QK;
    if constexpr (QT == Q8_0) {
      const uint8_t* lo = quants + grouped_offset(b);
      const uint8_t* hi = lo + grouped_gap(b, nb);
      for (int64_t i = 0; i < HALF; ++i) {
        o[i] = d * lo[i] + m;
        o[HALF + i] = d * hi[i] + m;
      }
    } else {
      const uint8_t* q = quants + HALF * b;
      for (int64_t i = 0; i < HALF; ++i) {
        o[i] = d * (q[i] & 0x0F) + m;
        o[HALF + i] = d * (q[i] >> 4) + m;
      }
    }
  }
}

template <typename Fn>
void dispatch(int64_t qtype, Fn&& fn) {
  switch (qtype) {
    case Q4_0: fn(std::integral_constant<int64_t, Q4_0>{}); return;
    case Q4_1: fn(std::integral_constant<int64_t, Q4_1>{}); return;
    case Q8_0: fn(std::integral_constant<int64_t, Q8_0>{}); return;
  }
  format_of(qtype);  // raises the unsupported-type error
}

torch::Tensor repack(torch::Tensor raw, int64_t qtype) {
  const Format f = format_of(qtype);
  const int64_t nb = blocks_per_row(raw, f);
  raw = raw.contiguous();
  auto out = torch::empty_like(raw);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t row_bytes = raw.size(1);
  dispatch(qtype, [&](auto qt) {
    at::parallel_for(0, raw.size(0), 1024, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        repack_row<decltype(qt)::value>(src + r * row_bytes, dst + r * row_bytes, nb);
    });
  });
  return out;
}

torch::Tensor dequantize(torch::Tensor packed, int64_t qtype) {
  const Format f = format_of(qtype);
  const int64_t nb = blocks_per_row(packed, f);
  packed = packed.contiguous();
  auto out = torch::empty({packed.size(0), nb * QK}, torch::kFloat);
  const uint8_t* src = packed.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  const int64_t row_bytes = packed.size(1);
  dispatch(qtype, [&](auto qt) {
    at::parallel_for(0, packed.size(0), 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        dequantize_row<decltype(qt)::value>(src + r * row_bytes, dst + r * nb * QK, nb);
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Activation quantization: rows of floats -> 8-bit blocks of 32 in grouped order

struct Activations {
  int64_t rows = 0, nb = 0, ng = 0;
  std::vector<int8_t> quants;  // [rows, nb*32] grouped order
  std::vector<float> lanes;    // [rows, ng*16] block scale da repeated for the 4 int32 lanes of a block
  std::vector<float> sums;     // [rows, nb] da * sum(qa)

  const int8_t* q(int64_t r) const { return quants.data() + r * nb * QK; }
  const float* lane_scales(int64_t r) const { return lanes.data() + r * ng * 16; }
  const float* s(int64_t r) const { return sums.data() + r * nb; }
};

void quantize_row(const float* x, int64_t nb, int8_t* q, float* lanes, float* sums) {
  const int64_t ng = (nb + GROUP - 1) / GROUP;
  std::fill(lanes, lanes + ng * 16, 0.f);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * QK;
    int8_t* lo = q + grouped_offset(b);
    int8_t* hi = lo + grouped_gap(b, nb);
    int32_t total = 0;
    float d;
#ifdef LH_AVX512
    const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    d = amax / 127.f;
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
    const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm512_cvtsepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), _mm512_cvtsepi32_epi8(i1));
    total = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
#else
    float amax = 0.f;
    for (int64_t i = 0; i < QK; ++i) amax = std::max(amax, std::abs(xb[i]));
    d = amax / 127.f;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t i = 0; i < QK; ++i) {
      const int32_t v = std::clamp(static_cast<int32_t>(std::nearbyint(xb[i] * inv)), -127, 127);
      (i < HALF ? lo[i] : hi[i - HALF]) = static_cast<int8_t>(v);
      total += v;
    }
#endif
    sums[b] = d * static_cast<float>(total);
    std::fill(lanes + b * 4, lanes + b * 4 + 4, d);  // group g lanes start at g*16 = 4*(4g)
  }
}

void quantize_activations(const float* x, int64_t rows, int64_t nb, Activations& a) {
  a.rows = rows;
  a.nb = nb;
  a.ng = (nb + GROUP - 1) / GROUP;
  a.quants.resize(rows * nb * QK);
  a.lanes.resize(rows * a.ng * 16);
  a.sums.resize(rows * nb);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      quantize_row(x + r * nb * QK, nb, a.quants.data() + r * nb * QK,
                   a.lanes.data() + r * a.ng * 16, a.sums.data() + r * nb);
  });
}

// ---------------------------------------------------------------------------------------------
// Tiles: R activation rows x C weight rows, each output a full dot product over K

#ifdef LH_AVX512

// [a b c d] -> [a a a a b b b b c c c c d d d d]: one block's scale for each of its 4 int32 lanes.
inline __m512 repeat4(__m128 v) {
  const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v));
}

// The four horizontal sums of a, b, c, d.
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

template <int64_t QT, int R, int C>
void tile(const Activations& a, int64_t r0, const uint8_t* w, int64_t row_bytes, int64_t c0,
          float* out, int64_t ldo) {
  constexpr Format f = format_for<QT>();
  const int64_t nb = a.nb, quant_bytes = nb * f.quant_bytes;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();

  for (int64_t g = 0; g < a.ng; ++g) {
    const int64_t count = std::min(GROUP, nb - g * GROUP);
    const __mmask64 qmask = count == GROUP ? ~0ULL : (1ULL << (HALF * count)) - 1;
    const __mmask8 smask = static_cast<__mmask8>((1u << count) - 1);
    const int64_t gap = HALF * count;
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const uint8_t* row = w + (c0 + c) * row_bytes;
      __m512i lo, hi;
      if constexpr (QT == Q8_0) {
        lo = _mm512_maskz_loadu_epi8(qmask, row + g * GROUP * QK);
        hi = _mm512_maskz_loadu_epi8(qmask, row + g * GROUP * QK + gap);
      } else {
        const __m512i packed = _mm512_maskz_loadu_epi8(qmask, row + g * GROUP * HALF);
        lo = _mm512_and_si512(packed, low4);
        hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low4);
      }
      const __m512 dw = repeat4(_mm_cvtph_ps(
          _mm_maskz_loadu_epi16(smask, row + quant_bytes + g * GROUP * 2)));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const int8_t* aq = a.q(r0 + r) + g * GROUP * QK;
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo,
                                          _mm512_maskz_loadu_epi8(qmask, aq));
        dot = _mm512_dpbusd_epi32(dot, hi, _mm512_maskz_loadu_epi8(qmask, aq + gap));
        const __m512 scale = _mm512_mul_ps(dw, _mm512_loadu_ps(a.lane_scales(r0 + r) + g * 16));
        acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r][c]);
      }
    }
  }

  // The min term: sum over blocks of m * da * sum(qa), 16 blocks per step.
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
    const uint8_t* row = w + (c0 + c) * row_bytes;
    const uint8_t* m = row + quant_bytes + (f.has_min ? 2 * nb : 0);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float* s = a.s(r0 + r);
      __m512 term = _mm512_setzero_ps();
      for (int64_t b = 0; b < nb; b += 16) {
        const __mmask16 mask = nb - b >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (nb - b)) - 1);
        const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, m + 2 * b));
        term = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(mask, s + b), term);
      }
      acc[r][c] = _mm512_fmadd_ps(term, _mm512_set1_ps(f.min_coef), acc[r][c]);
    }
  }

#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* o = out + (r0 + r) * ldo + c0;
    if constexpr (C == 4) {
      _mm_storeu_ps(o, hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    } else {
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) o[c] = _mm512_reduce_add_ps(acc[r][c]);
    }
  }
}

#else  // portable scalar tile

template <int64_t QT, int R, int C>
void tile(const Activations& a, int64_t r0, const uint8_t* w, int64_t row_bytes, int64_t c0,
          float* out, int64_t ldo) {
  constexpr Format f = format_for<QT>();
  const int64_t nb = a.nb, quant_bytes = nb * f.quant_bytes;
  for (int c = 0; c < C; ++c) {
    const uint8_t* row = w + (c0 + c) * row_bytes;
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(row + quant_bytes);
    const uint16_t* mins = scales + nb;
    for (int r = 0; r < R; ++r) {
      const int8_t* aq = a.q(r0 + r);
      const float* lanes = a.lane_scales(r0 + r);
      const float* s = a.s(r0 + r);
      float total = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int8_t* alo = aq + grouped_offset(b);
        const int8_t* ahi = alo + grouped_gap(b, nb);
        int32_t dot = 0;
        for (int64_t i = 0; i < HALF; ++i) {
          int32_t ulo, uhi;
          if constexpr (QT == Q8_0) {
            const uint8_t* lo = row + grouped_offset(b);
            ulo = lo[i];
            uhi = lo[grouped_gap(b, nb) + i];
          } else {
            const uint8_t q = row[HALF * b + i];
            ulo = q & 0x0F;
            uhi = q >> 4;
          }
          dot += ulo * alo[i] + uhi * ahi[i];
        }
        const float d = half_to_float(scales[b]);
        const float m = f.has_min ? half_to_float(mins[b]) : f.min_coef * d;
        total += d * lanes[b * 4] * static_cast<float>(dot) + m * s[b];
      }
      out[(r0 + r) * ldo + c0 + c] = total;
    }
  }
}

#endif

template <int64_t QT, int C>
void tile_rows(int64_t rows, const Activations& a, int64_t r0, const uint8_t* w, int64_t row_bytes,
               int64_t c0, float* out, int64_t ldo) {
  switch (rows) {
    case 4: tile<QT, 4, C>(a, r0, w, row_bytes, c0, out, ldo); break;
    case 3: tile<QT, 3, C>(a, r0, w, row_bytes, c0, out, ldo); break;
    case 2: tile<QT, 2, C>(a, r0, w, row_bytes, c0, out, ldo); break;
    default: tile<QT, 1, C>(a, r0, w, row_bytes, c0, out, ldo); break;
  }
}

template <int64_t QT>
void matmul_typed(const Activations& a, const uint8_t* w, int64_t row_bytes, int64_t n, float* out) {
  constexpr int64_t TR = 4, TC = 4;  // tile shape
  constexpr int64_t ROW_BLOCK = 64;  // activation rows kept in L2 while weight tiles pass by
  const int64_t tiles = (n + TC - 1) / TC;
  const int64_t macs_per_tile = a.rows * a.nb * QK * TC;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, macs_per_tile));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t rb = 0; rb < a.rows; rb += ROW_BLOCK) {
      const int64_t re = std::min(a.rows, rb + ROW_BLOCK);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = t * TC, cols = std::min(TC, n - c0);
        for (int64_t r0 = rb; r0 < re; r0 += TR) {
          const int64_t rows = std::min(TR, re - r0);
          if (cols == TC) {
            tile_rows<QT, TC>(rows, a, r0, w, row_bytes, c0, out, n);
          } else {
            for (int64_t c = c0; c < c0 + cols; ++c)
              tile_rows<QT, 1>(rows, a, r0, w, row_bytes, c, out, n);
          }
        }
      }
    }
  });
}

// x: float32 [M, K]; w: packed uint8 [N, row_bytes]  ->  float32 [M, N] = x @ W^T
torch::Tensor matmul(torch::Tensor x, torch::Tensor w, int64_t qtype) {
  const Format f = format_of(qtype);
  const int64_t nb = blocks_per_row(w, f);
  TORCH_CHECK(x.dtype() == torch::kFloat && x.dim() == 2, "activations must be float32 [rows, K]");
  TORCH_CHECK(x.size(1) == nb * QK, "activations have ", x.size(1), " features, weights ", nb * QK);
  TORCH_CHECK(w.is_contiguous(), "packed weights must be contiguous");
  x = x.contiguous();
  thread_local Activations a;
  quantize_activations(x.data_ptr<float>(), x.size(0), nb, a);
  auto out = torch::empty({x.size(0), w.size(0)}, torch::kFloat);
  dispatch(qtype, [&](auto qt) {
    matmul_typed<decltype(qt)::value>(a, w.data_ptr<uint8_t>(), w.size(1), w.size(0),
                                      out.data_ptr<float>());
  });
  return out;
}

std::string simd() {
#ifdef LH_AVX512
  return "avx512_vnni";
#else
  return "scalar";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Integer-dot matmul kernels for GGUF Q4_0, Q4_1 and Q8_0 weights";
  m.def("repack", &repack, "GGUF rows (uint8 [N, bytes]) -> packed rows of the same size");
  m.def("dequantize", &dequantize, "packed rows -> float32 [N, K]");
  m.def("matmul", &matmul, "x float32 [M, K] @ packed W^T -> float32 [M, N]");
  m.def("simd", &simd, "the instruction set the kernels were compiled for");
}
