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
