// The decode step: every layer of a packed model for one new token per sequence.
#pragma once

#include "matmul.h"

namespace {

// Rows this far ahead are fetched early: the hardware prefetcher alone leaves the attention
// loops waiting on memory (the cache is read once a step, as the weights are).
constexpr int64_t AHEAD = 8;

template <typename T>
void prefetch_row(const T* x, int64_t n) {
  for (int64_t i = 0; i < n * static_cast<int64_t>(sizeof(T)); i += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(x) + i);
}

// A thread's attention reads, one after another, the cached keys and then values of each of its
// tasks: a few KB each, where the hardware prefetcher starts anew at every 4 KB page and every
// task. So the thread runs a cursor READ_AHEAD bytes in front of its reads over the whole list,
// fetching into L2, as the matmuls do over their panels (format.h). It speeds up batched
// attention, which reads many rows; docs/performance.md has what it gave and what else was tried.
constexpr int64_t READ_AHEAD = 8192;

class ReadAhead {
 public:
  void clear() {
    ranges_.clear();
    next_ = 0;
    started_ = false;
  }
  void add(const void* p, int64_t bytes) {  // the next range read
    const char* c = static_cast<const char*>(p);
    if (bytes > 0) ranges_.push_back({c, c + bytes});
  }
  // the reads moved on by `bytes`: so does the cursor (the first call starts it READ_AHEAD on)
  void advance(int64_t bytes) {
    if (!started_) {
      started_ = true;
      bytes += READ_AHEAD;
    }
    for (; bytes > 0 && next_ < ranges_.size(); bytes -= 64) {
      auto& r = ranges_[next_];
      __builtin_prefetch(r.first, 0, 2);  // prefetcht1: into L2
      r.first += 64;
      if (r.first >= r.second) ++next_;
    }
  }

