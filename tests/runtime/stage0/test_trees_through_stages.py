"""Trees through real stage processes: stage 0 (in this process) over two peers, each running a
part of a tiny llama. Every node of a tree pass gets the logits of its root-to-node path run as a
chain, and after the accepted path is kept the next pass is the pass of a pipeline that only
ever saw that path; two sessions' trees share one batch pass."""

from __future__ import annotations

import numpy as np
import pytest

from layerline.runtime.decode.local_pipeline import LocalPipeline
from layerline.runtime.decode.targets import LocalTarget
from layerline.runtime.model.tree import Tree, TreeError
from layerline.runtime.serve.stage0 import Stage0, Stage0Options
from layerline.runtime.stage0 import pick
from layerline.runtime.stage0.target import PipelineTarget

from helpers import StageProcess, brought_up

PROMPT = [5, 9, 14, 3, 27, 8]
PARENTS = [-1, 0, 0, 1, 1, 2, 3, 5, 7]  # node 0 is the last prompt token; 1 and 2 its children, ...
NODES = [41, 12, 77, 30, 6, 19, 52, 88, 23]
ATOL = 1e-4


@pytest.fixture(scope="module")
def stages(tiny_llama_package, tmp_path_factory):
    """Stage 0 over two stage processes (layers 0..1 here, then 1..3 and 3..4), and the same
    package whole in this process, for reference."""
    cache = tmp_path_factory.mktemp("trees")
    peers = [StageProcess((), cache) for _ in range(2)]
    stage0 = Stage0(Stage0Options(package=str(tiny_llama_package), peers=[p.endpoint for p in peers],
                                  split="0:1,1:3,3:4", weights="f32", no_draft=True, cache_dir=cache))
    try:
        with brought_up(stage0):
            yield stage0, LocalPipeline.load(tiny_llama_package, None, "f32", tokenizer=False)
    finally:
        for peer in peers:
            peer.stop()


def chain_logits(whole: LocalPipeline, tokens: list[int]) -> np.ndarray:
    """The last row's logits of `tokens` run as a chain on a fresh session of the whole model."""
    return np.array(LocalTarget.open(whole).forward(tokens, 0)[-1])


def path_tokens(tree: Tree, node: int, nodes: list[int]) -> list[int]:
    return [nodes[i] for i in tree.path(node)]


def test_each_node_of_a_tree_through_the_stages_gets_its_paths_logits_and_the_kept_path_goes_on(stages):
    stage0, whole = stages
    target = PipelineTarget(stage0.scheduler.open("tree"))
    assert target.supports_trees
    base = len(PROMPT) - 1  # the last prompt token is the tree's root, as the decode loop sends it
    target.submit(PROMPT[:-1], 0).result()
    tree = Tree(base, tuple(PARENTS))
    nodes = [PROMPT[-1], *NODES[1:]]
    logits = np.array(target.submit_tree(nodes, PARENTS, base).result())
    assert logits.shape[0] == len(PARENTS)
    for node in range(len(PARENTS)):
        expected = chain_logits(whole, PROMPT[:-1] + path_tokens(tree, node, nodes))
        np.testing.assert_allclose(logits[node], expected, rtol=0, atol=ATOL, err_msg=f"node {node}")

    path = tree.path(7)  # 0 -> 2 -> 5 -> 7
    accepted = PROMPT[:-1] + path_tokens(tree, 7, nodes)
    target.keep_path(base, path)
    after = np.array(target.submit([99], base + len(path)).result()[-1])
    np.testing.assert_allclose(after, chain_logits(whole, [*accepted, 99]), rtol=0, atol=ATOL)
    target.session.close()


def test_a_path_that_is_not_the_trees_is_refused_before_it_is_sent(stages):
    stage0, _ = stages
    target = PipelineTarget(stage0.scheduler.open("wrong-path"))
    target.submit(PROMPT, 0).result()
    target.submit_tree(NODES[:3], [-1, 0, 0], len(PROMPT)).result()
    with pytest.raises(TreeError, match="not a root-to-node path"):
        target.keep_path(len(PROMPT), [0, 1, 2])
    with pytest.raises(TreeError, match="no tree at position 3"):
        target.keep_path(3, [0])
    with pytest.raises(TreeError, match="comes after it"):
        target.submit_tree(NODES[:3], [-1, 2, 0], len(PROMPT) + 1)
    target.session.close()


@pytest.mark.slow
def test_two_sessions_trees_share_one_pass_and_each_keeps_its_own_path(stages, monkeypatch):
    stage0, whole = stages
    scheduler = stage0.scheduler
    # The lane waits for both sessions however slow this machine is, so that they share passes.
    monkeypatch.setattr(pick, "MAX_PATIENCE_S", 10.0)
    sessions = [scheduler.open("a"), scheduler.open("b")]
    for session in sessions:
        session.pace.turnaround_s = 5.0
    targets = [PipelineTarget(session) for session in sessions]
    prompts = [PROMPT, [7, 7, 2, 60, 1, 33, 4, 9]]
    trees = [Tree(len(PROMPT) - 1, tuple(PARENTS)), Tree(len(prompts[1]) - 1, (-1, 0, 0, 2, 2, 4))]
    node_tokens = [[PROMPT[-1], *NODES[1:]], [prompts[1][-1], 50, 51, 52, 53, 54]]
    passes = [t.submit(p[:-1], 0) for t, p in zip(targets, prompts, strict=True)]
    for pending in passes:
        pending.result()
    before = scheduler.to_json()["passes"]
    passes = [t.submit_tree(n, list(tree.parents), tree.base)
              for t, n, tree in zip(targets, node_tokens, trees, strict=True)]
    logits = [np.array(pending.result()) for pending in passes]
    assert scheduler.to_json()["passes"] == before + 1  # both trees in one pass
    for prompt, tree, nodes, rows in zip(prompts, trees, node_tokens, logits, strict=True):
        for node in range(len(tree)):
            expected = chain_logits(whole, prompt[:-1] + path_tokens(tree, node, nodes))
            np.testing.assert_allclose(rows[node], expected, rtol=0, atol=ATOL, err_msg=f"node {node}")

    kept = [tree.path(len(tree) - 1) for tree in trees]  # each session its own path
    for target, tree, path in zip(targets, trees, kept, strict=True):
        target.keep_path(tree.base, path)
    passes = [target.submit([99], tree.base + len(path))
              for target, tree, path in zip(targets, trees, kept, strict=True)]
    after = [np.array(pending.result()[-1]) for pending in passes]
    assert scheduler.to_json()["passes"] == before + 2
    for prompt, tree, nodes, path, row in zip(prompts, trees, node_tokens, kept, after, strict=True):
        accepted = prompt[:-1] + path_tokens(tree, path[-1], nodes)
        np.testing.assert_allclose(row, chain_logits(whole, [*accepted, 99]), rtol=0, atol=ATOL)
    for session in sessions:
        session.close()
