// The vector kernel, written once over a `Simd` type that each instruction-set file defines
// before including this header inside its own anonymous namespace (so no two files share
// an instantiation compiled for different instructions).
//
// Each thread walks its own contiguous block of packed weight rows. One row of x (a decode
// step) is memory bound: the 4-bit GEMV below reads each weight once at the memory's speed.
// Several rows make the product compute bound, so the work per weight is what counts: NB
// weight rows at a time are unpacked and dequantized in registers once per pass of up to MB
// rows of x, whose sums all stay in registers, and the weight rows come in chunks that stay
// in L2 while every pass goes over them (so a call with M rows still reads each weight once
// from memory, and each pass's rows of x stay in L1).
//
// Unpacking: 4-bit and 8-bit rows widen bytes to 32-bit lanes (a 4-bit lane then holds two
// values: low and high nibble). The other widths 2..8 unpack the same general way: a vector
// of L values spans L*bits/8 <= 16 bytes, a byte shuffle puts each value's (at most two)
// bytes in its 32-bit lane, then a shift and a mask leave the value.

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
  walk_row_quads(a, n0, n1, packed_row(a), [&](const uint8_t* const* rows, int n, int count) {
    if (count == 4) {
      gemv4_block<4>(a, rows, xp.data(), xsum.data(), n);
    } else {
      for (int r = 0; r < count; ++r) gemv4_block<1>(a, rows + r, xp.data(), xsum.data(), n + r);
    }
  });
}

// Several rows of x: a draft to verify, a batch of sessions, a prefill chunk.

// One packed row, read a step at a time: L bytes (2L values) of a 4-bit row, L bytes (L
// values) of an 8-bit row, or L values of another width through the byte-shuffle unpacker.
// A 4-bit step's vectors are its low nibbles, then its high ones: values 0, 2, 4.. then
// 1, 3, 5.., so the rows of x are copied into that order once per call (as the GEMV does).
template <int BITS>
struct RowReader {
  static constexpr int vectors_per_step = BITS == 4 ? 2 : 1;
  const uint8_t* p;

  // Vector v of the current step as floats, without scale and bias.
  inline typename Simd::F vector(int v, const Unpacker& u) const {
    if constexpr (BITS == 4) {
      const typename Simd::I packed = Simd::widen(p);
      return Simd::to_float(v == 0 ? Simd::and_int(packed, Simd::set1_int(15)) : Simd::shift_right_4(packed));
    } else if constexpr (BITS == 8) {
      return Simd::to_float(Simd::widen(p));
    } else {
      return u.unpack(p);
    }
  }

  inline void advance(const Unpacker& u) { p += BITS == 4 || BITS == 8 ? Simd::L : u.chunk_bytes; }
};

