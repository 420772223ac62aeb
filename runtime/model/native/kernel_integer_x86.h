// The integer GEMV's 256-bit `Simd` for x86, included by kernel_integer_avx2.cpp (maddubs: unsigned
// by signed bytes into 16-bit pairs) and kernel_integer_avx512.cpp (VNNI's vpdpbusd: four products
// straight into 32-bit lanes), each inside its own anonymous namespace.

#include "scale_hardware.h"

struct Simd {
  using B = __m256i;  // 32 bytes: one block
  using S = __m256i;  // 8 int32 sums
  using F = __m256;
#if defined(__AVX512VNNI__)
  static constexpr bool signed8 = false;  // vpdpbusd sums 255 * 127 * 4 without saturating
#else
  // maddubs saturates a pair's sum at 32767: 8-bit weights as q - 128 by x's sign keeps it below.
  static constexpr bool signed8 = true;
#endif

  static B load_x(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

  template <int BITS>
  static B unpack(const uint8_t* p) {
    if constexpr (BITS == 4) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), low = _mm_set1_epi8(15);
      return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
    } else if constexpr (BITS == 5) {
      // Two halves of 16 values in 16-bit lanes, packed to bytes lane by lane.
      return _mm256_packus_epi16(five_bits(p), five_bits(p + 10));
    } else {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return signed8 ? _mm256_xor_si256(v, _mm256_set1_epi8(char(0x80))) : v;
    }
  }

  template <int BITS>
  static S dot(B q, B x) {
#if defined(__AVX512VNNI__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, x);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    if constexpr (BITS == 8) {
      return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(x, q)), ones);
    } else {
      return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones);
    }
#endif
  }

  // int16 x: 16 values a vector, each block's weights widened to 16 bits and multiplied in pairs
  // into 32-bit lanes (pmaddwd; vpdpwssd with VNNI). A block's sum is at most 32 * 255 * 32767.
  struct X16 {
    __m256i first, second;  // the block's values 0-15 and 16-31 in int_block_order
  };
  static X16 load_x16(const int16_t* p) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16))};
  }
  static S madd2(__m256i a, __m256i b, const X16& x) {
#if defined(__AVX512VNNI__)
    return _mm256_dpwssd_epi32(_mm256_madd_epi16(a, x.first), b, x.second);
#else
    return _mm256_add_epi32(_mm256_madd_epi16(a, x.first), _mm256_madd_epi16(b, x.second));
#endif
  }

  template <int BITS>
  static S dot16(const uint8_t* p, const X16& x) {
    if constexpr (BITS == 4) {
      const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      return madd2(_mm256_and_si256(v, _mm256_set1_epi16(15)), _mm256_srli_epi16(v, 4), x);
    } else if constexpr (BITS == 5) {
      return madd2(five_bits(p), five_bits(p + 10), x);
    } else {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return madd2(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(v)), _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v, 1)), x);
    }
  }

  // 16 5-bit values from 10 bytes at p (16 read) into 16-bit lanes, in order: each value's two
  // bytes into its lane, shifted to the lane's top by a multiply and back down by 11.
  static __m256i five_bits(const uint8_t* p) {
    const __m256i control = _mm256_setr_epi8(0, 1, 0, 1, 1, 2, 1, 2, 2, 3, 3, 4, 3, 4, 4, 5,  //
                                             5, 6, 5, 6, 6, 7, 6, 7, 7, 8, 8, 9, 8, 9, 9, 10);
    const __m256i lift = _mm256_setr_epi16(1 << 11, 1 << 6, 1 << 9, 1 << 4, 1 << 7, 1 << 10, 1 << 5, 1 << 8,
                                           1 << 11, 1 << 6, 1 << 9, 1 << 4, 1 << 7, 1 << 10, 1 << 5, 1 << 8);
    const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(bytes, control), lift), 11);
  }

  static F to_float(S v) { return _mm256_cvtepi32_ps(v); }
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
