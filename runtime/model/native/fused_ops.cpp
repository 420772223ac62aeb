#include "fused_ops.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "fused.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "pool.h"
#include "quantized_matmul.h"

namespace layerline {

namespace {

// Below this many bytes of keys and values an attention call runs on one thread.
constexpr size_t kAttentionBytesPerThread = 128 * 1024;

const FusedKernels& kernels() {
  // The packed-weight kernel's choice of instruction set (LAYERLINE_KERNEL_ISA forces it).
  static const FusedKernels& chosen = [] () -> const FusedKernels& {
#if defined(__x86_64__) || defined(_M_X64)
    const std::string isa = kernel_isa();
    if (isa == "avx512") return fused_avx512;
    if (isa == "avx2") return fused_avx2;
#endif
    return fused_portable;
  }();
  return chosen;
}

mx::Stream cpu_stream() { return mx::to_stream(std::monostate{}, mx::Device::cpu); }

void require_f32(const mx::array& a, const char* op, const char* what) {
  if (a.dtype() != mx::float32) {
    throw std::invalid_argument(std::string(op) + ": " + what + " must be float32");
  }
}

// A 4-D array as the kernels read it; the last axis must be contiguous.
View4 view4(const mx::array& a) {
  View4 v{};
  v.data = a.data<float>();
  for (int i = 0; i < 4; ++i) {
    v.shape[i] = a.shape(i);
    v.strides[i] = a.strides()[i];
  }
  return v;
}

// A view whose rows are contiguous: `v` itself (a KV cache's keys are a slice of a bigger
// buffer, read in place), else a copy into `buffer`. Called where the data has been computed.
View4 rows_contiguous(const View4& v, std::vector<float>& buffer) {
  if (v.strides[3] == 1) return v;
  const int A = v.shape[0], B = v.shape[1], C = v.shape[2], D = v.shape[3];
  buffer.resize(size_t(A) * B * C * D);
  View4 out{buffer.data(), {A, B, C, D}, {int64_t(B) * C * D, int64_t(C) * D, D, 1}};
  float* dst = buffer.data();
  for (int a = 0; a < A; ++a)
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < C; ++c) {
        const float* src = v.row(a, b, c);
        for (int d = 0; d < D; ++d) *dst++ = src[d * v.strides[3]];
      }
  return out;
}

// One query row per session against its own keys: the sessions' kv heads (the work items) split
// between threads by the keys each reads, consecutive items of a session in one kernel call.
void sessions_attention_task(View4 q, std::vector<View4>& keys, std::vector<View4>& values, float* y,
                             const LayerOpParams& p, size_t kv_bytes,
                             void (*attend)(const AttentionArgs&, int, int)) {
  const int sessions = q.shape[0], H = q.shape[1], Hk = keys[0].shape[1], Dv = values[0].shape[3];
  std::vector<std::vector<float>> copies(2 * size_t(sessions) + 1);
  q = rows_contiguous(q, copies.back());
  std::vector<size_t> item_end(size_t(sessions) * Hk);  // cumulative keys read, per (session, kv head)
  size_t total = 0;
  for (int s = 0; s < sessions; ++s) {
    keys[s] = rows_contiguous(keys[s], copies[2 * s]);
    values[s] = rows_contiguous(values[s], copies[2 * s + 1]);
    // A sliding window: the one row sees the last `window` keys, the ones before are skipped.
    const int T = keys[s].shape[2], first = p.window > 0 ? std::max(0, T - p.window) : 0;
    for (View4* kv : {&keys[s], &values[s]}) {
      kv->data += first * kv->strides[2];
      kv->shape[2] = T - first;
    }
    for (int h = 0; h < Hk; ++h) item_end[size_t(s) * Hk + h] = total += size_t(T - first) + 1;
  }
  auto& pool = kernel_pool();
  const int items = sessions * Hk;
  const int parts = int(std::clamp<size_t>(kv_bytes / kAttentionBytesPerThread, 1,
                                            size_t(std::min(pool.size(), items))));
  pool.run(parts, [&](int part) {
    // The items whose first key falls in this part's share of all keys read (each in one part
    // only: the kernel zeroes its output rows, then adds to them).
    const size_t from = total * part / parts, to = total * (part + 1) / parts;
    int i = from == 0 ? 0 : int(std::lower_bound(item_end.begin(), item_end.end(), from) - item_end.begin()) + 1;
    while (i < items) {
      const size_t start = i == 0 ? 0 : item_end[i - 1];
      if (start >= to) break;
      const int s = i / Hk;
      int end = i + 1;
      while (end < (s + 1) * Hk && item_end[end - 1] < to) ++end;
      View4 qs = q;
      qs.data = q.row(s, 0, 0);
      qs.shape[0] = 1;
      const AttentionArgs args{qs, keys[s], values[s], y + size_t(s) * H * Dv, p.scale, false};
      attend(args, i - s * Hk, end - s * Hk);
      i = end;
    }
  });
}

}  // namespace

