// Float vector helpers shared by the norms, the attention, the activations and sampling: one lane
// width per instruction set (format.h picks it), with plain loops for the portable build.
#pragma once

#include <limits>

#include "format.h"

namespace {

// Rows of floats or IEEE halves (cached keys and values), computed in float. (Left to the
// compiler, a dot product's sum became a chain of scalar adds through the stack: half of the
// attention time.)

// One float vector type per instruction set, `Lanes`, with the few operations the kernels use,
// so that each algorithm below is written once for both vector widths.
#ifdef LH_AVX512
#define LH_LANES 1
constexpr int64_t LANES = 16;
using Lanes = __m512;
inline Lanes load_lanes(const float* x) { return _mm512_loadu_ps(x); }
inline Lanes load_lanes(const c10::Half* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}
inline void store_lanes(float* x, Lanes v) { _mm512_storeu_ps(x, v); }
inline void store_lanes(c10::Half* x, Lanes v) {  // rounded to nearest even, as c10::Half(float)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline Lanes splat(float v) { return _mm512_set1_ps(v); }
inline Lanes add(Lanes a, Lanes b) { return _mm512_add_ps(a, b); }
inline Lanes sub(Lanes a, Lanes b) { return _mm512_sub_ps(a, b); }
inline Lanes mul(Lanes a, Lanes b) { return _mm512_mul_ps(a, b); }
inline Lanes div(Lanes a, Lanes b) { return _mm512_div_ps(a, b); }
inline Lanes fmadd(Lanes a, Lanes b, Lanes c) { return _mm512_fmadd_ps(a, b, c); }   // a*b + c
inline Lanes fnmadd(Lanes a, Lanes b, Lanes c) { return _mm512_fnmadd_ps(a, b, c); } // c - a*b
inline Lanes clamp(Lanes x, float lo, float hi) {
  return _mm512_min_ps(_mm512_max_ps(x, splat(lo)), splat(hi));
}
inline Lanes round_lanes(Lanes x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline Lanes scale_pow2(Lanes p, Lanes n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
inline Lanes lane_max(Lanes a, Lanes b) { return _mm512_max_ps(a, b); }
inline Lanes swap_pairs(Lanes x) { return _mm512_permute_ps(x, 0xB1); }  // lanes 1 0 3 2 ...
inline float reduce_add(Lanes v) { return _mm512_reduce_add_ps(v); }

// 16 horizontal reductions at once: lane i of fold16(v, op) is op over the lanes of vector
// FOLD_ORDER[i], op a lane-wise associative operation (sum, max). The shuffles transpose 4 x 4
// groups, 30 for all 16 vectors where one reduction takes 8; FOLD_ORDER is its own inverse, so
// vectors given in FOLD_ORDER come out in their natural order.
constexpr int FOLD_ORDER[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

template <typename Op>
inline __m512 fold16(const __m512* v, Op op) {
  __m512 t[8], u[4], w[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // halves of 2i and 2i+1 combined: 8 partial results each
    t[i] = op(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
              _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // 4 partial results each
    u[i] = op(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
              _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)  // 2 partial results each
    w[i] = op(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44),
              _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0xEE));
  return op(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
}
inline float reduce_max(Lanes v) { return _mm512_reduce_max_ps(v); }
// e where x is a logit a constraint allows, 0 where it is -inf
inline Lanes zero_where_minus_inf(Lanes x, Lanes e) {
  return _mm512_maskz_mov_ps(
      _mm512_cmp_ps_mask(x, splat(-std::numeric_limits<float>::infinity()), _CMP_NEQ_OQ), e);
}
#elif defined(LH_AVX2)
#define LH_LANES 1
constexpr int64_t LANES = 8;
using Lanes = __m256;
inline Lanes load_lanes(const float* x) { return _mm256_loadu_ps(x); }
inline Lanes load_lanes(const c10::Half* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}
inline void store_lanes(float* x, Lanes v) { _mm256_storeu_ps(x, v); }
inline void store_lanes(c10::Half* x, Lanes v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(x),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline Lanes splat(float v) { return _mm256_set1_ps(v); }
inline Lanes add(Lanes a, Lanes b) { return _mm256_add_ps(a, b); }
inline Lanes sub(Lanes a, Lanes b) { return _mm256_sub_ps(a, b); }
inline Lanes mul(Lanes a, Lanes b) { return _mm256_mul_ps(a, b); }
inline Lanes div(Lanes a, Lanes b) { return _mm256_div_ps(a, b); }
inline Lanes fmadd(Lanes a, Lanes b, Lanes c) { return _mm256_fmadd_ps(a, b, c); }
inline Lanes fnmadd(Lanes a, Lanes b, Lanes c) { return _mm256_fnmadd_ps(a, b, c); }
inline Lanes clamp(Lanes x, float lo, float hi) {
  return _mm256_min_ps(_mm256_max_ps(x, splat(lo)), splat(hi));
}
inline Lanes round_lanes(Lanes x) {
  return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// p * 2^n for whole n in [-150, 128], as AVX-512's scalef: 2^n is built in the exponent field,
// in two halves, since one float holds 2^k only for k in [-126, 127]. Both products are exact
// but for a subnormal result, rounded once, so the result is scalef's.
inline Lanes scale_pow2(Lanes p, Lanes n) {
  const __m256i k = _mm256_cvtps_epi32(n), k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
  const __m256i bias = _mm256_set1_epi32(127);
  const auto pow2 = [&](__m256i e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, bias), 23));
  };
  return mul(mul(p, pow2(k1)), pow2(k2));
}
inline Lanes lane_max(Lanes a, Lanes b) { return _mm256_max_ps(a, b); }
inline Lanes swap_pairs(Lanes x) { return _mm256_permute_ps(x, 0xB1); }
inline float reduce_max(Lanes v) {
  alignas(32) float lanes[LANES];
  _mm256_store_ps(lanes, v);
  float max = -std::numeric_limits<float>::infinity();  // std::max from -inf passes over NaN lanes
  for (const float x : lanes) max = std::max(max, x);
  return max;
}
inline float reduce_add(Lanes v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}
inline Lanes zero_where_minus_inf(Lanes x, Lanes e) {
  return _mm256_and_ps(_mm256_cmp_ps(x, splat(-std::numeric_limits<float>::infinity()), _CMP_NEQ_OQ), e);
}
#endif

template <typename T>
float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#ifdef LH_LANES
  Lanes acc = splat(0.f);
  for (; i + LANES <= n; i += LANES) acc = fmadd(load_lanes(a + i), load_lanes(b + i), acc);
  total = reduce_add(acc);
#endif
  for (; i < n; ++i) total += a[i] * static_cast<float>(b[i]);
  return total;
}

// The largest of n floats, in four independent vector chains (the compiler made a single scalar
// chain of maxes of the plain loop).
inline float row_max(const float* x, int64_t n) {
  float max = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#ifdef LH_LANES
  Lanes m[4];
  for (auto& v : m) v = splat(max);
  for (; i + 4 * LANES <= n; i += 4 * LANES)
    for (int j = 0; j < 4; ++j) m[j] = lane_max(m[j], load_lanes(x + i + j * LANES));
  max = reduce_max(lane_max(lane_max(m[0], m[1]), lane_max(m[2], m[3])));
#endif
  for (; i < n; ++i) max = std::max(max, x[i]);
  return max;
}

// y += p * x
template <typename T>
void axpy(float p, const T* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef LH_LANES
  const Lanes pv = splat(p);
  for (; i + LANES <= n; i += LANES) store_lanes(y + i, fmadd(pv, load_lanes(x + i), load_lanes(y + i)));
#endif
  for (; i < n; ++i) y[i] += p * static_cast<float>(x[i]);
}

#ifdef LH_LANES
// e^x a vector at a time: 2^n * p(r) with x = n*ln2 + r, |r| <= ln2/2 and p Cephes' expf
// polynomial (within 2 ulp of expf); the same bits in both vector widths.
inline Lanes exp_lanes(Lanes x) {
  x = clamp(x, -104.f, 88.7f);
  const Lanes n = round_lanes(mul(x, splat(1.44269504f)));
  Lanes r = fnmadd(n, splat(0.693359375f), x);  // ln2 in two parts
  r = fnmadd(n, splat(-2.12194440e-4f), r);
  Lanes p = splat(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                        5.0000001201e-1f})
    p = fmadd(p, r, splat(c));
  p = fmadd(p, mul(r, r), add(r, splat(1.f)));
  return scale_pow2(p, n);
}
#endif

// x[0..n) = softmax of x[0..n), in place. (Left to the compiler, the exponentials went through
// glibc's 4-wide vector expf, a library call every 4 scores.)
inline void softmax_row(float* x, int64_t n) {
  const float top = row_max(x, n);
  float total = 0.f;
  int64_t j = 0;
#ifdef LH_LANES
  const Lanes t = splat(top);
  Lanes sum = splat(0.f);
  for (; j + LANES <= n; j += LANES) {
    const Lanes e = exp_lanes(sub(load_lanes(x + j), t));
    store_lanes(x + j, e);
    sum = add(sum, e);
  }
  if (j < n) {  // the last partial vector, through a copy padded with the max
    alignas(64) float tail[LANES];
    std::fill_n(std::copy_n(x + j, n - j, tail), LANES - (n - j), top);
    store_lanes(tail, exp_lanes(sub(load_lanes(tail), t)));
    for (int64_t k = 0; k < n - j; ++k) total += x[j + k] = tail[k];
    j = n;
  }
  total += reduce_add(sum);
#endif
  for (; j < n; ++j) total += x[j] = expf(x[j] - top);
  const float inv = 1.f / total;
#pragma omp simd
  for (j = 0; j < n; ++j) x[j] *= inv;
}

// out = silu(gate) * up, n floats
inline void swiglu_row(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
#ifdef LH_LANES
  const Lanes one = splat(1.f);
  for (; i + LANES <= n; i += LANES) {
    const Lanes g = load_lanes(gate + i);
    const Lanes e = exp_lanes(sub(splat(0.f), g));
    store_lanes(out + i, mul(div(g, add(one, e)), load_lanes(up + i)));
  }
#endif
#pragma omp simd
  for (int64_t j = i; j < n; ++j) out[j] = gate[j] / (1.f + expf(-gate[j])) * up[j];
}

// SwiGLU of `rows` rows of gate | up (2h floats each) into rows of h floats, rows split between
// threads (one row runs on this thread).
inline void swiglu_rows(const float* gate_up, int64_t rows, int64_t h, float* out) {
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      swiglu_row(gate_up + r * 2 * h, gate_up + r * 2 * h + h, out + r * h, h);
  });
}

}  // namespace
