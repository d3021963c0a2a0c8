// Integer-dot matmul kernels for GGUF Q4_0, Q4_1 and Q8_0 weights (AVX512-VNNI, AVX2, portable).
//
// Weights are repacked once into panels of 16 rows (the last panel padded with zero rows); the
// packed tensor is uint8 [rows rounded up to 16, GGUF bytes per row], the same size as GGUF. For
// each block (32 weights) of a panel, 16*block_bytes bytes hold:
//   d: 16 f16 (one per row) | m: 16 f16 (Q4_1 only) | quants: 64-byte vectors j = 0, 1, ...
// where vector j holds, for each row l, 4 quant bytes of that row at bytes 4l..4l+3. Quant byte i
// of a GGUF block goes to vector i/4, so:
//   Q4: vector j's low nibbles are elements 4j..4j+3, its high nibbles elements 16+4j..16+4j+3;
//   Q8: vector j holds elements 4j..4j+3, stored xor 0x80 (offset binary: u = q + 128).
// One vpdpbusd of such a vector with 4 activation bytes broadcast to all lanes adds 4 products to
// each of the panel's 16 rows, so a block's dot product for 16 rows takes 8 vpdpbusd and its
// result needs no horizontal reduction.
//
// Every type is w = d*u + m with an unsigned quant u, where m is the stored min (Q4_1), -8d (Q4_0)
// or -128d (Q8_0). With activations a = da*qa (8-bit, blocks of 32):
//   sum_i w_i a_i = d*da * sum_i u_i qa_i  +  m * (da * sum_i qa_i)     (per block)

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// One code path per instruction set, picked by the compiler flags (kernels.py chooses them):
//   LH_AVX512  AVX512-VNNI: one 512-bit vector is a whole 16-row panel vector.
//   LH_AVX2    AVX2 + FMA + F16C, the widest most x86 CPUs have (Zen 2, Intel before Ice Lake);
//              LH_AVX_VNNI adds AVX-VNNI's 256-bit vpdpbusd where the CPU has it (Alder Lake on).
//   neither    portable scalar C++: correct everywhere, slow.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__) && defined(__F16C__)
#include <immintrin.h>
#define LH_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LH_AVX2 1
#if defined(__AVXVNNI__)
#define LH_AVX_VNNI 1
#endif
#endif

// LH_AMX adds Intel AMX-INT8 (Sapphire Rapids on) for matmuls of several activation rows, when the
// compiler targets it (-march=native on such a CPU, or kernels.py's "amx") and Linux grants the
// process the tile state at run time; otherwise those matmuls take the AVX512-VNNI tile.
#if defined(LH_AVX512) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define LH_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__GLIBC__) && defined(__x86_64__)
// glibc's vector math library (libmvec) has SIMD versions of expf; declaring them lets
// `omp simd` loops call those (math.h declares them only under -ffast-math).
extern "C" float expf(float) noexcept __attribute__((simd("notinbranch")));
#endif

namespace {

constexpr int64_t QK = 32;     // weights per block
constexpr int64_t PANEL = 16;  // rows per panel: one per int32 lane of a 512-bit vector

enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };

struct Format {
  int64_t quant_bytes;  // quant bytes per block and row
  int64_t block_bytes;  // bytes per block and row, GGUF and packed alike
  bool has_min;
  float min_coef;       // m = min_coef * d when the block stores no min
  int64_t scale_bytes() const { return PANEL * (has_min ? 4 : 2); }  // per block of a panel
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

template <typename Fn>
void dispatch(int64_t qtype, Fn&& fn) {
  switch (qtype) {
    case Q4_0: fn(std::integral_constant<int64_t, Q4_0>{}); return;
    case Q4_1: fn(std::integral_constant<int64_t, Q4_1>{}); return;
    case Q8_0: fn(std::integral_constant<int64_t, Q8_0>{}); return;
  }
  format_of(qtype);  // raises the unsupported-type error
}

inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

int64_t blocks_per_row(const torch::Tensor& w, const Format& f) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2, "weights must be uint8 [rows, bytes]");
  TORCH_CHECK(w.size(1) % f.block_bytes == 0, "a row of ", w.size(1),
              " bytes is not whole blocks of ", f.block_bytes);
  return w.size(1) / f.block_bytes;
}

// Where row `row`'s block `b` lives in a packed tensor of nb blocks per row.
struct Slot {
  uint8_t* block;  // the panel's block: scales, then quant vectors
  int64_t lane;    // the row within its panel
};

inline Slot slot(uint8_t* packed, const Format& f, int64_t nb, int64_t row, int64_t b) {
  const int64_t panel_bytes = PANEL * nb * f.block_bytes;
  return {packed + (row / PANEL) * panel_bytes + b * PANEL * f.block_bytes, row % PANEL};
}

// Quant byte i of a GGUF block, for row `lane` of the panel.
inline int64_t quant_offset(const Format& f, int64_t lane, int64_t i) {
  return f.scale_bytes() + 64 * (i / 4) + 4 * lane + i % 4;
}

// ---------------------------------------------------------------------------------------------
// Repacking, unpacking and dequantization

