// GGUF rows <-> packed panels: repacking, unpacking and dequantizing rows.
#pragma once

#include "format.h"

namespace {

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
  // One thread: a memory-bound copy, and free of thread start-up per tensor.
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

}  // namespace