// NB weight rows from n (packed at rows[r]; s and b: their f32 scales and biases, `groups` a
// row) against MB rows of x from m0, into y. Each weight vector is dequantized once and
// serves MB rows of x; NB x MB sums stay in registers over the whole row.
template <int BITS, int NB, int MB>
inline void rows_pass(const QmmArgs& a, const uint8_t* const* rows, const Unpacker& u, const float* __restrict s,
                      const float* __restrict b, const float* __restrict x, int n, int m0) {
  using F = typename Simd::F;
  constexpr int V = RowReader<BITS>::vectors_per_step, L = Simd::L;
  constexpr bool lookup = BITS == 4 && Simd::has_lookup16;
  const size_t K = size_t(a.K);
  const int groups = a.K / a.group, steps = a.group / (V * L);
  RowReader<BITS> reader[NB];
#pragma GCC unroll 8
  for (int r = 0; r < NB; ++r) reader[r].p = rows[r];
  F acc[NB][MB];
#pragma GCC unroll 8
  for (int r = 0; r < NB; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < MB; ++j) acc[r][j] = Simd::zero();
  x += size_t(m0) * K;
  size_t k = 0;
  for (int g = 0; g < groups; ++g) {
    // With a 16-lane permute, a 4-bit group's 16 possible weights fit in one register: s*q + b
    // for q = 0..15, computed once per group (the same floats as dequantizing each weight), and
    // each weight is then a lookup instead of a conversion and a multiply-add.
    [[maybe_unused]] F table[NB];
    if constexpr (lookup) {
#pragma GCC unroll 8
      for (int r = 0; r < NB; ++r) {
        table[r] = Simd::fma(Simd::iota(), Simd::set1(s[r * groups + g]), Simd::set1(b[r * groups + g]));
      }
    }
    for (int c = 0; c < steps; ++c) {
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) {
        F w[NB];
#pragma GCC unroll 8
        for (int r = 0; r < NB; ++r) {
          if constexpr (lookup) {
            const typename Simd::I packed = Simd::widen(reader[r].p);
            w[r] = Simd::lookup16(v == 0 ? packed : Simd::shift_right_4(packed), table[r]);
          } else {
            w[r] = Simd::fma(reader[r].vector(v, u), Simd::set1(s[r * groups + g]), Simd::set1(b[r * groups + g]));
          }
        }
#pragma GCC unroll 8
        for (int j = 0; j < MB; ++j) {
          const F xv = Simd::load(x + j * K + k);
#pragma GCC unroll 8
          for (int r = 0; r < NB; ++r) acc[r][j] = Simd::fma(w[r], xv, acc[r][j]);
        }
        k += L;
      }
#pragma GCC unroll 8
      for (int r = 0; r < NB; ++r) reader[r].advance(u);
    }
  }
  if constexpr (NB == 4) {
    // The 4 sums of a row of y at once: they are adjacent there.
#pragma GCC unroll 8
    for (int j = 0; j < MB; ++j) Simd::hsum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j], a.y + size_t(m0 + j) * a.N + n);
  } else {
#pragma GCC unroll 8
    for (int r = 0; r < NB; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < MB; ++j) a.y[size_t(m0 + j) * a.N + n + r] = Simd::hsum(acc[r][j]);
  }
}

template <int BITS, int NB>
inline void rows_pass_for(const QmmArgs& a, const uint8_t* const* rows, const Unpacker& u, const float* s,
                          const float* b, const float* x, int n, int m0, int mb) {
  static_assert(Simd::pass_rows <= 4, "rows_pass_for instantiates up to 4 rows of x");
  switch (mb) {
    case 1: return rows_pass<BITS, NB, 1>(a, rows, u, s, b, x, n, m0);
    case 2: return rows_pass<BITS, NB, 2>(a, rows, u, s, b, x, n, m0);
    case 3: return rows_pass<BITS, NB, 3>(a, rows, u, s, b, x, n, m0);
    case 4: return rows_pass<BITS, NB, 4>(a, rows, u, s, b, x, n, m0);
  }
}

