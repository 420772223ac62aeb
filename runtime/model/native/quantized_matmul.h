// y = x @ dequant(W)^T for mlx's affine packing, as an mlx primitive evaluated on the CPU.
#pragma once

#include <string>

#include "mlx/array.h"
#include "mlx/primitives.h"

namespace layerline {

namespace mx = mlx::core;

class PackedMatmul : public mx::UnaryPrimitive {
 public:
  PackedMatmul(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "LayerlinePackedMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int group_size_, bits_;
};

// x (..., K) float; w (N, K*bits/32) uint32; scales, biases (N, K/group_size). `name` names the
// weight in errors. Always evaluated on the CPU.
mx::array packed_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                        const mx::array& biases, int group_size, int bits, const std::string& name);

// The instruction set the kernel runs with: "avx512", "avx2", "neon" or "portable".
std::string kernel_isa();
// The integer GEMV's instruction set ("avx512-vnni", "avx2", "neon-sdot", "neon" or "portable"),
// and x's width on one-row 4-, 5- and 8-bit products: 0 (f32, exact: until set), or 8 or 16 bits
// (the integer GEMV).
std::string kernel_integer_isa();

// The instruction set of the integer path for many rows of x ("none" where this CPU has none).
std::string kernel_integer_rows_isa();

// Whether products of 8 or more rows of 4-bit weights take that path (where there is one).
void set_kernel_integer_rows(bool on);
bool kernel_integer_rows();
void set_kernel_gemv_x(int bits);
int kernel_gemv_x();
int kernel_threads();

}  // namespace layerline
