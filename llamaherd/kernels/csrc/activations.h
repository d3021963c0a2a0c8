// Activation quantization: rows of floats -> 8-bit blocks of 32, as the tiles read them.
#pragma once

#include "format.h"
#include "simd.h"

namespace {

// Block-major: block b of row r lies at quants + (b*rows + r)*32, its scale at scales[b*rows + r],
// so one block of consecutive rows is contiguous. A tile then reaches all its rows of a block from
// one pointer at constant offsets (a pointer per row spilled registers and doubled the instruction
// count of the 8-row tile), and AMX loads them as one tile with a 32-byte stride.
struct Activations {
  int64_t rows = 0, nb = 0;
  AlignedVector<int8_t> quants;  // [nb, rows, 32]
  AlignedVector<float> scales;   // [nb, rows] da
  AlignedVector<float> terms;    // [nb, rows] coef * da * sum(qa): the min term's activation factor
  AlignedVector<int32_t> sums;   // [nb, rows] sum(qa)

  // Row r's block b; row r + i's is i*32 bytes (q) or i elements (d, t, s) further on.
  const int8_t* q(int64_t r, int64_t b) const { return quants.data() + (b * rows + r) * QK; }
  const float* d(int64_t r, int64_t b) const { return scales.data() + b * rows + r; }
  const float* t(int64_t r, int64_t b) const { return terms.data() + b * rows + r; }
  const int32_t* s(int64_t r, int64_t b) const { return sums.data() + b * rows + r; }
};

// coef is the weight type's min_coef (Q4_0, Q8_0: m = coef*d) or 1 for a stored min (Q4_1).
// Blocks are numbered through x [rows, nb * 32] row by row: block k is row k / nb's block k % nb,
// elements 32k..32k+31 of x. Its scale's index in a (its quants' at 32x):
inline int64_t block_at(const Activations& a, int64_t k) { return k % a.nb * a.rows + k / a.nb; }

// Block k of x into a (a sized for its rows and blocks).
void quantize_block(const float* x, int64_t k, float coef, Activations& a) {
  const int64_t at = block_at(a, k);
  const float* xb = x + k * QK;
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
  for (int c = 0; c < 4; ++c) {
    v[c] = _mm256_loadu_ps(xb + 8 * c);
    vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign_bit, v[c]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m256i i[4];
  __m256i sum = _mm256_setzero_si256();
  for (int c = 0; c < 4; ++c) {
    i[c] = _mm256_cvtps_epi32(_mm256_mul_ps(v[c], inv));
    sum = _mm256_add_epi32(sum, i[c]);
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

#ifdef LH_AVX512
// Blocks k0..k0+15 at once, with quantize_block's arithmetic: their 16 maxima and 16 sums each
// come from one fold of 16 vectors (simd.h) instead of 16 horizontal reductions, which took most
// of a block's time.
void quantize_16_blocks(const float* x, int64_t k0, float coef, Activations& a) {
  __m512 m[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {  // in FOLD_ORDER: the folds give block k0 + i in lane i
    const float* xb = x + (k0 + FOLD_ORDER[i]) * QK;
    m[i] = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xb)), _mm512_abs_ps(_mm512_loadu_ps(xb + 16)));
  }
  const __m512 amax = fold16(m, [](__m512 p, __m512 q) { return _mm512_max_ps(p, q); });
  const __mmask16 positive = _mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ);
  alignas(64) float inv[16];
  _mm512_store_ps(inv, _mm512_maskz_div_ps(positive, _mm512_set1_ps(127.f), amax));
  __m512 sums[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    const int64_t k = k0 + FOLD_ORDER[i];
    const float* xb = x + k * QK;
    const __m512 scale = _mm512_set1_ps(inv[FOLD_ORDER[i]]);
    const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb), scale));
    const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + 16), scale));
    int8_t* qb = a.quants.data() + block_at(a, k) * QK;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtsepi32_epi8(i1));
    sums[i] = _mm512_castsi512_ps(_mm512_add_epi32(i0, i1));
  }
  const __m512i total = _mm512_castps_si512(fold16(sums, [](__m512 p, __m512 q) {
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), _mm512_castps_si512(q)));
  }));
  const __m512 da = _mm512_div_ps(amax, _mm512_set1_ps(127.f));
  alignas(64) float scales[16], terms[16];
  alignas(64) int32_t totals[16];
  _mm512_store_ps(scales, da);
  _mm512_store_ps(terms, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(coef), da),
                                       _mm512_cvtepi32_ps(total)));
  _mm512_store_si512(totals, total);
  for (int i = 0; i < 16; ++i) {
    const int64_t at = block_at(a, k0 + i);
    a.scales[at] = scales[i];
    a.terms[at] = terms[i];
    a.sums[at] = totals[i];
  }
}
#endif

void quantize_activations(const float* x, int64_t rows, int64_t nb, float coef, Activations& a) {
  a.rows = rows;
  a.nb = nb;
  a.quants.resize(rows * nb * QK);
  a.scales.resize(rows * nb);
  a.terms.resize(rows * nb);
  a.sums.resize(rows * nb);
  at::parallel_for(0, rows * nb, 16 * nb, [&](int64_t k0, int64_t k1) {
    int64_t k = k0;
#ifdef LH_AVX512
    for (; k + 16 <= k1; k += 16) quantize_16_blocks(x, k, coef, a);
#endif
    for (; k < k1; ++k) quantize_block(x, k, coef, a);
  });
}

}  // namespace
