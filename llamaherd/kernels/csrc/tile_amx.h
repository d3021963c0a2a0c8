// AMX tiles: AMX-INT8 for 16 to 63 activation rows (with tile_avx512.h's epilogue), AMX-BF16
// from 64.
#pragma once

#include "tile_avx512.h"

#ifdef LH_AMX

namespace {

// ---------------------------------------------------------------------------------------------
// AMX tiles: up to 16 activation rows x one panel, one block of 32 at a time
//
// TDPBSUD multiplies tile A (M rows x K signed bytes) by tile B (K/4 rows x 64 unsigned bytes)
// into tile C (M rows x 16 int32):  C[m][n] += sum over k < K/4, i < 4 of A[m][4k+i] * B[k][4n+i].
// With A = M activation rows' 32 quants of block b (K = 32; block-major, rows 32 bytes apart) and
// B row k = the 16 panel rows' quants 4k..4k+3, one instruction gives the block's integer dots
// for all M x 16 (activation row, panel row) pairs: the dots the VNNI tile sums with 8*M vpdpbusd.
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
// With long rows (K over 1024: the feed-forward's down projection) the VNNI tile stays ahead up
// to ~32 rows.
constexpr int64_t AMX_MIN_ROWS = 16, AMX_MIN_ROWS_LONG_K = 32;

// A last group of at most this many rows (after whole groups of 16) takes the VNNI tile, panel by
// panel right after the AMX rows: a pass of the AMX tile costs about as much for 8 rows as for 16.
constexpr int64_t AMX_VNNI_TAIL = 8;

inline bool amx_pays(int64_t rows, int64_t nb) {
  return rows >= (nb * QK > 1024 ? AMX_MIN_ROWS_LONG_K : AMX_MIN_ROWS);
}
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
  const int64_t nb = a.nb;
  alignas(64) int32_t dots[RING][M * PANEL];  // C of block b in slot b % RING
  auto issue = [&](int64_t b) {  // the two tile sets take turns
    if (b % 2 == 0) block_dots<0>(a.q(r0, b), QK, b_tiles + b * b_stride, dots[b % RING]);
    else block_dots<1>(a.q(r0, b), QK, b_tiles + b * b_stride, dots[b % RING]);
  };
  __m512 acc[M];
#pragma GCC unroll 16
  for (int r = 0; r < M; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < std::min(AHEAD, nb); ++b) issue(b);
  for (int64_t b = 0; b < nb; ++b) {
    if (b + AHEAD < nb) issue(b + AHEAD);
    const BlockScales scales = block_scales<QT>(panel + b * PANEL * f.block_bytes);
    const int32_t* c = dots[b % RING];
    const float* da = a.d(r0, b);
    const float* terms = a.t(r0, b);
#pragma GCC unroll 16
    for (int r = 0; r < M; ++r)
      acc[r] = accumulate<QT>(acc[r], _mm512_load_si512(c + PANEL * r), scales, da[r], terms[r]);
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

// matmul_typed's panels p0..p1-1 with AMX for activation rows 0..rows-1, `tail` for the others:
// each panel's B tiles are made ready once, then those rows pass, 16 at a time. The tiles are
// configured here and released at the end, so other code on this thread (oneDNN uses AMX too)
// never finds them in an unexpected state.
template <int64_t QT, typename Tail>
void amx_panels(const Activations& a, const uint8_t* w, int64_t n, int64_t p0, int64_t p1,
                float* out, int64_t rows, const Tail& tail) {
  constexpr Format f = format_for<QT>();
  const int64_t nb = a.nb, panel_bytes = PANEL * nb * f.block_bytes;
  thread_local AlignedVector<uint8_t> unpacked;
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
    for (int64_t r0 = 0; r0 < rows; r0 += PANEL) {
      const int m = static_cast<int>(std::min(PANEL, rows - r0));
      if (m != configured) configure_tiles(configured = m);
      amx_tile_rows<QT>(m, a, r0, panel, b_tiles, b_stride, out + p * PANEL, n, cols);
    }
    tail(p, panel, cols);  // rows rows..a.rows-1 of this panel, while it is in cache
  }
  _tile_release();
}

// ---------------------------------------------------------------------------------------------
// AMX-BF16: many activation rows (prefill), the whole K in one accumulation
//
// The integer tiles above must store and scale every block's dots on their own (each block has
// its own scales), which bounds them at ~80 multiply-adds a cycle, little more than VNNI. With
// TDPBF16PS the scales go into the weights instead: a panel's blocks are dequantized once to
// bfloat16 (d*q + m in float, rounded), the activations are rounded to bfloat16 once, and C tiles
// sum all K products in float32 with no epilogue but the final store. The dequantization costs
// about as much as 5 tile multiplies a block, so it pays from BF16_MIN_ROWS rows on. Results
// differ from the integer paths (bfloat16 keeps 8 bits of each weight and activation; the
// integer paths keep every weight bit but round activations to 8-bit blocks): tested against a
// bfloat16 emulation and against the float32 reference.
#ifdef LH_AMX_BF16

constexpr int64_t BF16_MIN_ROWS = 64;
// bfloat16s in one block's B tile: 16 pairs of k x 16 panel rows
constexpr int64_t BF16_TILE = 512;

inline bool bf16_pays(int64_t rows) { return rows >= BF16_MIN_ROWS && amx_ready(); }

// Tiles 0-3: C (16 x 16 floats); 4, 5: A (16 rows x 32 bfloat16s); 6, 7: B (16 x 32 bfloat16s).
void configure_bf16_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

// x [rows, K] float -> [rows rounded up to 16, K] bfloat16 (round to nearest even), zero rows
// after.
void round_rows_bf16(const float* x, int64_t rows, int64_t K, AlignedVector<uint16_t>& out) {
  const int64_t padded = (rows + PANEL - 1) / PANEL * PANEL;
  out.resize(padded * K);
  at::parallel_for(0, padded, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint16_t* o = out.data() + r * K;
      if (r >= rows) {
        std::fill_n(o, K, 0);
        continue;
      }
      for (int64_t k = 0; k < K; k += 32) {
        const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + r * K + k + 16),
                                               _mm512_loadu_ps(x + r * K + k));
        _mm512_storeu_si512(o + k, reinterpret_cast<const __m512i&>(v));
      }
    }
  });
}

