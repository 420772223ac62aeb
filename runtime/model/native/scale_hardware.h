// Element i of a scales or biases array as f32, f16 through the hardware conversion (F16C on
// x86, NEON on arm64) rather than kernel.h's software `scale_at`. Included inside each vector
// file's anonymous namespace, after its intrinsics header: every file is built with its own flags,
// so each keeps a copy of its own.
#pragma once

inline float hardware_scale_at(const void* p, ScaleType type, size_t i) {
  if (type == ScaleType::f32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
#if defined(__F16C__)
  if (type == ScaleType::f16) return _cvtsh_ss(h);
#elif defined(__ARM_NEON)
  if (type == ScaleType::f16) return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
#else
#error "scale_hardware.h is for files built with F16C or NEON"
#endif
  const uint32_t bits = uint32_t(h) << 16;  // bf16: the high half of an f32
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Elements i0 .. i0 + count of a scales or biases array as f32 into out: a row's scales widened
// at once, eight (F16C) or four (NEON) a conversion, so the GEMV's inner loop reads floats.
inline void hardware_scales(const void* p, ScaleType type, size_t i0, int count, float* out) {
  int i = 0;
  if (type == ScaleType::f16) {
    const uint16_t* h = static_cast<const uint16_t*>(p) + i0;
#if defined(__F16C__)
    for (; i + 8 <= count; i += 8) {
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
    }
#elif defined(__ARM_NEON)
    for (; i + 4 <= count; i += 4) vst1q_f32(out + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + i))));
#endif
  }
  for (; i < count; ++i) out[i] = hardware_scale_at(p, type, i0 + i);
}
