// Python bindings: layerline.runtime.model._cpu_kernel.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "mlx/version.h"
#include "fused_ops.h"
#include "quantized_matmul.h"

namespace nb = nanobind;
using namespace nb::literals;

#define LAYERLINE_STR2(x) #x
#define LAYERLINE_STR(x) LAYERLINE_STR2(x)

NB_MODULE(_cpu_kernel, m) {
  m.doc() = "layerline's CPU kernel for mlx's packed (affine-quantized) weights";
  m.def("packed_matmul", &layerline::packed_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a,
        "bits"_a, "name"_a = "weight",
        "x @ dequantize(w, scales, biases).T on the CPU, reading the packed weight once per call.");
  m.def("rms_norm", &layerline::rms_norm, "x"_a, "weight"_a, "eps"_a,
        "x normalized by its root mean square, times weight (f32, on the CPU).");
  m.def("add_rms_norm", &layerline::add_rms_norm, "x"_a, "residual"_a, "weight"_a, "eps"_a,
        "[x + residual, rms_norm(x + residual)] in one pass (f32, on the CPU).");
  m.def("rope", &layerline::rope, "x"_a, "inv_freqs"_a, "dims"_a, "traditional"_a, "scale"_a, "offset"_a,
        "mx.fast.rope of x (B, H, L, D) at positions offset.., angles position * inv_freqs (f32, on the CPU).");
  m.def("rope_at", &layerline::rope_at, "x"_a, "inv_freqs"_a, "dims"_a, "traditional"_a, "scale"_a, "offsets"_a,
        "rope with batch entry b at positions offsets[b].. (offsets (B,) int32), as mx.fast.rope's array offset.");
  m.def("silu_mul", &layerline::silu_mul, "gate"_a, "up"_a, "silu(gate) * up (f32, on the CPU).");
  m.def("attention", &layerline::attention, "q"_a, "k"_a, "v"_a, "scale"_a, "causal"_a,
        "softmax(q k^T * scale) v over grouped-query heads, k and v read in place (f32, on the CPU).");
  m.def("sessions_attention", &layerline::sessions_attention, "q"_a, "keys"_a, "values"_a, "scale"_a, "window"_a,
        "One query row per session, q (S, H, 1, D), against each session's own keys and values (1, Hk, T, D), "
        "over the last `window` keys (0: all), in one call (f32, on the CPU).");
  m.def("fused_isa", &layerline::fused_isa, "The instruction set the fused layer ops run with.");
  m.def("isa", &layerline::kernel_isa, "The instruction set in use: avx512, avx2, neon or portable.");
  m.def("integer_isa", &layerline::kernel_integer_isa, "The instruction set of the integer GEMV.");
  m.def("integer_rows_isa", &layerline::kernel_integer_rows_isa,
        "The instruction set of the integer path for 8 or more rows of 4-bit weights, or none.");
  m.def("set_gemv_x", &layerline::set_kernel_gemv_x, "bits"_a,
        "x of one-row 4-, 5- and 8-bit products: 0 (f32), or 8 or 16 (quantized, multiplied in integers).");
  m.def("set_integer_rows", &layerline::set_kernel_integer_rows, "on"_a,
        "Products of 8 or more rows of 4-bit weights on the integer path for many rows, where there is one.");
  m.def("integer_rows", &layerline::kernel_integer_rows, "Whether the integer path for many rows is asked for.");
  m.def("gemv_x", &layerline::kernel_gemv_x, "x's width on one-row products: 0 (f32), 8 or 16.");
  m.def("threads", &layerline::kernel_threads, "Threads a product may use.");
  m.attr("built_for_mlx") = LAYERLINE_STR(MLX_VERSION_MAJOR) "." LAYERLINE_STR(
      MLX_VERSION_MINOR) "." LAYERLINE_STR(MLX_VERSION_PATCH);
}
