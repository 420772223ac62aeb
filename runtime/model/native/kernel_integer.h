// The integer GEMV: one row of x quantized to int8 (as llama.cpp's q8 dot products do) or int16
// per block of 32 values, once per product, and each packed weight row's integers multiplied
// with it by integer multiply-adds. int8 x rounds each value to 1/254 of its block's largest;
// int16 x to 1/65534, below the f16 scales' own rounding, at about the same cost where pmaddwd
// (vpdpwssd with VNNI) takes the place of maddubs. A weight is w = s*q + b (q unsigned), a block
// of x is x ~= dx * xq, so
//   y_n = sum_g s_ng * sum_{blocks j of g} dx_j * (q . xq)_j  +  b_ng * sum_{k in g} x_k,
// with the bias term's sums of x exact in f32: only the products q*x carry x's rounding. The
// products count as centred on the middle weight c (8, 16 or 128: q - c is small where q
// is near c, and so is its error), which adds s_ng * c * (x's exact sum - its quantized sum) per group.
//
// Each instruction set unpacks a block's 32 values in the order its unpacking leaves them
// (int_block_order), and x is quantized into that same order once per call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernel.h"

namespace layerline {

constexpr int kIntegerBlock = 32;  // values of x per integer scale: every supported group holds whole blocks

// Whether the integer path computes this product: one row of 4-, 5- or 8-bit weights.
inline bool integer_supports(int bits, int M) { return M == 1 && (bits == 4 || bits == 5 || bits == 8); }

// Lane i of an unpacked block holds value int_block_order(bits, xbits, i) of the block's 32
// values: 4-bit: the low nibbles (even values), then the high ones (odd values); 5-bit into
// bytes: values 0-7, 16-23, 8-15, 24-31 (two 16-value halves packed lane by lane); else in order.
inline int int_block_order(int bits, int xbits, int i) {
  if (bits == 4) return i < 16 ? 2 * i : 2 * (i - 16) + 1;
  if (bits == 5 && xbits == 8) return (i % 16) / 8 * 16 + i / 16 * 8 + i % 8;
  return i;
}

// x's one row, quantized: xq in every block's unpacking order, dx per block, x's exact sum per group.
struct QuantizedX {
  int xbits = 8;               // 8: q holds x; 16: q16 does
  std::vector<int8_t> q;       // K values, block by block
  std::vector<int16_t> q16;
  std::vector<float> scale;    // K / 32: dx, x ~= dx * xq
  std::vector<float> sum;      // K / group: the exact f32 sum of each group's x
  std::vector<float> centre;   // K / group: c * (the exact sum - sum(dx * xq)): times s, centres q
};

// The middle weight c of a width: the products are taken as (q - c) * x.
inline float integer_centre(int bits) { return float(1 << (bits - 1)); }

void quantize_x(const QmmArgs& a, int xbits, QuantizedX& out);

using IntegerColumns = void (*)(const QmmArgs& a, const QuantizedX& x, int n0, int n1);

void integer_columns_portable(const QmmArgs& a, const QuantizedX& x, int n0, int n1);
#if defined(__x86_64__) || defined(_M_X64)
void integer_columns_avx2(const QmmArgs& a, const QuantizedX& x, int n0, int n1);
void integer_columns_avx512vnni(const QmmArgs& a, const QuantizedX& x, int n0, int n1);
#endif
#if defined(__aarch64__)
void integer_columns_neon(const QmmArgs& a, const QuantizedX& x, int n0, int n1);
#endif

}  // namespace layerline