std::string fused_isa() {
  const std::string isa = kernel_isa();
  return isa == "avx512" || isa == "avx2" ? isa : "portable";
}

void LayerOp::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& in : inputs) encoder.set_input_array(in);
  for (auto& out : outputs) encoder.set_output_array(out);
  const FusedKernels& k = kernels();
  const LayerOpParams p = params_;
  switch (kind_) {
    case LayerOpKind::rms_norm:
    case LayerOpKind::add_rms_norm: {
      const bool add = kind_ == LayerOpKind::add_rms_norm;
      RmsNormArgs args{};
      args.D = inputs[0].shape(-1);
      args.M = int(inputs[0].size() / std::max(args.D, 1));
      args.x = inputs[0].data<float>();
      args.residual = add ? inputs[1].data<float>() : nullptr;
      args.weight = inputs[add ? 2 : 1].data<float>();
      args.sum = add ? outputs[0].data<float>() : nullptr;
      args.y = outputs[add ? 1 : 0].data<float>();
      args.eps = p.eps;
      encoder.dispatch([args, fn = k.rms_norm]() { fn(args, 0, args.M); });
      break;
    }
    case LayerOpKind::rope: {
      RopeArgs args{view4(inputs[0]), inputs[1].data<float>(), outputs[0].data<float>(), p.dims,
                    p.traditional, p.scale, p.offset,
                    inputs.size() > 2 ? inputs[2].data<int32_t>() : nullptr};
      encoder.dispatch([args, fn = k.rope]() mutable {
        std::vector<float> copy;
        args.x = rows_contiguous(args.x, copy);
        fn(args);
      });
      break;
    }
    case LayerOpKind::silu_mul: {
      const float* gate = inputs[0].data<float>();
      const float* up = inputs[1].data<float>();
      float* y = outputs[0].data<float>();
      const size_t n = outputs[0].size();
      encoder.dispatch([=, fn = k.silu_mul]() { fn(gate, up, y, n); });
      break;
    }
    case LayerOpKind::attention: {
      AttentionArgs args{view4(inputs[0]), view4(inputs[1]), view4(inputs[2]), outputs[0].data<float>(),
                         p.scale, p.causal};
      const size_t kv_bytes = (inputs[1].size() + inputs[2].size()) * sizeof(float);
      encoder.dispatch([args, kv_bytes, fn = k.attention]() mutable {
        std::vector<float> q_copy, k_copy, v_copy;
        args.q = rows_contiguous(args.q, q_copy);
        args.k = rows_contiguous(args.k, k_copy);
        args.v = rows_contiguous(args.v, v_copy);
        const int groups = args.k.shape[0] * args.k.shape[1];
        auto& pool = kernel_pool();
        const int parts = int(std::clamp<size_t>(kv_bytes / kAttentionBytesPerThread, 1,
                                                  size_t(std::min(pool.size(), groups))));
        pool.run(parts, [&](int part) {
          const int g0 = groups * part / parts, g1 = groups * (part + 1) / parts;
          if (g0 < g1) fn(args, g0, g1);
        });
      });
      break;
    }
    case LayerOpKind::sessions_attention: {
      const int sessions = inputs[0].shape(0);
      std::vector<View4> keys, values;
      size_t kv_bytes = 0;
      for (int s = 0; s < sessions; ++s) {
        keys.push_back(view4(inputs[1 + s]));
        values.push_back(view4(inputs[1 + sessions + s]));
        kv_bytes += (inputs[1 + s].size() + inputs[1 + sessions + s].size()) * sizeof(float);
      }
      encoder.dispatch([q = view4(inputs[0]), keys = std::move(keys), values = std::move(values),
                        y = outputs[0].data<float>(), p, kv_bytes, fn = k.attention]() mutable {
        sessions_attention_task(q, keys, values, y, p, kv_bytes, fn);
      });
      break;
    }
  }
}

