// Drawing a token from softmax(logits / temperature) in one pass over each row, without the
// softmax, cumulative-sum and search tensors torch would allocate (page-faulted buffers of a
// vocabulary's size, each step; docs/performance.md has the cost).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

// The weights e^((x - max) / t) of one row into w, and their sums over chunks of CHUNK tokens
// into sums; -inf logits (tokens a constraint forbids) get weight exactly 0.
constexpr int64_t CHUNK = 64;

inline void row_weights(const float* x, int64_t n, float max, float inv_t, float* w, double* sums) {
  int64_t i = 0;
  int64_t c = 0;
#ifdef LH_LANES
  const Lanes m = splat(max), s = splat(inv_t);
  for (; i + CHUNK <= n; i += CHUNK, ++c) {
    Lanes total = splat(0.f);
    for (int64_t j = i; j < i + CHUNK; j += LANES) {
      const Lanes v = load_lanes(x + j);
      const Lanes e = zero_where_minus_inf(v, exp_lanes(mul(sub(v, m), s)));
      store_lanes(w + j, e);
      total = add(total, e);
    }
    sums[c] = reduce_add(total);
  }
#endif
  for (; i < n; i += CHUNK, ++c) {
    const int64_t end = std::min(n, i + CHUNK);
    float total = 0.f;
    for (int64_t j = i; j < end; ++j) {
      w[j] = std::isinf(x[j]) && x[j] < 0 ? 0.f : std::exp((x[j] - max) * inv_t);
      total += w[j];
    }
    sums[c] = total;
  }
}

// The first token whose running sum of weights passes u times their total (u in [0, 1)), so a
// token of weight 0 is never drawn. The chunk sums are added in one order for the total and the
// search alike; within the chunk found, rounding may leave the target unreached: its last token
// of nonzero weight is taken then.
inline int64_t draw_row(const float* x, int64_t n, float temperature, double u, float* w,
                        double* sums) {
  const float max = row_max(x, n);
  if (!(max > -std::numeric_limits<float>::infinity())) return -1;  // nothing allowed (or NaN)
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  row_weights(x, n, max, 1.f / temperature, w, sums);
  double total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += sums[c];
  const double target = u * total;
  double seen = 0;
  int64_t c = 0;
  while (c + 1 < chunks && seen + sums[c] <= target) seen += sums[c++];
  while (c > 0 && sums[c] == 0) --c;  // the target fell past the last nonzero chunk by rounding
  int64_t pick = -1;
  for (int64_t j = c * CHUNK; j < std::min(n, (c + 1) * CHUNK); ++j) {
    if (w[j] == 0) continue;
    pick = j;
    seen += w[j];
    if (seen > target) break;
  }
  return pick;
}

// logits float32 [B, V], temperatures float32 and uniforms float64 [B] -> int64 [B] (-1 where
// every logit is -inf); rows in parallel.
torch::Tensor draw(torch::Tensor logits, torch::Tensor temperatures, torch::Tensor uniforms) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32,
              "draw: logits must be float32 [B, V]");
  logits = logits.contiguous();
  const auto t = temperatures.to(torch::kFloat32).contiguous();
  const auto u = uniforms.to(torch::kFloat64).contiguous();
  const int64_t rows = logits.size(0), n = logits.size(1);
  TORCH_CHECK(t.numel() == rows && u.numel() == rows, "draw: one temperature and uniform a row");
  auto out = torch::empty({rows}, torch::kInt64);
  const float* x = logits.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  const double* up = u.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    thread_local AlignedVector<float> w;  // scratch kept between calls: no allocation a step
    thread_local std::vector<double> sums;
    w.resize(n);
    sums.resize((n + CHUNK - 1) / CHUNK);
    for (int64_t r = begin; r < end; ++r)
      op[r] = draw_row(x + r * n, n, tp[r], up[r], w.data(), sums.data());
  });
  return out;
}

}  // namespace