// GGUF block <-> panel slot, in the direction ToPanel says.
template <int64_t QT, bool ToPanel>
void move_block(uint8_t* gguf_block, Slot s) {
  constexpr Format f = format_for<QT>();
  constexpr int64_t quant_start = f.has_min ? 4 : 2;
  auto copy = [&](uint8_t* panel_byte, uint8_t* gguf_byte, int64_t n, uint8_t flip) {
    for (int64_t k = 0; k < n; ++k) {
      if constexpr (ToPanel) panel_byte[k] = gguf_byte[k] ^ flip;
      else gguf_byte[k] = panel_byte[k] ^ flip;
    }
  };
  copy(s.block + 2 * s.lane, gguf_block, 2, 0);
  if constexpr (f.has_min) copy(s.block + 2 * PANEL + 2 * s.lane, gguf_block + 2, 2, 0);
  for (int64_t i = 0; i < f.quant_bytes; i += 4)
    copy(s.block + quant_offset(f, s.lane, i), gguf_block + quant_start + i, 4,
         QT == Q8_0 ? 0x80 : 0);
}

// GGUF rows [n_i, bytes] of one or more matrices, stacked in order -> packed [sum n_i rounded up
// to 16, bytes] (several parts make one fused projection without copying the GGUF rows first)
torch::Tensor repack(std::vector<torch::Tensor> parts, int64_t qtype) {
  const Format f = format_of(qtype);
  TORCH_CHECK(!parts.empty(), "repack needs at least one matrix");
  const int64_t nb = blocks_per_row(parts[0], f), row_bytes = parts[0].size(1);
  int64_t rows = 0;
  for (auto& part : parts) {
    TORCH_CHECK(blocks_per_row(part, f) == nb, "stacked matrices need rows of the same length");
    part = part.contiguous();
    rows += part.size(0);
  }
  const int64_t padded = (rows + PANEL - 1) / PANEL * PANEL;
  auto out = torch::empty({padded, row_bytes}, parts[0].options());
  uint8_t* dst = out.data_ptr<uint8_t>();
  if (padded > rows)  // the last panel holds the zero padding rows, interleaved with real ones
    std::memset(dst + (padded - PANEL) * row_bytes, 0, PANEL * row_bytes);
  // One thread: a memory-bound copy (~0.6 ms per MB), and free of thread start-up per tensor.
  dispatch(qtype, [&](auto qt) {
    int64_t row = 0;
    for (const auto& part : parts) {
      const uint8_t* src = part.data_ptr<uint8_t>();
      for (int64_t r = 0; r < part.size(0); ++r, ++row)
        for (int64_t b = 0; b < nb; ++b)
          move_block<decltype(qt)::value, true>(
              const_cast<uint8_t*>(src) + r * row_bytes + b * f.block_bytes, slot(dst, f, nb, row, b));
    }
  });
  return out;
}

// packed -> GGUF rows [rows, bytes]: the exact inverse of repack
torch::Tensor unpack(torch::Tensor packed, int64_t qtype, int64_t rows) {
  const Format f = format_of(qtype);
  const int64_t nb = blocks_per_row(packed, f);
  TORCH_CHECK(packed.is_contiguous() && rows <= packed.size(0), "bad packed weights");
  auto out = torch::empty({rows, packed.size(1)}, packed.options());
  uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  dispatch(qtype, [&](auto qt) {
    at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t b = 0; b < nb; ++b)
          move_block<decltype(qt)::value, false>(dst + r * packed.size(1) + b * f.block_bytes,
                                                 slot(src, f, nb, r, b));
    });
  });
  return out;
}

template <int64_t QT>
void dequantize_row(uint8_t* packed, int64_t nb, int64_t row, float* out) {
  constexpr Format f = format_for<QT>();
  for (int64_t b = 0; b < nb; ++b) {
    const Slot s = slot(packed, f, nb, row, b);
    uint16_t bits;
    std::memcpy(&bits, s.block + 2 * s.lane, 2);
    const float d = half_to_float(bits);
    float m = f.min_coef * d;
    if constexpr (f.has_min) {
      std::memcpy(&bits, s.block + 2 * PANEL + 2 * s.lane, 2);
      m = half_to_float(bits);
    }
    float* o = out + b * QK;
    for (int64_t i = 0; i < f.quant_bytes; ++i) {
      const uint8_t u = s.block[quant_offset(f, s.lane, i)];
      if constexpr (QT == Q8_0) {
        o[i] = d * u + m;
      } else {
        o[i] = d * (u & 0x0F) + m;
        o[i + 16] = d * (u >> 4) + m;
      }
    }
  }
}

// Rows `ids` (int64) of packed weights holding `rows` rows -> float32 [len(ids), K]
torch::Tensor dequantize_rows(torch::Tensor packed, int64_t qtype, torch::Tensor ids, int64_t rows) {
  const Format f = format_of(qtype);
  const int64_t nb = blocks_per_row(packed, f);
  TORCH_CHECK(packed.is_contiguous() && rows <= packed.size(0), "bad packed weights");
  ids = ids.to(torch::kLong).contiguous();
  const int64_t n = ids.numel();
  const int64_t* idx = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < rows, "row ", idx[i], " is out of range for ", rows,
                      " rows");
  auto out = torch::empty({n, nb * QK}, torch::kFloat);
  uint8_t* src = packed.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  dispatch(qtype, [&](auto qt) {
    at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        dequantize_row<decltype(qt)::value>(src, nb, idx[i], dst + i * nb * QK);
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Activation quantization: rows of floats -> 8-bit blocks of 32, natural order

struct Activations {
  int64_t rows = 0, nb = 0;
  std::vector<int8_t> quants;  // [rows, nb*32]
  std::vector<float> scales;   // [rows, nb] da
  std::vector<float> terms;    // [rows, nb] coef * da * sum(qa): the min term's activation factor

  const int8_t* q(int64_t r) const { return quants.data() + r * nb * QK; }
  const float* d(int64_t r) const { return scales.data() + r * nb; }
  const float* t(int64_t r) const { return terms.data() + r * nb; }
};

// coef is the weight type's min_coef (Q4_0, Q8_0: m = coef*d) or 1 for a stored min (Q4_1).
void quantize_row(const float* x, int64_t nb, float coef, int8_t* q, float* scales, float* terms) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * QK;
    int8_t* qb = q + b * QK;
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
    scales[b] = amax / 127.f;
    terms[b] = coef * scales[b] * static_cast<float>(total);
  }
}

