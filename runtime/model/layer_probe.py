"""Time one synthetic layer of a model's shape on this device: what stage 0 plans its split from.

The layer is a llama block of the model's sizes (hidden, heads, key/value heads, head width,
MLP width) with random weights in the format this device would load the package's (packed,
on layerline's CPU kernel where it is built, or floats), so it does the matrix products a real
layer of the model does, on the same code path. Architecture details (Gemma's extra norms, a
sliding window) cost little beside those products and are left out, so that a stage needs no
package files to be probed. A probe times one row and a batch of rows, each the median of a few
runs after a warm-up, and runs no more once `PROBE_BUDGET_S` has passed (one timed run at
least, so a device slow enough takes longer).
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx
import mlx.nn as nn

from layerline.errors import LayerlineError

from .cpu_kernel import use_cpu_kernel
from .fused_ops import use_fused_ops
from .host_memory import host_memory
from .layer_range import LayerRange
from .layer_shape import LayerShape, LayerTiming
from .weights_policy import choose_weights, detect_device

PROBE_BUDGET_S = 0.8  # runs stop once the probe took this long, the warm-up included
MAX_RUNS = 15
PROBE_MEMORY_SHARE = 0.25  # a probe's layer may take at most this share of the free memory
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def probe_layer(shape: LayerShape, budget_s: float = PROBE_BUDGET_S) -> LayerTiming:
    """Build a random layer of `shape` in this device's weight format and time it."""
    deadline = time.perf_counter() + budget_s
    shape.check()
    device = detect_device()
    plan = choose_weights(shape.weight_format, quantized=shape.bits > 0, dtype=shape.stored_dtype,
                          expanded=lambda: shape.weights() * 4, device=device)
    weight_bytes = shape.weights() * (shape.bits / 8 if plan.format == "packed" and shape.bits
                                      else _BYTES.get(plan.compute_dtype, 4))
    free = host_memory().available
    if weight_bytes > free * PROBE_MEMORY_SHARE:
        raise LayerlineError(f"a layer of shape {shape} takes {int(weight_bytes) >> 20} MiB as "
                             f"{plan.format}, over {PROBE_MEMORY_SHARE:.0%} of the {free >> 20} MiB free",
                             hint="this stage is too small for the model's layers")
    layer = _build(shape, plan.format, getattr(mx, plan.compute_dtype))
    layer_bytes = sum(v.nbytes for v in _arrays(layer.parameters()))
    one, batch = _time(layer, shape, getattr(mx, plan.compute_dtype), deadline)
    return LayerTiming(one_row_s=one, batch_s=batch, batch_rows=shape.batch_rows,
                       weight_format=plan.format, layer_bytes=int(layer_bytes))


def _build(shape: LayerShape, weight_format: str, dtype: mx.Dtype) -> LayerRange:
    """A one-layer llama range of the shape, its weights random, packed or cast as planned."""
    config = {"model_type": "llama", "hidden_size": shape.hidden_size, "num_hidden_layers": 1,
              "intermediate_size": shape.intermediate_size,
              "num_attention_heads": shape.num_attention_heads,
              "num_key_value_heads": shape.num_key_value_heads, "head_dim": shape.head_dim,
              "rms_norm_eps": 1e-5, "vocab_size": 32, "rope_theta": 10000.0,
              "tie_word_embeddings": True}
    layer = LayerRange(config, 0, 1)
    layer.set_dtype(mx.float32)
    if weight_format == "packed" and shape.bits:
        nn.quantize(layer, group_size=shape.group_size, bits=shape.bits, mode="affine")
    layer.set_dtype(dtype)  # floats only: packed weights stay packed
    mx.eval(layer.parameters())
    use_cpu_kernel(layer)
    use_fused_ops(layer)
    return layer


def _time(layer: LayerRange, shape: LayerShape, dtype: mx.Dtype, deadline: float) -> tuple[float, float]:
    """Median seconds of one row after a batch of rows, and of the batch, over the runs until
    `deadline` (by perf_counter), one at least after the warm-up."""
    rows = mx.random.normal((1, shape.batch_rows, shape.hidden_size)).astype(dtype)
    one = mx.random.normal((1, 1, shape.hidden_size)).astype(dtype)
    mx.eval(rows, one)
    batch_times: list[float] = []
    row_times: list[float] = []
    for run in range(MAX_RUNS + 1):
        cache = layer.make_cache()
        t0 = time.perf_counter()
        mx.eval(layer(rows, cache))
        t1 = time.perf_counter()
        mx.eval(layer(one, cache))
        t2 = time.perf_counter()
        if run:  # the first run warms up (allocations, kernel choice)
            batch_times.append(t1 - t0)
            row_times.append(t2 - t1)
            if t2 > deadline:
                break
    return statistics.median(row_times), statistics.median(batch_times)


def _arrays(tree: object) -> list[mx.array]:
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(tree)]

