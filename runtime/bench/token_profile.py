"""`layerline bench decode --profile`: where a decoded token's time goes, and a prompt's
prefill chunk's, per op class.

Each class is timed in isolation on the real modules of every layer (their weights, shapes
and, for attention, a KV cache as long as the decode's average context, or the chunk's causal
attention over itself): 16 copies of the op in one `mx.eval` (one copy per 16 rows of a
chunk), best of 5 runs, so each figure is the op's cost inside a graph (its scheduling
included) without the rest of the pass. The classes are summed over the layers and set beside
the measured time of a whole token (or chunk); what is left is Python, building the graph,
the KV-cache writes, reshapes and scheduling between ops ("the rest").

The profile is taken twice in one process: with mlx's CPU ops for norms, RoPE, attention and
activations (`LAYERLINE_CPU_FUSED=off`), then with the extension's fused ops.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.activations import swiglu
from mlx_lm.models.cache import KVCache

from ..decode.local_pipeline import LocalPipeline
from ..decode.loop import generate
from ..decode.sampling import SamplingParams
from ..decode.targets import LocalTarget
from ..model.attention import attention
from ..model.fused_ops import ENV_VAR as FUSED_ENV_VAR
from ..model.fused_ops import FUSED_BLOCKS, FUSED_MLPS, add_rms_norm, fused_ops_enabled, silu_mul

COPIES, REPEATS = 16, 5
CLASSES = ("packed products", "norms + residual adds", "RoPE", "attention", "activations",
           "embedding", "head (norm + product)", "sampling")


@dataclass(frozen=True)
class TokenProfile:
    fused: bool
    token_ms: float  # a whole decoded token (or prefill chunk), measured
    class_ms: dict[str, float]  # per op class, summed over the layers
    rows: int = 1  # query rows of the pass profiled: 1 a decoded token, else a prefill chunk

    @property
    def rest_ms(self) -> float:
        """The token's time not in any class: Python, graph building, cache writes, scheduling."""
        return self.token_ms - sum(self.class_ms.values())


@contextlib.contextmanager
def fused_ops_switched(on: bool) -> Iterator[None]:
    """Load and run with the fused ops on or off (read where modules are loaded and per call)."""
    before = os.environ.get(FUSED_ENV_VAR)
    os.environ[FUSED_ENV_VAR] = "on" if on else "off"
    try:
        yield
    finally:
        if before is None:
            del os.environ[FUSED_ENV_VAR]
        else:
            os.environ[FUSED_ENV_VAR] = before


def time_op(op: Callable[[], Any], copies: int = COPIES) -> float:
    """Seconds one call of `op` costs inside a graph: `copies` in one evaluation, best of REPEATS."""
    mx.eval(op())
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        mx.eval([op() for _ in range(copies)])
        best = min(best, (time.perf_counter() - started) / copies)
    return best