void quantize_activations(const float* x, int64_t rows, int64_t nb, float coef, Activations& a) {
  a.rows = rows;
  a.nb = nb;
  a.quants.resize(rows * nb * QK);
  a.scales.resize(rows * nb);
  a.terms.resize(rows * nb);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      quantize_row(x + r * nb * QK, nb, coef, a.quants.data() + r * nb * QK,
                   a.scales.data() + r * nb, a.terms.data() + r * nb);
  });
}

// ---------------------------------------------------------------------------------------------
// Tiles: R activation rows x one panel (16 weight rows)

#ifdef LH_AVX512

// Bytes ahead of the current block to prefetch: panels are read once, front to back, and the
// hardware prefetcher alone stalls at page boundaries (~10-15% slower on the per-layer matrices).
constexpr int64_t PREFETCH_AHEAD = 1024;

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
  const int32_t* aq[R];
  const float* da[R];
  const float* terms[R];
  __m512 acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    aq[r] = reinterpret_cast<const int32_t*>(a.q(r0 + r));
    da[r] = a.d(r0 + r);
    terms[r] = a.t(r0 + r);
    acc[r] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* block = panel + b * PANEL * f.block_bytes;
#pragma GCC unroll 8
    for (int64_t line = 0; line < PANEL * f.block_bytes; line += 64)  // the hardware prefetcher
      _mm_prefetch(reinterpret_cast<const char*>(block + PREFETCH_AHEAD + line), _MM_HINT_T0);
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
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const int32_t* x = aq[r] + b * (QK / 4);
      __m512i dot;
      if constexpr (R < 4) {  // few rows: two shorter dependency chains keep the ports busy
        __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int j = 0; j < NV; j += 2) {
          even = _mm512_dpbusd_epi32(even, w[j], _mm512_set1_epi32(x[j]));
          odd = _mm512_dpbusd_epi32(odd, w[j + 1], _mm512_set1_epi32(x[j + 1]));
        }
        dot = _mm512_add_epi32(even, odd);
      } else {
        dot = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) dot = _mm512_dpbusd_epi32(dot, w[j], _mm512_set1_epi32(x[j]));
      }
      acc[r] = accumulate<QT>(acc[r], dot, scales, da[r][b], terms[r][b]);
    }
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + (r0 + r) * ldo, mask, acc[r]);
}

#ifdef LH_AMX

// ---------------------------------------------------------------------------------------------
// AMX tiles: up to 16 activation rows x one panel, one block of 32 at a time
//
// TDPBSUD multiplies tile A (M rows x K signed bytes) by tile B (K/4 rows x 64 unsigned bytes)
// into tile C (M rows x 16 int32):  C[m][n] += sum over k < K/4, i < 4 of A[m][4k+i] * B[k][4n+i].
// With A = M activation rows' 32 quants of block b (K = 32, row stride nb*32 bytes) and B row
// k = the 16 panel rows' quants 4k..4k+3, one instruction gives the block's integer dots for all
// M x 16 (activation row, panel row) pairs: the same dots the VNNI tile sums with 8*M vpdpbusd.
//   Q8_0: B is the block's 8 quant vectors as stored (offset binary u = q + 128: unsigned).
//   Q4:   B rows 0-3 are the low nibbles of vectors 0-3 (elements 0-15), rows 4-7 their high
//         nibbles (elements 16-31), unpacked to bytes once per panel.
// C goes to memory and through the VNNI tile's float epilogue (accumulate), so both paths give
// the same results bit for bit. The scales differ per block, so every block's C is stored and
// reloaded: on Sapphire Rapids a 16-row block costs about as much in tile loads, TDPBSUD and the
// tile store as in the epilogue's float ops, and the two overlap little, so AMX is ~1.2-1.4x the
// VNNI tile from 16 rows on, not the multiply's ratio.

// Fewer rows take the VNNI tile: below 16 it is as fast or faster (bench_kernels.py --isa
// avx512,amx), as the tile stores and the float epilogue, not the multiplies, bound both paths.
constexpr int64_t AMX_MIN_ROWS = 16;
constexpr int64_t B_BYTES = QK / 4 * 64;  // one block's B tile: 8 rows of 64 bytes