void LayerOp::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(std::string(name()) + " runs on the CPU only; GPUs keep mlx's ops");
}

const char* LayerOp::name() const {
  switch (kind_) {
    case LayerOpKind::rms_norm: return "LayerlineRMSNorm";
    case LayerOpKind::add_rms_norm: return "LayerlineAddRMSNorm";
    case LayerOpKind::rope: return "LayerlineRoPE";
    case LayerOpKind::silu_mul: return "LayerlineSiluMul";
    case LayerOpKind::attention: return "LayerlineAttention";
    case LayerOpKind::sessions_attention: return "LayerlineSessionsAttention";
  }
  return "LayerlineLayerOp";
}

bool LayerOp::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const LayerOp&>(other);
  return kind_ == o.kind_ && params_ == o.params_;
}

std::vector<mx::Shape> LayerOp::output_shapes(const std::vector<mx::array>& inputs) {
  switch (kind_) {
    case LayerOpKind::add_rms_norm: return {inputs[0].shape(), inputs[0].shape()};
    case LayerOpKind::attention: {
      auto shape = inputs[0].shape();
      shape.back() = inputs[2].shape(-1);
      return {shape};
    }
    case LayerOpKind::sessions_attention: {  // inputs: q, then every session's keys, then values
      auto shape = inputs[0].shape();
      shape.back() = inputs[1 + inputs[0].shape(0)].shape(-1);
      return {shape};
    }
    default: return {inputs[0].shape()};
  }
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps) {
  require_f32(x, "rms_norm", "x");
  require_f32(weight, "rms_norm", "weight");
  if (weight.ndim() != 1 || weight.shape(0) != x.shape(-1)) {
    throw std::invalid_argument("rms_norm: weight must be (D,) for x (..., D)");
  }
  const auto s = cpu_stream();
  LayerOpParams p;
  p.eps = eps;
  return mx::array(x.shape(), mx::float32, std::make_shared<LayerOp>(s, LayerOpKind::rms_norm, p),
                   {mx::contiguous(x, false, s), mx::contiguous(weight, false, s)});
}

std::vector<mx::array> add_rms_norm(const mx::array& x, const mx::array& residual, const mx::array& weight,
                                    float eps) {
  require_f32(x, "add_rms_norm", "x");
  require_f32(residual, "add_rms_norm", "residual");
  require_f32(weight, "add_rms_norm", "weight");
  if (x.shape() != residual.shape() || weight.ndim() != 1 || weight.shape(0) != x.shape(-1)) {
    throw std::invalid_argument("add_rms_norm: x and residual must match, and weight be (D,)");
  }
  const auto s = cpu_stream();
  LayerOpParams p;
  p.eps = eps;
  return mx::array::make_arrays({x.shape(), x.shape()}, {mx::float32, mx::float32},
                                std::make_shared<LayerOp>(s, LayerOpKind::add_rms_norm, p),
                                {mx::contiguous(x, false, s), mx::contiguous(residual, false, s),
                                 mx::contiguous(weight, false, s)});
}

namespace {

mx::array rope_op(const mx::array& x, const mx::array& inv_freqs, int dims, bool traditional, float scale,
                  int offset, const mx::array* offsets) {
  require_f32(x, "rope", "x");
  require_f32(inv_freqs, "rope", "inv_freqs");
  if (x.ndim() != 4 || dims <= 0 || dims % 2 != 0 || dims > x.shape(-1)) {
    throw std::invalid_argument("rope: x must be (B, H, L, D) and dims even, at most D");
  }
  if (inv_freqs.ndim() != 1 || inv_freqs.shape(0) != dims / 2) {
    throw std::invalid_argument("rope: inv_freqs must be (dims / 2,)");
  }
  if (offsets != nullptr && (offsets->dtype() != mx::int32 || offsets->ndim() != 1 ||
                             offsets->shape(0) != x.shape(0))) {
    throw std::invalid_argument("rope: offsets must be (B,) int32 for x (B, H, L, D)");
  }
  const auto s = cpu_stream();
  LayerOpParams p;
  p.dims = dims;
  p.traditional = traditional;
  p.scale = scale;
  p.offset = offset;
  std::vector<mx::array> inputs{x, mx::contiguous(inv_freqs, false, s)};
  if (offsets != nullptr) inputs.push_back(mx::contiguous(*offsets, false, s));
  return mx::array(x.shape(), mx::float32, std::make_shared<LayerOp>(s, LayerOpKind::rope, p), std::move(inputs));
}

}  // namespace

