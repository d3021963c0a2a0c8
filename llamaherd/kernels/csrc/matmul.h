// Matmuls over packed panels with whichever tile this build has; RMSNorm rows.
#pragma once

#include "activations.h"
#include "format.h"
#include "simd.h"

#if defined(LH_AVX512)
#include "tile_amx.h"
#include "tile_avx512.h"
#elif defined(LH_AVX2)
#include "tile_avx2.h"
#else
#include "tile_scalar.h"
#endif

namespace {

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
    if (amx_pays(a.rows, a.nb) && amx_ready()) {
      const int64_t tail = a.rows % PANEL;
      const int64_t amx_rows = tail <= AMX_VNNI_TAIL ? a.rows - tail : a.rows;
      return amx_panels<QT>(a, w, n, p0, p1, out, amx_rows,
                            [&](int64_t p, const uint8_t* panel, int64_t cols) {
        for (int64_t r0 = amx_rows; r0 < a.rows; r0 += TILE_ROWS)
          tile_rows<QT>(std::min<int64_t>(TILE_ROWS, a.rows - r0), a, r0, panel, out + p * PANEL,
                        n, cols);
      });
    }
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
#ifdef LH_AMX_BF16
  if (bf16_pays(rows)) {  // many rows: bfloat16 products on AMX (tile_amx.h), no 8-bit activations
    thread_local AlignedVector<uint16_t> xb;
    round_rows_bf16(x, rows, nb * QK, xb);
    const uint16_t* rounded = xb.data();  // (a worker thread naming xb would find its own)
    const int64_t panels = (n + PANEL - 1) / PANEL;
    return dispatch(qtype, [&](auto qt) {
      at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
        bf16_panels<decltype(qt)::value>(rounded, rows, nb * QK, w.data_ptr<uint8_t>(), n, p0,
                                         p1, out);
      });
    });
  }
#endif
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
  const float sum = dot(x, x, k);  // a plain loop's sum is one long chain of dependent adds
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

// SwiGLU of rows float32 [..., 2H] holding gate | up -> [..., H]: silu(gate) * up in one pass
// (torch makes two temporaries of [..., H] on the way).
torch::Tensor swiglu(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dtype() == torch::kFloat && gate_up.size(-1) % 2 == 0,
              "swiglu takes float32 [..., 2H]");
  const int64_t h = gate_up.size(-1) / 2;
  const torch::Tensor x = gate_up.reshape({-1, 2 * h}).contiguous();
  std::vector<int64_t> shape = gate_up.sizes().vec();
  shape.back() = h;
  auto out = torch::empty(shape, gate_up.options());
  swiglu_rows(x.data_ptr<float>(), x.size(0), h, out.data_ptr<float>());
  return out;
}

}  // namespace
