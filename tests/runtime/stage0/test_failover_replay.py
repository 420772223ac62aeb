"""A replay after a failover rebuilds what every stage held, trees included: stage 0 (in this
process) over two stage processes and a spare; the last peer is killed while one session's
accepted path waits for its next frame and another's tree is not yet kept. Both sessions'
next passes get the logits of a pipeline that never lost a stage."""

from __future__ import annotations

import numpy as np
import pytest

from layerline.runtime.decode.local_pipeline import LocalPipeline
from layerline.runtime.decode.targets import LocalTarget
from layerline.runtime.model.tree import Tree
from layerline.runtime.serve.stage0 import Stage0, Stage0Options
from layerline.runtime.stage0.target import PipelineTarget

from helpers import StageProcess, brought_up

PROMPT = [5, 9, 14, 3, 27, 8]
PARENTS = [-1, 0, 0, 1, 1, 2, 3, 5, 7]
NODES = [8, 12, 77, 30, 6, 19, 52, 88, 23]  # node 0 is the last prompt token
ATOL = 1e-4


@pytest.fixture
def stages(tiny_llama_package, tmp_path):
    """Stage 0 over two stage processes (0..1 here, 1..3 and 3..4 there) with one spare, and the
    same package whole in this process, for reference."""
    names = ("peer1", "peer2", "spare")
    for name in names:
        (tmp_path / name).mkdir()
    peers = [StageProcess((), tmp_path / name) for name in names]
    stage0 = Stage0(Stage0Options(package=str(tiny_llama_package), peers=[p.endpoint for p in peers[:2]],
                                  spares=[peers[2].endpoint], split="0:1,1:3,3:4", weights="f32",
                                  no_draft=True, cache_dir=tmp_path / "stage0"))
    try:
        with brought_up(stage0):
            yield stage0, peers, LocalPipeline.load(tiny_llama_package, None, "f32", tokenizer=False)
    finally:
        for peer in peers:
            if peer.process.popen.poll() is None:
                peer.stop()


def chain_logits(whole: LocalPipeline, tokens: list[int]) -> np.ndarray:
    """The last row's logits of `tokens` run as a chain on a fresh session of the whole model."""
    return np.array(LocalTarget.open(whole).forward(tokens, 0)[-1])


def test_sessions_with_a_kept_path_and_a_pending_tree_go_on_exactly_after_a_peer_is_replaced(stages):
    stage0, peers, whole = stages
    base = len(PROMPT) - 1
    tree = Tree(base, tuple(PARENTS))
    kept, pending = (PipelineTarget(stage0.scheduler.open(name)) for name in ("kept", "pending"))
    for target in (kept, pending):
        target.submit(PROMPT[:-1], 0).result()
        target.submit_tree(NODES, PARENTS, base).result()
    kept.keep_path(base, tree.path(7))  # rides on the next frame, which the lost stage never sees

    peers[1].kill()

    accepted = PROMPT[:-1] + [NODES[i] for i in tree.path(7)]
    after = np.array(kept.submit([99], len(accepted)).result()[-1])
    np.testing.assert_allclose(after, chain_logits(whole, [*accepted, 99]), rtol=0, atol=ATOL)
    pending.keep_path(base, tree.path(4))  # the tree was replayed as a tree: its path is still there
    accepted = PROMPT[:-1] + [NODES[i] for i in tree.path(4)]
    after = np.array(pending.submit([99], len(accepted)).result()[-1])
    np.testing.assert_allclose(after, chain_logits(whole, [*accepted, 99]), rtol=0, atol=ATOL)

    pause = stage0.status()["pipeline"]["pauses"][-1]
    assert pause["replacement"] == peers[2].endpoint and pause["replayed_sessions"] == 2
    for target in (kept, pending):
        target.session.close()
