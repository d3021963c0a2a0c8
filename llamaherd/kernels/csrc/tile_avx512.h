// The AVX512-VNNI tile: R activation rows x one panel (16 weight rows).
#pragma once

#include "activations.h"
#include "format.h"

namespace {

// A block's weight scales for the panel's 16 rows: d, and the stored min m (Q4_1 only; the other
// types' m = coef*d is folded into the activation term).
struct BlockScales {
  __m512 d, m;
};

template <int64_t QT>
inline BlockScales block_scales(const uint8_t* block) {
  const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block)));
  if constexpr (format_for<QT>().has_min)
    return {d, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32)))};
  return {d, _mm512_setzero_ps()};
}

// The float epilogue of one block for one activation row: its 16 integer dots (one per panel
// row) into the row's accumulator. The VNNI and AMX tiles share it, so their results agree.
template <int64_t QT>
inline __m512 accumulate(__m512 acc, __m512i dot, const BlockScales& w, float da, float term) {
  const __m512 sum = _mm512_cvtepi32_ps(dot);
  if constexpr (format_for<QT>().has_min) {  // acc += dw*da*dot + m*(da*sum(qa))
    acc = _mm512_fmadd_ps(w.m, _mm512_set1_ps(term), acc);
    return _mm512_fmadd_ps(_mm512_mul_ps(sum, _mm512_set1_ps(da)), w.d, acc);
  } else {  // acc += dw*(da*dot + coef*da*sum(qa))
    const __m512 t = _mm512_fmadd_ps(sum, _mm512_set1_ps(da), _mm512_set1_ps(term));
    return _mm512_fmadd_ps(t, w.d, acc);
  }
}

template <int64_t QT, int R>
void tile(const Activations& a, int64_t r0, const uint8_t* panel, float* out, int64_t ldo,
          int64_t cols) {
  constexpr Format f = format_for<QT>();
  constexpr int NV = 8;  // quant vectors per block after unpacking: vector j = elements 4j..4j+3
  const int64_t nb = a.nb;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* block = panel + b * PANEL * f.block_bytes;
    prefetch_panel(block, PANEL * f.block_bytes);
    const BlockScales scales = block_scales<QT>(block);
    const uint8_t* quants = block + f.scale_bytes();
    __m512i w[NV];
    if constexpr (QT == Q8_0) {
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) w[j] = _mm512_loadu_si512(quants + 64 * j);
    } else {
#pragma GCC unroll 4
      for (int j = 0; j < NV / 2; ++j) {
        const __m512i v = _mm512_loadu_si512(quants + 64 * j);
        w[j] = _mm512_and_si512(v, low4);
        w[j + NV / 2] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      }
    }
    // row r's activation quants of this block: x[r*8 + j] holds elements 4j..4j+3
    const int32_t* x = reinterpret_cast<const int32_t*>(a.q(r0, b));
    const float* da = a.d(r0, b);
    const float* terms = a.t(r0, b);
    if constexpr (R < 4) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        // few rows: two shorter dependency chains keep the ports busy
        __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int j = 0; j < NV; j += 2) {
          even = _mm512_dpbusd_epi32(even, w[j], _mm512_set1_epi32(x[r * NV + j]));
          odd = _mm512_dpbusd_epi32(odd, w[j + 1], _mm512_set1_epi32(x[r * NV + j + 1]));
        }
        acc[r] = accumulate<QT>(acc[r], _mm512_add_epi32(even, odd), scales, da[r], terms[r]);
      }
    } else {  // rows side by side: R independent chains, each one step at a time
      __m512i dot[R];
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j)
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
          dot[r] = _mm512_dpbusd_epi32(dot[r], w[j], _mm512_set1_epi32(x[r * NV + j]));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r] = accumulate<QT>(acc[r], dot[r], scales, da[r], terms[r]);
    }
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + (r0 + r) * ldo, mask, acc[r]);
}

}  // namespace
