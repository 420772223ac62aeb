// The integer GEMV's scalar parts: quantizing x (every path's), and the portable path, which
// every vector path must agree with in exact integer sums (only their float rounding differs).
#include <algorithm>
#include <cmath>

#include "kernel_integer.h"

namespace layerline {

void quantize_x(const QmmArgs& a, int xbits, QuantizedX& out) {
  const int blocks = a.K / kIntegerBlock;
  const float top = xbits == 8 ? 127.0f : 32767.0f;
  out.xbits = xbits;
  (xbits == 8 ? out.q.resize(a.K) : out.q16.resize(a.K));
  out.scale.resize(blocks);
  out.sum.assign(a.K / a.group, 0.0f);
  out.centre.assign(a.K / a.group, 0.0f);
  int order[kIntegerBlock];
  for (int i = 0; i < kIntegerBlock; ++i) order[i] = int_block_order(a.bits, xbits, i);
  for (int j = 0; j < blocks; ++j) {
    const float* x = a.x + size_t(j) * kIntegerBlock;
    float amax = 0.0f, sum = 0.0f;
    for (int i = 0; i < kIntegerBlock; ++i) {
      amax = std::max(amax, std::fabs(x[i]));
      sum += x[i];
    }
    out.sum[j * kIntegerBlock / a.group] += sum;
    const float dx = amax / top, inverse = amax > 0.0f ? top / amax : 0.0f;
    out.scale[j] = dx;
    int32_t qsum = 0;
    for (int i = 0; i < kIntegerBlock; ++i) {
      const int32_t v = std::lrintf(x[order[i]] * inverse);
      if (xbits == 8) {
        out.q[size_t(j) * kIntegerBlock + i] = int8_t(v);
      } else {
        out.q16[size_t(j) * kIntegerBlock + i] = int16_t(v);
      }
      qsum += v;
    }
    out.centre[j * kIntegerBlock / a.group] -= dx * float(qsum);
  }
  const float c = integer_centre(a.bits);
  for (size_t g = 0; g < out.sum.size(); ++g) out.centre[g] = c * (out.sum[g] + out.centre[g]);
}

void integer_columns_portable(const QmmArgs& a, const QuantizedX& x, int n0, int n1) {
  const int groups = a.K / a.group, per_group = a.group / kIntegerBlock;
  int order[kIntegerBlock];
  for (int i = 0; i < kIntegerBlock; ++i) order[i] = int_block_order(a.bits, x.xbits, i);
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + size_t(n) * a.w_row_bytes;
    float acc = 0.0f;
    for (int g = 0; g < groups; ++g) {
      const size_t i = size_t(n) * groups + g;
      const float s = scale_at(a.scales, a.scale_type, i), b = scale_at(a.biases, a.scale_type, i);
      float products = 0.0f;
      for (int j = g * per_group; j < (g + 1) * per_group; ++j) {
        int32_t dot = 0;
        for (int k = 0; k < kIntegerBlock; ++k) {
          const size_t i = size_t(j) * kIntegerBlock + k;
          dot += int32_t(unpack_value(row, j * kIntegerBlock + order[k], a.bits)) * (x.xbits == 8 ? x.q[i] : x.q16[i]);
        }
        products += float(dot) * x.scale[j];
      }
      acc += s * (products + x.centre[g]) + b * x.sum[g];
    }
    a.y[n] = acc;
  }
}

}  // namespace layerline
