// The many-row integer path's scalar parts (see kernel_integer.h): quantizing x's rows, a weight
// row's sub-scales (every path's), and the portable path, whose integer sums the vector paths
// must equal exactly (only their float rounding differs).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernel_integer.h"

namespace layerline {

void prepare_rows(const QmmArgs& a, QuantizedRows& out) {
  const int spans = span_count(a.K);
  out.storage.resize(size_t(a.M) * a.K + 32);
  out.q = reinterpret_cast<int16_t*>((reinterpret_cast<uintptr_t>(out.storage.data()) + 63) & ~uintptr_t(63));
  out.scale.resize(size_t(a.M) * spans);
  out.sum.assign(size_t(a.M) * (a.K / a.group), 0.0f);
}

void quantize_rows(const QmmArgs& a, QuantizedRows& out) {
  const int spans = span_count(a.K), groups = a.K / a.group;
  prepare_rows(a, out);
  for (int m = 0; m < a.M; ++m) {
    const float* x = a.x + size_t(m) * a.K;
    int16_t* q = out.q + size_t(m) * a.K;
    for (int k = 0; k < a.K; ++k) out.sum[size_t(m) * groups + k / a.group] += x[k];
    for (int sp = 0; sp < spans; ++sp) {
      const int k0 = sp * kSpan, k1 = std::min(a.K, k0 + kSpan);
      float amax = 0.0f;
      for (int k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(x[k]));
      out.scale[size_t(m) * spans + sp] = amax / kRowsXTop;
      const float inverse = amax > 0.0f ? kRowsXTop / amax : 0.0f;
      for (int p = k0; p < k1; p += 64) {
        for (int i = 0; i < 64; ++i) q[p + i] = int16_t(std::lrintf(x[p + pair_source(i)] * inverse));
      }
    }
  }
}

void span_subscales(const float* s, const float* b, int K, int group, int16_t* sc, float* span_scale,
                    float* bias_centre) {
  const int groups = K / group, spans = span_count(K);
  for (int g = 0; g < groups; ++g) bias_centre[g] = b[g] + 8.0f * s[g];
  for (int sp = 0; sp < spans; ++sp) {
    const int g0 = sp * kSpan / group, g1 = std::min(groups, (sp + 1) * kSpan / group);
    float smax = 0.0f;
    for (int g = g0; g < g1; ++g) smax = std::max(smax, std::fabs(s[g]));
    span_scale[sp] = smax / kSubScaleTop;
    const float inverse = smax > 0.0f ? kSubScaleTop / smax : 0.0f;
    for (int g = g0; g < g1; ++g) sc[g] = int16_t(std::lrintf(s[g] * inverse));
  }
}

void integer_rows_portable(const QmmArgs& a, const QuantizedRows& x, int n0, int n1) {
  const int groups = a.K / a.group, spans = span_count(a.K);
  std::vector<int16_t> sc(groups);
  std::vector<float> s(groups), b(groups), span_scale(spans), bias_centre(groups);
  for (int n = n0; n < n1; ++n) {
    for (int g = 0; g < groups; ++g) {
      s[g] = scale_at(a.scales, a.scale_type, size_t(n) * groups + g);
      b[g] = scale_at(a.biases, a.scale_type, size_t(n) * groups + g);
    }
    span_subscales(s.data(), b.data(), a.K, a.group, sc.data(), span_scale.data(), bias_centre.data());
    const uint8_t* row = a.w + size_t(n) * a.w_row_bytes;
    for (int m = 0; m < a.M; ++m) {
      const int16_t* q = x.q + size_t(m) * a.K;
      float acc = 0.0f;
      for (int sp = 0; sp < spans; ++sp) {
        const int k0 = sp * kSpan, k1 = std::min(a.K, k0 + kSpan);
        int32_t products = 0;
        for (int p = k0; p < k1; p += 64) {
          for (int i = 0; i < 64; ++i) {
            const int k = p + pair_source(i);
            const int32_t w = (int32_t(unpack_value(row, k, 4)) - 8) * sc[k / a.group];
            products += w * q[p + i];
          }
        }
        acc += span_scale[sp] * x.scale[size_t(m) * spans + sp] * float(products);
      }
      for (int g = 0; g < groups; ++g) acc += bias_centre[g] * x.sum[size_t(m) * groups + g];
      a.y[size_t(m) * a.N + n] = acc;
    }
  }
}

}  // namespace layerline