template <int BITS, int NB = Simd::block_weight_rows>
inline void rows_product(const QmmArgs& a, int n0, int n1, const float* x) {
  constexpr int MB = Simd::pass_rows;
  const Unpacker u(a.bits);
  const int groups = a.K / a.group;
  // Chunks of about 128 KiB of packed weights: each pass after the first finds the chunk in L2.
  const int chunk = std::max(NB, int((size_t(128) << 10) / a.w_row_bytes) / NB * NB);
  // Rows of x split evenly into passes of at most MB (7 rows: 4 + 3; 9 rows: 3 + 3 + 3).
  const int passes = (a.M + MB - 1) / MB;
  thread_local std::vector<float> scale_buffer;
  std::vector<uint8_t> tail;
  for (int c0 = n0; c0 < n1; c0 += chunk) {
    const int c1 = std::min(n1, c0 + chunk);
    scale_buffer.resize(2 * size_t(c1 - c0) * groups);
    float *s = scale_buffer.data(), *b = s + size_t(c1 - c0) * groups;
    hardware_scales(a.scales, a.scale_type, size_t(c0) * groups, (c1 - c0) * groups, s);
    hardware_scales(a.biases, a.scale_type, size_t(c0) * groups, (c1 - c0) * groups, b);
    // The byte-shuffle unpacker reads 16 bytes from a row's last step: the rows that end
    // within 16 bytes of the weight buffer's end are read from a copy with padding.
    const size_t row_bytes = a.w_row_bytes;
    const int padded = std::max(c0, a.w_total_bytes < 16 ? 0 : int((a.w_total_bytes - 16) / row_bytes));
    if (padded < c1) {
      tail.assign(size_t(c1 - padded) * row_bytes + 16, 0);
      std::memcpy(tail.data(), a.w + size_t(padded) * row_bytes, size_t(c1 - padded) * row_bytes);
    }
    for (int p = 0, m0 = 0; p < passes; ++p) {
      const int m1 = a.M * (p + 1) / passes;
      for (int n = c0; n < c1; n += NB) {
        const int nb = std::min(NB, c1 - n);
        const size_t start = size_t(n) * a.w_row_bytes;
        const uint8_t* rows[NB];
        for (int r = 0; r < nb; ++r) {
          rows[r] = n + r >= padded ? tail.data() + size_t(n + r - padded) * row_bytes : a.w + start + r * row_bytes;
        }
        if (p == 0) {
          // Ask for the rows two blocks ahead now: the hardware prefetcher alone leaves a GEMV
          // waiting on memory (measured at a fifth of the read bandwidth without this).
          const size_t block_bytes = size_t(NB) * a.w_row_bytes, ahead = start + 2 * block_bytes;
          for (size_t line = 0; line < block_bytes && ahead + line < a.w_total_bytes; line += 64) {
            Simd::prefetch(a.w + ahead + line);
          }
        }
        const float *sn = s + size_t(n - c0) * groups, *bn = b + size_t(n - c0) * groups;
        if (nb == NB) {
          rows_pass_for<BITS, NB>(a, rows, u, sn, bn, x, n, m0, m1 - m0);
        } else {
          for (int r = 0; r < nb; ++r) {
            rows_pass_for<BITS, 1>(a, rows + r, u, sn + r * groups, bn + r * groups, x, n + r, m0, m1 - m0);
          }
        }
      }
      m0 = m1;
    }
  }
}

inline void columns(const QmmArgs& a, int n0, int n1) {
  // One row of 4-bit weights: the GEMV, unless a lookup table dequantizes (AVX-512), which
  // measured as fast from memory and a quarter faster in cache.
  if (a.bits == 4 && a.M == 1 && !Simd::has_lookup16) return gemv4(a, n0, n1);
  if (a.bits == 8) return rows_product<8>(a, n0, n1, a.x);
  if (a.bits != 4) return rows_product<0>(a, n0, n1, a.x);
  // x in the 4-bit order: per 2L values, the even ones, then the odd ones.
  constexpr int L = Simd::L;
  std::vector<float> x_buffer(size_t(a.M) * a.K);  // not kept: a prefill chunk's x can be large
  for (int m = 0; m < a.M; ++m) {
    const float* from = a.x + size_t(m) * a.K;
    float* to = x_buffer.data() + size_t(m) * a.K;
    for (int k0 = 0; k0 < a.K; k0 += 2 * L) {
      for (int i = 0; i < L; ++i) {
        to[k0 + i] = from[k0 + 2 * i];
        to[k0 + L + i] = from[k0 + 2 * i + 1];
      }
    }
  }
  // One row (on AVX-512): 8 weight rows a block, for 8 independent sums in flight; measured
  // slower for the other widths.
  if (a.M == 1) return rows_product<4, 2 * Simd::block_weight_rows>(a, n0, n1, x_buffer.data());
  rows_product<4>(a, n0, n1, x_buffer.data());
}
