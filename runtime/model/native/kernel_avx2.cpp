// The AVX2 + FMA path (8 floats a vector), compiled with -mavx2 -mfma; used only when the
// CPU reports both.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernel.h"

namespace layerline {
namespace {

#include "scale_hardware.h"

struct Simd {
  using F = __m256;
  using I = __m256i;
  static constexpr int L = 8;
  // Several rows of x: 2 weight rows x up to 4 rows of x of sums in registers (8 of 16).
  static constexpr int block_weight_rows = 2, pass_rows = 4;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static I load_int(const void* p) { return _mm256_load_si256(static_cast<const __m256i*>(p)); }
  static I set1_int(int v) { return _mm256_set1_epi32(v); }
  static F unpack(const uint8_t* p, I control, I shifts, I mask) {
    const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i lanes = _mm256_shuffle_epi8(bytes, control);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(lanes, shifts), mask));
  }
  static I widen(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static I and_int(I a, I b) { return _mm256_and_si256(a, b); }
  static I shift_right_4(I a) { return _mm256_srli_epi32(a, 4); }
  static F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  static constexpr bool has_lookup16 = false;  // no 16-lane permute
  static F lookup16(I, F table) { return table; }
  static F iota() { return zero(); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static float scale(const void* p, ScaleType type, size_t i) { return hardware_scale_at(p, type, i); }
  static void hsum4(F a, F b, F c, F d, float* out) {
    out[0] = hsum(a), out[1] = hsum(b), out[2] = hsum(c), out[3] = hsum(d);
  }
  static void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

#include "kernel_simd.h"

}  // namespace

void qmm_columns_avx2(const QmmArgs& a, int n0, int n1) { columns(a, n0, n1); }

}  // namespace layerline
