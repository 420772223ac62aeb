// The rest of a layer on the CPU, without mlx: RMSNorm (with the residual add before it),
// RoPE, SiLU(gate) * up and attention of a few query rows over a KV cache. One table of
// functions per instruction set, compiled from one source (fused_impl.h) with that set's flags.
#pragma once

#include <cstddef>
#include <cstdint>

namespace layerline {

// A 4-D f32 array read through its strides (in elements; the last stride is 1).
struct View4 {
  const float* data;
  int shape[4];
  int64_t strides[4];
  const float* row(int a, int b, int c) const {
    return data + a * strides[0] + b * strides[1] + c * strides[2];
  }
};

struct RmsNormArgs {
  const float* x;         // (M, D) rows
  const float* residual;  // (M, D) added to x first, or null
  const float* weight;    // (D)
  float* sum;             // (M, D): x + residual, written when residual is set
  float* y;               // (M, D)
  int M, D;
  float eps;
};

struct RopeArgs {
  View4 x;                 // (B, H, L, D)
  const float* inv_freqs;  // (dims / 2): mlx computes them, so angles match its own to the bit
  float* y;                // (B, H, L, D) row-major
  int dims;                // leading dims rotated; the rest copied
  bool traditional;
  float scale;
  int offset;              // position of row 0
  const int32_t* offsets;  // (B): batch entry b's row 0 at offsets[b] instead, or null
};

struct AttentionArgs {
  View4 q;        // (B, H, L, D)
  View4 k, v;     // (B, Hk, T, D) and (B, Hk, T, Dv)
  float* y;       // (B, H, L, Dv) row-major
  float scale;
  bool causal;    // row l sees keys [0, T - L + l]; otherwise every key
};

struct FusedKernels {
  void (*rms_norm)(const RmsNormArgs&, int m0, int m1);
  void (*rope)(const RopeArgs&);
  void (*silu_mul)(const float* gate, const float* up, float* y, size_t n);
  // Heads of kv-head groups [g0, g1) of B * Hk: each group's keys are read once for all its queries.
  void (*attention)(const AttentionArgs&, int g0, int g1);
};

extern const FusedKernels fused_portable;
#if defined(__x86_64__) || defined(_M_X64)
extern const FusedKernels fused_avx2;
extern const FusedKernels fused_avx512;
#endif

}  // namespace layerline