// Whether tile instructions may run: Linux gives a process the 8 KB of tile state only when asked
// (once per process; an old kernel or a VM without it refuses). LLAMAHERD_NO_AMX=1 refuses too.
bool amx_ready() {
  static const bool ready = [] {
    const char* off = std::getenv("LLAMAHERD_NO_AMX");
    if (off != nullptr && std::string(off) == "1") return false;
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ready;
}

// ldtilecfg's 64-byte operand (palette 1): each tile's bytes per row and rows.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Two tile sets s = 0, 1 of C = tile s (m x 16 int32), A = tile 2+s (m x 32), B = tile 4+s (8 x 64).
void configure_tiles(int m) {
  TileConfig config;
  for (int s = 0; s < 2; ++s) {
    config.bytes_per_row[s] = PANEL * 4;
    config.rows[s] = static_cast<uint8_t>(m);
    config.bytes_per_row[2 + s] = QK;
    config.rows[2 + s] = static_cast<uint8_t>(m);
    config.bytes_per_row[4 + s] = 64;
    config.rows[4 + s] = QK / 4;
  }
  _tile_loadconfig(&config);
}

// c (m rows x 16 int32) = A (m rows at x, x_stride apart) . B (at w) with tile set S. (Tile
// numbers are part of the instruction, so each set is spelled out.)
template <int S>
inline void block_dots(const int8_t* x, int64_t x_stride, const uint8_t* w, int32_t* c) {
  if constexpr (S == 0) {
    _tile_zero(0);
    _tile_loadd(2, x, x_stride);
    _tile_loadd(4, w, 64);
    _tile_dpbsud(0, 2, 4);
    _tile_stored(0, c, PANEL * 4);
  } else {
    _tile_zero(1);
    _tile_loadd(3, x, x_stride);
    _tile_loadd(5, w, 64);
    _tile_dpbsud(1, 3, 5);
    _tile_stored(1, c, PANEL * 4);
  }
}

// A Q4 panel's B tiles, block after block (nb * B_BYTES bytes at out).
void unpack_q4_panel(const uint8_t* panel, const Format& f, int64_t nb, uint8_t* out) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* quants = panel + b * PANEL * f.block_bytes + f.scale_bytes();
    uint8_t* o = out + b * B_BYTES;
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512i v = _mm512_loadu_si512(quants + 64 * j);
      _mm512_storeu_si512(o + 64 * j, _mm512_and_si512(v, low4));
      _mm512_storeu_si512(o + 4 * 64 + 64 * j, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
    }
  }
  asm volatile("" ::: "memory");  // tileloadd's asm does not tell the compiler it reads memory
}

// Rows r0..r0+M-1 x one panel whose block b's B tile is at b_tiles + b*b_stride; the tiles must
// be configured for M rows. Vector loads of bytes a tile store has just written stall, so the
// tile unit runs AHEAD blocks in front of the epilogue, the two tile sets taking turns.
template <int64_t QT, int M>
void amx_tile(const Activations& a, int64_t r0, const uint8_t* panel, const uint8_t* b_tiles,
              int64_t b_stride, float* out, int64_t ldo, int64_t cols) {
  constexpr Format f = format_for<QT>();
  constexpr int64_t AHEAD = 4, RING = 8;  // RING > AHEAD: a slot is rewritten well after its read
  const int64_t nb = a.nb, x_stride = nb * QK;
  const int8_t* x = a.q(r0);
  alignas(64) int32_t dots[RING][M * PANEL];  // C of block b in slot b % RING
  auto issue = [&](int64_t b) {  // the two tile sets take turns
    if (b % 2 == 0) block_dots<0>(x + b * QK, x_stride, b_tiles + b * b_stride, dots[b % RING]);
    else block_dots<1>(x + b * QK, x_stride, b_tiles + b * b_stride, dots[b % RING]);
  };
  const float* da = a.d(r0);
  const float* terms = a.t(r0);
  __m512 acc[M];
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < std::min(AHEAD, nb); ++b) issue(b);
  for (int64_t b = 0; b < nb; ++b) {
    if (b + AHEAD < nb) issue(b + AHEAD);
    const BlockScales scales = block_scales<QT>(panel + b * PANEL * f.block_bytes);
    const int32_t* c = dots[b % RING];
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r)
      acc[r] = accumulate<QT>(acc[r], _mm512_load_si512(c + PANEL * r), scales, da[r * nb + b],
                              terms[r * nb + b]);
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r) _mm512_mask_storeu_ps(out + (r0 + r) * ldo, mask, acc[r]);
}

template <int64_t QT, int M = PANEL>
void amx_tile_rows(int m, const Activations& a, int64_t r0, const uint8_t* panel,
                   const uint8_t* b_tiles, int64_t b_stride, float* out, int64_t ldo, int64_t cols) {
  if constexpr (M > 1) {
    if (m < M) return amx_tile_rows<QT, M - 1>(m, a, r0, panel, b_tiles, b_stride, out, ldo, cols);
  }
  amx_tile<QT, M>(a, r0, panel, b_tiles, b_stride, out, ldo, cols);
}

// matmul_typed's panels p0..p1-1 with AMX: each panel's B tiles are made ready once, then all the
// activation rows pass, 16 at a time. The tiles are configured here and released at the end, so
// other code on this thread (oneDNN uses AMX too) never finds them in an unexpected state.
template <int64_t QT>
void amx_panels(const Activations& a, const uint8_t* w, int64_t n, int64_t p0, int64_t p1,
                float* out) {
  constexpr Format f = format_for<QT>();
  const int64_t nb = a.nb, panel_bytes = PANEL * nb * f.block_bytes;
  thread_local std::vector<uint8_t> unpacked;
  if constexpr (QT != Q8_0) unpacked.resize(nb * B_BYTES);
  int configured = 0;  // rows the tiles are configured for
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = w + p * panel_bytes;
    const uint8_t* b_tiles = panel + f.scale_bytes();  // Q8_0: the stored quant vectors
    int64_t b_stride = PANEL * f.block_bytes;
    if constexpr (QT != Q8_0) {
      unpack_q4_panel(panel, f, nb, unpacked.data());
      b_tiles = unpacked.data();
      b_stride = B_BYTES;
    }
    const int64_t cols = std::min(PANEL, n - p * PANEL);
    for (int64_t r0 = 0; r0 < a.rows; r0 += PANEL) {
      const int m = static_cast<int>(std::min(PANEL, a.rows - r0));
      if (m != configured) configure_tiles(configured = m);
      amx_tile_rows<QT>(m, a, r0, panel, b_tiles, b_stride, out + p * PANEL, n, cols);
    }
  }
  _tile_release();
}

