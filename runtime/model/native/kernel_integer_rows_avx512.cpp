// The many-row integer path on AVX-512 VNNI (see kernel_integer.h), compiled with -mavx512vnni;
// used only when the CPU reports it. Four weight rows at a time: their sub-scaled 16-bit weights
// w' are unpacked once into a scratch row each, then every four rows of x meet them there:
// sixteen int32 accumulators a span (vpdpwssd), from eight 512-bit loads for sixteen
// multiply-adds, made floats once a span.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel.h"
#include "kernel_integer.h"

namespace layerline {

namespace {

#include "scale_hardware.h"

// acc + the pairwise products of a and b, as vpdpwssd. GCC 12's intrinsic copied every accumulator
// in and out of a spare register around each instruction (and spilled), twice the instructions
// of the loop; tied in place here, they stay where they are.
inline __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

constexpr int kTileRows = 4;  // weight rows a tile
constexpr int kXRows = 4;     // rows of x a pass over the tile

// Four weight rows as the inner loop reads them: w' (K values each, pair order, 64-byte aligned),
// S per span, b + 8 s per group.
struct Tile {
  int16_t* w;
  float* span_scale;
  float* bias_centre;
  int spans, groups;
};

struct Scratch {
  std::vector<int16_t> weights, subscales, block_subscales;
  std::vector<float> floats, widened;
};

Tile tile_scratch(const QmmArgs& a, Scratch& scratch) {
  const int spans = span_count(a.K), groups = a.K / a.group;
  scratch.weights.resize(size_t(kTileRows) * a.K + 32);
  scratch.floats.resize(size_t(kTileRows) * (spans + groups));
  scratch.widened.resize(2 * size_t(groups));
  scratch.subscales.resize(groups + 32);  // a window of 32 may read past the last
  scratch.block_subscales.resize(a.K / kIntegerBlock + 32);
  auto* w = reinterpret_cast<int16_t*>((reinterpret_cast<uintptr_t>(scratch.weights.data()) + 63) & ~uintptr_t(63));
  return {w, scratch.floats.data(), scratch.floats.data() + size_t(kTileRows) * spans, spans, groups};
}

// span_subscales on 16 groups a vector: the same sub-scales and span scales (the same float
// operations, rounded to nearest even as lrintf does), where the scalar loop was as costly as the
// products of 8 rows of x.
void vector_subscales(const float* s, const float* b, int K, int group, int16_t* sc, float* span_scale,
                      float* bias_centre) {
  const int groups = K / group, per_span = kSpan / group;
  for (int g = 0; g < groups; g += 16) {
    const __mmask16 mask = groups - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (groups - g)) - 1);
    const __m512 centred = _mm512_fmadd_ps(_mm512_set1_ps(8.0f), _mm512_maskz_loadu_ps(mask, s + g),
                                           _mm512_maskz_loadu_ps(mask, b + g));
    _mm512_mask_storeu_ps(bias_centre + g, mask, centred);
  }
  for (int sp = 0, g0 = 0; g0 < groups; ++sp, g0 += per_span) {
    const int count = std::min(per_span, groups - g0);
    const __mmask16 mask = count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(mask, s + g0);
    const float smax = _mm512_reduce_max_ps(_mm512_abs_ps(v));
    span_scale[sp] = smax / kSubScaleTop;
    const __m512 inverse = _mm512_set1_ps(smax > 0.0f ? kSubScaleTop / smax : 0.0f);
    _mm512_mask_cvtepi32_storeu_epi16(sc + g0, mask, _mm512_cvtps_epi32(_mm512_mul_ps(v, inverse)));
  }
}

// Row n's w' into tile row r: each 32 packed bytes (blocks j and j + 1) widened to 16 bits, split
// into low and high nibbles, centred on 8 and multiplied by their blocks' sub-scales (blocks j and
// j + 1's, in the vector's two halves: a permute of 32 blocks' sub-scales).
void unpack_row(const QmmArgs& a, size_t n, const Tile& t, int r, Scratch& scratch) {
  float* s = scratch.widened.data();
  float* b = s + t.groups;
  hardware_scales(a.scales, a.scale_type, n * t.groups, t.groups, s);
  hardware_scales(a.biases, a.scale_type, n * t.groups, t.groups, b);
  int16_t* sc = scratch.subscales.data();
  vector_subscales(s, b, a.K, a.group, sc, t.span_scale + size_t(r) * t.spans, t.bias_centre + size_t(r) * t.groups);
  // Each block's sub-scale, 32 to a vector: the groups' own at 32 values a group, else each
  // group's repeated for its 2 or 4 blocks.
  const int blocks_per_group = a.group / kIntegerBlock;
  const int16_t* block_sc = sc;
  if (blocks_per_group > 1) {
    int16_t* expanded = scratch.block_subscales.data();
    for (int g = 0; g < t.groups; ++g) std::fill_n(expanded + g * blocks_per_group, blocks_per_group, sc[g]);
    block_sc = expanded;
  }
  const uint8_t* row = a.w + n * a.w_row_bytes;
  int16_t* out = t.w + size_t(r) * a.K;
  const __m512i low = _mm512_set1_epi16(15), centre = _mm512_set1_epi16(8);
  // Pair p (of the 16 in a window of 32 blocks): lanes 0-15 take block 2p's sub-scale, 16-31 block 2p + 1's.
  const __m512i first_pair = _mm512_set_epi64(0x0001000100010001, 0x0001000100010001, 0x0001000100010001,
                                              0x0001000100010001, 0, 0, 0, 0);
  const __m512i two = _mm512_set1_epi16(2);
  __m512i window = _mm512_setzero_si512(), pick = first_pair;
  for (int p = 0; p < a.K / 64; ++p) {
    if (p % 16 == 0) {
      window = _mm512_loadu_si512(block_sc + 2 * p);  // both scratches hold 32 past the last block
      pick = first_pair;
    }
    const __m512i scales = _mm512_permutexvar_epi16(pick, window);
    pick = _mm512_add_epi16(pick, two);
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + size_t(p) * 32)));
    const __m512i even = _mm512_sub_epi16(_mm512_and_si512(v, low), centre);
    const __m512i odd = _mm512_sub_epi16(_mm512_srli_epi16(v, 4), centre);
    _mm512_store_si512(out + size_t(p) * 64, _mm512_mullo_epi16(even, scales));
    _mm512_store_si512(out + size_t(p) * 64 + 32, _mm512_mullo_epi16(odd, scales));
  }
}

