"""A stage's batch frames with trees: each node's rows are its path's, the accepted path is kept
with the next frame, and a tree or compaction the stage cannot run is refused before any cache
changes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from layerline.proto import activation_pb2 as pb
from layerline.runtime.model.kv_cache import SessionStore
from layerline.runtime.model.layer_range import LayerRange
from layerline.runtime.model.tree import MAX_TREE_NODES, Tree
from layerline.runtime.stage.model import StageModel
from layerline.runtime.stage.wire import FrameError, KeepPath, Rows

from tiny_architectures import CONFIGS, LAYERS

HIDDEN = 64
CONTEXT = 64
PREFIX = 10  # positions before the tree (Gemma 3's window of 8 is crossed)
PARENTS = (-1, 0, 0, 1, 1, 2, 3, 5, 7)  # node 0 continues the prefix; 1 and 2 its children, ...


def stage(arch: str = "llama") -> StageModel:
    layers = LayerRange(CONFIGS[arch], 0, LAYERS)
    mx.eval(layers.parameters())
    return StageModel(layers, SessionStore(layers.make_cache, max_sessions=4), CONTEXT, mx.float32)


def rows(n: int, seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal((1, n, HIDDEN)).astype(np.float32))


def path_rows(tree: Tree, node: int, nodes: mx.array) -> mx.array:
    return nodes[:, mx.array(tree.path(node))]


def held(model: StageModel, session_id: str) -> list[np.ndarray]:
    """A session's keys and values, as far as its cache holds them."""
    cache = model.sessions.get(session_id)
    return [np.array(getattr(c, name)[..., :c.offset - getattr(c, "start", 0), :])
            for c in cache.caches for name in ("keys", "values")]


def same(a: list[np.ndarray], b: list[np.ndarray], atol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=atol, atol=atol)


def test_trees_of_two_sessions_and_a_chain_in_one_frame_give_each_node_its_paths_rows():
    model = stage()
    prefix = {"a": rows(PREFIX, 1), "b": rows(4, 2), "c": rows(3, 3)}
    for session_id, h in prefix.items():
        model.forward_batch([Rows(session_id, 0, h.shape[1])], h)
    tree_a, tree_b = Tree(PREFIX, PARENTS), Tree(4, (-1, 0, 0, 2))
    nodes_a, nodes_b, chain_c = rows(len(PARENTS), 4), rows(4, 5), rows(2, 6)
    out = model.forward_batch(
        [Rows("a", PREFIX, len(PARENTS), PARENTS), Rows("b", 4, 4, tree_b.parents), Rows("c", 3, 2)],
        mx.concatenate([nodes_a, nodes_b, chain_c], axis=1))
    alone = StageModel(model.layers, SessionStore(model.layers.make_cache), CONTEXT, mx.float32)
    for session_id, tree, nodes, offset in (("a", tree_a, nodes_a, 0), ("b", tree_b, nodes_b, len(PARENTS))):
        for node in range(len(tree)):
            path = path_rows(tree, node, nodes)
            h = mx.concatenate([prefix[session_id], path], axis=1)
            expected = alone.forward_batch([Rows(f"{session_id}{node}", 0, h.shape[1])], h)[:, -1]
            np.testing.assert_allclose(np.array(out[:, offset + node]), np.array(expected), rtol=1e-4,
                                       atol=1e-4)
    chain = alone.forward_batch([Rows("c", 0, 5)], mx.concatenate([prefix["c"], chain_c], axis=1))
    np.testing.assert_allclose(np.array(out[:, -2:]), np.array(chain[:, -2:]), rtol=1e-4, atol=1e-4)
    assert model.sessions.get("a").length == PREFIX + len(PARENTS)  # every node, until a path is kept


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_the_accepted_path_kept_with_the_next_frame_leaves_the_stage_as_if_it_alone_was_sent(arch):
    model = stage(arch)
    tree = Tree(PREFIX, PARENTS)
    prefix, nodes, after = rows(PREFIX, 1), rows(len(PARENTS), 2), rows(2, 3)
    model.forward_batch([Rows("s", 0, PREFIX)], prefix)
    model.forward_batch([Rows("s", PREFIX, len(PARENTS), PARENTS)], nodes)
    path = tree.path(8)  # 0 -> 2 -> 5 -> 7 -> 8
    out = model.forward_batch([Rows("s", PREFIX + len(path), 2, keep=KeepPath(PREFIX, tuple(path)))], after)

    alone = StageModel(model.layers, SessionStore(model.layers.make_cache), CONTEXT, mx.float32)
    h = mx.concatenate([prefix, path_rows(tree, 8, nodes), after], axis=1)
    expected = alone.forward_batch([Rows("s", 0, h.shape[1])], h)
    np.testing.assert_allclose(np.array(out), np.array(expected[:, -2:]), rtol=1e-4, atol=1e-4)
    same(held(model, "s"), held(alone, "s"))


def test_a_frame_inside_the_accepted_path_keeps_its_first_nodes_and_one_before_the_tree_none():
    model = stage()
    tree = Tree(PREFIX, PARENTS)
    prefix, nodes, step = rows(PREFIX, 1), rows(len(PARENTS), 2), rows(1, 3)
    model.forward_batch([Rows("s", 0, PREFIX)], prefix)
    model.forward_batch([Rows("s", PREFIX, len(PARENTS), PARENTS)], nodes)
    keep = KeepPath(PREFIX, tuple(tree.path(8)))
    out = model.forward_batch([Rows("s", PREFIX + 2, 1, keep=keep)], step)  # re-feeds the path's third

    alone = StageModel(model.layers, SessionStore(model.layers.make_cache), CONTEXT, mx.float32)
    h = mx.concatenate([prefix, path_rows(tree, 2, nodes), step], axis=1)  # nodes 0 and 2 kept
    np.testing.assert_allclose(np.array(out), np.array(alone.forward_batch([Rows("s", 0, 13)], h)[:, -1:]),
                               rtol=1e-4, atol=1e-4)
    same(held(model, "s"), held(alone, "s"))

    model.forward_batch([Rows("t", 0, PREFIX)], prefix)
    model.forward_batch([Rows("t", PREFIX, len(PARENTS), PARENTS)], nodes)
    model.forward_batch([Rows("t", 4, 1, keep=keep)], step)  # back before the tree: truncated there
    assert model.sessions.get("t").length == 5