#endif  // LH_AMX

#elif defined(LH_AVX2)

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

template <int64_t QT, int G>
void half_tile(const Activations& a, int64_t r0, const uint8_t* panel, int half, float* out,
               int64_t ldo, int64_t cols) {
  constexpr Format f = format_for<QT>();
  constexpr int NQ = f.quant_bytes / 4;  // 64-byte quant vectors per block: 4 (Q4) or 8 (Q8)
  const int64_t nb = a.nb;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const int32_t* aq[G];
  const float* da[G];
  const float* terms[G];
  __m256 acc[G];
  for (int g = 0; g < G; ++g) {
    aq[g] = reinterpret_cast<const int32_t*>(a.q(r0 + g));
    da[g] = a.d(r0 + g);
    terms[g] = a.t(r0 + g);
    acc[g] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* block = panel + b * PANEL * f.block_bytes;
    const uint8_t* quants = block + f.scale_bytes() + 4 * HALF * half;
    __m256i dot[G];
#ifdef LH_AVX_VNNI
    for (int g = 0; g < G; ++g) dot[g] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < NQ; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 64 * j));
      const __m256i lo = QT == Q8_0 ? v : _mm256_and_si256(v, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      for (int g = 0; g < G; ++g) {
        const int32_t* x = aq[g] + b * (QK / 4);
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
        const int32_t* x = aq[g] + b * (QK / 4);
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
    const __m256 dw = _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2 * HALF * half)));
    __m256 mw;
    if constexpr (f.has_min)
      mw = _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2 * PANEL + 2 * HALF * half)));
    for (int g = 0; g < G; ++g) {  // as in the AVX-512 tile
      const __m256 sum = _mm256_cvtepi32_ps(dot[g]);
      if constexpr (f.has_min) {
        acc[g] = _mm256_fmadd_ps(mw, _mm256_set1_ps(terms[g][b]), acc[g]);
        acc[g] = _mm256_fmadd_ps(_mm256_mul_ps(sum, _mm256_set1_ps(da[g][b])), dw, acc[g]);
      } else {
        const __m256 t = _mm256_fmadd_ps(sum, _mm256_set1_ps(da[g][b]), _mm256_set1_ps(terms[g][b]));
        acc[g] = _mm256_fmadd_ps(t, dw, acc[g]);
      }
    }
  }
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(cols)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (int g = 0; g < G; ++g) _mm256_maskstore_ps(out + (r0 + g) * ldo, mask, acc[g]);
}

template <int64_t QT, int R>
void tile(const Activations& a, int64_t r0, const uint8_t* panel, float* out, int64_t ldo,
          int64_t cols) {
  constexpr int G = R < GROUP ? R : GROUP;
  half_tile<QT, G>(a, r0, panel, 0, out, ldo, std::min<int64_t>(cols, HALF));
  if (cols > HALF) half_tile<QT, G>(a, r0, panel, 1, out + HALF, ldo, cols - HALF);
  if constexpr (R > G) tile<QT, R - G>(a, r0 + G, panel, out, ldo, cols);
}

#else  // portable scalar tile

template <int64_t QT, int R>
void tile(const Activations& a, int64_t r0, const uint8_t* panel, float* out, int64_t ldo,
          int64_t cols) {
  constexpr Format f = format_for<QT>();
  for (int64_t l = 0; l < cols; ++l) {
    for (int r = 0; r < R; ++r) {
      const int8_t* x = a.q(r0 + r);
      float total = 0.f;
      for (int64_t b = 0; b < a.nb; ++b) {
        const uint8_t* block = panel + b * PANEL * f.block_bytes;
        uint16_t bits;
        std::memcpy(&bits, block + 2 * l, 2);
        const float d = half_to_float(bits);
        float m = d;  // min_coef is in the activation term
        if constexpr (f.has_min) {
          std::memcpy(&bits, block + 2 * PANEL + 2 * l, 2);
          m = half_to_float(bits);
        }
        int32_t dot = 0;
        for (int64_t i = 0; i < f.quant_bytes; ++i) {
          const uint8_t u = block[quant_offset(f, l, i)];
          if constexpr (QT == Q8_0) {
            dot += u * x[b * QK + i];
          } else {
            dot += (u & 0x0F) * x[b * QK + i] + (u >> 4) * x[b * QK + i + 16];
          }
        }
        total += d * a.d(r0 + r)[b] * static_cast<float>(dot) + m * a.t(r0 + r)[b];
      }
      out[(r0 + r) * ldo + l] = total;
    }
  }
}

#endif

constexpr int TILE_ROWS = 8;

template <int64_t QT, int R = TILE_ROWS>
void tile_rows(int64_t rows, const Activations& a, int64_t r0, const uint8_t* panel, float* out,
               int64_t ldo, int64_t cols) {
  if constexpr (R > 1) {
    if (rows < R) return tile_rows<QT, R - 1>(rows, a, r0, panel, out, ldo, cols);
  }
  tile<QT, R>(a, r0, panel, out, ldo, cols);
}

template <int64_t QT>
void matmul_typed(const Activations& a, const uint8_t* w, int64_t n, float* out) {
  constexpr Format f = format_for<QT>();
  constexpr int64_t ROW_BLOCK = 64;  // activation rows kept in L2 while panels pass through L1
  const int64_t panels = (n + PANEL - 1) / PANEL;
  const int64_t panel_bytes = PANEL * a.nb * f.block_bytes;
  const int64_t macs_per_panel = a.rows * a.nb * QK * PANEL;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, macs_per_panel));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
