// Python bindings: layerline.runtime.model._cpu_kernel.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "mlx/version.h"
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
  m.def("isa", &layerline::kernel_isa, "The instruction set in use: avx512, avx2, neon or portable.");
  m.def("threads", &layerline::kernel_threads, "Threads a product may use.");
  m.attr("built_for_mlx") = LAYERLINE_STR(MLX_VERSION_MAJOR) "." LAYERLINE_STR(
      MLX_VERSION_MINOR) "." LAYERLINE_STR(MLX_VERSION_PATCH);
}
