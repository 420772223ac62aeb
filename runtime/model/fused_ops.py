"""The rest of a layer on layerline's CPU extension: RMSNorm (and residual add + RMSNorm), RoPE,
SiLU(gate) * up, attention of a few query rows over a KV cache, and attention of one row of
each of a batch pass's sessions over each one's own cache, in one call.

mlx's CPU backend has no kernels for `mx.fast.rms_norm`, `mx.fast.rope` or
`scaled_dot_product_attention`: each runs as several elementwise ops and reductions, one
scheduled task each, which cost a decoded token far more than their bytes. The extension
(`native/fused_ops.cpp`) computes each in one task, as an mlx primitive so graphs stay lazy,
on the instruction set the packed-weight kernel chose. `use_fused_ops` swaps a loaded range's
modules onto them (called by `use_cpu_kernel`, so only on the CPU with the kernel built);
`fused_attention` is the hook `attention.py` calls, `fused_sessions_attention` the one a batch
pass's `SessionRows` calls for its one-row sessions. Each falls back to mlx's op for what it
does not cover (other dtypes, a mask array, attention sinks).
`LAYERLINE_CPU_FUSED=off` keeps mlx's ops while the kernel still computes the products.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama, qwen2, qwen3

from .cpu_kernel import cpu_kernel

log = logging.getLogger("layerline.runtime")

ENV_VAR = "LAYERLINE_CPU_FUSED"  # "off": mlx's ops for norms, RoPE, attention and SiLU*mul
MAX_ATTENTION_ROWS = 16  # a decode step or a verify window; prefill keeps mlx's matmuls


def fused_ops_enabled() -> bool:
    """Whether the fused ops run here: on the CPU, with the kernel built, and not switched off."""
    setting = os.environ.get(ENV_VAR, "").strip().lower()
    return (setting not in ("off", "0", "no", "none") and mx.default_device() == mx.cpu
            and cpu_kernel().available and _built_with_fused_ops())


@functools.cache  # a fact of the process, logged once
def _built_with_fused_ops() -> bool:
    # An extension built before the fused ops still computes the products: keep mlx's ops then.
    built = "fused_isa" in dir(_native())
    if not built:
        log.warning("event=cpu_fused_ops_missing the CPU kernel was built without its fused ops; "
                    "reinstall layerline (pip install -e .) to rebuild it")
    return built


def _native() -> Any:
    from . import _cpu_kernel  # type: ignore[attr-defined]

    return _cpu_kernel


def rope_inverse_frequencies(dims: int, base: float) -> mx.array:
    """The inverse frequencies `mx.fast.rope` rotates by, computed with mlx's own ops (its
    fallback's), so the fused RoPE's angles equal mlx's to the bit."""
    half = dims // 2
    step = np.float32(np.log(np.float32(base))) / np.float32(half)
    return mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * mx.array(step, dtype=mx.float32))


