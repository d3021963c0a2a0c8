// The packed panel layout (described below), the instruction-set selection and shared helpers.
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

#pragma once

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
// LH_AMX_BF16 adds AMX-BF16 (Sapphire Rapids on) for matmuls of many rows (prefill): weights
// dequantized to bfloat16 a panel at a time, activations rounded to bfloat16 (see tile_amx.h).
#if defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define LH_AMX_BF16 1
#endif
#endif

#if defined(__GLIBC__) && defined(__x86_64__)
// glibc's vector math library (libmvec) has SIMD versions of expf; declaring them lets
// `omp simd` loops call those (math.h declares them only under -ffast-math).
extern "C" float expf(float) noexcept __attribute__((simd("notinbranch")));
#endif

namespace {

// std::vector storage on 64-byte boundaries. With malloc's 16-byte alignment a process got, by
// chance, scratch buffers whose every 64-byte row of an AMX tile (or vector) spanned two cache
// lines, and every matmul of that process ran markedly slower.
template <typename T>
struct CacheAligned {
  using value_type = T;
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const { return false; }
};
template <typename T>
using AlignedVector = std::vector<T, CacheAligned<T>>;

constexpr int64_t QK = 32;     // weights per block
constexpr int64_t PANEL = 16;  // rows per panel: one per int32 lane of a 512-bit vector
// Panels are read once, front to back, from memory (the model does not stay in the caches
// between steps), and the hardware prefetcher alone stalls at page boundaries. So each block
// prefetches the bytes one page ahead into L1 and two pages ahead into L2 (the distances that
// measured best: docs/performance.md).
constexpr int64_t PREFETCH_NEAR = 4096, PREFETCH_FAR = 8192;

inline void prefetch_panel(const uint8_t* block, int64_t bytes) {
#pragma GCC unroll 8
  for (int64_t line = 0; line < bytes; line += 64) {
    __builtin_prefetch(block + PREFETCH_NEAR + line, 0, 3);  // prefetcht0: into L1
    __builtin_prefetch(block + PREFETCH_FAR + line, 0, 2);   // prefetcht1: into L2
  }
}

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

}  // namespace
