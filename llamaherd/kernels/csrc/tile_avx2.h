// The AVX2 (and AVX-VNNI) tile: the AVX-512 tile's dots and float ops on 256-bit vectors.
#pragma once

#include "activations.h"
#include "format.h"

namespace {

// A 256-bit vector holds 8 int32 lanes, so each 64-byte panel vector is two halves, rows 0-7 and
// rows 8-15, computed one after the other. Activation rows go GROUP at a time so that the
// accumulators, weights and broadcasts fit in the 16 ymm registers.
//
// With AVX-VNNI, vpdpbusd works as in the AVX-512 tile. Without it, the u8 x s8 dot is vpmaddubsw
// (adjacent products summed into saturating int16) then vpmaddwd by 1 (int16 pairs into int32).
// That is exact for 4-bit u: a pair sum is at most 2*15*127 = 3810 in size, and even the 8 of a
// block fit int16, so they are added as int16 and widened once. A Q8 byte u = 16*hi + lo could
// saturate, so it is split into two nibble planes summed like Q4 and combined as lo + 16*hi in
// int32. Either way each row gets the same integer dot as vpdpbusd, then the same float ops.

constexpr int HALF = PANEL / 2;  // panel rows per 256-bit vector
constexpr int GROUP = 4;         // activation rows per pass over a half panel

// The value passes through an empty asm: this keeps each running sum a chain of adds, which the
// compiler would otherwise regroup into trees of partial sums that overflow the registers.
inline void chain(__m256i& v) { asm("" : "+x"(v)); }

// A block's weight scales for one half of the panel: d, and the stored min m (Q4_1 only).
template <int64_t QT>
inline void half_scales(const uint8_t* block, int half, __m256& dw, __m256& mw) {
  dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2 * HALF * half)));
  if constexpr (format_for<QT>().has_min)
    mw = _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2 * PANEL + 2 * HALF * half)));
}

// The float epilogue of one block for one activation row: the AVX-512 tile's `accumulate`.
template <int64_t QT>
inline __m256 accumulate(__m256 acc, __m256i dot, __m256 dw, __m256 mw, float da, float term) {
  const __m256 sum = _mm256_cvtepi32_ps(dot);
  if constexpr (format_for<QT>().has_min) {
    acc = _mm256_fmadd_ps(mw, _mm256_set1_ps(term), acc);
    return _mm256_fmadd_ps(_mm256_mul_ps(sum, _mm256_set1_ps(da)), dw, acc);
  }
  const __m256 t = _mm256_fmadd_ps(sum, _mm256_set1_ps(da), _mm256_set1_ps(term));
  return _mm256_fmadd_ps(t, dw, acc);
}

template <int64_t QT, int G>
void half_tile(const Activations& a, int64_t r0, const uint8_t* panel, int half, float* out,
               int64_t ldo, int64_t cols) {
  constexpr Format f = format_for<QT>();
  constexpr int NQ = f.quant_bytes / 4;  // 64-byte quant vectors per block: 4 (Q4) or 8 (Q8)
  const int64_t nb = a.nb;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* block = panel + b * PANEL * f.block_bytes;
    if (half == 0) prefetch_panel(block, PANEL * f.block_bytes);  // the other passes hit cache
    const uint8_t* quants = block + f.scale_bytes() + 4 * HALF * half;
    const int32_t* aq = reinterpret_cast<const int32_t*>(a.q(r0, b));  // row g's at aq + 8g
    const float* da = a.d(r0, b);
    const float* terms = a.t(r0, b);
    __m256i dot[G];
#ifdef LH_AVX_VNNI
    for (int g = 0; g < G; ++g) dot[g] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < NQ; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 64 * j));
      const __m256i lo = QT == Q8_0 ? v : _mm256_and_si256(v, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      for (int g = 0; g < G; ++g) {
        const int32_t* x = aq + g * (QK / 4);
        dot[g] = _mm256_dpbusd_avx_epi32(dot[g], lo, _mm256_set1_epi32(x[j]));
        if constexpr (QT != Q8_0)  // high nibbles are elements 16 on
          dot[g] = _mm256_dpbusd_avx_epi32(dot[g], hi, _mm256_set1_epi32(x[j + 4]));
      }
    }
#else
    __m256i lo16[G], hi16[G];  // int16 pair sums: of the low planes, and of Q8's high nibbles
    for (int g = 0; g < G; ++g) lo16[g] = hi16[g] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < NQ; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 64 * j));
      const __m256i lo = _mm256_and_si256(v, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      for (int g = 0; g < G; ++g) {
        const int32_t* x = aq + g * (QK / 4);
        const __m256i xj = _mm256_set1_epi32(x[j]);
        lo16[g] = _mm256_add_epi16(lo16[g], _mm256_maddubs_epi16(lo, xj));
        if constexpr (QT == Q8_0)
          hi16[g] = _mm256_add_epi16(hi16[g], _mm256_maddubs_epi16(hi, xj));
        else  // high nibbles are elements 16 on
          lo16[g] = _mm256_add_epi16(lo16[g], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x[j + 4])));
        chain(lo16[g]);
        if constexpr (QT == Q8_0) chain(hi16[g]);
      }
    }
    for (int g = 0; g < G; ++g) {
      dot[g] = _mm256_madd_epi16(lo16[g], _mm256_set1_epi16(1));
      if constexpr (QT == Q8_0)
        dot[g] = _mm256_add_epi32(dot[g], _mm256_madd_epi16(hi16[g], _mm256_set1_epi16(16)));
    }
