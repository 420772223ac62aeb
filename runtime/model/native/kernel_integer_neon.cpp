// The integer GEMV on arm64: int8 x by sdot (vdotq_s32) where the compiler targets the
// dot-product extension, else NEON's widening multiply and pairwise add (every arm64 CPU has
// those), weights as signed bytes (4- and 5-bit values fit, 8-bit ones as q - 128); int16 x by
// widening multiply-adds of 16-bit lanes. 5-bit blocks unpack in scalar code (no arm64 machine
// here to measure a vector unpacking worth its code).
#include <arm_neon.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernel_integer.h"

namespace layerline {
namespace {

#include "scale_hardware.h"

struct Simd {
  using B = int8x16x2_t;
  using S = int32x4_t;
  using F = float32x4_t;
  static constexpr bool signed8 = true;

  static B load_x(const int8_t* p) { return {vld1q_s8(p), vld1q_s8(p + 16)}; }

  template <int BITS>
  static B unpack(const uint8_t* p) {
    if constexpr (BITS == 4) {
      const uint8x16_t v = vld1q_u8(p);
      return {vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15))), vreinterpretq_s8_u8(vshrq_n_u8(v, 4))};
    } else if constexpr (BITS == 5) {
      alignas(16) int8_t bytes[kIntegerBlock];
      for (int i = 0; i < kIntegerBlock; ++i) bytes[i] = int8_t(unpack_value(p, int_block_order(5, 8, i), 5));
      return load_x(bytes);
    } else {
      const uint8x16_t flip = vdupq_n_u8(0x80);
      return {vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p), flip)), vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p + 16), flip))};
    }
  }

  template <int BITS>
  static S dot(B q, B x) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), q.val[0], x.val[0]), q.val[1], x.val[1]);
#else
    // A product is at most 128 * 127: two of them still fit 16 bits before widening.
    int32x4_t sums = vdupq_n_s32(0);
    for (int h = 0; h < 2; ++h) {
      sums = vpadalq_s16(sums, vmull_s8(vget_low_s8(q.val[h]), vget_low_s8(x.val[h])));
      sums = vpadalq_s16(sums, vmull_high_s8(q.val[h], x.val[h]));
    }
    return sums;
#endif
  }

  struct X16 {
    int16x8_t v[4];  // the block's 32 values in int_block_order
  };
  static X16 load_x16(const int16_t* p) { return {{vld1q_s16(p), vld1q_s16(p + 8), vld1q_s16(p + 16), vld1q_s16(p + 24)}}; }

  // Weights widened to 16 bits (at most 255: they fit signed) times x, summed into 4 lanes.
  static S multiply16(const int16x8_t (&w)[4], const X16& x) {
    int32x4_t sums = vdupq_n_s32(0);
    for (int i = 0; i < 4; ++i) {
      sums = vmlal_s16(sums, vget_low_s16(w[i]), vget_low_s16(x.v[i]));
      sums = vmlal_high_s16(sums, w[i], x.v[i]);
    }
    return sums;
  }
  static int16x8_t widen(uint8x8_t v) { return vreinterpretq_s16_u16(vmovl_u8(v)); }

  template <int BITS>
  static S dot16(const uint8_t* p, const X16& x) {
    int16x8_t w[4];
    if constexpr (BITS == 4) {
      const uint8x16_t v = vld1q_u8(p), low = vandq_u8(v, vdupq_n_u8(15)), high = vshrq_n_u8(v, 4);
      w[0] = widen(vget_low_u8(low)), w[1] = widen(vget_high_u8(low));
      w[2] = widen(vget_low_u8(high)), w[3] = widen(vget_high_u8(high));
    } else if constexpr (BITS == 5) {
      alignas(16) int16_t values[kIntegerBlock];
      for (int i = 0; i < kIntegerBlock; ++i) values[i] = int16_t(unpack_value(p, i, 5));
      for (int i = 0; i < 4; ++i) w[i] = vld1q_s16(values + 8 * i);
    } else {
      const uint8x16_t first = vld1q_u8(p), second = vld1q_u8(p + 16);
      w[0] = widen(vget_low_u8(first)), w[1] = widen(vget_high_u8(first));
      w[2] = widen(vget_low_u8(second)), w[3] = widen(vget_high_u8(second));
    }
    return multiply16(w, x);
  }

  static F to_float(S v) { return vcvtq_f32_s32(v); }
  static F zero() { return vdupq_n_f32(0.0f); }
  static F set1(float v) { return vdupq_n_f32(v); }
  static F fma(F a, F b, F c) { return vfmaq_f32(c, a, b); }
  static float hsum(F v) { return vaddvq_f32(v); }
};

#include "kernel_integer_simd.h"

}  // namespace

void integer_columns_neon(const QmmArgs& a, const QuantizedX& x, int n0, int n1) { integer_columns(a, x, n0, n1); }

}  // namespace layerline