void clear_row(const QmmArgs& a, const Tile& t, int r) {
  std::fill_n(t.w + size_t(r) * a.K, a.K, int16_t(0));
  std::fill_n(t.span_scale + size_t(r) * t.spans, t.spans, 0.0f);
  std::fill_n(t.bias_centre + size_t(r) * t.groups, t.groups, 0.0f);
}

// a's and b's adjacent lanes summed: a's eight pairs, then b's.
inline __m512 pair_sums(__m512 a, __m512 b) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return _mm512_add_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
}

// The lane sums of 16 vectors, lane i holding v[i]'s: pairs summed four times over (45
// instructions, where a reduction each takes about 130).
inline __m512 lane_sums(__m512* v) {
  for (int width = 16; width > 1; width /= 2) {
    for (int i = 0; i < width / 2; ++i) v[i] = pair_sums(v[2 * i], v[2 * i + 1]);
  }
  return v[0];
}

// Rows m .. m + MB of x against the tile's four weight rows: y's `count` columns from n. Each span's
// int32 sums stay in registers and are added as floats, times S * dx, to acc (in L1); then the
// bias and centre, sum over groups of (b + 8 s) times x's group sums, join acc's lanes.
template <int MB>
void tile_rows(const QmmArgs& a, const QuantizedRows& x, const Tile& t, int m, int n, int count) {
  alignas(64) float acc[MB][kTileRows][16] = {};
  const int16_t* xs[MB];
  for (int c = 0; c < MB; ++c) xs[c] = x.q + size_t(m + c) * a.K;
  for (int sp = 0; sp < t.spans; ++sp) {
    const int k0 = sp * kSpan, k1 = std::min(a.K, k0 + kSpan);
    __m512i sums[kTileRows][MB];
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) {
#pragma GCC unroll 4
      for (int c = 0; c < MB; ++c) sums[r][c] = _mm512_setzero_si512();
    }
    for (int k = k0; k < k1; k += 32) {
      __m512i wv[kTileRows];
#pragma GCC unroll 4
      for (int r = 0; r < kTileRows; ++r) wv[r] = _mm512_load_si512(t.w + size_t(r) * a.K + k);
#pragma GCC unroll 4
      for (int c = 0; c < MB; ++c) {
        const __m512i xv = _mm512_load_si512(xs[c] + k);
#pragma GCC unroll 4
        for (int r = 0; r < kTileRows; ++r) sums[r][c] = dpwssd(sums[r][c], wv[r], xv);
      }
    }
    __m512 dx[MB];
#pragma GCC unroll 4
    for (int c = 0; c < MB; ++c) dx[c] = _mm512_set1_ps(x.scale[size_t(m + c) * t.spans + sp]);
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) {
      const __m512 span_scale = _mm512_set1_ps(t.span_scale[size_t(r) * t.spans + sp]);
#pragma GCC unroll 4
      for (int c = 0; c < MB; ++c) {
        _mm512_store_ps(acc[c][r], _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][c]), _mm512_mul_ps(span_scale, dx[c]),
                                                   _mm512_load_ps(acc[c][r])));
      }
    }
  }
  __m512 v[16];  // v[c * 4 + r]: y[m + c][n + r]'s lanes
#pragma GCC unroll 4
  for (int c = 0; c < kXRows; ++c) {
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) v[c * kTileRows + r] = c < MB ? _mm512_load_ps(acc[c][r]) : _mm512_setzero_ps();
  }
  // Sixteen independent multiply-add chains a step of 16 groups (one chain each took its latency).
  for (int g = 0; g < t.groups; g += 16) {
    const __mmask16 mask = t.groups - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (t.groups - g)) - 1);
    __m512 sums[MB];