// A panel's blocks as B tiles (nb * BF16_TILE bfloat16s at out): row 2j + h of block b's tile
// holds, for panel rows n = 0..15, the weights 4j + 2h and 4j + 2h + 1 of the block, d*q + m
// rounded. Quant vector j (as the VNNI tile unpacks it) holds weights 4j..4j+3 of each panel row,
// so its float vectors g = 0..3 hold panel rows 4g..4g+3, and two of them rounded together
// interleave to the tile's rows 2j and 2j + 1 with one two-source permute each.
template <int64_t QT>
void dequantize_panel_bf16(const uint8_t* panel, int64_t nb, uint16_t* out) {
  constexpr Format f = format_for<QT>();
  __m512i spread[4];  // lane l of float vector g is panel row 4g + l/4
  for (int g = 0; g < 4; ++g)
    spread[g] = _mm512_add_epi32(_mm512_set1_epi32(4 * g),
                                 _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
  // the pairs (dwords) of weights 4j, 4j+1 of panel rows 0..15, then those of 4j+2, 4j+3
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i low4 = _mm512_set1_epi32(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* block = panel + b * PANEL * f.block_bytes;
    const BlockScales s = block_scales<QT>(block);
    const __m512 c = f.has_min ? s.m : _mm512_mul_ps(s.d, _mm512_set1_ps(f.min_coef));
    __m512 d[4], m[4];
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      d[g] = _mm512_permutexvar_ps(spread[g], s.d);
      m[g] = _mm512_permutexvar_ps(spread[g], c);
    }
    const uint8_t* quants = block + f.scale_bytes();
    uint16_t* tile = out + b * BF16_TILE;
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m512 w[4];
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        // Q4: vectors 0-3 are the low nibbles of the 4 stored vectors, 4-7 their high nibbles
        const int64_t stored = QT == Q8_0 ? j : j % 4;
        __m512i u = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(quants + 64 * stored + 16 * g)));
        if constexpr (QT != Q8_0) u = j < 4 ? _mm512_and_si512(u, low4) : _mm512_srli_epi32(u, 4);
        w[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(u), d[g], m[g]);
      }
      const __m512bh lo = _mm512_cvtne2ps_pbh(w[1], w[0]), hi = _mm512_cvtne2ps_pbh(w[3], w[2]);
      const __m512i l = reinterpret_cast<const __m512i&>(lo);
      const __m512i h = reinterpret_cast<const __m512i&>(hi);
      _mm512_storeu_si512(tile + 64 * j, _mm512_permutex2var_epi32(l, even, h));
      _mm512_storeu_si512(tile + 64 * j + 32, _mm512_permutex2var_epi32(l, odd, h));
    }
  }
  asm volatile("" ::: "memory");  // tileloadd's asm does not tell the compiler it reads memory
}

