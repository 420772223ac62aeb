// The vector kernel, written once over a `Simd` type that each instruction-set file defines
// before including this header inside its own anonymous namespace (so no two files share
// an instantiation compiled for different instructions).
//
// Memory-bound by design: each thread walks its own contiguous block of packed weight rows
// once; a few rows (NB) at a time are unpacked to floats in registers and applied to up to
// MB rows of x, so a call with M rows still reads each weight once from memory. Every
// packed width 2..8 unpacks the same way: a vector of L values spans L*bits/8 <= 16 bytes,
// a byte shuffle puts each value's (at most two) bytes in its 32-bit lane, then a shift
// and a mask leave the value.

constexpr int kMaxRowsPerPass = Simd::max_rows;

struct Unpacker {
  typename Simd::I control, shifts, mask;
  int chunk_bytes;

  explicit Unpacker(int bits) : chunk_bytes(Simd::L * bits / 8) {
    alignas(64) uint8_t ctl[Simd::L * 4];
    alignas(64) int32_t sh[Simd::L];
    for (int i = 0; i < Simd::L; ++i) {
      const int bit = i * bits, byte = bit >> 3, shift = bit & 7;
      sh[i] = shift;
      ctl[4 * i] = uint8_t(byte);
      ctl[4 * i + 1] = shift + bits > 8 ? uint8_t(byte + 1) : 0x80;
      ctl[4 * i + 2] = 0x80;
      ctl[4 * i + 3] = 0x80;
    }
    control = Simd::load_int(ctl);
    shifts = Simd::load_int(sh);
    mask = Simd::set1_int((1 << bits) - 1);
  }

  // The L values packed at `p`, as floats (16 bytes at `p` must be readable).
  inline typename Simd::F unpack(const uint8_t* p) const {
    return Simd::unpack(p, control, shifts, mask);
  }
};

