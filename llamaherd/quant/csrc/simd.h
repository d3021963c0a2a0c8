// Float vector helpers shared by the norms, the attention, the activations and sampling: one lane
// width per instruction set (format.h picks it), with plain loops for the portable build.
#pragma once

#include <limits>

#include "format.h"

namespace {

// Rows of floats or IEEE halves (cached keys and values), computed in float. (Left to the
// compiler, a dot product's sum became a chain of scalar adds through the stack: half of the
// attention time.)

#ifdef LH_AVX512
constexpr int64_t LANES = 16;
inline __m512 load_lanes(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load_lanes(const c10::Half* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}
#elif defined(LH_AVX2)
constexpr int64_t LANES = 8;
inline __m256 load_lanes(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load_lanes(const c10::Half* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}
#endif

template <typename T>
float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#ifdef LH_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; i + LANES <= n; i += LANES) acc = _mm512_fmadd_ps(load_lanes(a + i), load_lanes(b + i), acc);
  total = _mm512_reduce_add_ps(acc);
#elif defined(LH_AVX2)
  __m256 acc = _mm256_setzero_ps();
  for (; i + LANES <= n; i += LANES) acc = _mm256_fmadd_ps(load_lanes(a + i), load_lanes(b + i), acc);
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  total = _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
#endif
  for (; i < n; ++i) total += a[i] * static_cast<float>(b[i]);
  return total;
}

// The largest of n floats, in four independent vector chains (a single scalar chain of maxes,
// which is what the compiler made of the plain loop, took 55 us for 49k logits).
inline float row_max(const float* x, int64_t n) {
  float max = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#ifdef LH_AVX512
  __m512 m[4];
  for (auto& v : m) v = _mm512_set1_ps(max);
  for (; i + 4 * LANES <= n; i += 4 * LANES)
    for (int j = 0; j < 4; ++j) m[j] = _mm512_max_ps(m[j], _mm512_loadu_ps(x + i + j * LANES));
  max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m[0], m[1]), _mm512_max_ps(m[2], m[3])));
#elif defined(LH_AVX2)
  __m256 m[4];
  for (auto& v : m) v = _mm256_set1_ps(max);
  for (; i + 4 * LANES <= n; i += 4 * LANES)
    for (int j = 0; j < 4; ++j) m[j] = _mm256_max_ps(m[j], _mm256_loadu_ps(x + i + j * LANES));
  alignas(32) float lanes[LANES];
  _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])));
  for (const float v : lanes) max = std::max(max, v);
#endif
  for (; i < n; ++i) max = std::max(max, x[i]);
  return max;
}

// y += p * x
template <typename T>
void axpy(float p, const T* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef LH_AVX512
  const __m512 pv = _mm512_set1_ps(p);
  for (; i + LANES <= n; i += LANES)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(pv, load_lanes(x + i), _mm512_loadu_ps(y + i)));
#elif defined(LH_AVX2)
  const __m256 pv = _mm256_set1_ps(p);
  for (; i + LANES <= n; i += LANES)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, load_lanes(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += p * static_cast<float>(x[i]);
}

#ifdef LH_AVX512
// e^x for 16 floats: 2^n * p(r) with x = n*ln2 + r, |r| <= ln2/2 and p Cephes' expf polynomial
// (within 2 ulp of expf), 16 lanes at a time where GCC calls libmvec's 8-lane expf.
inline __m512 exp_lanes(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                        5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// out = silu(gate) * up, n floats
inline void swiglu_row(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
#ifdef LH_AVX512
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + LANES <= n; i += LANES) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 e = exp_lanes(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)),
                                            _mm512_loadu_ps(up + i)));
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