def test_a_tree_fed_a_depth_per_frame_gives_the_rows_of_the_tree_sent_whole():
    # As the draft model's scheduler feeds a tree: each frame the tree so far, its last depth's rows.
    model = stage()
    prefix, nodes = rows(PREFIX, 1), rows(len(PARENTS), 2)
    for session_id in ("whole", "by-depth"):
        model.forward_batch([Rows(session_id, 0, PREFIX)], prefix)
    whole = model.forward_batch([Rows("whole", PREFIX, len(PARENTS), PARENTS)], nodes)
    fed = 0
    for depth_end in (1, 3, 6, 8, 9):  # PARENTS lists its nodes depth by depth
        part = model.forward_batch([Rows("by-depth", PREFIX + fed, depth_end - fed, PARENTS[:depth_end])],
                                   nodes[:, fed:depth_end])
        np.testing.assert_allclose(np.array(part), np.array(whole[:, fed:depth_end]), rtol=1e-4, atol=1e-4)
        fed = depth_end
    same(held(model, "by-depth"), held(model, "whole"))


def _bad_frames() -> list[tuple[str, Rows, int, str]]:
    """(case, a bad session's rows after `s` has run PARENTS from PREFIX, the code, the message)."""
    bad = pb.ACTIVATION_ERROR_CODE_BAD_FRAME
    keep = PREFIX + 5
    return [
        ("parent after its child", Rows("s", keep, 3, (-1, 2, 0)), bad, "node 1's parent 2 comes after it"),
        ("cycle", Rows("s", keep, 3, (-1, 2, 1)), bad, "comes after it"),
        ("parent out of range", Rows("s", keep, 2, (-1, -2)), bad, "is not a node of the tree"),
        ("too many nodes", Rows("s", keep, MAX_TREE_NODES + 1, (-1, *range(MAX_TREE_NODES))), bad,
         f"more than the {MAX_TREE_NODES}"),
        ("fewer parents than rows", Rows("s", keep, 3, (-1, 0)), bad, "cannot be the last nodes of a tree"),
        ("depth past the context", Rows("s", CONTEXT - 2, 3, (-1, 0, 1)),
         pb.ACTIVATION_ERROR_CODE_CONTEXT_FULL, "past the context length 64"),
        ("keep of another tree", Rows("s", PREFIX + 1, 1, keep=KeepPath(PREFIX - 1, (0,))), bad,
         "its last frame here carried a tree at slot 10"),
        ("keep not a path", Rows("s", PREFIX + 2, 1, keep=KeepPath(PREFIX, (0, 3))), bad,
         "not a root-to-node path"),
        ("keep of a missing node", Rows("s", PREFIX + 2, 1, keep=KeepPath(PREFIX, (0, 9))), bad,
         "does not have"),
        ("keep without a tree", Rows("fresh", 0, 1, keep=KeepPath(0, (0,))), bad, "carried no tree"),
        ("gap past the kept path", Rows("s", PREFIX + 3, 1, keep=KeepPath(PREFIX, (0, 1))),
         pb.ACTIVATION_ERROR_CODE_POSITION_GAP, "would leave a gap"),
    ]


@pytest.mark.parametrize(("case", "bad", "code", "message"), _bad_frames(), ids=[c[0] for c in _bad_frames()])
def test_a_bad_tree_or_compaction_is_refused_and_every_cache_is_unchanged(case, bad, code, message):
    model = stage()
    model.forward_batch([Rows("s", 0, PREFIX)], rows(PREFIX, 1))
    model.forward_batch([Rows("s", PREFIX, len(PARENTS), PARENTS)], rows(len(PARENTS), 2))
    model.forward_batch([Rows("other", 0, 4)], rows(4, 3))
    before = {sid: held(model, sid) for sid in ("s", "other")}
    batch = [Rows("other", 4, 1), bad]  # a good session beside it: refused with it, untouched
    with pytest.raises(FrameError) as refused:
        model.forward_batch(batch, rows(sum(r.count for r in batch), 4))
    assert refused.value.code == code and message in refused.value.message, refused.value.message
    for session_id, arrays in before.items():
        same(held(model, session_id), arrays, atol=0)
    assert "fresh" not in model.sessions
    # The tree is still there to keep a path of.
    model.forward_batch([Rows("s", PREFIX + 2, 1, keep=KeepPath(PREFIX, (0, 1)))], rows(1, 5))
    assert model.sessions.get("s").length == PREFIX + 3


def test_a_tree_sent_to_layers_that_cannot_run_one_is_refused_with_the_fix():
    model = stage("gemma2")  # its attention soft-caps: computed by its own module
    model.forward_batch([Rows("s", 0, 4)], rows(4, 1))
    with pytest.raises(FrameError, match="cannot run one .* verify chains of drafts") as refused:
        model.forward_batch([Rows("s", 4, 3, (-1, 0, 0))], rows(3, 2))
    assert refused.value.code == pb.ACTIVATION_ERROR_CODE_BAD_FRAME
    assert model.sessions.get("s").length == 4
