// The integer GEMV's scalar parts: quantizing x (every path's), and the portable path, which
// every vector path must agree with in exact integer sums (only their float rounding differs).
#include <algorithm>
#include <cmath>

#include "kernel_int8.h"

namespace layerline {

void quantize_x(const QmmArgs& a, QuantizedX& out) {
  const int blocks = a.K / kInt8Block;
  out.q.resize(a.K);
  out.scale.resize(blocks);
  out.sum.assign(a.K / a.group, 0.0f);
  out.centre.assign(a.K / a.group, 0.0f);
  int order[kInt8Block];
  for (int i = 0; i < kInt8Block; ++i) order[i] = int8_block_order(a.bits, i);
  for (int j = 0; j < blocks; ++j) {
    const float* x = a.x + size_t(j) * kInt8Block;
    float amax = 0.0f, sum = 0.0f;
    for (int i = 0; i < kInt8Block; ++i) {
      amax = std::max(amax, std::fabs(x[i]));
      sum += x[i];
    }
    out.sum[j * kInt8Block / a.group] += sum;
    const float dx = amax / 127.0f, inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
    out.scale[j] = dx;
    int8_t* q = out.q.data() + size_t(j) * kInt8Block;
    int32_t qsum = 0;
    for (int i = 0; i < kInt8Block; ++i) {
      q[i] = int8_t(std::lrintf(x[order[i]] * inverse));
      qsum += q[i];
    }
    out.centre[j * kInt8Block / a.group] -= dx * float(qsum);
  }
  const float c = int8_centre(a.bits);
  for (size_t g = 0; g < out.sum.size(); ++g) out.centre[g] = c * (out.sum[g] + out.centre[g]);
}

void int8_columns_portable(const QmmArgs& a, const QuantizedX& x, int n0, int n1) {
  const int groups = a.K / a.group, per_group = a.group / kInt8Block;
  int order[kInt8Block];
  for (int i = 0; i < kInt8Block; ++i) order[i] = int8_block_order(a.bits, i);
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + size_t(n) * a.w_row_bytes;
    float acc = 0.0f;
    for (int g = 0; g < groups; ++g) {
      const size_t i = size_t(n) * groups + g;
      const float s = scale_at(a.scales, a.scale_type, i), b = scale_at(a.biases, a.scale_type, i);
      float products = 0.0f;
      for (int j = g * per_group; j < (g + 1) * per_group; ++j) {
        const int8_t* q = x.q.data() + size_t(j) * kInt8Block;
        int32_t dot = 0;
        for (int k = 0; k < kInt8Block; ++k) {
          dot += int32_t(unpack_value(row, j * kInt8Block + order[k], a.bits)) * q[k];
        }
        products += float(dot) * x.scale[j];
      }
      acc += s * (products + x.centre[g]) + b * x.sum[g];
    }
    a.y[n] = acc;
  }
}

}  // namespace layerline