mx::array rope(const mx::array& x, const mx::array& inv_freqs, int dims, bool traditional, float scale,
               int offset) {
  return rope_op(x, inv_freqs, dims, traditional, scale, offset, nullptr);
}

mx::array rope_at(const mx::array& x, const mx::array& inv_freqs, int dims, bool traditional, float scale,
                  const mx::array& offsets) {
  return rope_op(x, inv_freqs, dims, traditional, scale, 0, &offsets);
}

mx::array silu_mul(const mx::array& gate, const mx::array& up) {
  require_f32(gate, "silu_mul", "gate");
  require_f32(up, "silu_mul", "up");
  if (gate.shape() != up.shape()) throw std::invalid_argument("silu_mul: gate and up must match");
  const auto s = cpu_stream();
  return mx::array(gate.shape(), mx::float32, std::make_shared<LayerOp>(s, LayerOpKind::silu_mul, LayerOpParams{}),
                   {mx::contiguous(gate, false, s), mx::contiguous(up, false, s)});
}

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal) {
  for (const auto& [a, what] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    require_f32(*a, "attention", what);
    if (a->ndim() != 4) throw std::invalid_argument(std::string("attention: ") + what + " must be 4-D");
  }
  if (k.shape(0) != q.shape(0) || v.shape(0) != q.shape(0) || k.shape(1) != v.shape(1) ||
      k.shape(2) != v.shape(2) || k.shape(3) != q.shape(3) || q.shape(1) % k.shape(1) != 0 ||
      (causal && q.shape(2) > k.shape(2))) {
    throw std::invalid_argument("attention: q (B, H, L, D), k and v (B, Hk, T, D) with Hk dividing H");
  }
  const auto s = cpu_stream();
  LayerOpParams p;
  p.scale = scale;
  p.causal = causal;
  auto shape = q.shape();
  shape.back() = v.shape(-1);
  return mx::array(shape, mx::float32, std::make_shared<LayerOp>(s, LayerOpKind::attention, p),
                   {q, k, v});
}

mx::array sessions_attention(const mx::array& q, const std::vector<mx::array>& keys,
                             const std::vector<mx::array>& values, float scale, int window) {
  require_f32(q, "sessions_attention", "q");
  const int sessions = q.ndim() == 4 ? q.shape(0) : 0;
  if (q.ndim() != 4 || q.shape(2) != 1 || sessions == 0 || int(keys.size()) != sessions ||
      int(values.size()) != sessions || window < 0) {
    throw std::invalid_argument("sessions_attention: q (S, H, 1, D) with S keys and S values, window >= 0");
  }
  const int Hk = keys[0].ndim() == 4 ? keys[0].shape(1) : 0, Dv = values[0].ndim() == 4 ? values[0].shape(3) : 0;
  if (Hk == 0 || q.shape(1) % Hk != 0) {
    throw std::invalid_argument("sessions_attention: keys (1, Hk, T, D) with Hk dividing q's heads");
  }
  for (int s = 0; s < sessions; ++s) {
    const auto &k = keys[s], &v = values[s];
    require_f32(k, "sessions_attention", "keys");
    require_f32(v, "sessions_attention", "values");
    if (k.ndim() != 4 || v.ndim() != 4 || k.shape(0) != 1 || k.shape(1) != Hk || k.shape(3) != q.shape(3) ||
        k.shape(2) < 1 || v.shape(0) != 1 || v.shape(1) != Hk || v.shape(2) != k.shape(2) || v.shape(3) != Dv) {
      throw std::invalid_argument("sessions_attention: session " + std::to_string(s) +
                                  "'s keys and values must be (1, Hk, T, D) and (1, Hk, T, Dv) like the others'");
    }
  }
  const auto s = cpu_stream();
  LayerOpParams p;
  p.scale = scale;
  p.window = window;
  std::vector<mx::array> inputs{q};
  inputs.insert(inputs.end(), keys.begin(), keys.end());
  inputs.insert(inputs.end(), values.begin(), values.end());
  auto shape = q.shape();
  shape.back() = Dv;
  return mx::array(shape, mx::float32, std::make_shared<LayerOp>(s, LayerOpKind::sessions_attention, p),
                   std::move(inputs));
}

}  // namespace layerline
