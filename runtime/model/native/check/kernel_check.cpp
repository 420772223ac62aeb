// Every vector path compiled for this machine against the portable path, without mlx: random
// packed weights for every bits, group, scale type and 1..32 rows of x, an odd number of
// weight rows (tails of every block size), split in two column ranges as two threads would.
// Built and run by scripts/check_cpu_kernel.sh, natively or cross-compiled for arm64 under qemu.
// Exit status 0 when every path is within 1e-4 relative error of the portable one, and every
// integer GEMV path, portable included, within kInt8MaxRelativeError (int8 x) or
// kInt16MaxRelativeError (int16 x) of the f32 product
// and kInt8Agreement of the portable integer path (their integer sums are exact; only the float
// rounding differs).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../kernel.h"
#include "../kernel_integer.h"

namespace {

using namespace layerline;

constexpr double kMaxRelativeError = 1e-4;
// x rounded to 8 bits per block of 32: each product off by up to 1/254 of its block's largest |x|.
constexpr double kInt8MaxRelativeError = 2e-2;
constexpr double kInt16MaxRelativeError = 1e-4;  // x to 1/65534 of its block's largest: as the f32 paths
constexpr double kInt8Agreement = 1e-5;
// Many rows: x to 1/16382 of its span's largest, scales to 1/2046 of their span's largest.
constexpr double kIntegerRowsMaxRelativeError = 1e-3;

struct IntegerPath {
  const char* name;
  IntegerColumns columns;
};

std::vector<IntegerPath> integer_paths() {
  std::vector<IntegerPath> paths{{"portable", integer_columns_portable}};
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) paths.push_back({"avx2", integer_columns_avx2});
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) {
    paths.push_back({"avx512-vnni", integer_columns_avx512vnni});
  }
#endif
#if defined(__aarch64__)
  paths.push_back({"neon", integer_columns_neon});
#endif
  return paths;
}

struct RowsPath {
  const char* name;
  void (*quantize)(const QmmArgs&, QuantizedRows&);
  IntegerRows rows;
};

std::vector<RowsPath> integer_rows_paths() {
  std::vector<RowsPath> paths{{"portable", quantize_rows, integer_rows_portable}};
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) {
    paths.push_back({"avx512-vnni", quantize_rows_avx512, integer_rows_avx512vnni});
  }
#endif
  return paths;
}

struct Path {
  const char* name;
  QmmColumns columns;
};

std::vector<Path> vector_paths() {
  std::vector<Path> paths;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) paths.push_back({"avx2", qmm_columns_avx2});
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
    paths.push_back({"avx512", qmm_columns_avx512});
  }
#endif
#if defined(__aarch64__)
  paths.push_back({"neon", qmm_columns_neon});
#endif
  return paths;
}

// A half with a random sign and mantissa and a magnitude in [2^-5, 1).
uint16_t random_half(std::mt19937& rng) {
  const uint32_t sign = rng() & 1u, exponent = 10 + rng() % 5, mantissa = rng() & 0x3ffu;
  return uint16_t(sign << 15 | exponent << 10 | mantissa);
}

// The top half of a float's bits: a bf16 value near it.
uint16_t bf16_of(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return uint16_t(bits >> 16);
}

struct Case {
  int N, K, M, bits, group;
  ScaleType type;
  std::vector<uint8_t> w;
  std::vector<float> x, scales32, biases32;
  std::vector<uint16_t> scales16, biases16;

  QmmArgs args(float* y) const {
    QmmArgs a{};
    a.x = x.data();
    a.w = w.data();
    a.scale_type = type;
    a.scales = type == ScaleType::f32 ? static_cast<const void*>(scales32.data()) : scales16.data();
    a.biases = type == ScaleType::f32 ? static_cast<const void*>(biases32.data()) : biases16.data();
    a.y = y;
    a.M = M, a.N = N, a.K = K, a.bits = bits, a.group = group;
    a.w_row_bytes = size_t(K) * bits / 8;
    a.w_total_bytes = size_t(N) * a.w_row_bytes;
    return a;
  }
};

