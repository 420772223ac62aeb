"""The extension's fused layer ops (RMSNorm, residual + RMSNorm, RoPE, SiLU*mul, few-row
attention, one-row attention of several sessions) against mlx's own on every instruction-set
path, where they are swapped in, and a package decoding greedily the same with them as with
mlx's ops."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from layerline.runtime.bench.token_profile import fused_ops_switched
from layerline.runtime.decode.local_pipeline import LocalPipeline
from layerline.runtime.decode.loop import generate
from layerline.runtime.decode.sampling import SamplingParams
from layerline.runtime.decode.targets import LocalTarget
from layerline.runtime.model.cpu_kernel import cpu_kernel
from layerline.runtime.model.fused_ops import (
    FUSED_BLOCKS,
    FUSED_MLPS,
    KernelRMSNorm,
    KernelRoPE,
    fused_attention,
    fused_sessions_attention,
    use_fused_ops,
)

from helpers import sweep_on_isa

pytestmark = pytest.mark.skipif(not cpu_kernel().available, reason=f"no CPU kernel: {cpu_kernel().reason}")

MAX_RELATIVE_ERROR = 1e-5

# Run in a fresh process per path: the extension picks its instruction set once per process.
_SWEEP = r"""
import json
import mlx.core as mx, mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention
from layerline.runtime.model import _cpu_kernel as native
from layerline.runtime.model.fused_ops import rope_inverse_frequencies

mx.random.seed(11)
worst = {}
def check(key, got, ref):
    err = (mx.abs(got - ref).max() / mx.abs(ref).max()).item()
    worst[key] = max(worst.get(key, 0.0), err)

for D in (64, 576, 1536, 100):  # 100: a width off every vector length
    x, r, w = mx.random.normal((3, 5, D)), mx.random.normal((3, 5, D)), mx.random.normal((D,))
    check("rms_norm", native.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5))
    total, normed = native.add_rms_norm(x, r, w, 1e-6)
    check("add_rms_norm", total, x + r)
    check("add_rms_norm", normed, mx.fast.rms_norm(x + r, w, 1e-6))
for traditional in (False, True):
    for base, scale, D, dims in ((10000.0, 1.0, 64, 64), (1e6, 1.0, 128, 128), (10000.0, 0.5, 96, 32)):
        inverse = rope_inverse_frequencies(dims, base)
        for offset in (0, 7, 250, 4000):
            for x in (mx.random.normal((1, 9, 3, D)),  # (B, H, L, D) as stored
                      mx.random.normal((1, 3, 9, D)).transpose(0, 2, 1, 3),  # as q_proj's output is viewed
                      mx.random.normal((2, 4, D, 1)).transpose(0, 1, 3, 2)):  # rows not contiguous
                ref = mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset)
                got = native.rope(x, inverse, dims, traditional, scale, offset)
                check(f"rope traditional={traditional}", got, ref)
        # A batch pass's rows: batch entry b at its own position.
        x, offsets = mx.random.normal((5, 3, 1, D)), mx.array([0, 7, 250, 4000, 31], dtype=mx.int32)
        ref = mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offsets)
        got = native.rope_at(x, inverse, dims, traditional, scale, offsets)
        check(f"rope traditional={traditional}", got, ref)
for rows in (1, 64):  # 64: a prefill chunk's, split over the threads
    gate, up = mx.random.normal((2, rows, 8960)) * 6, mx.random.normal((2, rows, 8960))
    check("silu_mul", native.silu_mul(gate, up), nn.silu(gate) * up)
x, w = mx.random.normal((1, 128, 1536)), mx.random.normal((1536,))
check("rms_norm", native.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5))
for B, H, Hk, D in ((1, 9, 3, 64), (2, 12, 2, 128), (1, 4, 4, 32)):
    for rows, length, causal in ((1, 1, False), (1, 300, False), (3, 40, True), (5, 5, True), (4, 100, False),
                                 (16, 700, True), (128, 128, True), (100, 300, True)):  # prefill chunks
        # Keys and values as a KV cache hands them over: a slice of a longer buffer.
        keys = mx.random.normal((B, Hk, 1024, D))[:, :, :length]
        values = mx.random.normal((B, Hk, 1024, D))[:, :, :length]
        q = mx.random.normal((B, H, rows, D))
        mask = "causal" if causal else None
        ref = scaled_dot_product_attention(q, keys, values, None, scale=D ** -0.5, mask=mask)
        check("attention", native.attention(q, keys, values, D ** -0.5, causal), ref)
    # One row of each of several sessions, each over its own cache (as long as it is), whole or
    # within a sliding window, against mlx's attention per session under the window's mask.
    lengths = (1, 37, 300, 5, 700, 64)
    for window in (0, 16, 64):
        keys = [mx.random.normal((1, Hk, 1024, D))[:, :, :T] for T in lengths]
        values = [mx.random.normal((1, Hk, 1024, D))[:, :, :T] for T in lengths]
        q = mx.random.normal((len(lengths), H, 1, D))
        refs = []
        for s, T in enumerate(lengths):
            mask = mx.arange(T)[None] > T - 1 - window if window else None
            refs.append(scaled_dot_product_attention(q[s:s + 1], keys[s], values[s], None, scale=D ** -0.5,
                                                     mask=mask))
        got = native.sessions_attention(q, keys, values, D ** -0.5, window)
        check("sessions_attention", got, mx.concatenate(refs))