def _layer_classes(layer: Any, context: int, rows: int = 1) -> dict[str, float]:
    """One llama-shaped block's op classes for `rows` query rows at a KV cache of `context`
    positions (the rows' own included)."""
    copies = max(1, COPIES // rows)
    attn, mlp = layer.self_attn, layer.mlp
    x = mx.random.normal((1, rows, layer.post_attention_layernorm.weight.shape[0]))
    q = attn.q_proj(x)
    heads, kv_heads = attn.n_heads, attn.n_kv_heads
    head_dim = q.shape[-1] // heads
    cache = KVCache()  # laid out as decoding leaves it: a slice of a bigger buffer
    keys, values = cache.update_and_fetch(mx.random.normal((1, kv_heads, context, head_dim)),
                                          mx.random.normal((1, kv_heads, context, head_dim)))
    queries = q.reshape(1, rows, heads, head_dim).transpose(0, 2, 1, 3)
    key_row = attn.k_proj(x).reshape(1, rows, kv_heads, head_dim).transpose(0, 2, 1, 3)
    gate, attended = mlp.gate_proj(x), mx.random.normal((1, rows, heads * head_dim))
    mask = "causal" if rows > 1 else None
    mx.eval(x, q, keys, values, queries, key_row, gate, attended)
    norm = layer.post_attention_layernorm
    activation = silu_mul if isinstance(mlp, FUSED_MLPS) else swiglu
    products = ((attn.q_proj, x), (attn.k_proj, x), (attn.v_proj, x), (attn.o_proj, attended),
                (mlp.gate_proj, x), (mlp.up_proj, x), (mlp.down_proj, gate))
    return {
        "packed products": sum(time_op(lambda p=p, i=i: p(i), copies) for p, i in products),
        "norms + residual adds": (
            time_op(lambda: layer.input_layernorm(x), copies) + time_op(lambda: x + x, copies)
            + time_op(lambda: list(add_rms_norm(x, x, norm)) if isinstance(layer, FUSED_BLOCKS)
                      else [x + x, norm(x + x)], copies)),
        "RoPE": (time_op(lambda: attn.rope(queries, offset=context - rows), copies)
                 + time_op(lambda: attn.rope(key_row, offset=context - rows), copies)),
        "attention": time_op(lambda: attention(queries, keys, values, cache, attn.scale, mask)
                             .transpose(0, 2, 1, 3).reshape(1, rows, -1), copies),
        "activations": time_op(lambda: activation(gate, gate), copies),
    }


def _token_ms(pipeline: LocalPipeline, prompt: list[int], tokens: int) -> float:
    """Milliseconds per decoded token through the decode loop (greedy), best of two runs."""
    best = float("inf")
    for _ in range(2):
        stamps = [time.perf_counter() for _ in generate(LocalTarget.open(pipeline), prompt,
                                                        SamplingParams(max_tokens=tokens))]
        best = min(best, (stamps[-1] - stamps[0]) / (len(stamps) - 1))
    return best * 1000


def _prefill_ms(pipeline: LocalPipeline, prompt: list[int]) -> float:
    """Milliseconds from a prompt to its first token through the decode loop, best of two runs."""
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        for _ in generate(LocalTarget.open(pipeline), prompt, SamplingParams(max_tokens=1)):
            best = min(best, time.perf_counter() - started)
    return best * 1000


def profile_token(package_dir: str | Path, prompt: list[int], tokens: int = 64,
                  prefill: bool = False) -> TokenProfile:
    """One decoded token of the packed package (or, `prefill`, the prompt's prefill as one chunk),
    per op class, with the fused ops as switched now."""
    pipeline = LocalPipeline.load(package_dir, None, "packed")
    if prefill:
        _prefill_ms(pipeline, prompt)  # warm-up: the first call pays for allocations
        token_ms, rows, context = _prefill_ms(pipeline, prompt), len(prompt), len(prompt)
    else:
        token_ms, rows = _token_ms(pipeline, prompt, tokens), 1
        context = len(prompt) + tokens // 2  # the decode's average context
    classes = dict.fromkeys(CLASSES, 0.0)
    for layer_range in pipeline.ranges:
        for layer in layer_range.layers:
            for name, seconds in _layer_classes(layer, context, rows).items():
                classes[name] += seconds
    head = pipeline.head
    h = mx.random.normal((1, 1, head.norm.weight.shape[0]))
    token = mx.array([prompt[-rows:]], dtype=mx.uint32)
    logits = head.logits(h)
    mx.eval(h, logits)
    classes["embedding"] = time_op(lambda: head.embed(token))
    classes["head (norm + product)"] = time_op(lambda: head.logits(h))  # the last row's only
    classes["sampling"] = time_op(lambda: mx.argmax(logits[:, -1], axis=-1))
    return TokenProfile(fused_ops_enabled(), token_ms, {k: v * 1000 for k, v in classes.items()}, rows)


def profile_both(package_dir: str | Path, prompt: list[int], tokens: int = 64,
                 prefill: bool = False) -> list[TokenProfile]:
    """The token's (or prefill's) profile with mlx's ops, then with the fused ops (where they
    run), in this process."""
    profiles = []
    for on in (False, True):
        with fused_ops_switched(on):
            profiles.append(profile_token(package_dir, prompt, tokens, prefill))
    return profiles


def render_profiles(profiles: list[TokenProfile]) -> str:
    """The profiles side by side as a Markdown table: ms per token and share of the token."""
    names = ["fused ops" if p.fused else "mlx ops" for p in profiles]
    head = "| op class (summed over layers) | " + " | ".join(f"{n} ms | {n} share" for n in names) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(profiles)]

    def row(label: str, values: list[float]) -> str:
        cells = [f"{v:.2f} | {v / p.token_ms:.0%}" for v, p in zip(values, profiles, strict=True)]
        return f"| {label} | " + " | ".join(cells) + " |"

    for name in CLASSES:
        lines.append(row(name, [p.class_ms[name] for p in profiles]))
    lines.append(row("the rest (Python, graph, KV writes, scheduling)", [p.rest_ms for p in profiles]))
    whole = "whole token" if profiles[0].rows == 1 else f"whole prefill of {profiles[0].rows} tokens"
    lines.append(row(f"**{whole} (measured)**", [p.token_ms for p in profiles]))
    return "\n".join(lines)
