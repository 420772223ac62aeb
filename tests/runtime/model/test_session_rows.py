"""A batch pass: rows of several sessions through a layer range at once equal each session's own pass."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from layerline.errors import LayerRangeError
from layerline.runtime.model import attention as attention_module
from layerline.runtime.model import session_rows
from layerline.runtime.model.fused_ops import fused_ops_enabled, fused_sessions_attention
from layerline.runtime.model.layer_range import LayerRange

from tiny_architectures import CONFIGS, LAYERS

HIDDEN = 64
PREFIXES = [10, 3, 0, 12]  # positions each session holds before the batch (Gemma 3 slides over 8)
ROWS = [1, 5, 7, 2]  # rows each session brings: a plain step, a draft window, a prompt chunk, ...


def _sessions(layers: LayerRange, seed: int) -> list[list]:
    """Caches of len(PREFIXES) sessions, each fed its prefix alone."""
    mx.random.seed(seed)
    caches = [layers.make_cache() for _ in PREFIXES]
    for cache, length in zip(caches, PREFIXES, strict=True):
        if length:
            mx.eval(layers(mx.random.normal((1, length, HIDDEN)), cache))
    return caches


@pytest.mark.parametrize("joint", [True, False], ids=["one-call", "call-per-session"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_a_batch_pass_equals_each_sessions_own_pass(arch, joint, monkeypatch):
    # Sessions attend in one call (as on a GPU), or one call each (a CPU, or batches too big).
    monkeypatch.setattr(session_rows, "JOINT_ON_CPU", joint)
    layers = LayerRange(CONFIGS[arch], 0, LAYERS)
    mx.eval(layers.parameters())
    batched, alone = _sessions(layers, seed=1), _sessions(layers, seed=1)
    mx.random.seed(2)
    for step in range(2):  # the second step runs on caches the batch pass wrote
        rows = ROWS if step == 0 else [1, 1, 3, 1]
        h = mx.random.normal((1, sum(rows), HIDDEN))
        out = layers.forward_rows(h, batched, rows)
        pieces = mx.split(h, list(np.cumsum(rows))[:-1], axis=1)
        expected = mx.concatenate([layers(piece, cache) for piece, cache in zip(pieces, alone, strict=True)],
                                  axis=1)
        np.testing.assert_allclose(np.array(out), np.array(expected), rtol=1e-4, atol=1e-4)
        assert [c[0].offset for c in batched] == [c[0].offset for c in alone]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_one_row_sessions_attend_in_one_call_as_each_alone(arch, monkeypatch):
    # Decode steps of every session: on the CPU kernel one attention call per layer over all their
    # caches (Gemma 3's sliding layers within their window), equal to each session's own pass.
    calls = []

    def counted(*args):
        calls.append(len(args[1]))
        return fused_sessions_attention(*args)

    monkeypatch.setattr(attention_module, "fused_sessions_attention", counted)
    layers = LayerRange(CONFIGS[arch], 0, LAYERS)
    mx.eval(layers.parameters())
    batched, alone = _sessions(layers, seed=3), _sessions(layers, seed=3)
    mx.random.seed(4)
    for _ in range(3):
        h = mx.random.normal((1, len(PREFIXES), HIDDEN))
        out = layers.forward_rows(h, batched, [1] * len(PREFIXES))
        expected = mx.concatenate([layers(h[:, i:i + 1], cache) for i, cache in enumerate(alone)], axis=1)
        np.testing.assert_allclose(np.array(out), np.array(expected), rtol=1e-4, atol=1e-4)
    if fused_ops_enabled() and layers.supports_trees:  # attention routed here, on the CPU kernel
        assert calls == [len(PREFIXES)] * (3 * LAYERS)


def test_a_batch_of_one_session_is_the_plain_pass():
    layers = LayerRange(CONFIGS["llama"], 0, LAYERS)
    mx.eval(layers.parameters())
    cache, reference = layers.make_cache(), layers.make_cache()
    h = mx.random.normal((1, 4, HIDDEN))
    assert mx.array_equal(layers.forward_rows(h, [cache], [4]), layers(h, reference))


def test_rows_that_do_not_add_up_are_refused():
    layers = LayerRange(CONFIGS["llama"], 0, LAYERS)
    with pytest.raises(LayerRangeError, match="3 rows cannot be"):
        layers.forward_rows(mx.zeros((1, 3, HIDDEN)), [layers.make_cache(), layers.make_cache()], [1, 1])
