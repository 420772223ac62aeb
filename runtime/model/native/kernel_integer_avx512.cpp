// The integer GEMV on AVX-512 VNNI, compiled with -mavx512vnni -mavx512vl; used only when the CPU
// reports both. int8 x, and 5-bit weights, run the 256-bit path (vpdpbusd) shared with AVX2;
// 4- and 8-bit weights with int16 x, a decode step's products by default, run on 512-bit vectors:
// 32 16-bit products a multiply-add, where the 256-bit path takes 16.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel_integer.h"

namespace layerline {
namespace {

#include "kernel_integer_x86.h"
#include "kernel_integer_simd.h"

// int16 x as zmm_rows reads it, into `out` at a 64-byte boundary (a 512-bit load that straddles
// two cache lines costs two). 4-bit weights take two blocks at a time: a load of 32 packed bytes
// widens to blocks j's and j+1's 16 bytes, whose low nibbles (the blocks' even values, see
// int_block_order) meet x's first 32 values of the pair and whose high nibbles the next 32.
const int16_t* arrange_x(const QuantizedX& x, int bits, int blocks, std::vector<int16_t>& out) {
  out.resize(size_t(blocks) * kIntegerBlock + 32);
  int16_t* aligned = reinterpret_cast<int16_t*>((reinterpret_cast<uintptr_t>(out.data()) + 63) & ~uintptr_t(63));
  if (bits != 4) {
    std::memcpy(aligned, x.q16.data(), size_t(blocks) * kIntegerBlock * sizeof(int16_t));
    return aligned;
  }
  for (int j = 0; j < blocks; j += 2) {
    const int16_t* first = x.q16.data() + size_t(j) * kIntegerBlock;
    const int16_t* second = first + kIntegerBlock;
    int16_t* pair = aligned + size_t(j) * kIntegerBlock;  // first's 0-15, second's 0-15, then each one's 16-31
    std::memcpy(pair, first, 16 * sizeof(int16_t));
    std::memcpy(pair + 16, second, 16 * sizeof(int16_t));
    std::memcpy(pair + 32, first + 16, 16 * sizeof(int16_t));
    std::memcpy(pair + 48, second + 16, 16 * sizeof(int16_t));
  }
  return aligned;
}

// row_factors for f16 scales and one block a group, 16 groups a step: the row's bias term
// (b * x's sum + s * x.centre over its groups) and s * dx per block into sdx.
inline float row_factors_f16(const QmmArgs& a, const QuantizedX& x, size_t n, float* sdx) {
  const int groups = a.K / a.group;
  const uint16_t* scales = static_cast<const uint16_t*>(a.scales) + n * groups;
  const uint16_t* biases = static_cast<const uint16_t*>(a.biases) + n * groups;
  __m512 bias = _mm512_setzero_ps();
  for (int g = 0; g < groups; g += 16) {
    const __mmask16 m = groups - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (groups - g)) - 1);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, scales + g));
    const __m512 b = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, biases + g));
    bias = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(m, x.sum.data() + g), bias);
    bias = _mm512_fmadd_ps(s, _mm512_maskz_loadu_ps(m, x.centre.data() + g), bias);
    _mm512_mask_storeu_ps(sdx + g, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, x.scale.data() + g)));
  }
  return _mm512_reduce_add_ps(bias);
}

// NB rows of BITS-bit weights (4 or 8) against int16 x on 512-bit vectors. 4-bit: two blocks a
// step, their int32 sums in lanes 0-7 and 8-15, each half scaled by its own block's factor;
// 8-bit: one block a step, all 16 lanes one block's.
template <int BITS, int NB>
inline void zmm_rows(const QmmArgs& a, const QuantizedX& x, const int16_t* xs, const uint8_t* const* rows, int n,
                     float* sdx, float* widened) {
  const int blocks = a.K / kIntegerBlock;
  __m512 acc[NB];
  float bias[NB];
  const float* factor[NB];
#pragma GCC unroll 4
  for (int r = 0; r < NB; ++r) {
    acc[r] = _mm512_setzero_ps();
    factor[r] = sdx + size_t(r) * blocks;
    bias[r] = a.scale_type == ScaleType::f16 && a.group == kIntegerBlock
                  ? row_factors_f16(a, x, size_t(n + r), sdx + size_t(r) * blocks)
                  : row_factors<BITS, 16>(a, x, size_t(n + r), sdx + size_t(r) * blocks, widened);
  }
  if constexpr (BITS == 4) {
    const __m512i low = _mm512_set1_epi16(15);
    const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    for (int j = 0; j < blocks; j += 2) {
      const __m512i x_low = _mm512_loadu_si512(xs + size_t(j) * kIntegerBlock);
      const __m512i x_high = _mm512_loadu_si512(xs + size_t(j) * kIntegerBlock + 32);
      const size_t byte = size_t(j) * 16;
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + byte)));
        const __m512i sums = _mm512_dpwssd_epi32(_mm512_madd_epi16(_mm512_and_si512(v, low), x_low),
                                                 _mm512_srli_epi16(v, 4), x_high);
        const __m512 f = _mm512_permutexvar_ps(
            halves, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(factor[r] + j)))));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), f, acc[r]);
      }
    }
  } else {
    for (int j = 0; j < blocks; ++j) {
      const __m512i xv = _mm512_loadu_si512(xs + size_t(j) * kIntegerBlock);
      const size_t byte = size_t(j) * kIntegerBlock;
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + byte)));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(v, xv)), _mm512_set1_ps(factor[r][j]), acc[r]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NB; ++r) a.y[n + r] = _mm512_reduce_add_ps(acc[r]) + bias[r];
}

template <int BITS>
void zmm_gemv(const QmmArgs& a, const QuantizedX& x, int n0, int n1) {
  thread_local std::vector<int16_t> arranged;
  const RowScratch scratch = row_scratch(a);
  float* sdx = scratch.sdx;
  float* widened = scratch.widened;
  const int16_t* xs = arrange_x(x, BITS, a.K / kIntegerBlock, arranged);
  walk_row_quads(a, n0, n1, packed_row(a), [&](const uint8_t* const* rows, int n, int count) {
    if (count == 4) {
      zmm_rows<BITS, 4>(a, x, xs, rows, n, sdx, widened);
    } else {
      for (int r = 0; r < count; ++r) zmm_rows<BITS, 1>(a, x, xs, rows + r, n + r, sdx, widened);
    }
  });
}

}  // namespace

void integer_columns_avx512vnni(const QmmArgs& a, const QuantizedX& x, int n0, int n1) {
  // Two blocks a step for 4-bit: a row of an even number of blocks (every K a multiple of 64).
  if (x.xbits == 16 && a.bits == 4 && a.K % (2 * kIntegerBlock) == 0) return zmm_gemv<4>(a, x, n0, n1);
  if (x.xbits == 16 && a.bits == 8) return zmm_gemv<8>(a, x, n0, n1);
  integer_columns(a, x, n0, n1);
}

}  // namespace layerline
