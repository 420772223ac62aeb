// The portable path: each packed row dequantized once into a buffer, then one dot per row of x.
#include <vector>

#include "kernel.h"

namespace layerline {

void qmm_columns_portable(const QmmArgs& a, int n0, int n1) {
  std::vector<float> row(a.K);
  const int groups = a.K / a.group;
  for (int n = n0; n < n1; ++n) {
    const uint8_t* packed = a.w + size_t(n) * a.w_row_bytes;
    for (int g = 0; g < groups; ++g) {
      const size_t i = size_t(n) * groups + g;
      const float s = scale_at(a.scales, a.scale_type, i), b = scale_at(a.biases, a.scale_type, i);
      for (int k = g * a.group; k < (g + 1) * a.group; ++k) {
        row[k] = s * float(unpack_value(packed, k, a.bits)) + b;
      }
    }
    for (int m = 0; m < a.M; ++m) {
      const float* x = a.x + size_t(m) * a.K;
      float acc = 0.0f;
      for (int k = 0; k < a.K; ++k) acc += row[k] * x[k];
      a.y[size_t(m) * a.N + n] = acc;
    }
  }
}

}  // namespace layerline