print(json.dumps({"isa": native.fused_isa(), "worst": worst}))
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_fused_ops_match_mlx_on_each_instruction_set(isa):
    report = sweep_on_isa(_SWEEP, isa)
    bad = {k: v for k, v in report["worst"].items() if v > MAX_RELATIVE_ERROR}
    assert not bad and len(report["worst"]) == 7


def test_fused_attention_leaves_mask_arrays_rows_past_the_keys_and_half_floats_to_mlx():
    q, k = mx.zeros((1, 2, 1, 8)), mx.zeros((1, 2, 4, 8))
    assert fused_attention(q, k, k, 1.0, None) is not None
    assert fused_attention(q, k, k, 1.0, mx.zeros((1, 4), dtype=mx.bool_)) is None
    assert fused_attention(mx.zeros((1, 2, 5, 8)), k, k, 1.0, "causal") is None
    long_keys = mx.zeros((1, 2, 200, 8))  # a prefill chunk of 128 rows after 72 cached positions
    assert fused_attention(mx.zeros((1, 2, 128, 8)), long_keys, long_keys, 1.0, "causal") is not None
    half_q, half_k = q.astype(mx.float16), k.astype(mx.float16)
    assert fused_attention(half_q, half_k, half_k, 1.0, None) is None


def test_rows_of_a_batch_pass_attend_and_rotate_bit_for_bit_as_each_alone():
    # What a one-row session computes in a batch pass equals its own pass, to the bit: greedy
    # answers then differ only where the products' rows round differently.
    mx.random.seed(5)
    width = 64
    # Keys enough for more than one thread, split unevenly (the long session's one kv head is
    # more than half of every key read): each thread's share must hold whole heads, every run.
    for lengths, heads, kv_heads in (((1, 37, 300, 5), 9, 3), ((1000, 1), 2, 1)):
        keys = [mx.random.normal((1, kv_heads, 1024, width))[:, :, :n] for n in lengths]
        values = [mx.random.normal((1, kv_heads, 1024, width))[:, :, :n] for n in lengths]
        q = mx.random.normal((len(lengths), heads, 1, width))
        alone = mx.concatenate([fused_attention(q[s:s + 1], keys[s], values[s], 0.125, None)
                                for s in range(len(lengths))])
        for _ in range(50):
            assert mx.array_equal(fused_sessions_attention(q, keys, values, 0.125, None), alone)
    rope = nn.RoPE(width, base=1e5)
    assert use_fused_ops(rope) == 1 and isinstance(rope, KernelRoPE)
    q = mx.random.normal((4, 9, 1, width))
    positions = [3, 40, 1000, 7]
    rotated = rope(q, offset=mx.array(positions, dtype=mx.int32))
    alone = [rope(q[s:s + 1], offset=p) for s, p in enumerate(positions)]
    assert mx.array_equal(rotated, mx.concatenate(alone))


def test_sessions_attention_refuses_sessions_that_do_not_match():
    q = mx.zeros((2, 4, 1, 8))
    keys = [mx.zeros((1, 2, 5, 8)), mx.zeros((1, 2, 3, 8))]
    assert fused_sessions_attention(q, keys, keys, 1.0, None).shape == (2, 4, 1, 8)
    with pytest.raises(ValueError, match="S keys and S values"):
        fused_sessions_attention(q, keys[:1], keys[:1], 1.0, None)
    with pytest.raises(ValueError, match="session 1's keys"):
        fused_sessions_attention(q, [keys[0], mx.zeros((1, 4, 3, 8))], keys, 1.0, None)
    half = [k.astype(mx.float16) for k in keys]
    assert fused_sessions_attention(q, half, half, 1.0, None) is None


def test_switched_off_the_layers_keep_mlx_ops(smollm2_package):
    with fused_ops_switched(False):
        plain = LocalPipeline.load(smollm2_package, weights="packed", tokenizer=False)
        assert use_fused_ops(plain.ranges[0]) == 0
    kinds = {type(m) for _, m in plain.ranges[0].named_modules()}
    assert nn.RMSNorm in kinds and KernelRMSNorm not in kinds and KernelRoPE not in kinds


def test_greedy_output_identical_with_fused_ops_for_64_tokens(smollm2_package):
    def tokens(fused: bool) -> list[int]:
        with fused_ops_switched(fused):
            pipeline = LocalPipeline.load(smollm2_package, weights="packed")
            if fused:
                kinds = {type(m) for _, m in pipeline.ranges[0].named_modules()} | {type(pipeline.head.norm)}
                assert {KernelRMSNorm, KernelRoPE} <= kinds
                assert kinds & set(FUSED_MLPS) and kinds & set(FUSED_BLOCKS)
            prompt = list(pipeline.tokenizer.encode("The history of computing is a story of"))
            return [t.id for t in generate(LocalTarget.open(pipeline), prompt, SamplingParams(max_tokens=64))]

    assert tokens(True) == tokens(False)
