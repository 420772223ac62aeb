// The NEON path for arm64 (always present there): 4 floats a register, used in pairs as one
// 8-lane vector, because 4 values of 3 or 5 bits do not end on a byte and 8 always do.
#include <arm_neon.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernel.h"

namespace layerline {
namespace {

#include "scale_hardware.h"

struct Simd {
  using F = float32x4x2_t;
  using I = uint32x4x2_t;
  static constexpr int L = 8;
  // Several rows of x: 2 weight rows x up to 4 rows of x of sums in registers, as on AVX2 (32
  // registers hold as many 8-lane pairs as AVX2 has 8-lane registers).
  static constexpr int block_weight_rows = 2, pass_rows = 4;
  static F zero() { return {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)}; }
  static F set1(float v) { return {vdupq_n_f32(v), vdupq_n_f32(v)}; }
  static F load(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
  static F fma(F a, F b, F c) {
    return {vfmaq_f32(c.val[0], a.val[0], b.val[0]), vfmaq_f32(c.val[1], a.val[1], b.val[1])};
  }
  static I load_int(const void* p) {
    const uint32_t* q = static_cast<const uint32_t*>(p);
    return {vld1q_u32(q), vld1q_u32(q + 4)};
  }
  static I set1_int(int v) { return {vdupq_n_u32(uint32_t(v)), vdupq_n_u32(uint32_t(v))}; }
  // A table lookup places each value's bytes in its lane (index 0x80 is out of the table: 0),
  // as AVX2's byte shuffle does; a negative shift count shifts right.
  static F unpack(const uint8_t* p, I control, I shifts, I mask) {
    const uint8x16_t bytes = vld1q_u8(p);
    F out;
    for (int h = 0; h < 2; ++h) {
      const uint32x4_t lanes = vreinterpretq_u32_u8(vqtbl1q_u8(bytes, vreinterpretq_u8_u32(control.val[h])));
      const uint32x4_t v = vandq_u32(vshlq_u32(lanes, vnegq_s32(vreinterpretq_s32_u32(shifts.val[h]))), mask.val[h]);
      out.val[h] = vcvtq_f32_u32(v);
    }
    return out;
  }
  static I widen(const uint8_t* p) {
    const uint16x8_t wide = vmovl_u8(vld1_u8(p));
    return {vmovl_u16(vget_low_u16(wide)), vmovl_u16(vget_high_u16(wide))};
  }
  static I and_int(I a, I b) { return {vandq_u32(a.val[0], b.val[0]), vandq_u32(a.val[1], b.val[1])}; }
  static I shift_right_4(I a) { return {vshrq_n_u32(a.val[0], 4), vshrq_n_u32(a.val[1], 4)}; }
  static F to_float(I a) { return {vcvtq_f32_u32(a.val[0]), vcvtq_f32_u32(a.val[1])}; }
  static constexpr bool has_lookup16 = false;  // no 16-lane permute
  static F lookup16(I, F table) { return table; }
  static F iota() { return zero(); }
  static F add(F a, F b) { return {vaddq_f32(a.val[0], b.val[0]), vaddq_f32(a.val[1], b.val[1])}; }
  static float scale(const void* p, ScaleType type, size_t i) { return hardware_scale_at(p, type, i); }
  static void hsum4(F a, F b, F c, F d, float* out) {
    out[0] = hsum(a), out[1] = hsum(b), out[2] = hsum(c), out[3] = hsum(d);
  }
  static void prefetch(const uint8_t* p) { __builtin_prefetch(p, 0, 3); }
  static float hsum(F v) { return vaddvq_f32(vaddq_f32(v.val[0], v.val[1])); }
};

#include "kernel_simd.h"

}  // namespace

void qmm_columns_neon(const QmmArgs& a, int n0, int n1) { columns(a, n0, n1); }

}  // namespace layerline
