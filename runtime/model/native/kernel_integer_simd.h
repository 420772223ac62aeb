// The integer GEMV, written once over a `Simd` type that each instruction-set file defines
// before including this header inside its own anonymous namespace (as kernel_simd.h is used).
// `Simd` gives: B, a block of 32 bytes; S, a vector of int32 sums; F, a vector of floats;
// unpack<BITS>(p) (one block of 32 packed values at p as bytes, in int_block_order);
// dot<BITS>(q, x) (the block's products q*x summed into S's lanes); load_x; to_float; fma;
// set1; zero; hsum; for int16 x, X16 (a block of it), load_x16 and
// dot16<BITS>(p, x) (unpacking and multiplying at once); and signed8: whether unpack<8> leaves q - 128 (for a
// signed-by-signed multiply), which centres 8-bit products itself: the bias then takes 128 * s
// with x's exact sum, where the other widths add s * x.centre (see kernel_integer.h).
//
// Four weight rows at a time share each block of x; the block's integer sums become floats
// once and are scaled by s * dx, so per 32 weights the work is an unpack, a multiply-add
// chain of integers, one conversion and one float multiply-add.

// Packed bytes a block of 32 values spans, and how far past its end unpack<BITS> may read.
template <int BITS>
constexpr int block_bytes = kIntegerBlock * BITS / 8;
template <int BITS>
constexpr int block_overread = BITS == 5 ? 6 : 0;

// Row n's factor s * dx for every block of x into sdx, and its bias term (the sum over groups of
// b * x's sum + s * x.centre, see kernel_integer.h): the row's scales and biases are widened once
// per row here, not one by one per block inside the loop of multiply-adds.
template <int BITS, int XBITS>
inline float row_factors(const QmmArgs& a, const QuantizedX& x, size_t n, float* sdx, float* widened) {
  const int groups = a.K / a.group, per_group = a.group / kIntegerBlock;
  constexpr bool centred = BITS == 8 && XBITS == 8 && Simd::signed8;
  float* s = widened;
  float* b = widened + groups;
  hardware_scales(a.scales, a.scale_type, n * groups, groups, s);
  hardware_scales(a.biases, a.scale_type, n * groups, groups, b);
  const auto term = [&](int g) {
    return centred ? (b[g] + 128.0f * s[g]) * x.sum[g] : b[g] * x.sum[g] + s[g] * x.centre[g];
  };
  float p0 = 0.0f, p1 = 0.0f, p2 = 0.0f, p3 = 0.0f;  // four chains, in registers: not one long dependency
  int g = 0;
  for (; g + 4 <= groups; g += 4) {
    p0 += term(g);
    p1 += term(g + 1);
    p2 += term(g + 2);
    p3 += term(g + 3);
  }
  for (; g < groups; ++g) p0 += term(g);
  if (per_group == 1) {
    for (int j = 0; j < groups; ++j) sdx[j] = s[j] * x.scale[j];
  } else {
    for (int g = 0; g < groups; ++g) {
      for (int p = 0; p < per_group; ++p) sdx[g * per_group + p] = s[g] * x.scale[g * per_group + p];
    }
  }
  return (p0 + p1) + (p2 + p3);
}

// Scratch for row_factors, per thread and kept between calls: 4 rows' factors (sdx, K / 32 each)
// and one row's widened scales and biases (2 * groups).
struct RowScratch {
  float* sdx;
  float* widened;
};
inline RowScratch row_scratch(const QmmArgs& a) {
  thread_local std::vector<float> scratch;
  const size_t blocks = a.K / kIntegerBlock;
  scratch.resize(4 * blocks + 2 * size_t(a.K / a.group));
  return {scratch.data(), scratch.data() + 4 * blocks};
}

// NB weight rows from row n against x: sdx holds NB rows of K / 32 factors, widened 2 * groups floats.
template <int BITS, int XBITS, int NB>
inline void int_rows(const QmmArgs& a, const QuantizedX& x, const uint8_t* const* rows, int n, float* sdx,
                     float* widened) {
  using F = typename Simd::F;
  const int blocks = a.K / kIntegerBlock;
  F acc[NB];
  float bias[NB];
  const float* factor[NB];
#pragma GCC unroll 4
  for (int r = 0; r < NB; ++r) {
    acc[r] = Simd::zero();
    factor[r] = sdx + size_t(r) * blocks;
    bias[r] = row_factors<BITS, XBITS>(a, x, size_t(n + r), sdx + size_t(r) * blocks, widened);
  }
  for (int j = 0; j < blocks; ++j) {
    const size_t byte = size_t(j) * block_bytes<BITS>;
    if constexpr (XBITS == 8) {
      const typename Simd::B xv = Simd::load_x(x.q.data() + size_t(j) * kIntegerBlock);
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        const typename Simd::S sums = Simd::template dot<BITS>(Simd::template unpack<BITS>(rows[r] + byte), xv);
        acc[r] = Simd::fma(Simd::to_float(sums), Simd::set1(factor[r][j]), acc[r]);
      }
    } else {
      const typename Simd::X16 xv = Simd::load_x16(x.q16.data() + size_t(j) * kIntegerBlock);
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        const typename Simd::S sums = Simd::template dot16<BITS>(rows[r] + byte, xv);
        acc[r] = Simd::fma(Simd::to_float(sums), Simd::set1(factor[r][j]), acc[r]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NB; ++r) a.y[n + r] = Simd::hsum(acc[r]) + bias[r];
}

template <int BITS, int XBITS>
inline void int_gemv(const QmmArgs& a, const QuantizedX& x, int n0, int n1) {
  // Rows whose last block's read would pass the weights' end are read from a padded copy.
  std::vector<uint8_t> tail;
  int padded = n1;
  if constexpr (block_overread<BITS> > 0) {
    const size_t row_bytes = a.w_row_bytes;
    while (padded > n0 && size_t(padded) * row_bytes + block_overread<BITS> > a.w_total_bytes) --padded;
    if (padded < n1) {
      tail.assign(size_t(n1 - padded) * row_bytes + block_overread<BITS>, 0);
      std::memcpy(tail.data(), a.w + size_t(padded) * row_bytes, size_t(n1 - padded) * row_bytes);
    }
  }
  const RowScratch scratch = row_scratch(a);
  float* sdx = scratch.sdx;
  float* widened = scratch.widened;
  const auto row_at = [&](int n) {
    return n >= padded ? tail.data() + size_t(n - padded) * a.w_row_bytes : a.w + size_t(n) * a.w_row_bytes;
  };
  walk_row_quads(a, n0, n1, row_at, [&](const uint8_t* const* rows, int n, int count) {
    if (count == 4) {
      int_rows<BITS, XBITS, 4>(a, x, rows, n, sdx, widened);
    } else {
      for (int r = 0; r < count; ++r) int_rows<BITS, XBITS, 1>(a, x, rows + r, n + r, sdx, widened);
    }
  });
}

template <int XBITS>
inline void int_columns_for(const QmmArgs& a, const QuantizedX& x, int n0, int n1) {
  if (a.bits == 4) return int_gemv<4, XBITS>(a, x, n0, n1);
  if (a.bits == 5) return int_gemv<5, XBITS>(a, x, n0, n1);
  int_gemv<8, XBITS>(a, x, n0, n1);
}

inline void integer_columns(const QmmArgs& a, const QuantizedX& x, int n0, int n1) {
  if (x.xbits == 8) return int_columns_for<8>(a, x, n0, n1);
  int_columns_for<16>(a, x, n0, n1);
}
