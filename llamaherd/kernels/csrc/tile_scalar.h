// The portable tile: plain C++, correct everywhere, slow.
#pragma once

#include "activations.h"
#include "format.h"

namespace {

template <int64_t QT, int R>
void tile(const Activations& a, int64_t r0, const uint8_t* panel, float* out, int64_t ldo,
          int64_t cols) {
  constexpr Format f = format_for<QT>();
  for (int64_t l = 0; l < cols; ++l) {
    for (int r = 0; r < R; ++r) {
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
        const int8_t* x = a.q(r0 + r, b);
        int32_t dot = 0;
        for (int64_t i = 0; i < f.quant_bytes; ++i) {
          const uint8_t u = block[quant_offset(f, l, i)];
          if constexpr (QT == Q8_0) {
            dot += u * x[i];
          } else {
            dot += (u & 0x0F) * x[i] + (u >> 4) * x[i + 16];
          }
        }
        total += d * *a.d(r0 + r, b) * static_cast<float>(dot) + m * *a.t(r0 + r, b);
      }
      out[(r0 + r) * ldo + l] = total;
    }
  }
}

}  // namespace