// C tile C (16 x 16 floats) to `to`, rows `stride` floats apart. (The tile number is part of the
// instruction, so each is spelled out.)
template <int C>
inline void tile_store(float* to, int64_t stride) {
  if constexpr (C == 0) _tile_stored(0, to, stride * 4);
  else if constexpr (C == 1) _tile_stored(1, to, stride * 4);
  else if constexpr (C == 2) _tile_stored(2, to, stride * 4);
  else _tile_stored(3, to, stride * 4);
}

// C tile C into out (rows ldo floats apart; rows_left rows and cols columns of it are inside):
// straight from the tile when all of it is inside, else through a buffer.
template <int C>
inline void store_c(float* out, int64_t ldo, int64_t rows_left, int64_t cols) {
  if (rows_left >= 16 && cols == PANEL) return tile_store<C>(out, ldo);
  alignas(64) float c[16 * PANEL];
  tile_store<C>(c, PANEL);
  asm volatile("" ::: "memory");  // tilestored's asm does not tell the compiler it writes c
  for (int64_t r = 0; r < std::min<int64_t>(16, rows_left); ++r)
    std::copy_n(c + r * PANEL, cols, out + r * ldo);
}

// NR x 16 rows (from r0) x NP panels (from p) of out, from the rounded activations xb [.., K] and
// the panels' B tiles (NP * nb tiles at tiles).
template <int NR, int NP>
void bf16_tile(const uint16_t* xb, int64_t K, int64_t rows, int64_t r0, const uint16_t* tiles,
               int64_t p, int64_t n, float* out) {
  const int64_t nb = K / QK;
  _tile_zero(0);
  if constexpr (NP == 2) _tile_zero(1);
  if constexpr (NR == 2) _tile_zero(2);
  if constexpr (NR == 2 && NP == 2) _tile_zero(3);
  for (int64_t b = 0; b < nb; ++b) {
    _tile_loadd(4, xb + r0 * K + b * QK, K * 2);
    _tile_loadd(6, tiles + b * BF16_TILE, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NP == 2) {
      _tile_loadd(7, tiles + (nb + b) * BF16_TILE, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (NR == 2) {
      _tile_loadd(5, xb + (r0 + 16) * K + b * QK, K * 2);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NP == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  const int64_t cols0 = std::min(PANEL, n - p * PANEL);
  float* o = out + r0 * n + p * PANEL;
  store_c<0>(o, n, rows - r0, cols0);
  if constexpr (NP == 2) store_c<1>(o + PANEL, n, rows - r0, std::min(PANEL, n - (p + 1) * PANEL));
  if constexpr (NR == 2) store_c<2>(o + 16 * n, n, rows - r0 - 16, cols0);
  if constexpr (NR == 2 && NP == 2)
    store_c<3>(o + 16 * n + PANEL, n, rows - r0 - 16, std::min(PANEL, n - (p + 1) * PANEL));
}

// Panels p0..p1-1 of out [rows, n] = x @ W^T, x rounded to xb (round_rows_bf16): two panels and
// 32 rows a pass (four C tiles, each A and B tile used twice).
template <int64_t QT>
void bf16_panels(const uint16_t* xb, int64_t rows, int64_t K, const uint8_t* w, int64_t n,
                 int64_t p0, int64_t p1, float* out) {
  constexpr Format f = format_for<QT>();
  const int64_t nb = K / QK, panel_bytes = PANEL * nb * f.block_bytes;
  thread_local AlignedVector<uint16_t> tiles;
  tiles.resize(2 * nb * BF16_TILE);
  configure_bf16_tiles();
  for (int64_t p = p0; p < p1; p += 2) {
    const bool two = p + 1 < p1;
    dequantize_panel_bf16<QT>(w + p * panel_bytes, nb, tiles.data());
    if (two)
      dequantize_panel_bf16<QT>(w + (p + 1) * panel_bytes, nb, tiles.data() + nb * BF16_TILE);
    for (int64_t r0 = 0; r0 < rows; r0 += 32) {
      const bool pair = r0 + 16 < rows;
      if (pair && two) bf16_tile<2, 2>(xb, K, rows, r0, tiles.data(), p, n, out);
      else if (pair) bf16_tile<2, 1>(xb, K, rows, r0, tiles.data(), p, n, out);
      else if (two) bf16_tile<1, 2>(xb, K, rows, r0, tiles.data(), p, n, out);
      else bf16_tile<1, 1>(xb, K, rows, r0, tiles.data(), p, n, out);
    }
  }
  _tile_release();
}

#endif  // LH_AMX_BF16

}  // namespace

#endif  // LH_AMX