#ifdef LH_AMX
    if (a.rows >= AMX_MIN_ROWS && amx_ready()) return amx_panels<QT>(a, w, n, p0, p1, out);
#endif
    for (int64_t rb = 0; rb < a.rows; rb += ROW_BLOCK) {
      const int64_t re = std::min(a.rows, rb + ROW_BLOCK);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t cols = std::min(PANEL, n - p * PANEL);
        for (int64_t r0 = rb; r0 < re; r0 += TILE_ROWS)
          tile_rows<QT>(std::min<int64_t>(TILE_ROWS, re - r0), a, r0, w + p * panel_bytes,
                        out + p * PANEL, n, cols);
      }
    }
  });
}

void check_packed(const torch::Tensor& w, int64_t qtype, int64_t n, int64_t k) {
  const Format f = format_of(qtype);
  const int64_t nb = blocks_per_row(w, f);
  TORCH_CHECK(k == nb * QK, "activations have ", k, " features, weights ", nb * QK);
  TORCH_CHECK(w.is_contiguous() && w.size(0) % PANEL == 0 && n <= w.size(0) && n > w.size(0) - PANEL,
              "weights are not packed for ", n, " rows");
}

// out [rows, n] = x [rows, K] @ W^T for packed weights w (checked by check_packed)
void matmul_into(const float* x, int64_t rows, const torch::Tensor& w, int64_t qtype, int64_t n,
                 float* out) {
  const Format f = format_of(qtype);
  const int64_t nb = w.size(1) / f.block_bytes;
  thread_local Activations a;
  quantize_activations(x, rows, nb, f.has_min ? 1.f : f.min_coef, a);
  dispatch(qtype, [&](auto qt) {
    matmul_typed<decltype(qt)::value>(a, w.data_ptr<uint8_t>(), n, out);
  });
}

// x: float32 [..., K]; w: packed [N rounded up to 16, bytes]  ->  float32 [..., N] = x @ W^T
torch::Tensor matmul(torch::Tensor x, torch::Tensor w, int64_t qtype, int64_t n) {
  TORCH_CHECK(x.dtype() == torch::kFloat && x.dim() >= 1, "activations must be float32 [..., K]");
  check_packed(w, qtype, n, x.size(-1));
  const torch::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = n;
  auto out = torch::empty(shape, x.options());
  matmul_into(x2.data_ptr<float>(), x2.size(0), w, qtype, n, out.data_ptr<float>());
  return out;
}

void rms_norm_row(const float* x, const float* weight, int64_t k, float eps, float* out) {
  float sum = 0.f;
  for (int64_t i = 0; i < k; ++i) sum += x[i] * x[i];
  const float scale = 1.f / std::sqrt(sum / static_cast<float>(k) + eps);
  for (int64_t i = 0; i < k; ++i) out[i] = x[i] * scale * weight[i];
}

// RMSNorm of each row of x float32 [..., K] with weight float32 [K], in one pass per row: on the
// decode path the dozen small torch ops of a composed norm cost more than the arithmetic.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat && weight.dtype() == torch::kFloat,
              "rms_norm takes float32 activations and weight");
  const int64_t k = x.size(-1);
  TORCH_CHECK(weight.numel() == k, "rms_norm weight has ", weight.numel(), " elements, rows ", k);
  const torch::Tensor x2 = x.reshape({-1, k}).contiguous();
  const torch::Tensor w = weight.contiguous();
  auto out = torch::empty_like(x2);
  const float* xp = x2.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t rows = x2.size(0);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rms_norm_row(xp + r * k, wp, k, static_cast<float>(eps), op + r * k);
  });
  return out.view(x.sizes());
}

// ---------------------------------------------------------------------------------------------
// Rows of cached keys and values, stored as float or IEEE half: dot products and updates in
// float. (Left to the compiler, the dot product's final sum became a chain of scalar adds through
// the stack: half of the attention time.)

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

// Rows this far ahead are fetched early: the hardware prefetcher alone leaves the attention
// loops waiting on memory (the cache is read once a step, as the weights are).
constexpr int64_t AHEAD = 8;

template <typename T>
void prefetch_row(const T* x, int64_t n) {
  for (int64_t i = 0; i < n * static_cast<int64_t>(sizeof(T)); i += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(x) + i);
}

template <typename T>
void store_row(const float* x, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(x[i]);
}

// ---------------------------------------------------------------------------------------------
// The decode step: every layer of the model for one new token per sequence, in one call
//
// model.py's Block.forward for T = 1, with the same kernels for the four projections; between them
// the small ops (norms, rotary, cache writes, attention, SwiGLU, residuals) that cost ~40 torch
// calls a layer in Python are plain loops here.

struct Projection {
  torch::Tensor w;  // packed panels
  int64_t qtype, n;
  void operator()(const float* x, int64_t rows, float* out) const {
    matmul_into(x, rows, w, qtype, n, out);
  }
};

struct Layer {
  torch::Tensor attn_norm, ffn_norm;
  Projection wqkv, wo, w13, w2;
};

class Decoder {
 public:
  Decoder(int64_t dim, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t hidden_dim,
          double eps, torch::Tensor freqs)
      : dim_(dim), n_heads_(n_heads), n_kv_(n_kv_heads), head_dim_(head_dim),
        hidden_(hidden_dim), eps_(static_cast<float>(eps)), freqs_(freqs.contiguous()) {
    TORCH_CHECK(n_heads % n_kv_heads == 0 && head_dim % 2 == 0, "bad head counts");
    TORCH_CHECK(freqs_.dtype() == torch::kFloat && freqs_.numel() == head_dim / 2,
                "rotary frequencies must be float32 [head_dim / 2]");
  }

