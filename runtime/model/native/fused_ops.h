// The rest of a layer as mlx primitives evaluated on the CPU (fused.h computes them), so a
// layer's graph stays lazy: RMSNorm, residual add + RMSNorm, RoPE, SiLU(gate) * up, and
// attention of a few query rows over a KV cache, and of one query row of each of several sessions
// over each one's own cache. f32 only; callers keep mlx's ops otherwise.
#pragma once

#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"

namespace layerline {

namespace mx = mlx::core;

enum class LayerOpKind { rms_norm, add_rms_norm, rope, silu_mul, attention, sessions_attention };

struct LayerOpParams {
  float eps = 0.0f;                                     // norms
  int dims = 0, offset = 0;                             // rope
  bool traditional = false;                             // rope
  float scale = 0.0f;                                   // rope's and attention's
  bool causal = false;                                  // attention
  int window = 0;                                       // sessions_attention: keys seen, 0 for all
  bool operator==(const LayerOpParams&) const = default;
};

class LayerOp : public mx::Primitive {
 public:
  LayerOp(mx::Stream stream, LayerOpKind kind, LayerOpParams params)
      : mx::Primitive(stream), kind_(kind), params_(params) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override;
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  LayerOpKind kind_;
  LayerOpParams params_;
};

// x (..., D) normalized by its root mean square, times weight (D).
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps);
// (x + residual, rms_norm(x + residual, weight, eps)).
std::vector<mx::array> add_rms_norm(const mx::array& x, const mx::array& residual, const mx::array& weight,
                                    float eps);
// x (B, H, L, D) rotated at positions (offset .. offset + L - 1) * scale by angles position *
// inv_freqs (dims / 2), as mx.fast.rope.
mx::array rope(const mx::array& x, const mx::array& inv_freqs, int dims, bool traditional, float scale,
               int offset);
// The same with each batch entry b's rows at positions offsets[b].. (offsets: (B,) int32), as
// mx.fast.rope with an array offset.
mx::array rope_at(const mx::array& x, const mx::array& inv_freqs, int dims, bool traditional, float scale,
                  const mx::array& offsets);
// silu(gate) * up, elementwise.
mx::array silu_mul(const mx::array& gate, const mx::array& up);
// softmax(q k^T * scale) v for q (B, H, L, D) and k, v (B, Hk, T, D) with H a multiple of Hk;
// `causal`: query row l sees keys up to T - L + l. k and v are read through their strides.
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal);
// One query row per session, q (S, H, 1, D), each against its own keys and values (1, Hk, T_s, D)
// (T_s may differ; each read in place through its strides): softmax(q_s k_s^T * scale) v_s over
// the last `window` keys of each (every key when window is 0). Sessions x kv heads in parallel.
mx::array sessions_attention(const mx::array& q, const std::vector<mx::array>& keys,
                             const std::vector<mx::array>& values, float scale, int window);

// The instruction set the fused ops run with (the kernel's choice; avx2's code where it is avx512
// and the file was built without it, portable otherwise).
std::string fused_isa();

}  // namespace layerline