class KernelRMSNorm(nn.RMSNorm):
    """mlx's RMSNorm, computed in one task by the extension for f32 inputs."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.dtype != mx.float32 or self.weight.dtype != mx.float32:
            return super().__call__(x)
        return _native().rms_norm(x, self.weight, self.eps)


class KernelRoPE(nn.RoPE):
    """mlx's RoPE (either layout), computed in one task by the extension for f32 (B, H, L, D), at
    one offset or at one per batch entry (a batch pass's rows, `SessionRows.offset`)."""

    _inverse_frequencies: mx.array

    def __call__(self, x: mx.array, offset: Any = 0) -> mx.array:
        if x.dtype != mx.float32 or x.ndim != 4:
            return super().__call__(x, offset)
        rotation = (x, self._inverse_frequencies, self.dims, self.traditional, self.scale, offset)
        if isinstance(offset, int):
            return _native().rope(*rotation)
        if isinstance(offset, mx.array) and offset.dtype == mx.int32 and offset.shape == (x.shape[0],):
            return _native().rope_at(*rotation)
        return super().__call__(x, offset)


def silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up: by the extension in one task for f32, else mlx's ops."""
    if gate.dtype != mx.float32 or up.dtype != mx.float32:
        return nn.silu(gate) * up
    return _native().silu_mul(gate, up)


def add_rms_norm(x: mx.array, residual: mx.array, norm: nn.RMSNorm) -> tuple[mx.array, mx.array]:
    """(x + residual, norm(x + residual)): by the extension in one task for f32, else mlx's ops."""
    if x.dtype != mx.float32 or residual.dtype != mx.float32 or norm.weight.dtype != mx.float32:
        h = x + residual
        return h, norm(h)
    h, normed = _native().add_rms_norm(x, residual, norm.weight, norm.eps)
    return h, normed


def _silu_mul_mlp(self: nn.Module, x: mx.array) -> mx.array:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _add_norm_block(self: nn.Module, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
    r = self.self_attn(self.input_layernorm(x), mask, cache)
    h, normed = add_rms_norm(x, r, self.post_attention_layernorm)
    return h + self.mlp(normed)


# mlx-lm's gate/up/down MLPs and pre-norm blocks whose __call__ the methods above repeat exactly.
class KernelLlamaMLP(llama.MLP):
    __call__ = _silu_mul_mlp


class KernelQwen2MLP(qwen2.MLP):
    __call__ = _silu_mul_mlp


class KernelQwen3MLP(qwen3.MLP):
    __call__ = _silu_mul_mlp


class KernelLlamaBlock(llama.TransformerBlock):
    __call__ = _add_norm_block


class KernelQwen2Block(qwen2.TransformerBlock):
    __call__ = _add_norm_block


class KernelQwen3Block(qwen3.TransformerBlock):
    __call__ = _add_norm_block


FUSED_MLPS = (KernelLlamaMLP, KernelQwen2MLP, KernelQwen3MLP)
FUSED_BLOCKS = (KernelLlamaBlock, KernelQwen2Block, KernelQwen3Block)
_SWAPS: dict[type, type] = {
    nn.RMSNorm: KernelRMSNorm, nn.RoPE: KernelRoPE,
    llama.MLP: KernelLlamaMLP, qwen2.MLP: KernelQwen2MLP, qwen3.MLP: KernelQwen3MLP,
    llama.TransformerBlock: KernelLlamaBlock, qwen2.TransformerBlock: KernelQwen2Block,
    qwen3.TransformerBlock: KernelQwen3Block,
}


def use_fused_ops(module: nn.Module) -> int:
    """Move `module`'s norms, RoPEs, MLP activations and residual norms onto the fused ops
    where they run (`fused_ops_enabled`); how many modules moved."""
    if not fused_ops_enabled():
        return 0
    moved = 0
    for _, layer in module.named_modules():
        kind = _SWAPS.get(type(layer))
        if kind is None:
            continue
        layer.__class__ = kind  # same parameters, computed by the extension
        if kind is KernelRoPE:
            # Evaluated here: a lazy array built on the loading thread cannot be evaluated on another.
            layer._inverse_frequencies = rope_inverse_frequencies(layer.dims, layer.base)
            mx.eval(layer._inverse_frequencies)
        moved += 1
    return moved


def fused_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                    mask: Any) -> mx.array | None:
    """Attention of a few f32 query rows by the extension, or None where mlx's op must run
    (not on the CPU kernel, another dtype, a mask array, many rows)."""
    causal_or_none = mask is None or isinstance(mask, str) and mask == "causal"
    if queries.shape[2] > MAX_ATTENTION_ROWS or not causal_or_none:
        return None
    if any(a.dtype != mx.float32 for a in (queries, keys, values)) or not fused_ops_enabled():
        return None
    causal = mask is not None and queries.shape[2] > 1  # one row sees every key either way
    return _native().attention(queries, keys, values, scale, causal)


def fused_sessions_attention(queries: mx.array, keys: list[mx.array], values: list[mx.array], scale: float,
                             window: int | None) -> mx.array | None:
    """One query row per session, queries (S, H, 1, D), against each session's own keys and values
    (1, Hk, T_s, D) over its last `window` keys (None: all), in one call by the extension; None
    where mlx's ops must run (not on the CPU kernel, another dtype)."""
    if any(a.dtype != mx.float32 for a in (queries, *keys, *values)) or not fused_ops_enabled():
        return None
    return _native().sessions_attention(queries, keys, values, scale, window or 0)