  void add_layer(torch::Tensor attn_norm, torch::Tensor wqkv, int64_t qkv_type, torch::Tensor wo,
                 int64_t wo_type, torch::Tensor ffn_norm, torch::Tensor w13, int64_t w13_type,
                 torch::Tensor w2, int64_t w2_type) {
    const int64_t qkv_n = (n_heads_ + 2 * n_kv_) * head_dim_;
    check_packed(wqkv, qkv_type, qkv_n, dim_);
    check_packed(wo, wo_type, dim_, n_heads_ * head_dim_);
    check_packed(w13, w13_type, 2 * hidden_, dim_);
    check_packed(w2, w2_type, dim_, hidden_);
    for (const auto& norm : {attn_norm, ffn_norm})
      TORCH_CHECK(norm.dtype() == torch::kFloat && norm.is_contiguous() && norm.numel() == dim_,
                  "norm weights must be contiguous float32 [dim]");
    layers_.push_back({attn_norm, ffn_norm, {wqkv, qkv_type, qkv_n}, {wo, wo_type, dim_},
                       {w13, w13_type, 2 * hidden_}, {w2, w2_type, dim_}});
  }

  // h: float32 [B, dim], the embeddings of the new tokens; rows, pos: int64 [B], each token's
  // cache row and position; k, v: one float32 cache [rows, n_kv_heads, max_len, head_dim] per
  // layer. Writes each token's keys and values at its position; returns the hidden states.
  torch::Tensor forward(torch::Tensor h, torch::Tensor rows, torch::Tensor pos,
                        const std::vector<torch::Tensor>& k, const std::vector<torch::Tensor>& v) {
    const int64_t L = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(h.dtype() == torch::kFloat && h.dim() == 2 && h.size(1) == dim_,
                "hidden states must be float32 [B, ", dim_, "]");
    TORCH_CHECK(static_cast<int64_t>(k.size()) == L && static_cast<int64_t>(v.size()) == L,
                "one key and one value cache per layer");
    const int64_t B = h.size(0);
    rows = rows.to(torch::kLong).contiguous();
    pos = pos.to(torch::kLong).contiguous();
    TORCH_CHECK(rows.numel() == B && pos.numel() == B, "one cache row and position per token");
    for (int64_t l = 0; l < L; ++l)
      for (const auto& c : {k[l], v[l]})
        TORCH_CHECK((c.dtype() == torch::kFloat || c.dtype() == torch::kHalf) &&
                        c.dtype() == k[0].dtype() && c.is_contiguous() && c.dim() == 4 &&
                        c.size(1) == n_kv_ && c.size(3) == head_dim_ && c.sizes() == k[0].sizes(),
                    "caches must be contiguous float32 or float16 [rows, ", n_kv_, ", max_len, ",
                    head_dim_, "]");
    const int64_t* row = rows.data_ptr<int64_t>();
    const int64_t* at = pos.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(row[b] >= 0 && row[b] < k[0].size(0) && at[b] >= 0 && at[b] < k[0].size(2),
                  "cache row ", row[b], " or position ", at[b], " out of range");

    torch::Tensor x = h.contiguous().clone();
    const int64_t q_n = n_heads_ * head_dim_, kv_n = n_kv_ * head_dim_, qkv_n = q_n + 2 * kv_n;
    std::vector<float> xn(B * dim_), qkv(B * qkv_n), att(B * q_n), gu(B * 2 * hidden_),
        act(B * hidden_), delta(B * dim_);
    const std::vector<float> rot = rotations(at, B);
    float* xp = x.data_ptr<float>();
    for (int64_t l = 0; l < L; ++l) {
      const Layer& layer = layers_[l];
      for (int64_t b = 0; b < B; ++b)
        rms_norm_row(xp + b * dim_, layer.attn_norm.data_ptr<float>(), dim_, eps_, xn.data() + b * dim_);
      layer.wqkv(xn.data(), B, qkv.data());
      for (int64_t b = 0; b < B; ++b)  // q and k heads are adjacent
        rotate(qkv.data() + b * qkv_n, n_heads_ + n_kv_, rot.data() + b * head_dim_);
      if (k[l].scalar_type() == torch::kHalf)
        attend<c10::Half>(qkv.data(), qkv_n, k[l], v[l], row, at, B, att.data());
      else
        attend<float>(qkv.data(), qkv_n, k[l], v[l], row, at, B, att.data());
      layer.wo(att.data(), B, delta.data());
      for (int64_t i = 0; i < B * dim_; ++i) xp[i] += delta[i];
      for (int64_t b = 0; b < B; ++b)
        rms_norm_row(xp + b * dim_, layer.ffn_norm.data_ptr<float>(), dim_, eps_, xn.data() + b * dim_);
      layer.w13(xn.data(), B, gu.data());
      for (int64_t b = 0; b < B; ++b) {  // SwiGLU: silu(gate) * up
        const float* gate = gu.data() + b * 2 * hidden_;
        const float* up = gate + hidden_;
        float* a = act.data() + b * hidden_;
#pragma omp simd
        for (int64_t i = 0; i < hidden_; ++i) a[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
      }
      layer.w2(act.data(), B, delta.data());
      for (int64_t i = 0; i < B * dim_; ++i) xp[i] += delta[i];
    }
    return x;
  }

 private:
  // cos and sin of position * frequency for each token: [B, head_dim/2, 2]
  std::vector<float> rotations(const int64_t* at, int64_t B) const {
    const float* freqs = freqs_.data_ptr<float>();
    std::vector<float> rot(B * head_dim_);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < head_dim_ / 2; ++i) {
        const float angle = static_cast<float>(at[b]) * freqs[i];
        rot[b * head_dim_ + 2 * i] = std::cos(angle);
        rot[b * head_dim_ + 2 * i + 1] = std::sin(angle);
      }
    return rot;
  }