// NB packed rows (n..n+NB) against MB rows of x (m0..m0+MB).
template <int NB, int MB>
inline void block(const QmmArgs& a, const uint8_t* const* rows, const Unpacker& u, int n, int m0) {
  using F = typename Simd::F;
  F acc[NB][MB];
#pragma GCC unroll 8
  for (int r = 0; r < NB; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < MB; ++j) acc[r][j] = Simd::zero();
  const int groups = a.K / a.group, per_group = a.group / Simd::L;
  const float* x = a.x + size_t(m0) * a.K;
  size_t offset = 0;
  int k = 0;
  for (int g = 0; g < groups; ++g) {
    F s[NB], b[NB];
#pragma GCC unroll 8
    for (int r = 0; r < NB; ++r) {
      s[r] = Simd::set1(Simd::scale(a.scales, a.scale_type, size_t(n + r) * groups + g));
      b[r] = Simd::set1(Simd::scale(a.biases, a.scale_type, size_t(n + r) * groups + g));
    }
    for (int c = 0; c < per_group; ++c) {
      F w[NB];
#pragma GCC unroll 8
      for (int r = 0; r < NB; ++r) w[r] = Simd::fma(u.unpack(rows[r] + offset), s[r], b[r]);
#pragma GCC unroll 8
      for (int j = 0; j < MB; ++j) {
        const F xv = Simd::load(x + size_t(j) * a.K + k);
#pragma GCC unroll 8
        for (int r = 0; r < NB; ++r) acc[r][j] = Simd::fma(w[r], xv, acc[r][j]);
      }
      offset += u.chunk_bytes;
      k += Simd::L;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NB; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < MB; ++j) a.y[size_t(m0 + j) * a.N + n + r] = Simd::hsum(acc[r][j]);
}

template <int NB>
inline void pass_rows(const QmmArgs& a, const uint8_t* const* rows, const Unpacker& u, int n, int m0, int mb) {
  switch (mb) {
#define LAYERLINE_CASE(R) \
  case R:                 \
    return block<NB, R>(a, rows, u, n, m0);
    LAYERLINE_CASE(1) LAYERLINE_CASE(2) LAYERLINE_CASE(3) LAYERLINE_CASE(4)
#if SIMD_MAX_ROWS > 4
    LAYERLINE_CASE(5) LAYERLINE_CASE(6) LAYERLINE_CASE(7) LAYERLINE_CASE(8)
#endif
#undef LAYERLINE_CASE
  }
}

// One row of x against 4-bit weights (a decode step): L packed bytes widen to L lanes whose low
// nibbles are the even values and high nibbles the odd ones, so x is reordered to match once
// per call, and each group's scale and bias apply once to its sums (sum(q*x)*s + b*sum(x))
// instead of to every weight: half the vector work of the general path.
template <int NB>
inline void gemv4_block(const QmmArgs& a, const uint8_t* const* rows, const float* xp, const float* xsum,
                        int n) {
  using F = typename Simd::F;
  constexpr int L = Simd::L;
  const int groups = a.K / a.group, blocks = a.group / (2 * L);
  const typename Simd::I low = Simd::set1_int(15);
  F total[NB];
  float bias[NB];
#pragma GCC unroll 4
  for (int r = 0; r < NB; ++r) {
    total[r] = Simd::zero();
    bias[r] = 0.0f;
  }
  size_t byte = 0;
  int k = 0;
  for (int g = 0; g < groups; ++g) {
    F lo[NB], hi[NB];
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) lo[r] = hi[r] = Simd::zero();
    for (int b = 0; b < blocks; ++b) {
      const F xe = Simd::load(xp + k), xo = Simd::load(xp + k + L);
#pragma GCC unroll 4
      for (int r = 0; r < NB; ++r) {
        const typename Simd::I v = Simd::widen(rows[r] + byte);
        lo[r] = Simd::fma(Simd::to_float(Simd::and_int(v, low)), xe, lo[r]);
        hi[r] = Simd::fma(Simd::to_float(Simd::shift_right_4(v)), xo, hi[r]);
      }
      byte += L;
      k += 2 * L;
    }
#pragma GCC unroll 4
    for (int r = 0; r < NB; ++r) {
      total[r] = Simd::fma(Simd::add(lo[r], hi[r]), Simd::set1(Simd::scale(a.scales, a.scale_type, size_t(n + r) * groups + g)), total[r]);
      bias[r] += Simd::scale(a.biases, a.scale_type, size_t(n + r) * groups + g) * xsum[g];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NB; ++r) a.y[n + r] = Simd::hsum(total[r]) + bias[r];
}

inline void gemv4(const QmmArgs& a, int n0, int n1) {
  constexpr int L = Simd::L;
  const int groups = a.K / a.group;
  std::vector<float> xp(a.K), xsum(groups, 0.0f);
  for (int k0 = 0; k0 < a.K; k0 += 2 * L) {
    for (int i = 0; i < L; ++i) {
      xp[k0 + i] = a.x[k0 + 2 * i];
      xp[k0 + L + i] = a.x[k0 + 2 * i + 1];
    }
  }
  for (int k = 0; k < a.K; ++k) xsum[k / a.group] += a.x[k];
  for (int n = n0; n < n1; n += 4) {
    const int nb = std::min(4, n1 - n);
    const uint8_t* rows[4];
    for (int r = 0; r < nb; ++r) rows[r] = a.w + size_t(n + r) * a.w_row_bytes;
    // The rows two blocks ahead, as in the general path.
    const size_t block_bytes = 4 * a.w_row_bytes, ahead = size_t(n) * a.w_row_bytes + 2 * block_bytes;
    for (size_t line = 0; line < block_bytes && ahead + line < a.w_total_bytes; line += 64) {
      Simd::prefetch(a.w + ahead + line);
    }
    if (nb == 4) {
      gemv4_block<4>(a, rows, xp.data(), xsum.data(), n);
    } else {
      for (int r = 0; r < nb; ++r) gemv4_block<1>(a, rows + r, xp.data(), xsum.data(), n + r);
    }
  }
}

inline void columns(const QmmArgs& a, int n0, int n1) {
  if (a.M == 1 && a.bits == 4) return gemv4(a, n0, n1);
  const Unpacker u(a.bits);
  // Several weight rows at once: each x vector loaded serves all of them (x of many rows
  // does not fit L1), and one row of x still has independent FMA chains in flight.
  const int step = Simd::weight_rows(a.M);
  // The last rows of the matrix are copied with 16 bytes of padding, so a vector load at
  // their end never reads past the weight buffer.
  std::vector<uint8_t> tail;
  for (int n = n0; n < n1; n += step) {
    const int nb = std::min(step, n1 - n);
    const uint8_t* rows[4];
    const size_t start = size_t(n) * a.w_row_bytes;
    const bool near_end = start + size_t(nb) * a.w_row_bytes + 16 > a.w_total_bytes;
    if (near_end) {
      tail.assign(size_t(nb) * a.w_row_bytes + 16, 0);
      std::memcpy(tail.data(), a.w + start, size_t(nb) * a.w_row_bytes);
    }
    for (int r = 0; r < nb; ++r) {
      rows[r] = (near_end ? tail.data() : a.w + start) + size_t(r) * a.w_row_bytes;
    }
    // Ask for the rows two blocks ahead now: the hardware prefetcher alone leaves a GEMV
    // waiting on memory (measured at a fifth of the read bandwidth without this).
    const size_t block_bytes = size_t(step) * a.w_row_bytes;
    const size_t ahead = start + 2 * block_bytes;
    for (size_t line = 0; line < block_bytes && ahead + line < a.w_total_bytes; line += 64) {
      Simd::prefetch(a.w + ahead + line);
    }
    for (int m0 = 0; m0 < a.M; m0 += kMaxRowsPerPass) {
      const int mb = std::min(kMaxRowsPerPass, a.M - m0);
      if (nb == 4) {
        pass_rows<4>(a, rows, u, n, m0, mb);
      } else if (nb == 2) {
        pass_rows<2>(a, rows, u, n, m0, mb);
      } else {
        for (int r = 0; r < nb; ++r) pass_rows<1>(a, rows + r, u, n + r, m0, mb);
      }
    }
  }
}
