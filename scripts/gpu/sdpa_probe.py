"""Does mlx's CUDA SDPA build a graph whenever the key length changes (more than one query row)?

Run on the GPU machine: `python3 scripts/gpu/sdpa_probe.py` (docs/benchmarks.md, "On an NVIDIA
GPU"). Times mx.fast.scaled_dot_product_attention with a new key length every call, with the
same key length every call, and the same attention as matmuls and a softmax.
"""
import time

import mlx.core as mx

B, H, KVH, D = 1, 24, 8, 128  # a 3B llama's attention
DTYPE = mx.float16
SCALE = D ** -0.5


def matmul_attention(q, k, v):
    rows, length = q.shape[2], k.shape[2]
    grouped = (q * SCALE).reshape(B, KVH, H // KVH, rows, D)
    scores = grouped @ k[:, :, None].swapaxes(-1, -2)
    causal = mx.arange(length - rows, length)[:, None] >= mx.arange(length)[None]
    scores = mx.where(causal, scores, mx.array(-mx.inf, scores.dtype))
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(DTYPE)
    return (weights @ v[:, :, None]).reshape(B, H, rows, D)


def fused_attention(q, k, v):
    mask = "causal" if q.shape[2] > 1 else None
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask=mask)


def inputs(rows, length):
    q = mx.random.normal((B, H, rows, D)).astype(DTYPE)
    k = mx.random.normal((B, KVH, length, D)).astype(DTYPE)
    v = mx.random.normal((B, KVH, length, D)).astype(DTYPE)
    mx.eval(q, k, v)
    return q, k, v


def report(name, attention, rows, lengths):
    times = []
    for length in lengths:
        q, k, v = inputs(rows, length)
        start = time.perf_counter()
        mx.eval(attention(q, k, v))
        times.append((time.perf_counter() - start) * 1e3)
    warm = sorted(times[1:])
    print(f"{name:8s} L={rows:2d} first={times[0]:8.2f} ms  "
          f"median={warm[len(warm) // 2]:8.3f} ms  max={warm[-1]:8.2f} ms")


print("device", mx.default_device(), mx.__version__)
for rows in (1, 2, 5, 9):
    report("fast-new", fused_attention, rows, list(range(700, 720)))  # a new key length every call
    report("fast-fix", fused_attention, rows, [800] * 20)  # the same key length every call
    report("manual", matmul_attention, rows, list(range(900, 920)))
q, k, v = inputs(5, 333)
print("max diff", mx.abs(fused_attention(q, k, v) - matmul_attention(q, k, v)).max().item())