  // Rotate adjacent pairs of each of `heads` heads by the token's rotations (Meta's layout).
  void rotate(float* t, int64_t heads, const float* rot) const {
    for (int64_t hd = 0; hd < heads; ++hd) {
      float* x = t + hd * head_dim_;
      for (int64_t i = 0; i < head_dim_ / 2; ++i) {
        const float c = rot[2 * i], s = rot[2 * i + 1], x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = x0 * c - x1 * s;
        x[2 * i + 1] = x0 * s + x1 * c;
      }
    }
  }

  int64_t cache_offset(const torch::Tensor& c, int64_t row, int64_t head, int64_t p) const {
    return ((row * n_kv_ + head) * c.size(2) + p) * head_dim_;
  }

  // Writes each token's new keys and values into its cache row, then lets each query head attend
  // to its kv head's cached positions 0..pos (causal, one query). A task serves several query
  // heads of one group, so each cached row is read from memory once a step, unless that leaves
  // fewer tasks than threads to run them (batch 1).
  template <typename T>
  void attend(const float* qkv, int64_t qkv_n, const torch::Tensor& k, const torch::Tensor& v,
              const int64_t* row, const int64_t* at, int64_t B, float* out) const {
    const int64_t G = n_heads_ / n_kv_, D = head_dim_, q_n = n_heads_ * D, kv_n = n_kv_ * D;
    T* k_base = k.data_ptr<T>();
    T* v_base = v.data_ptr<T>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < n_kv_; ++g) {
        const float* t = qkv + b * qkv_n + q_n + g * D;
        store_row(t, k_base + cache_offset(k, row[b], g, at[b]), D);
        store_row(t + kv_n, v_base + cache_offset(v, row[b], g, at[b]), D);
      }
    const int64_t split = B * n_kv_ < 2 * at::get_num_threads() ? G : 1;  // tasks per group
    const int64_t heads = G / split;  // query heads per task
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    at::parallel_for(0, B * n_kv_ * split, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> scores;  // [heads, n]
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / (n_kv_ * split), g = t / split % n_kv_, n = at[b] + 1;
        const int64_t first = g * G + t % split * heads;  // its first query head
        const float* q = qkv + b * qkv_n + first * D;
        const T* keys = k_base + cache_offset(k, row[b], g, 0);
        const T* values = v_base + cache_offset(v, row[b], g, 0);
        scores.resize(heads * n);
        for (int64_t j = 0; j < n; ++j) {
          prefetch_row(keys + (j + AHEAD) * D, D);
          for (int64_t h = 0; h < heads; ++h)
            scores[h * n + j] = dot(q + h * D, keys + j * D, D) * scale;
        }
        for (int64_t h = 0; h < heads; ++h) {  // softmax of each head's scores
          float* e = scores.data() + h * n;
          const float top = *std::max_element(e, e + n);
          float total = 0.f;
#pragma omp simd reduction(+ : total)
          for (int64_t j = 0; j < n; ++j) {
            e[j] = expf(e[j] - top);
            total += e[j];
          }
          const float inv = 1.f / total;
          for (int64_t j = 0; j < n; ++j) e[j] *= inv;
        }
        float* o = out + b * q_n + first * D;
        std::fill(o, o + heads * D, 0.f);
        for (int64_t j = 0; j < n; ++j) {
          prefetch_row(values + (j + AHEAD) * D, D);
          for (int64_t h = 0; h < heads; ++h) axpy(scores[h * n + j], values + j * D, o + h * D, D);
        }
      }
    });
  }

  int64_t dim_, n_heads_, n_kv_, head_dim_, hidden_;
  float eps_;
  torch::Tensor freqs_;
  std::vector<Layer> layers_;
};

std::string simd() {
#if defined(LH_AMX)
  return amx_ready() ? "avx512_vnni+amx" : "avx512_vnni";
#elif defined(LH_AVX512)
  return "avx512_vnni";
#elif defined(LH_AVX_VNNI)
  return "avx_vnni";
#elif defined(LH_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while the kernels run, so other Python threads (a server's event loop)
  // go on meanwhile.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.doc() = "Integer-dot matmul kernels for GGUF Q4_0, Q4_1 and Q8_0 weights";
  m.def("repack", &repack, nogil, "GGUF rows uint8 [N_i, bytes] of stacked matrices -> 16-row panels");
  m.def("unpack", &unpack, nogil, "16-row panels -> the first `rows` GGUF rows");
  m.def("dequantize_rows", &dequantize_rows, nogil, "rows `ids` of packed weights -> float32 [n, K]");
  m.def("matmul", &matmul, nogil, "x float32 [..., K] @ packed W^T (N rows) -> float32 [..., N]");
  m.def("rms_norm", &rms_norm, nogil, "RMSNorm of float32 rows [..., K] with weight [K]");
  m.def("simd", &simd, "the instruction set the kernels were compiled for");
  py::class_<Decoder>(m, "Decoder", "every layer of a packed model for one new token per sequence")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, torch::Tensor>(),
           py::arg("dim"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"),
           py::arg("hidden_dim"), py::arg("eps"), py::arg("freqs"))
      .def("add_layer", &Decoder::add_layer)
      .def("forward", &Decoder::forward, nogil, py::arg("h"), py::arg("rows"), py::arg("pos"),
           py::arg("k"), py::arg("v"));
}
