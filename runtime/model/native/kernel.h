// The packed-weight product y = x @ dequant(W)^T on the CPU, without mlx: one entry per
// instruction set, each computing output columns [n0, n1) for every row of x.
#pragma once

#include <cstddef>
#include <cstdint>

namespace layerline {

struct QmmArgs {
  const float* x;       // (M, K) row-major activations
  const uint8_t* w;     // (N, K * bits / 8) packed rows: a little-endian bit stream per row
  const float* scales;  // (N, K / group)
  const float* biases;  // (N, K / group)
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

// One packed value: bits [i*bits, (i+1)*bits) of the row's little-endian bit stream.
inline uint32_t unpack_value(const uint8_t* row, int i, int bits) {
  const int bit = i * bits;
  const int byte = bit >> 3, shift = bit & 7;
  uint32_t v = row[byte];
  if (shift + bits > 8) v |= uint32_t(row[byte + 1]) << 8;
  return (v >> shift) & ((1u << bits) - 1u);
}

}  // namespace layerline
