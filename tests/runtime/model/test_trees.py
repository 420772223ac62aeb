"""A tree of rows in one pass: each node's row is its root-to-node path's, and keeping one path
leaves the cache as if that path alone had been fed."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from layerline.errors import SessionError
from layerline.runtime.decode.targets import LocalTarget
from layerline.runtime.model.kv_cache import RangeCache
from layerline.runtime.model.layer_range import LayerRange
from layerline.runtime.model.tree import MAX_TREE_NODES, Tree, TreeError, check_tree

from tiny_architectures import CONFIGS, LAYERS

HIDDEN = 64
PREFIX = 10  # positions before the tree (Gemma 3's window of 8 is crossed)
# Node 0 continues the prefix; 1 and 2 are its children, 3 and 4 children of 1, ...
PARENTS = (-1, 0, 0, 1, 1, 2, 3, 5, 7)
TREE_ARCHS = sorted(a for a in CONFIGS if a != "gemma2")  # Gemma 2 computes its own attention


def _range(arch: str) -> LayerRange:
    layers = LayerRange(CONFIGS[arch], 0, LAYERS)
    mx.eval(layers.parameters())
    return layers


def _fed(layers: LayerRange, rows: mx.array) -> RangeCache:
    """A session's caches after `rows` (1, L, D) were fed as a chain."""
    cache = RangeCache(layers.make_cache())
    if rows.shape[1]:
        mx.eval(layers(rows, cache.caches))
    return cache


def _path_rows(tree: Tree, node: int, nodes: mx.array) -> mx.array:
    return nodes[:, mx.array(tree.path(node))]


def _assert_same_cache(a: RangeCache, b: RangeCache) -> None:
    assert a.length == b.length
    for x, y in zip(a.caches, b.caches, strict=True):
        held = x.offset - getattr(x, "start", 0)
        assert held == y.offset - getattr(y, "start", 0)
        for name in ("keys", "values"):
            np.testing.assert_allclose(np.array(getattr(x, name)[..., :held, :]),
                                       np.array(getattr(y, name)[..., :held, :]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", TREE_ARCHS)
def test_each_node_of_a_tree_pass_equals_its_path_run_alone(arch):
    layers = _range(arch)
    mx.random.seed(1)
    prefix, nodes = mx.random.normal((1, PREFIX, HIDDEN)), mx.random.normal((1, len(PARENTS), HIDDEN))
    tree = Tree(PREFIX, PARENTS)
    cache = _fed(layers, prefix)
    out = layers.forward_rows(nodes, [cache.caches], [len(PARENTS)], trees=[tree])
    for node in range(len(PARENTS)):
        alone = _fed(layers, prefix)
        expected = layers(_path_rows(tree, node, nodes), alone.caches)[:, -1]
        np.testing.assert_allclose(np.array(out[:, node]), np.array(expected), rtol=1e-4, atol=1e-4)
    assert cache.length == PREFIX + len(PARENTS)  # every node is held until a path is kept


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "qwen3_moe"])
def test_keeping_a_path_leaves_the_cache_the_path_alone_makes(arch):
    layers = _range(arch)
    mx.random.seed(2)
    prefix, nodes = mx.random.normal((1, PREFIX, HIDDEN)), mx.random.normal((1, len(PARENTS), HIDDEN))
    tree = Tree(PREFIX, PARENTS)
    cache = _fed(layers, prefix)
    mx.eval(layers.forward_rows(nodes, [cache.caches], [len(PARENTS)], trees=[tree]))
    path = tree.path(8)  # 0 -> 2 -> 5 -> 7 -> 8
    cache.keep_path(PREFIX, path)
    alone = _fed(layers, mx.concatenate([prefix, _path_rows(tree, 8, nodes)], axis=1))
    _assert_same_cache(cache, alone)
    # And the next step runs on it as on the path's own cache.
    step = mx.random.normal((1, 3, HIDDEN))
    np.testing.assert_allclose(np.array(layers(step, cache.caches)), np.array(layers(step, alone.caches)),
                               rtol=1e-4, atol=1e-4)


def test_a_tree_fed_over_two_calls_equals_one_call():
    # The draft model feeds one depth's frontier per call, its earlier nodes already cached.
    layers = _range("llama")
    mx.random.seed(3)
    prefix, nodes = mx.random.normal((1, PREFIX, HIDDEN)), mx.random.normal((1, len(PARENTS), HIDDEN))
    tree = Tree(PREFIX, PARENTS)
    once, twice = _fed(layers, prefix), _fed(layers, prefix)
    whole = layers.forward_rows(nodes, [once.caches], [len(PARENTS)], trees=[tree])
    first = layers.forward_rows(nodes[:, :3], [twice.caches], [3], trees=[Tree(PREFIX, PARENTS[:3])])
    rest = layers.forward_rows(nodes[:, 3:], [twice.caches], [len(PARENTS) - 3], trees=[tree])
    np.testing.assert_allclose(np.array(mx.concatenate([first, rest], axis=1)), np.array(whole),
                               rtol=1e-4, atol=1e-4)


