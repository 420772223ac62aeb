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

// Many rows of x against 4-bit weights (prefill chunks, batch passes, draft windows), in integers
// where a pass's multiply-adds, not its bytes, bound it. A weight row's group scales become, per
// span of up to 512 values, integer sub-scales of the span's largest (as llama.cpp's Q4_K stores
// them per 256, at 10 bits where Q4_K has 6), folded into the weights once per call:
// w' = (q - 8) * sc, 16-bit. x is rounded to 14 bits per span of each row. A span's products then
// sum in int32 lanes (vpdpwssd: 32 multiply-adds an instruction, where an f32 FMA does 16) and
// become floats once, times S * dx; the bias and centre, (b + 8 s) * x's exact group sums, stay in f32:
//   y_mn = sum_spans S_n,sp * dx_m,sp * sum_{k in sp} w'_nk * xq_mk  +  sum_g (b_ng + 8 s_ng) * sum_{k in g} x_mk.
// The largest int32 sum: 32 products a lane a span, each at most 8 * 1023 * 8191 (< 2^31 / 32).
// The span is as long as that allows: each span's sums cost a conversion and a multiply-add.
constexpr int kSpan = 512;
constexpr float kRowsXTop = 8191.0f;
constexpr float kSubScaleTop = 1023.0f;

// From 8 rows: below, unpacking each weight row's w' costs more than its products save (2 threads,
// 8960 x 1536 against f32 x: 4 rows 1.03 against 0.86 ms, 8 rows 1.37 against 1.57, 128 rows 12.7
// against 21.2).
constexpr int kIntegerRowsMin = 8;

inline bool integer_rows_support(int bits, int M, int K) { return bits == 4 && M >= kIntegerRowsMin && K % 64 == 0; }

inline int span_count(int K) { return (K + kSpan - 1) / kSpan; }

// Every row of x, quantized: each row's K values in pair order (per 64 values, as a 32-byte load of
// 4-bit weights unpacks: the low nibbles of blocks j and j + 1, then their high nibbles: each
// block's even values, then its odd ones), 64-byte aligned; dx per row and span; x's exact sums
// per row and group.
struct QuantizedRows {
  std::vector<int16_t> storage;
  int16_t* q = nullptr;        // M * K, into storage
  std::vector<float> scale;    // M * spans
  std::vector<float> sum;      // M * groups
};

void quantize_rows(const QmmArgs& a, QuantizedRows& out);
// Sizes out for a's rows (every quantizer's first step).
void prepare_rows(const QmmArgs& a, QuantizedRows& out);
// Where value i of a 64-value pair comes from in pair order: blocks j and j + 1's even values,
// then their odd ones (4-bit bytes hold an even value in the low nibble, the next in the high).
inline int pair_source(int i) { return (i / 16) % 2 * 32 + (i % 16) * 2 + i / 32; }

// A weight row's sub-scales from its scales s and biases b (groups each, widened to f32): sc per
// group (|sc| <= 1023), S per span (s ~= S * sc), and b + 8 s per group. Every path's, so their
// integer sums agree exactly.
void span_subscales(const float* s, const float* b, int K, int group, int16_t* sc, float* span_scale,
                    float* bias_centre);

using IntegerRows = void (*)(const QmmArgs& a, const QuantizedRows& x, int n0, int n1);

void integer_rows_portable(const QmmArgs& a, const QuantizedRows& x, int n0, int n1);
#if defined(__x86_64__) || defined(_M_X64)
void quantize_rows_avx512(const QmmArgs& a, QuantizedRows& out);  // the same values (sums to f32 rounding)
void integer_rows_avx512vnni(const QmmArgs& a, const QuantizedRows& x, int n0, int n1);
#endif

}  // namespace layerline
