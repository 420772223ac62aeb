// The AVX-512 path (16 floats a vector), compiled with -mavx512f -mavx512bw; used only when
// the CPU reports both.
// GCC 12 warns inside its own AVX-512 headers (their _mm512_undefined_* placeholders) once
// those intrinsics inline into this file's templates: the warning is about the header.
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernel.h"

namespace layerline {
namespace {

#include "scale_hardware.h"

struct Simd {
  using F = __m512;
  using I = __m512i;
  static constexpr int L = 16;
  // Several rows of x: 4 weight rows x up to 4 rows of x of sums in registers (16 of 32), and
  // 4 rows of x (up to K of ~1500) in L1. More rows a pass measured slower here.
  static constexpr int block_weight_rows = 4, pass_rows = 4;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static I load_int(const void* p) { return _mm512_load_si512(p); }
  static I set1_int(int v) { return _mm512_set1_epi32(v); }
  static F unpack(const uint8_t* p, I control, I shifts, I mask) {
    const __m512i bytes = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i lanes = _mm512_shuffle_epi8(bytes, control);
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(lanes, shifts), mask));
  }
  static I widen(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I and_int(I a, I b) { return _mm512_and_si512(a, b); }
  static I shift_right_4(I a) { return _mm512_srli_epi32(a, 4); }
  static F to_float(I a) { return _mm512_cvtepi32_ps(a); }
  // Lane i of `table` at each lane's low 4 bits of `index`.
  static constexpr bool has_lookup16 = true;
  static F lookup16(I index, F table) { return _mm512_permutexvar_ps(index, table); }
  static F iota() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static float scale(const void* p, ScaleType type, size_t i) { return hardware_scale_at(p, type, i); }
  // The sums of a, b, c and d into out[0..3]: pairs of vectors folded together, 13 operations
  // instead of 4 x 8.
  static void hsum4(F a, F b, F c, F d, float* out) {
    const F ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a02 b02 a13 b13
    const F cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    F v = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));  // a b c d per 128 bits
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
    _mm_storeu_ps(out, _mm512_castps512_ps128(v));
  }
  static void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
  // In-register halving (GCC 12's _mm512_reduce_add_ps warns inside its own header).
  static float hsum(F v) {
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
    __m128 s = _mm512_castps512_ps128(v);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

#include "kernel_simd.h"

}  // namespace

void qmm_columns_avx512(const QmmArgs& a, int n0, int n1) { columns(a, n0, n1); }

}  // namespace layerline