Case make_case(std::mt19937& rng, int N, int K, int M, int bits, int group, ScaleType type) {
  Case c{N, K, M, bits, group, type, {}, {}, {}, {}, {}, {}};
  // Exactly the packed bytes, no slack: a path that reads past the weights reads past the buffer.
  c.w.resize(size_t(N) * K * bits / 8);
  for (auto& b : c.w) b = uint8_t(rng());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  c.x.resize(size_t(M) * K);
  for (auto& v : c.x) v = normal(rng);
  const size_t groups = size_t(N) * K / group;
  for (size_t i = 0; i < groups; ++i) {
    const float s = half_to_float(random_half(rng)), b = half_to_float(random_half(rng));
    c.scales32.push_back(s);
    c.biases32.push_back(b);
    c.scales16.push_back(type == ScaleType::bf16 ? bf16_of(s) : random_half(rng));
    c.biases16.push_back(type == ScaleType::bf16 ? bf16_of(b) : random_half(rng));
  }
  return c;
}

// Columns [0, split) and [split, N) as two threads would take them (split on a 4-row block).
std::vector<float> run(QmmColumns columns, const Case& c) {
  std::vector<float> y(size_t(c.M) * c.N, NAN);
  const QmmArgs a = c.args(y.data());
  const int split = (c.N / 2) / 4 * 4;
  columns(a, 0, split);
  columns(a, split, c.N);
  return y;
}

// The integer GEMV as the dispatch runs it: x quantized once, two column ranges.
std::vector<float> run_integer(IntegerColumns columns, const Case& c, int xbits) {
  std::vector<float> y(size_t(c.N), NAN);
  const QmmArgs a = c.args(y.data());
  QuantizedX x;
  quantize_x(a, xbits, x);
  const int split = (c.N / 2) / 4 * 4;
  columns(a, x, 0, split);
  columns(a, x, split, c.N);
  return y;
}

// The many-row integer path as the dispatch runs it: every row of x quantized once, two column ranges.
// Its quantizer must give the portable one's integers and scales exactly (else y is NaN).
std::vector<float> run_integer_rows(const RowsPath& path, const Case& c) {
  std::vector<float> y(size_t(c.M) * c.N, NAN);
  const QmmArgs a = c.args(y.data());
  QuantizedRows x, reference;
  path.quantize(a, x);
  quantize_rows(a, reference);
  if (!std::equal(x.q, x.q + size_t(c.M) * c.K, reference.q) || x.scale != reference.scale) {
    std::printf("%s: x quantized otherwise than the portable quantizer\n", path.name);
    return y;
  }
  const int split = (c.N / 2) / 4 * 4;
  path.rows(a, x, 0, split);
  path.rows(a, x, split, c.N);
  return y;
}

double relative_error(const std::vector<float>& got, const std::vector<float>& ref) {
  double diff = 0.0, scale = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    diff = std::max(diff, double(std::fabs(got[i] - ref[i])));
    scale = std::max(scale, double(std::fabs(ref[i])));
  }
  return diff / scale;
}

}  // namespace