def test_trees_and_chains_of_several_sessions_share_a_pass():
    layers = _range("gemma3_text")
    mx.random.seed(4)
    prefixes = [mx.random.normal((1, n, HIDDEN)) for n in (PREFIX, 3, 6)]
    trees = [Tree(PREFIX, PARENTS), None, Tree(6, (-1, 0, 0, 0))]
    counts = [len(PARENTS), 2, 4]
    h = mx.random.normal((1, sum(counts), HIDDEN))
    batched = [_fed(layers, p) for p in prefixes]
    out = layers.forward_rows(h, [c.caches for c in batched], counts, trees=trees)
    pieces = mx.split(h, list(np.cumsum(counts))[:-1], axis=1)
    for i, (prefix, tree, piece) in enumerate(zip(prefixes, trees, pieces, strict=True)):
        alone = _fed(layers, prefix)
        if tree is None:
            expected = layers(piece, alone.caches)
        else:
            expected = layers.forward_rows(piece, [alone.caches], [counts[i]], trees=[tree])
        start = sum(counts[:i])
        np.testing.assert_allclose(np.array(out[:, start:start + counts[i]]), np.array(expected),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("parents", "why"), [
    ((0,), "comes after it"),
    ((-1, 2, 1), "comes after it"),
    ((-1, -2), "not a node of the tree"),
    ((), "at least one node"),
    (tuple(range(-1, MAX_TREE_NODES)), "more than"),
])
def test_trees_that_cannot_run_are_refused(parents, why):
    with pytest.raises(TreeError, match=why):
        check_tree(parents)


def test_a_tree_past_the_context_is_refused():
    with pytest.raises(TreeError, match="past the context length 12"):
        check_tree((-1, 0, 1), base=10, context_length=12)
    assert check_tree((-1, 0, 0, 0), base=10, context_length=12) == [0, 1, 1, 1]


def test_a_range_that_computes_its_own_attention_refuses_a_tree():
    layers = _range("gemma2")
    assert not layers.supports_trees
    with pytest.raises(TreeError, match="cannot run a tree"):
        layers.forward_rows(mx.zeros((1, 2, HIDDEN)), [layers.make_cache()], [2], trees=[Tree(0, (-1, 0))])


def test_a_path_the_cache_does_not_hold_is_refused_and_changes_nothing():
    layers = _range("llama")
    cache = _fed(layers, mx.random.normal((1, 6, HIDDEN)))
    for base, path in [(2, [0, 5]), (2, [1, 1]), (2, []), (7, [0])]:
        assert not cache.can_keep_path(base, path)
        with pytest.raises(SessionError, match="cannot keep the tree path"):
            cache.keep_path(base, path)
    assert cache.length == 6
    cache.keep_path(2, [0, 2, 3])
    assert cache.length == 5


def test_a_local_target_verifies_a_tree_as_each_path_alone(tiny_llama_package):
    from layerline.runtime.decode.local_pipeline import LocalPipeline

    pipeline = LocalPipeline.load(tiny_llama_package, split="0:2,2:4", tokenizer=False)
    prompt, tokens = [5, 9, 13, 2, 7], [11, 20, 21, 30, 31, 40]
    parents = [-1, 0, 0, 1, 2, 4]
    target = LocalTarget.open(pipeline)
    assert target.supports_trees
    target.forward(prompt[:-1], 0)
    logits = target.submit_tree(tokens, parents, len(prompt) - 1).result()
    tree = Tree(len(prompt) - 1, tuple(parents))
    reference = LocalTarget.open(pipeline)
    for node in range(len(tokens)):
        path = [tokens[i] for i in tree.path(node)]
        expected = reference.forward(prompt[:-1] + path, 0)[-1]
        np.testing.assert_allclose(np.array(logits[node]), np.array(expected), rtol=1e-4, atol=1e-4)
    target.keep_path(len(prompt) - 1, tree.path(5))  # 0 -> 2 -> 4 -> 5
    assert target.length == len(prompt) - 1 + 4
    after = target.forward([50], target.length)[0]
    expected = reference.forward(prompt[:-1] + [tokens[i] for i in tree.path(5)] + [50], 0)[-1]
    np.testing.assert_allclose(np.array(after), np.array(expected), rtol=1e-4, atol=1e-4)
