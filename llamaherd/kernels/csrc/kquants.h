// GGUF k-quant rows rewritten as rows of a kernel type (llamaherd/quant/kquants.py explains the
// choice): Q4_K -> Q4_1, Q5_K and Q6_K -> Q8_0. The same float operations, in the same order, as
// the gguf package's numpy dequantization and Q8_0 quantization, so both give the same bytes.
#pragma once

#include "format.h"

namespace {

enum KQuant : int64_t { Q4_K = 12, Q5_K = 13, Q6_K = 14 };
constexpr int64_t QK_K = 256;  // weights per k-quant super-block: 8 blocks of 32

inline uint16_t float_to_half(float x) { return c10::detail::fp16_ieee_from_fp32_value(x); }

// Q4_K and Q5_K: the 6-bit scale and min of each of the 8 blocks, from 12 packed bytes.
inline void scale_min(const uint8_t* s, int j, float* sc, float* m) {
  if (j < 4) {
    *sc = static_cast<float>(s[j] & 63);
    *m = static_cast<float>(s[j + 4] & 63);
  } else {
    *sc = static_cast<float>((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4));
    *m = static_cast<float>((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
  }
}

// 32 weights -> one Q8_0 block: d = max|w| / 127 (float16), q = round(w / d).
inline void q8_0_block(const float* w, uint8_t* out) {
  float amax = 0.f;
  for (int e = 0; e < 32; ++e) amax = std::max(amax, std::abs(w[e]));
  const float d = amax / 127.f;
  const float id = d == 0.f ? 0.f : 1.f / d;
  const uint16_t bits = float_to_half(d);
  std::memcpy(out, &bits, 2);
  for (int e = 0; e < 32; ++e) out[2 + e] = static_cast<uint8_t>(static_cast<int8_t>(std::round(w[e] * id)));
}

// One super-block's 256 weights as floats (Q5_K, Q6_K).
void super_block_weights(int64_t qtype, const uint8_t* b, float* w) {
  if (qtype == Q5_K) {  // d | dmin | scales[12] | qh[32] | qs[128]
    const float d = half_to_float(b[0] | b[1] << 8), dmin = half_to_float(b[2] | b[3] << 8);
    const uint8_t *qh = b + 16, *qs = b + 48;
    for (int j = 0; j < 8; ++j) {
      float sc, m;
      scale_min(b + 4, j, &sc, &m);
      const float scale = d * sc, min = dmin * m;
      for (int e = 0; e < 32; ++e) {
        const int low = (qs[32 * (j / 2) + e] >> (4 * (j % 2))) & 0x0F, high = (qh[e] >> j) & 1;
        w[32 * j + e] = scale * static_cast<float>(low | high << 4) - min;
      }
    }
  } else {  // Q6_K: ql[128] | qh[64] | scales[16] (int8) | d
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    const float d = half_to_float(b[208] | b[209] << 8);
    for (int i = 0; i < QK_K; ++i) {
      const int half = i / 128, r = i % 128;
      const int low = (ql[64 * half + r % 64] >> (4 * (r / 64))) & 0x0F;
      const int high = (qh[32 * half + r % 32] >> (2 * (r / 32))) & 3;
      w[i] = d * static_cast<float>(scales[i / 16]) * static_cast<float>((low | high << 4) - 32);
    }
  }
}

// Q4_K super-block -> 8 Q4_1 blocks (20 bytes each): the same 4-bit quants, scale d*sc, min
// -dmin*m rounded to float16.
void q4_k_as_q4_1(const uint8_t* b, uint8_t* out) {
  const float d = half_to_float(b[0] | b[1] << 8), dmin = half_to_float(b[2] | b[3] << 8);
  const uint8_t* qs = b + 16;
  for (int j = 0; j < 8; ++j, out += 20) {
    float sc, m;
    scale_min(b + 4, j, &sc, &m);
    const uint16_t scale = float_to_half(d * sc), min = float_to_half(-dmin * m);
    std::memcpy(out, &scale, 2);
    std::memcpy(out + 2, &min, 2);
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int e = 0; e < 16; ++e)
      out[4 + e] = ((q[e] >> shift) & 0x0F) | (((q[e + 16] >> shift) & 0x0F) << 4);
  }
}

// GGUF rows uint8 [rows, bytes] of a k-quant -> GGUF rows of its kernel type.
torch::Tensor kquant_to_kernel(torch::Tensor raw, int64_t qtype) {
  TORCH_CHECK(qtype == Q4_K || qtype == Q5_K || qtype == Q6_K, "not a k-quant: ggml type ", qtype);
  const int64_t in_bytes = qtype == Q4_K ? 144 : qtype == Q5_K ? 176 : 210;
  const int64_t out_bytes = qtype == Q4_K ? 8 * 20 : 8 * 34;  // per super-block
  TORCH_CHECK(raw.dtype() == torch::kUInt8 && raw.dim() == 2 && raw.size(1) % in_bytes == 0,
              "k-quant rows must be uint8 [rows, whole super-blocks]");
  raw = raw.contiguous();
  const int64_t rows = raw.size(0), per_row = raw.size(1) / in_bytes;
  auto out = torch::empty({rows, per_row * out_bytes}, raw.options());
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, rows * per_row, 256, [&](int64_t s0, int64_t s1) {
    float w[QK_K];
    for (int64_t s = s0; s < s1; ++s) {
      if (qtype == Q4_K) {
        q4_k_as_q4_1(src + s * in_bytes, dst + s * out_bytes);
        continue;
      }
      super_block_weights(qtype, src + s * in_bytes, w);
      for (int j = 0; j < 8; ++j) q8_0_block(w + 32 * j, dst + s * out_bytes + 34 * j);
    }
  });
  return out;
}

}  // namespace