int main() {
  std::mt19937 rng(15);
  const ScaleType types[] = {ScaleType::f32, ScaleType::f16, ScaleType::bf16};
  const char* type_names[] = {"f32", "f16", "bf16"};
  int failures = 0, cases = 0;
  for (const IntegerPath& path : integer_paths()) {
    for (int xbits : {8, 16}) {
      const double tolerance = xbits == 8 ? kInt8MaxRelativeError : kInt16MaxRelativeError;
      double worst = 0.0, worst_agreement = 0.0;
      for (int bits : {4, 5, 8}) {
        for (int group : {32, 64, 128}) {
          // Odd row counts (every tail), one group a row, a tall wide matrix, and rows whose groups end
          // off a 16-group step (AVX-512's 4-bit rows with f16 scales: 38 x 1664).
          for (const auto& [N, K] : {std::pair{37, 5 * group}, std::pair{37, group}, std::pair{413, 2048},
                                     std::pair{38, 1664}}) {
            const int t = (bits + group / 32 + N) % 3;
            const Case c = make_case(rng, N, K, 1, bits, group, types[t]);
            const auto got = run_integer(path.columns, c, xbits);
            const double err = relative_error(got, run(qmm_columns_portable, c));
            const double agreement = relative_error(got, run_integer(integer_columns_portable, c, xbits));
            worst = std::max(worst, err);
            worst_agreement = std::max(worst_agreement, agreement);
            ++cases;
            if (!(err <= tolerance) || !(agreement <= kInt8Agreement)) {
              ++failures;
              std::printf("FAIL int%d x %s %dx%d bits=%d group=%d scales=%s: relative error %.3g (%.3g from portable)\n",
                          xbits, path.name, N, K, bits, group, type_names[t], err, agreement);
            }
          }
        }
      }
      std::printf("int%d x %s: worst relative error %.3g against the f32 product, %.3g against portable\n", xbits,
                  path.name, worst, worst_agreement);
    }
  }
  for (const RowsPath& path : integer_rows_paths()) {
    double worst = 0.0, worst_agreement = 0.0;
    for (int group : {32, 64, 128}) {
      // A tail span of 64 (576), one whole span (512), a tail of 128 off a 16-group step (1664), taller
      // (one row count: the portable path is slow under qemu).
      for (const auto& [N, K] : {std::pair{37, 576}, std::pair{37, 512}, std::pair{38, 1664}, std::pair{413, 2048}}) {
        if (K % group != 0) continue;
        for (int M : N > 100 ? std::vector<int>{9} : std::vector<int>{2, 3, 8, 17}) {
          const int t = (M + group / 32 + N) % 3;
          const Case c = make_case(rng, N, K, M, 4, group, types[t]);
          const auto got = run_integer_rows(path, c);
          const double err = relative_error(got, run(qmm_columns_portable, c));
          const double agreement = relative_error(got, run_integer_rows(integer_rows_paths()[0], c));
          worst = std::max(worst, err);
          worst_agreement = std::max(worst_agreement, agreement);
          ++cases;
          if (!(err <= kIntegerRowsMaxRelativeError) || !(agreement <= kInt8Agreement)) {
            ++failures;
            std::printf("FAIL integer rows %s %dx%d rows=%d group=%d scales=%s: relative error %.3g (%.3g from "
                        "portable)\n", path.name, N, K, M, group, type_names[t], err, agreement);
          }
        }
      }
    }
    std::printf("integer rows %s: worst relative error %.3g against the f32 product, %.3g against portable\n",
                path.name, worst, worst_agreement);
  }
  const auto paths = vector_paths();
  if (paths.empty()) std::printf("no vector path on this CPU: nothing to compare\n");
  for (const Path& path : paths) {
    double worst = 0.0;
    for (int bits : {2, 3, 4, 5, 6, 8}) {
      for (int group : {32, 64, 128}) {
        for (int M = 1; M <= 32; ++M) {
          const int t = (M + bits + group / 32) % 3;
          const Case c = make_case(rng, 37, 384, M, bits, group, types[t]);
          const double err = relative_error(run(path.columns, c), run(qmm_columns_portable, c));
          worst = std::max(worst, err);
          ++cases;
          if (!(err <= kMaxRelativeError)) {
            ++failures;
            std::printf("FAIL %s bits=%d group=%d rows=%d scales=%s: relative error %.3g\n", path.name, bits,
                        group, M, type_names[t], err);
          }
        }
      }
    }
    // Wider and taller matrices: several L2 chunks of weight rows per thread, ending off a block.
    for (int bits : {3, 4, 8}) {
      for (int M : {1, 5, 9}) {
        const Case c = make_case(rng, 413, 2048, M, bits, 64, ScaleType::f16);
        const double err = relative_error(run(path.columns, c), run(qmm_columns_portable, c));
        worst = std::max(worst, err);
        ++cases;
        if (!(err <= kMaxRelativeError)) {
          ++failures;
          std::printf("FAIL %s 413x2048 bits=%d rows=%d: relative error %.3g\n", path.name, bits, M, err);
        }
      }
    }
    // One group a row (32 values, 8 or 12 bytes): the unpacker's 16-byte loads near the end.
    for (int bits : {2, 3, 5}) {
      for (int M : {1, 3, 6}) {
        const Case c = make_case(rng, 37, 32, M, bits, 32, ScaleType::f32);
        const double err = relative_error(run(path.columns, c), run(qmm_columns_portable, c));
        worst = std::max(worst, err);
        ++cases;
        if (!(err <= kMaxRelativeError)) {
          ++failures;
          std::printf("FAIL %s 37x32 bits=%d rows=%d: relative error %.3g\n", path.name, bits, M, err);
        }
      }
    }
    std::printf("%s: worst relative error %.3g against portable\n", path.name, worst);
  }
  std::printf("%d cases, %d failed\n", cases, failures);
  return failures ? 1 : 0;
}