 private:
  std::vector<std::pair<const char*, const char*>> ranges_;
  size_t next_ = 0;
  bool started_ = false;
};

// out = x converted to T. (Element by element, c10::Half's conversion is a dozen integer
// operations: a tenth of the attention's time at batch 8.)
template <typename T>
void store_row(const float* x, T* out, int64_t n) {
  int64_t i = 0;
#ifdef LH_LANES
  for (; i + LANES <= n; i += LANES) store_lanes(out + i, load_lanes(x + i));
#endif
  for (; i < n; ++i) out[i] = static_cast<T>(x[i]);
}

// ---------------------------------------------------------------------------------------------
// One attention task: `heads` query heads (D floats each, adjacent) against n cached rows of their
// shared kv head. head_scores and head_values are plain loops over dot and axpy; with a vector
// build and head_dim 64 or 128 (every Llama so far) they take blocks of LANES keys at a time
// instead: a block is converted to float once for all the heads, its LANES dot products per head
// are summed together by shuffles (no horizontal sum per key), and the output rows stay in
// registers.

#ifdef LH_LANES
#ifdef LH_AVX512
// sum_lanes' lane i holds the sum of vector KEY_ORDER[i].
constexpr const int* KEY_ORDER = FOLD_ORDER;

inline Lanes sum_lanes(const Lanes* v) { return fold16(v, [](Lanes a, Lanes b) { return add(a, b); }); }

constexpr int VALUE_HEADS = 4;  // head_values_blocked: heads a pass (of 32 registers)
#else
// sum_lanes' lane i holds the sum of vector i: pairwise sums within 128-bit halves, then the
// halves of the eight partial sums added.
constexpr int KEY_ORDER[8] = {0, 1, 2, 3, 4, 5, 6, 7};

inline Lanes sum_lanes(const Lanes* v) {
  const __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
  const __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);  // halves' sums of 0-3, 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

constexpr int VALUE_HEADS = 2;  // of 16 registers
#endif

// The scores of all n keys, LANES at a time (a last partial block padded with zero keys).
template <int D, typename T>
void head_scores_blocked(const float* q, int64_t heads, const T* keys, int64_t n, float scale,
                         float* s, ReadAhead* ahead) {
  constexpr int C = D / LANES;
  alignas(64) float block[LANES * D];  // LANES keys as floats
  alignas(64) float last[LANES];       // a partial block's scores
  const Lanes sv = splat(scale);
  for (int64_t j0 = 0; j0 < n; j0 += LANES) {
    const int64_t valid = std::min<int64_t>(LANES, n - j0);  // keys in this block
    const T* kb = keys + j0 * D;
    // the next block (not its values too, for head_values: that made the attention slower with
    // the cache out of L2; the values pass fetches its own)
    prefetch_row(kb + LANES * D, LANES * D);
    if (ahead != nullptr) ahead->advance(LANES * D * sizeof(T));
    if (valid == LANES) {
#pragma GCC unroll 16
      for (int i = 0; i < LANES * C; ++i)
        store_lanes(block + LANES * i, load_lanes(kb + LANES * i));
    } else {  // rows past n are not read: they may lie past the cache
      for (int i = 0; i < LANES * C; ++i)
        store_lanes(block + LANES * i, i / C < valid ? load_lanes(kb + LANES * i) : splat(0.f));
    }
    for (int64_t h = 0; h < heads; ++h) {
      // the keys are read from `block` by each head's multiply-adds: without this barrier the
      // compiler hoists all LANES * C key vectors out of the loop and, short of registers,
      // copies them to another place on the stack every block
      asm volatile("" ::: "memory");
      const float* qh = q + h * D;
      Lanes acc[LANES];
#pragma GCC unroll 16
      for (int i = 0; i < LANES; ++i) {
        const float* key = block + KEY_ORDER[i] * D;
        acc[i] = mul(load_lanes(qh), load_lanes(key));
#pragma GCC unroll 8
        for (int c = 1; c < C; ++c) acc[i] = fmadd(load_lanes(qh + LANES * c), load_lanes(key + LANES * c), acc[i]);
      }
      const Lanes scores = mul(sum_lanes(acc), sv);
      if (valid == LANES) {
        store_lanes(s + h * n + j0, scores);
      } else {
        store_lanes(last, scores);
        std::copy_n(last, valid, s + h * n + j0);
      }
    }
  }
}

// Output rows in registers: VALUE_HEADS heads x 4 vectors of their rows a pass.
template <int D, typename T>
void head_values_blocked(const float* p, int64_t heads, const T* values, int64_t n, float* o,
                         ReadAhead* ahead) {
  constexpr int C = D / LANES, CB = C < 4 ? C : 4, HB = VALUE_HEADS;
  for (int64_t h0 = 0; h0 < heads; h0 += HB) {
    const int64_t hb = std::min<int64_t>(HB, heads - h0);
    for (int c0 = 0; c0 < C; c0 += CB) {
      Lanes acc[HB][CB];
#pragma GCC unroll 4
      for (int hh = 0; hh < HB; ++hh)
#pragma GCC unroll 4
        for (int c = 0; c < CB; ++c) acc[hh][c] = splat(0.f);
      for (int64_t j = 0; j < n; ++j) {
        if (c0 == 0) {
          prefetch_row(values + (j + AHEAD) * D, D);
          if (ahead != nullptr && j % AHEAD == 0) ahead->advance(AHEAD * D * sizeof(T));
        }
        Lanes v[CB];
#pragma GCC unroll 4
        for (int c = 0; c < CB; ++c) v[c] = load_lanes(values + j * D + LANES * (c0 + c));
#pragma GCC unroll 4
        for (int hh = 0; hh < HB; ++hh) {
          if (hh >= hb) break;
          const Lanes pv = splat(p[(h0 + hh) * n + j]);
#pragma GCC unroll 4
          for (int c = 0; c < CB; ++c) acc[hh][c] = fmadd(pv, v[c], acc[hh][c]);
        }
      }
#pragma GCC unroll 4
      for (int hh = 0; hh < HB; ++hh) {
        if (hh >= hb) break;
#pragma GCC unroll 4
        for (int c = 0; c < CB; ++c) store_lanes(o + (h0 + hh) * D + LANES * (c0 + c), acc[hh][c]);
      }
    }
  }
}
#endif

// s[h*n + j] = scale * (query h . key j)
template <typename T>
void head_scores(const float* q, int64_t heads, const T* keys, int64_t n, int64_t D, float scale,
                 float* s, ReadAhead* ahead) {
#ifdef LH_LANES
  if (D == 64) return head_scores_blocked<64>(q, heads, keys, n, scale, s, ahead);
  if (D == 128) return head_scores_blocked<128>(q, heads, keys, n, scale, s, ahead);
#endif
  for (int64_t j = 0; j < n; ++j) {
    prefetch_row(keys + (j + AHEAD) * D, D);
    for (int64_t h = 0; h < heads; ++h) s[h * n + j] = dot(q + h * D, keys + j * D, D) * scale;
  }
}

// o[h] = sum over j of p[h*n + j] * value j
template <typename T>
void head_values(const float* p, int64_t heads, const T* values, int64_t n, int64_t D, float* o,
                 ReadAhead* ahead) {
#ifdef LH_LANES
  if (D == 64) return head_values_blocked<64>(p, heads, values, n, o, ahead);
  if (D == 128) return head_values_blocked<128>(p, heads, values, n, o, ahead);
#endif
  std::fill(o, o + heads * D, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    prefetch_row(values + (j + AHEAD) * D, D);
    for (int64_t h = 0; h < heads; ++h) axpy(p[h * n + j], values + j * D, o + h * D, D);
  }
}

// `heads` query heads (adjacent in q and out) attend to cached rows 0..n-1 of their kv head:
// scores, softmax, weighted values. scores is the task's scratch [heads, n]. seen (if given):
// head h sees only rows 0..seen[h]-1 (the others get weight 0).
template <typename T>
void attend_group(const float* q, int64_t heads, const T* keys, const T* values, int64_t n,
                  int64_t D, float scale, std::vector<float>& scores, float* out,
                  const int64_t* seen = nullptr, ReadAhead* ahead = nullptr) {
  scores.resize(heads * n);
  head_scores(q, heads, keys, n, D, scale, scores.data(), ahead);
  for (int64_t h = 0; h < heads; ++h) {  // softmax of each head's scores
    float* e = scores.data() + h * n;
    const int64_t m = seen == nullptr ? n : seen[h];
    softmax_row(e, m);
    std::fill(e + m, e + n, 0.f);
  }
  head_values(scores.data(), heads, values, n, D, out, ahead);
}

// Offset of position p of kv head `head` in cache row `row` of a [rows, heads, max_len, D] cache.
inline int64_t cache_offset(const torch::Tensor& c, int64_t row, int64_t head, int64_t p) {
  return ((row * c.size(1) + head) * c.size(2) + p) * c.size(3);
}

void check_cache(const torch::Tensor& k, const torch::Tensor& v, int64_t n_kv, int64_t head_dim) {
  for (const auto& c : {k, v})
    TORCH_CHECK((c.dtype() == torch::kFloat || c.dtype() == torch::kHalf) &&
                    c.dtype() == k.dtype() && c.is_contiguous() && c.dim() == 4 &&
                    c.size(1) == n_kv && c.size(3) == head_dim && c.sizes() == k.sizes(),
                "caches must be contiguous float32 or float16 [rows, ", n_kv, ", max_len, ",
                head_dim, "]");
}

// Positions start..n-1 of cache row src copied into row dst of every cache in `caches` (each
// contiguous [rows, heads, max_len, D] on the CPU): one copy a kv head, in one call for every
// layer, where torch's indexing is one call per cache.
void copy_rows(const std::vector<torch::Tensor>& caches, int64_t src, int64_t dst, int64_t start,
               int64_t n) {
  for (const auto& c : caches) {
    TORCH_CHECK(c.device().is_cpu() && c.is_contiguous() && c.dim() == 4,
                "caches must be contiguous CPU tensors [rows, heads, max_len, head_dim]");
    TORCH_CHECK(src >= 0 && src < c.size(0) && dst >= 0 && dst < c.size(0) && start >= 0 &&
                    start <= n && n <= c.size(2),
                "cache rows ", src, ", ", dst, " or positions ", start, "..", n, " out of range");
  }
  for (const auto& c : caches) {
    char* base = static_cast<char*>(c.data_ptr());
    const int64_t size = c.element_size();
    for (int64_t h = 0; h < c.size(1); ++h)
      std::memmove(base + cache_offset(c, dst, h, start) * size,
                   base + cache_offset(c, src, h, start) * size, (n - start) * c.size(3) * size);
  }
}

// Each of B sequences' cache row row[b] and its T positions at[b * T + t] inside the cache.
void check_slots(const torch::Tensor& cache, const int64_t* row, const int64_t* at, int64_t B,
                 int64_t T) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK(row[b] >= 0 && row[b] < cache.size(0) && at[b * T + t] >= 0 &&
                      at[b * T + t] < cache.size(2),
                  "cache row ", row[b], " or position ", at[b * T + t], " out of range");
}

