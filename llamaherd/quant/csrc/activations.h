// Activation quantization: rows of floats -> 8-bit blocks of 32, as the tiles read them.
#pragma once

#include "format.h"

namespace {

// Block-major: block b of row r lies at quants + (b*rows + r)*32, its scale at scales[b*rows + r],
// so one block of consecutive rows is contiguous. A tile then reaches all its rows of a block from
// one pointer at constant offsets (a pointer per row spilled registers and doubled the instruction
// count of the 8-row tile), and AMX loads them as one tile with a 32-byte stride.
struct Activations {
  int64_t rows = 0, nb = 0;
  std::vector<int8_t> quants;  // [nb, rows, 32]
  std::vector<float> scales;   // [nb, rows] da
  std::vector<float> terms;    // [nb, rows] coef * da * sum(qa): the min term's activation factor
  std::vector<int32_t> sums;   // [nb, rows] sum(qa)

  // Row r's block b; row r + i's is i*32 bytes (q) or i elements (d, t, s) further on.
  const int8_t* q(int64_t r, int64_t b) const { return quants.data() + (b * rows + r) * QK; }
  const float* d(int64_t r, int64_t b) const { return scales.data() + b * rows + r; }
  const float* t(int64_t r, int64_t b) const { return terms.data() + b * rows + r; }
  const int32_t* s(int64_t r, int64_t b) const { return sums.data() + b * rows + r; }
};

// coef is the weight type's min_coef (Q4_0, Q8_0: m = coef*d) or 1 for a stored min (Q4_1).
// Row r of x into a's blocks (a sized for its rows and blocks).
void quantize_row(const float* x, int64_t r, float coef, Activations& a) {
  for (int64_t b = 0; b < a.nb; ++b) {
    const int64_t at = b * a.rows + r;  // row r's block b: its scale's index, its quants' at 32x
    const float* xb = x + b * QK;
    int8_t* qb = a.quants.data() + at * QK;
    int32_t total = 0;
    float amax;
#ifdef LH_AVX512
    const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
    const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtsepi32_epi8(i1));
    total = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
#elif defined(LH_AVX2)  // the same float ops as the AVX-512 code on four 8-float vectors
    const __m256 sign_bit = _mm256_set1_ps(-0.f);
    __m256 v[4];
    __m256 vmax = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      v[k] = _mm256_loadu_ps(xb + 8 * k);
      vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign_bit, v[k]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i i[4];
    __m256i sum = _mm256_setzero_si256();
    for (int k = 0; k < 4; ++k) {
      i[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv));
      sum = _mm256_add_epi32(sum, i[k]);
    }
    // The saturating packs work within 128-bit lanes, leaving 4-byte groups in the order
    // i0[0:4] i1[0:4] i2[0:4] i3[0:4] i0[4:8] ...: the permutation puts them back in order.
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]),
                                             _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb),
                        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    total = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
#else
    amax = 0.f;
    for (int64_t i = 0; i < QK; ++i) amax = std::max(amax, std::abs(xb[i]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t i = 0; i < QK; ++i) {
      const int32_t v = std::clamp(static_cast<int32_t>(std::nearbyint(xb[i] * inv)), -127, 127);
      qb[i] = static_cast<int8_t>(v);
      total += v;
    }
#endif
    a.scales[at] = amax / 127.f;
    a.terms[at] = coef * a.scales[at] * static_cast<float>(total);
    a.sums[at] = total;
  }
}

void quantize_activations(const float* x, int64_t rows, int64_t nb, float coef, Activations& a) {
  a.rows = rows;
  a.nb = nb;
  a.quants.resize(rows * nb * QK);
  a.scales.resize(rows * nb);
  a.terms.resize(rows * nb);
  a.sums.resize(rows * nb);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) quantize_row(x + r * nb * QK, r, coef, a);
  });
}

}  // namespace