#pragma GCC unroll 4
    for (int c = 0; c < MB; ++c) sums[c] = _mm512_maskz_loadu_ps(mask, x.sum.data() + size_t(m + c) * t.groups + g);
#pragma GCC unroll 4
    for (int r = 0; r < kTileRows; ++r) {
      const __m512 bias = _mm512_maskz_loadu_ps(mask, t.bias_centre + size_t(r) * t.groups + g);
#pragma GCC unroll 4
      for (int c = 0; c < MB; ++c) v[c * kTileRows + r] = _mm512_fmadd_ps(bias, sums[c], v[c * kTileRows + r]);
    }
  }
  const __m512 totals = lane_sums(v);  // lane c * 4 + r: y[m + c][n + r]
  alignas(64) float out[16];
  _mm512_store_ps(out, totals);
  for (int c = 0; c < MB; ++c) {
    if (count == kTileRows) {
      std::memcpy(a.y + size_t(m + c) * a.N + n, out + c * kTileRows, kTileRows * sizeof(float));
    } else {
      for (int r = 0; r < count; ++r) a.y[size_t(m + c) * a.N + n + r] = out[c * kTileRows + r];
    }
  }
}

}  // namespace

void quantize_rows_avx512(const QmmArgs& a, QuantizedRows& out) {
  const int spans = span_count(a.K), groups = a.K / a.group;
  prepare_rows(a, out);
  // Pair order: a 64-value pair's even values of its first 32, then of its second 32, then the odd
  // ones (vpermt2w over the pair's two vectors of 32 int16, in order).
  alignas(64) int16_t order[2][32];
  for (int i = 0; i < 64; ++i) order[i / 32][i % 32] = int16_t(pair_source(i));
  const __m512i first = _mm512_load_si512(order[0]), second = _mm512_load_si512(order[1]);
  for (int m = 0; m < a.M; ++m) {
    const float* x = a.x + size_t(m) * a.K;
    int16_t* q = out.q + size_t(m) * a.K;
    float* sums = out.sum.data() + size_t(m) * groups;
    for (int g = 0; g < groups; ++g) {
      __m512 total = _mm512_setzero_ps();
      for (int k = g * a.group; k < (g + 1) * a.group; k += 16) total = _mm512_add_ps(total, _mm512_loadu_ps(x + k));
      sums[g] = _mm512_reduce_add_ps(total);
    }
    for (int sp = 0; sp < spans; ++sp) {
      const int k0 = sp * kSpan, k1 = std::min(a.K, k0 + kSpan);
      __m512 top = _mm512_setzero_ps();
      for (int k = k0; k < k1; k += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
      const float amax = _mm512_reduce_max_ps(top);
      out.scale[size_t(m) * spans + sp] = amax / kRowsXTop;
      const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? kRowsXTop / amax : 0.0f);
      for (int p = k0; p < k1; p += 64) {
        __m512i v[4];
        for (int i = 0; i < 4; ++i) v[i] = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + p + 16 * i), inverse));
        // packs interleaves 128-bit lanes of its two sources: put them back in order before the pair order.
        const __m512i lanes = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
        const __m512i low = _mm512_permutexvar_epi64(lanes, _mm512_packs_epi32(v[0], v[1]));
        const __m512i high = _mm512_permutexvar_epi64(lanes, _mm512_packs_epi32(v[2], v[3]));
        _mm512_store_si512(q + p, _mm512_permutex2var_epi16(low, first, high));
        _mm512_store_si512(q + p + 32, _mm512_permutex2var_epi16(low, second, high));
      }
    }
  }
}

void integer_rows_avx512vnni(const QmmArgs& a, const QuantizedRows& x, int n0, int n1) {
  thread_local Scratch scratch;
  const Tile t = tile_scratch(a, scratch);
  for (int n = n0; n < n1; n += kTileRows) {
    const int count = std::min(kTileRows, n1 - n);
    // The next tile's packed rows, asked for while this one computes: with few rows of x a tile is
    // short, and its unpacking would wait on memory.
    const size_t next = size_t(n + kTileRows) * a.w_row_bytes;
    const size_t end = std::min(a.w_total_bytes, size_t(n1) * a.w_row_bytes);
    for (size_t line = next; line < std::min(end, next + kTileRows * a.w_row_bytes); line += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(a.w + line), _MM_HINT_T0);
    }
    for (int r = 0; r < kTileRows; ++r) {
      if (r < count) {
        unpack_row(a, size_t(n + r), t, r, scratch);
      } else {
        clear_row(a, t, r);
      }
    }
    int m = 0;
    for (; m + kXRows <= a.M; m += kXRows) tile_rows<kXRows>(a, x, t, m, n, count);
    switch (a.M - m) {
      case 3: tile_rows<3>(a, x, t, m, n, count); break;
      case 2: tile_rows<2>(a, x, t, m, n, count); break;
      case 1: tile_rows<1>(a, x, t, m, n, count); break;
      default: break;
    }
  }
}

}  // namespace layerline