// Causal attention of T queries a sequence over the KV cache, their own keys and values already
// written (a prefill, or a speculative check): query t of sequence b, at position pos[b, t] of
// cache row rows[b], sees that row's positions 0..pos[b, t]. A task is QUERY_TILE consecutive
// queries' heads of one kv head, which share each block of keys converted to float (each head
// masked to its own query's positions); the tiles are dealt out from both ends of the prompt in
// turn, so each thread's share of a causal prompt holds as many keys as the other's.
constexpr int64_t QUERY_TILE = 8;

// q float32 [B, T, H, D]; k, v [rows, Hkv, max_len, D] float32 or float16; rows int64 [B];
// pos int64 [B, T]  ->  float32 [B, T, H, D]
torch::Tensor attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor rows,
                        torch::Tensor pos) {
  TORCH_CHECK(q.dtype() == torch::kFloat && q.dim() == 4, "queries must be float32 [B, T, H, D]");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(1);
  check_cache(k, v, Hkv, D);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, H, " query heads do not share ", Hkv, " kv heads evenly");
  q = q.contiguous();
  rows = rows.to(torch::kLong).contiguous();
  pos = pos.to(torch::kLong).contiguous();
  TORCH_CHECK(rows.numel() == B && pos.numel() == B * T,
              "one cache row a sequence, one position a query");
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* at = pos.data_ptr<int64_t>();
  check_slots(k, row, at, B, T);
  const int64_t G = H / Hkv;
  TORCH_CHECK(G <= 64, "more than 64 query heads share a kv head");
  auto out = torch::empty_like(q);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t tiles = (T + QUERY_TILE - 1) / QUERY_TILE;
  auto run = [&](auto* k_base, auto* v_base) {
    at::parallel_for(0, B * tiles * Hkv, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores, qs(QUERY_TILE * G * D), os(QUERY_TILE * G * D);
      int64_t seen[QUERY_TILE * 64];  // keys seen by each head of the tile (G <= 64)
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t g = i % Hkv, j = i / Hkv % tiles, b = i / (Hkv * tiles);
        const int64_t tile = j % 2 == 0 ? j / 2 : tiles - 1 - j / 2;  // 0, last, 1, last-1, ...
        const int64_t t0 = tile * QUERY_TILE, c = std::min(QUERY_TILE, T - t0);
        int64_t n = 0;
        for (int64_t u = 0; u < c; ++u) {  // the tile's query heads side by side
          std::copy_n(qp + ((b * T + t0 + u) * H + g * G) * D, G * D, qs.data() + u * G * D);
          std::fill_n(seen + u * G, G, at[b * T + t0 + u] + 1);
          n = std::max(n, at[b * T + t0 + u] + 1);
        }
        attend_group(qs.data(), c * G, k_base + cache_offset(k, row[b], g, 0),
                     v_base + cache_offset(v, row[b], g, 0), n, D, scale, scores, os.data(), seen);
        for (int64_t u = 0; u < c; ++u)
          std::copy_n(os.data() + u * G * D, G * D, op + ((b * T + t0 + u) * H + g * G) * D);
      }
    });
  };
  if (k.scalar_type() == torch::kHalf)
    run(k.data_ptr<c10::Half>(), v.data_ptr<c10::Half>());
  else
    run(k.data_ptr<float>(), v.data_ptr<float>());
  return out;
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