#endif
    __m256 dw, mw = _mm256_setzero_ps();
    half_scales<QT>(block, half, dw, mw);
    for (int g = 0; g < G; ++g) acc[g] = accumulate<QT>(acc[g], dot[g], dw, mw, da[g], terms[g]);
  }
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(cols)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (int g = 0; g < G; ++g) _mm256_maskstore_ps(out + (r0 + g) * ldo, mask, acc[g]);
}

#ifndef LH_AVX_VNNI
// Without AVX-VNNI, several activation rows: G rows a pass over both halves of the panel, so each
// activation broadcast serves 16 weight rows rather than 8 (the broadcasts were as many as the
// multiplies, and their loads the busiest port). The float accumulators stay in L1.
//
// Q4 rows get half_tile's integer dots. Q8 takes fewer operations than its two nibble planes:
// with the signed quant q = u - 128, vpmaddubsw of |q| and the activations carrying q's sign adds
// two products q*qa of at most 128*127 in size each, which int16 holds; vpmaddwd widens each
// step's sums. The dot of u is then that of q plus 128*sum(qa), the same integer as half_tile's.
template <int64_t QT, int G>
void full_tile(const Activations& a, int64_t r0, const uint8_t* panel, float* out, int64_t ldo,
               int64_t cols) {
  constexpr Format f = format_for<QT>();
  constexpr int NQ = f.quant_bytes / 4;
  const int64_t nb = a.nb;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i offset = _mm256_set1_epi8(static_cast<char>(0x80));
  alignas(32) float acc[G][PANEL];
  for (int g = 0; g < G; ++g)
    for (int l = 0; l < PANEL; ++l) acc[g][l] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* block = panel + b * PANEL * f.block_bytes;
    prefetch_panel(block, PANEL * f.block_bytes);
    const uint8_t* quants = block + f.scale_bytes();
    const int32_t* aq = reinterpret_cast<const int32_t*>(a.q(r0, b));  // row g's at aq + 8g
    const float* da = a.d(r0, b);
    const float* terms = a.t(r0, b);
    const int32_t* sums = a.s(r0, b);
    __m256i dot[G][2];  // per row and half: int16 pair sums (Q4), int32 sums (Q8)
    for (int g = 0; g < G; ++g) dot[g][0] = dot[g][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < NQ; ++j) {
      __m256i lo[2], hi[2];  // Q4: the nibble planes; Q8: |q| and q
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 64 * j + 32 * h));
        if constexpr (QT == Q8_0) {
          hi[h] = _mm256_xor_si256(v, offset);
          lo[h] = _mm256_abs_epi8(hi[h]);
        } else {
          lo[h] = _mm256_and_si256(v, low4);
          hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        }
      }
      for (int g = 0; g < G; ++g) {
        const int32_t* x = aq + g * (QK / 4);
        const __m256i xj = _mm256_set1_epi32(x[j]);
        if constexpr (QT == Q8_0) {
          for (int h = 0; h < 2; ++h) {
            const __m256i pairs = _mm256_maddubs_epi16(lo[h], _mm256_sign_epi8(xj, hi[h]));
            dot[g][h] = _mm256_add_epi32(dot[g][h], _mm256_madd_epi16(pairs, ones));
          }
        } else {  // high nibbles are elements 16 on
          const __m256i xh = _mm256_set1_epi32(x[j + 4]);
          for (int h = 0; h < 2; ++h) {
            dot[g][h] = _mm256_add_epi16(dot[g][h], _mm256_maddubs_epi16(lo[h], xj));
            dot[g][h] = _mm256_add_epi16(dot[g][h], _mm256_maddubs_epi16(hi[h], xh));
            chain(dot[g][h]);
          }
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      __m256 dw, mw = _mm256_setzero_ps();
      half_scales<QT>(block, h, dw, mw);
      for (int g = 0; g < G; ++g) {
        const __m256i d = QT == Q8_0
            ? _mm256_add_epi32(dot[g][h], _mm256_set1_epi32(128 * sums[g]))
            : _mm256_madd_epi16(dot[g][h], ones);
        _mm256_store_ps(acc[g] + HALF * h, accumulate<QT>(_mm256_load_ps(acc[g] + HALF * h), d,
                                                          dw, mw, da[g], terms[g]));
      }
    }
  }
  for (int g = 0; g < G; ++g)
    std::copy(acc[g], acc[g] + cols, out + (r0 + g) * ldo);
}
#endif

template <int64_t QT, int R>
void tile(const Activations& a, int64_t r0, const uint8_t* panel, float* out, int64_t ldo,
          int64_t cols) {
#ifndef LH_AVX_VNNI
  constexpr int FG = 4;  // rows a full-width pass: their sums and the weights fill the registers
  if constexpr (R >= 2) {
    constexpr int G = R < FG ? R : FG;
    full_tile<QT, G>(a, r0, panel, out, ldo, cols);
    if constexpr (R > G) tile<QT, R - G>(a, r0 + G, panel, out, ldo, cols);
    return;
  }
#endif
  constexpr int G = R < GROUP ? R : GROUP;
  half_tile<QT, G>(a, r0, panel, 0, out, ldo, std::min<int64_t>(cols, HALF));
  if (cols > HALF) half_tile<QT, G>(a, r0, panel, 1, out + HALF, ldo, cols - HALF);
  if constexpr (R > G) tile<QT, R - G>(a, r0 + G, panel, out, ldo, cols);
}

}  // namespace
