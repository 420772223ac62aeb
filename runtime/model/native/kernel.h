// The packed-weight product y = x @ dequant(W)^T on the CPU, without mlx: one entry per
// instruction set, each computing output columns [n0, n1) for every row of x.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace layerline {

// Scales and biases stay in the package's type: f16 or bf16 halves the bytes they add per token.
enum class ScaleType : int { f32 = 0, f16 = 1, bf16 = 2 };

struct QmmArgs {
  const float* x;       // (M, K) row-major activations
  const uint8_t* w;     // (N, K * bits / 8) packed rows: a little-endian bit stream per row
  const void* scales;   // (N, K / group) of scale_type
  const void* biases;   // (N, K / group) of scale_type
  ScaleType scale_type;
  float* y;             // (M, N) row-major output
  int M, N, K, bits, group;
  size_t w_row_bytes;   // K * bits / 8
  size_t w_total_bytes; // N * w_row_bytes: vector loads never read past it
};

using QmmColumns = void (*)(const QmmArgs&, int n0, int n1);

void qmm_columns_portable(const QmmArgs& a, int n0, int n1);
#if defined(__x86_64__) || defined(_M_X64)
void qmm_columns_avx2(const QmmArgs& a, int n0, int n1);
void qmm_columns_avx512(const QmmArgs& a, int n0, int n1);
#endif
#if defined(__aarch64__)
void qmm_columns_neon(const QmmArgs& a, int n0, int n1);
#endif

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf, nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = -1;
    uint32_t m = mantissa;
    do {
      ++e;
      m <<= 1;
    } while ((m & 0x400) == 0);
    bits = sign | uint32_t(112 - e) << 23 | ((m & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Element i of a scales or biases array, as f32.
inline float scale_at(const void* p, ScaleType type, size_t i) {
  if (type == ScaleType::f32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (type == ScaleType::f16) return half_to_float(h);
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// A one-row product's walk over weight rows n0 .. n1, four at a time (the last pass fewer):
// pass(rows, n, count) with rows[r] = row_at(n + r). Each pass first asks for the rows two passes
// ahead: the hardware prefetcher alone left the GEMV waiting on memory (software prefetch was 4x).
template <typename RowAt, typename Pass>
inline void walk_row_quads(const QmmArgs& a, int n0, int n1, RowAt row_at, Pass pass) {
  for (int n = n0; n < n1; n += 4) {
    const int count = n1 - n < 4 ? n1 - n : 4;
    const uint8_t* rows[4];
    for (int r = 0; r < count; ++r) rows[r] = row_at(n + r);
    const size_t block = 4 * a.w_row_bytes, ahead = size_t(n) * a.w_row_bytes + 2 * block;
    for (size_t line = 0; line < block && ahead + line < a.w_total_bytes; line += 64) {
      __builtin_prefetch(a.w + ahead + line, 0, 3);  // prefetcht0 on x86, prfm pldl1keep on arm64
    }
    pass(rows, n, count);
  }
}

// Row n of the packed weights.
inline auto packed_row(const QmmArgs& a) {
  return [&a](int n) { return a.w + size_t(n) * a.w_row_bytes; };
}

// One packed value: bits [i*bits, (i+1)*bits) of the row's little-endian bit stream.
inline uint32_t unpack_value(const uint8_t* row, int i, int bits) {
  const int bit = i * bits;
  const int byte = bit >> 3, shift = bit & 7;
  uint32_t v = row[byte];
  if (shift + bits > 8) v |= uint32_t(row[byte + 1]) << 8;
  return (v >> shift) & ((1u << bits) - 1u);
}

}  // namespace layerline
