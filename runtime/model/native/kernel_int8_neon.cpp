// The integer GEMV on arm64: sdot (vdotq_s32) where the compiler targets the dot-product
// extension, else NEON's widening multiply and pairwise add (every arm64 CPU has those). Weights
// are multiplied as signed bytes: 4- and 5-bit values fit, 8-bit ones as q - 128. 5-bit blocks
// unpack in scalar code (no arm64 machine here measured a vector unpacking worth its code).
#include <arm_neon.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernel_int8.h"

namespace layerline {
namespace {

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
      alignas(16) int8_t bytes[kInt8Block];
      for (int i = 0; i < kInt8Block; ++i) bytes[i] = int8_t(unpack_value(p, int8_block_order(5, i), 5));
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

  static F to_float(S v) { return vcvtq_f32_s32(v); }
  static F zero() { return vdupq_n_f32(0.0f); }
  static F set1(float v) { return vdupq_n_f32(v); }
  static F fma(F a, F b, F c) { return vfmaq_f32(c, a, b); }
  static float hsum(F v) { return vaddvq_f32(v); }
  static float scale(const void* p, ScaleType type, size_t i) {
    if (type == ScaleType::f32) return static_cast<const float*>(p)[i];
    const uint16_t h = static_cast<const uint16_t*>(p)[i];
    if (type == ScaleType::f16) return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
    const uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static void prefetch(const uint8_t* p) { __builtin_prefetch(p, 0, 3); }
};

#include "kernel_int8_simd.h"

}  // namespace

void int8_columns_neon(const QmmArgs& a, const QuantizedX& x, int n0, int n1) { int8_columns(a, x, n0, n1); }

}  // namespace layerline
