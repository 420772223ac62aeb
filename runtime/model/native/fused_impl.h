// The fused ops' code, written once in plain loops that the compiler vectorizes with the
// flags of the file that includes it (fused_avx2.cpp, fused_avx512.cpp, fused_portable.cpp),
// inside that file's anonymous namespace so no two instruction sets share a function.
//
// Sums run in 16 independent lanes (the inner `j` loops), so they vectorize without
// reassociating floats behind the compiler's back; exp is a branch-free polynomial
// (Cephes' expf, about 1 ulp) so it vectorizes too.

constexpr int kLanes = 16;

inline float dot(const float* a, const float* b, int n) {
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] += alpha * x[i];
}

inline float exp_approx(float x) {
  x = std::min(88.3762626647949f, std::max(-87.3365447505531f, x));
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

void rms_norm(const RmsNormArgs& a, int m0, int m1) {
  for (int m = m0; m < m1; ++m) {
    const float* x = a.x + size_t(m) * a.D;
    float* y = a.y + size_t(m) * a.D;
    if (a.residual != nullptr) {
      const float* r = a.residual + size_t(m) * a.D;
      float* s = a.sum + size_t(m) * a.D;
      for (int i = 0; i < a.D; ++i) s[i] = x[i] + r[i];
      x = s;
    }
    const float mean = dot(x, x, a.D) / float(a.D);
    const float inv = 1.0f / std::sqrt(mean + a.eps);
    for (int i = 0; i < a.D; ++i) y[i] = x[i] * inv * a.weight[i];
  }
}

void rope(const RopeArgs& a) {
  const int B = a.x.shape[0], H = a.x.shape[1], L = a.x.shape[2], D = a.x.shape[3];
  const int half = a.dims / 2;
  // Angles as mlx computes them (f32 positions times f32 inverse frequencies), sin and cos in double:
  // once for every batch entry, or per entry where each has its own offset (a batch pass's rows).
  std::vector<float> cs(size_t(L) * half), sn(size_t(L) * half);
  const auto angles = [&](int offset) {
    for (int l = 0; l < L; ++l) {
      const float position = float(offset + l) * a.scale;
      for (int i = 0; i < half; ++i) {
        const float theta = position * a.inv_freqs[i];
        cs[size_t(l) * half + i] = float(std::cos(double(theta)));
        sn[size_t(l) * half + i] = float(std::sin(double(theta)));
      }
    }
  };
  if (a.offsets == nullptr) angles(a.offset);
  for (int b = 0; b < B; ++b) {
    if (a.offsets != nullptr) angles(a.offsets[b]);
    for (int h = 0; h < H; ++h) {
      for (int l = 0; l < L; ++l) {
        const float* x = a.x.row(b, h, l);
        float* y = a.y + ((size_t(b) * H + h) * L + l) * D;
        const float* c = cs.data() + size_t(l) * half;
        const float* s = sn.data() + size_t(l) * half;
        if (a.traditional) {
          for (int i = 0; i < half; ++i) {
            const float x1 = x[2 * i], x2 = x[2 * i + 1];
            y[2 * i] = x1 * c[i] - x2 * s[i];
            y[2 * i + 1] = x1 * s[i] + x2 * c[i];
          }
        } else {
          for (int i = 0; i < half; ++i) {
            const float x1 = x[i], x2 = x[i + half];
            y[i] = x1 * c[i] - x2 * s[i];
            y[i + half] = x1 * s[i] + x2 * c[i];
          }
        }
        for (int i = a.dims; i < D; ++i) y[i] = x[i];
      }
    }
  }
}

void silu_mul(const float* gate, const float* up, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] = gate[i] / (1.0f + exp_approx(-gate[i])) * up[i];
}

void attention(const AttentionArgs& a, int g0, int g1) {
  const int H = a.q.shape[1], L = a.q.shape[2], D = a.q.shape[3];
  const int Hk = a.k.shape[1], T = a.k.shape[2], Dv = a.v.shape[3];
  const int group = H / Hk, rows = group * L;
  std::vector<float> scores(size_t(rows) * T);
  for (int gi = g0; gi < g1; ++gi) {
    const int b = gi / Hk, kv = gi % Hk;
    // Scores of every query row of the group's heads, each key read once for all of them.
    for (int t = 0; t < T; ++t) {
      const float* key = a.k.row(b, kv, t);
      for (int r = 0; r < rows; ++r) {
        const int h = kv * group + r / L, l = r % L;
        scores[size_t(r) * T + t] = dot(a.q.row(b, h, l), key, D) * a.scale;
      }
    }
    for (int r = 0; r < rows; ++r) {
      const int h = kv * group + r / L, l = r % L;
      const int seen = a.causal ? T - L + l + 1 : T;
      float* s = scores.data() + size_t(r) * T;
      float top = s[0];
      for (int t = 1; t < seen; ++t) top = std::max(top, s[t]);
      float total = 0.0f;
      for (int t = 0; t < seen; ++t) {
        s[t] = exp_approx(s[t] - top);
        total += s[t];
      }
      const float inv = 1.0f / total;
      float* y = a.y + ((size_t(b) * H + h) * L + l) * Dv;
      std::fill(y, y + Dv, 0.0f);
      for (int t = 0; t < seen; ++t) axpy(s[t] * inv, a.v.row(b, kv, t), y, Dv);
    }
  }
}

constexpr FusedKernels kFusedKernels{rms_norm, rope, silu_mul, attention};
