#include "quantized_matmul.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>

#include "kernel.h"
#include "kernel_integer.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/utils.h"
#include "pool.h"

namespace layerline {

namespace {

// Below this many packed bytes a product runs on one thread: waking the others costs more.
constexpr size_t kBytesPerExtraThread = 256 * 1024;

struct Isa {
  QmmColumns columns;
  const char* name;
  IntegerColumns integer_columns;  // the integer GEMV on the same instruction set
  const char* integer_name;
  IntegerRows integer_rows = nullptr;  // many rows of x in integers, where the instruction set has them
  void (*quantize_rows)(const QmmArgs&, QuantizedRows&) = nullptr;  // and their x
};

Isa choose_isa() {
  // LAYERLINE_KERNEL_ISA=portable|avx2|avx512|neon forces a path (tests run each); an unsupported
  // choice falls back to the best the CPU has.
  const char* forced = std::getenv("LAYERLINE_KERNEL_ISA");
  const std::string want = forced ? forced : "";
  const Isa portable{qmm_columns_portable, "portable", integer_columns_portable, "portable"};
  if (want == "portable") return portable;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  // The integer path's multiply-add: VNNI's where the CPU has it (on 256-bit vectors), else AVX2's.
  const bool vnni = avx512 && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  const Isa with_avx2{qmm_columns_avx2, "avx2", integer_columns_avx2, "avx2"};
  const Isa with_avx512 = vnni ? Isa{qmm_columns_avx512, "avx512", integer_columns_avx512vnni, "avx512-vnni",
                                     integer_rows_avx512vnni, quantize_rows_avx512}
                               : Isa{qmm_columns_avx512, "avx512", integer_columns_avx2, "avx2"};
  if (avx512 && (want.empty() || want == "avx512")) return with_avx512;
  if (avx2 && want != "avx512") return with_avx2;
  if (avx512) return with_avx512;
  if (avx2) return with_avx2;
#endif
#if defined(__aarch64__)
  // Every arm64 CPU has NEON: the only choice is forcing the portable path above.
#if defined(__ARM_FEATURE_DOTPROD)
  return {qmm_columns_neon, "neon", integer_columns_neon, "neon-sdot"};
#else
  return {qmm_columns_neon, "neon", integer_columns_neon, "neon"};
#endif
#endif
  return portable;
}

const Isa& isa() {
  static const Isa chosen = choose_isa();
  return chosen;
}

// x of one-row 4-, 5- and 8-bit products: 0 (f32), 8 or 16 (the integer path), set by cpu_kernel.py
// from LAYERLINE_CPU_INTEGER_X.
std::atomic<int> gemv_x_bits{0};
// Products of 8 or more rows of 4-bit weights in integers (the path for many rows), set by
// cpu_kernel.py from LAYERLINE_CPU_INTEGER_ROWS: off by default, as a row's result then depends on
// how many rows its pass had.
std::atomic<bool> rows_integer{false};

[[noreturn]] void refuse(const std::string& name, const std::string& what) {
  throw std::invalid_argument(name + ": " + what);
}

std::string shape_of(const mx::array& a) {
  std::ostringstream out;
  out << "(";
  for (int i = 0; i < a.ndim(); ++i) out << (i ? ", " : "") << a.shape(i);
  out << ")";
  return out.str();
}

}  // namespace

std::string kernel_isa() { return isa().name; }

std::string kernel_integer_isa() { return isa().integer_name; }

std::string kernel_integer_rows_isa() { return isa().integer_rows ? isa().integer_name : "none"; }

void set_kernel_gemv_x(int bits) {
  if (bits != 0 && bits != 8 && bits != 16) throw std::invalid_argument("gemv x bits must be 0 (f32), 8 or 16");
  gemv_x_bits.store(bits);
}

int kernel_gemv_x() { return gemv_x_bits.load(); }

void set_kernel_integer_rows(bool on) { rows_integer.store(on); }

bool kernel_integer_rows() { return rows_integer.load(); }

int kernel_threads() { return kernel_pool().size(); }

void PackedMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  const auto& scales = inputs[2];
  const auto& biases = inputs[3];
  for (const auto* a : {&x, &w, &scales, &biases}) {
    if (!a->flags().row_contiguous) throw std::runtime_error("LayerlinePackedMatmul: input not contiguous");
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));

  QmmArgs args{};
  args.M = int(x.size() / x.shape(-1));
  args.K = x.shape(-1);
  args.N = w.shape(0);
  args.bits = bits_;
  args.group = group_size_;
  args.w_row_bytes = size_t(args.K) * bits_ / 8;
  args.w_total_bytes = size_t(args.N) * args.w_row_bytes;
  args.x = x.data<float>();
  args.w = reinterpret_cast<const uint8_t*>(w.data<uint32_t>());
  args.scales = scales.data<void>();
  args.biases = biases.data<void>();
  args.scale_type = scales.dtype() == mx::float16    ? ScaleType::f16
                    : scales.dtype() == mx::bfloat16 ? ScaleType::bf16
                                                      : ScaleType::f32;
  args.y = out.data<float>();

  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(x);
  encoder.set_input_array(w);
  encoder.set_input_array(scales);
  encoder.set_input_array(biases);
  encoder.set_output_array(out);
  // The buffers stay alive until the task has run: mlx holds the inputs until then.
  encoder.dispatch([args]() {
    auto& pool = kernel_pool();
    const int parts = int(std::clamp<size_t>(args.w_total_bytes / kBytesPerExtraThread, 1, pool.size()));
    // Whole 4-row blocks per thread, so each walks its rows the way the kernel unpacks them.
    const int quantum = 4;
    const int blocks = (args.N + quantum - 1) / quantum;
    const QmmColumns columns = isa().columns;
    // One row of 4-, 5- or 8-bit weights, with the integer path on: x quantized once, here.
    const int x_bits = gemv_x_bits.load(std::memory_order_relaxed);
    const bool integer = x_bits != 0 && integer_supports(args.bits, args.M);
    thread_local QuantizedX quantized;  // kept: no allocation a token
    const QuantizedX& xq = quantized;    // the pool's threads read this thread's copy
    if (integer) quantize_x(args, x_bits, quantized);
    const IntegerColumns integer_columns = isa().integer_columns;
    // Many rows of 4-bit weights in integers: where asked for and the CPU has the path.
    const IntegerRows integer_rows = isa().integer_rows;
    const bool rows = rows_integer.load(std::memory_order_relaxed) && integer_rows != nullptr &&
                      integer_rows_support(args.bits, args.M, args.K);
    thread_local QuantizedRows quantized_rows;
    const QuantizedRows& xrows = quantized_rows;
    if (rows) isa().quantize_rows(args, quantized_rows);
    pool.run(parts, [&](int part) {
      const int n0 = std::min(args.N, blocks * part / parts * quantum);
      const int n1 = std::min(args.N, blocks * (part + 1) / parts * quantum);
      if (n0 >= n1) return;
      if (rows) {
        integer_rows(args, xrows, n0, n1);
      } else if (integer) {
        integer_columns(args, xq, n0, n1);
      } else {
        columns(args, n0, n1);
      }
    });
  });
}

void PackedMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("LayerlinePackedMatmul runs on the CPU only; GPUs keep mlx's kernels");
}

bool PackedMatmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const PackedMatmul&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_;
}

std::vector<mx::Shape> PackedMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = inputs[1].shape(0);
  return {shape};
}

mx::array packed_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                        const mx::array& biases, int group_size, int bits, const std::string& name) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 5 && bits != 6 && bits != 8) {
    refuse(name, "bits=" + std::to_string(bits) + " is not supported (2, 3, 4, 5, 6 or 8)");
  }
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    refuse(name, "group_size=" + std::to_string(group_size) + " is not supported (32, 64 or 128)");
  }
  if (w.dtype() != mx::uint32 || w.ndim() != 2) {
    refuse(name, "packed weight must be a 2-D uint32 array, got " + shape_of(w));
  }
  const int N = w.shape(0);
  const long packed_bits = long(w.shape(1)) * 32;
  if (packed_bits % bits != 0) {
    refuse(name, "packed width " + std::to_string(w.shape(1)) + " words does not hold whole " +
                     std::to_string(bits) + "-bit values");
  }
  const int K = int(packed_bits / bits);
  if (K % group_size != 0) {
    refuse(name, "input width " + std::to_string(K) + " does not divide into groups of " +
                     std::to_string(group_size));
  }
  const mx::Shape groups_shape{N, K / group_size};
  if (scales.shape() != groups_shape || biases.shape() != groups_shape) {
    refuse(name, "scales " + shape_of(scales) + " and biases " + shape_of(biases) + " must both be (" +
                     std::to_string(N) + ", " + std::to_string(K / group_size) + ") for a weight of " +
                     std::to_string(N) + " rows of " + std::to_string(K) + " values");
  }
  if (x.ndim() < 1 || x.shape(-1) != K) {
    refuse(name, "input " + shape_of(x) + " must end in " + std::to_string(K) + " (the weight's width)");
  }
  if (!mx::issubdtype(x.dtype(), mx::floating)) refuse(name, "input must be floating point");

  const auto s = mx::to_stream(std::monostate{}, mx::Device::cpu);
  // Scales and biases are read as they are stored when f32, f16 or bf16 (both the same type).
  auto scale_type = scales.dtype();
  if ((scale_type != mx::float16 && scale_type != mx::bfloat16) || biases.dtype() != scale_type) {
    scale_type = mx::float32;
  }
  auto xf = mx::contiguous(mx::astype(x, mx::float32, s), false, s);
  auto out_shape = x.shape();
  out_shape.back() = N;
  auto out = mx::array(out_shape, mx::float32, std::make_shared<PackedMatmul>(s, group_size, bits),
                       {xf, mx::contiguous(w, false, s),
                        mx::contiguous(mx::astype(scales, scale_type, s), false, s),
                        mx::contiguous(mx::astype(biases, scale_type, s), false, s)});
  return x.dtype() == mx::float32 ? out : mx::astype(out, x.dtype(), s);
}

}  // namespace layerline