constexpr int64_t FFN_ROWS = 256;

// fn(b) for the B rows of a step: a decode step's few on this thread (a parallel region costs
// more than their norms and rotations), a prefill's many on all of them.
constexpr int64_t PARALLEL_ROWS = 32;

template <typename F>
void for_rows(int64_t B, const F& fn) {
  if (B < PARALLEL_ROWS) {
    for (int64_t b = 0; b < B; ++b) fn(b);
    return;
  }
  at::parallel_for(0, B, PARALLEL_ROWS / 2, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(b);
  });
}

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
    for (int64_t l = 0; l < L; ++l) {
      check_cache(k[l], v[l], n_kv_, head_dim_);
      TORCH_CHECK(k[l].dtype() == k[0].dtype() && k[l].sizes() == k[0].sizes(),
                  "every layer's cache must have the same type and shape");
    }
    const int64_t* row = rows.data_ptr<int64_t>();
    const int64_t* at = pos.data_ptr<int64_t>();
    check_slots(k[0], row, at, B, 1);

    torch::Tensor x = h.contiguous().clone();
    const int64_t q_n = n_heads_ * head_dim_, kv_n = n_kv_ * head_dim_, qkv_n = q_n + 2 * kv_n;
    // the feed-forward takes up to FFN_ROWS tokens at a time (a short prefill has hundreds), so
    // its two widest intermediates stay a few MB; each pass dequantizes the weights to bfloat16
    // anew, and a last pass under bf16_min_rows takes the 8-bit path, so smaller passes made
    // prompts joining a step slower
    const int64_t ffn_rows = std::min(B, FFN_ROWS);
    AlignedVector<float> xn(B * dim_), qkv(B * qkv_n), att(B * q_n), gu(ffn_rows * 2 * hidden_),
        act(ffn_rows * hidden_), delta(B * dim_);
    const std::vector<float> rot = rotations(at, B);
    bool distinct = true;  // every token in a cache row of its own (a decode step; see attend)
    std::vector<bool> taken(k[0].size(0));
    for (int64_t b = 0; b < B && distinct; ++b) {
      distinct = !taken[row[b]];
      taken[row[b]] = true;
    }
    float* xp = x.data_ptr<float>();
    // row b: x += delta (unless null), then xn = norm(x) (unless null)
    auto add_norm = [&](const float* d, const torch::Tensor* norm) {
      for_rows(B, [&](int64_t b) {
        float* xb = xp + b * dim_;
        if (d != nullptr)
          for (int64_t i = 0; i < dim_; ++i) xb[i] += d[b * dim_ + i];
        if (norm != nullptr)
          rms_norm_row(xb, norm->data_ptr<float>(), dim_, eps_, xn.data() + b * dim_);
      });
    };
    add_norm(nullptr, &layers_[0].attn_norm);
    for (int64_t l = 0; l < L; ++l) {
      const Layer& layer = layers_[l];
      layer.wqkv(xn.data(), B, qkv.data());
      if (k[l].scalar_type() == torch::kHalf)
        attend<c10::Half>(qkv.data(), qkv_n, rot.data(), k[l], v[l], row, at, B, distinct,
                                 att.data());
      else
        attend<float>(qkv.data(), qkv_n, rot.data(), k[l], v[l], row, at, B, distinct,
                             att.data());
      layer.wo(att.data(), B, delta.data());
      add_norm(delta.data(), &layer.ffn_norm);
      for (int64_t r0 = 0; r0 < B; r0 += ffn_rows) {
        const int64_t m = std::min(ffn_rows, B - r0);
        layer.w13(xn.data() + r0 * dim_, m, gu.data());
        swiglu_rows(gu.data(), m, hidden_, act.data());
        layer.w2(act.data(), m, delta.data() + r0 * dim_);
      }
      add_norm(delta.data(), l + 1 < L ? &layers_[l + 1].attn_norm : nullptr);
    }
    return x;
  }

 private:
  // Each token's rotation as two rows of head_dim: cos of position * frequency i at elements 2i
  // and 2i+1, then -sin at 2i and sin at 2i+1: [B, 2, head_dim].
  std::vector<float> rotations(const int64_t* at, int64_t B) const {
    const float* freqs = freqs_.data_ptr<float>();
    std::vector<float> rot(B * 2 * head_dim_);
    for (int64_t b = 0; b < B; ++b) {
      float* c = rot.data() + b * 2 * head_dim_;
      float* s = c + head_dim_;
      for (int64_t i = 0; i < head_dim_ / 2; ++i) {
        const float angle = static_cast<float>(at[b]) * freqs[i];
        c[2 * i] = c[2 * i + 1] = std::cos(angle);
        s[2 * i + 1] = std::sin(angle);
        s[2 * i] = -s[2 * i + 1];
      }
    }
    return rot;
  }

  // Rotate adjacent pairs (x0, x1) of each of `heads` heads by the token's rotation (Meta's
  // layout): x0 c - x1 s, x1 c + x0 s, i.e. x * cos row + (x with each pair swapped) * sin row.
  void rotate(float* t, int64_t heads, const float* rot) const {
    const float* c = rot;
    const float* s = rot + head_dim_;
    for (int64_t hd = 0; hd < heads; ++hd) {
      float* x = t + hd * head_dim_;
      int64_t j = 0;
#ifdef LH_LANES
      for (; j + LANES <= head_dim_; j += LANES) {
        const Lanes v = load_lanes(x + j);
        store_lanes(x + j, fmadd(swap_pairs(v), load_lanes(s + j), mul(v, load_lanes(c + j))));
      }
#endif
      for (; j < head_dim_; j += 2) {  // the same operations, a pair at a time
        const float x0 = x[j], x1 = x[j + 1];
        x[j] = std::fma(x1, s[j], x0 * c[j]);
        x[j + 1] = std::fma(x0, s[j + 1], x1 * c[j + 1]);
      }
    }
  }

  // Rotates each token's queries and keys, writes its new keys and values into its cache row,
  // then lets each query head attend to its kv head's cached positions 0..pos (causal, one
  // query). A task serves several query heads of one group, so each cached row is read from
  // memory once a step, unless that leaves fewer tasks than threads to run them (batch 1). When
  // each task is a whole group and every token has a cache row of its own (a decode step), each
  // task rotates and writes its own group first (spreading that serial work over the threads);
  // otherwise (a prompt's tokens read each other's keys) all rows are done before any attends.
  template <typename T>
  void attend(float* qkv, int64_t qkv_n, const float* rot, const torch::Tensor& k,
              const torch::Tensor& v, const int64_t* row, const int64_t* at, int64_t B,
              bool distinct_rows, float* out) const {
    const int64_t G = n_heads_ / n_kv_, D = head_dim_, q_n = n_heads_ * D, kv_n = n_kv_ * D;
    T* k_base = k.data_ptr<T>();
    T* v_base = v.data_ptr<T>();
    auto prepare = [&](int64_t b, int64_t g) {  // row b's key g rotated; its key and value cached
      float* t = qkv + b * qkv_n + q_n + g * D;
      rotate(t, 1, rot + b * 2 * D);
      store_row(t, k_base + cache_offset(k, row[b], g, at[b]), D);
      store_row(t + kv_n, v_base + cache_offset(v, row[b], g, at[b]), D);
    };
    const int64_t split = B * n_kv_ < 2 * at::get_num_threads() ? G : 1;  // tasks per group
    const bool own_rows = split == 1 && distinct_rows;
    if (!own_rows) {
      for_rows(B, [&](int64_t b) {
        rotate(qkv + b * qkv_n, n_heads_, rot + b * 2 * D);
        for (int64_t g = 0; g < n_kv_; ++g) prepare(b, g);
      });
    }
    const int64_t heads = G / split;  // query heads per task
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    at::parallel_for(0, B * n_kv_ * split, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> scores;  // [heads, n]
      thread_local ReadAhead ahead;
      ahead.clear();
      for (int64_t t = t0; t < t1; ++t) {  // what the tasks will read, in order
        if (t % split != 0 && t != t0) continue;  // the group's rows are in the list already
        const int64_t b = t / (n_kv_ * split), g = t / split % n_kv_;
        ahead.add(k_base + cache_offset(k, row[b], g, 0), at[b] * D * sizeof(T));
        ahead.add(v_base + cache_offset(v, row[b], g, 0), at[b] * D * sizeof(T));
      }
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / (n_kv_ * split), g = t / split % n_kv_;
        const int64_t first = g * G + t % split * heads;  // its first query head
        if (own_rows) {
          rotate(qkv + b * qkv_n + first * D, heads, rot + b * 2 * D);
          prepare(b, g);
        }
        attend_group(qkv + b * qkv_n + first * D, heads, k_base + cache_offset(k, row[b], g, 0),
                     v_base + cache_offset(v, row[b], g, 0), at[b] + 1, D, scale, scores,
                     out + b * q_n + first * D, nullptr, &ahead);
      }
    });
  }

  int64_t dim_, n_heads_, n_kv_, head_dim_, hidden_;
  float eps_;
  torch::Tensor freqs_;
  std::vector<Layer> layers_;
};

}  // namespace
