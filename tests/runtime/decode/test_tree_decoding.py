"""Token trees in the decode loop: the drafted tree, its acceptance rules (plain greedy's tokens;
the target's exact sampling distribution with branching 2-4), tree drafting by n-gram matches,
and the loop's tree steps against a target that verifies trees path by path."""

from __future__ import annotations

import concurrent.futures
from collections import Counter
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from layerline.errors import LayerlineError
from layerline.runtime.decode.draft_tree import MAX_TREE_NODES, DraftTree, TreeShape, TreeShapeError
from layerline.runtime.decode.drafters import ModelDrafter, NgramDrafter
from layerline.runtime.decode.local_pipeline import LocalPipeline
from layerline.runtime.decode.loop import StepRecord, generate
from layerline.runtime.decode.sampling import SamplingParams
from layerline.runtime.decode.scheduled_drafter import ScheduledDrafter
from layerline.runtime.decode.targets import LocalTarget
from layerline.runtime.decode.tree_accept import accept_tree, greedy_verdict
from layerline.runtime.decode.window_policy import FixedWindow
from layerline.runtime.stage0.target import PipelineTarget

from sampling_checks import (
    SAMPLES,
    SIGNIFICANCE,
    TINY_VOCAB,
    chi_square_p,
    exact_joint,
    one_stage_scheduler,
    tiny_pipeline,
)
from tree_reference import ChainTreeTarget

# ---------------------------------------------------------------- the tree and its shape


def test_a_chain_is_the_one_branch_tree():
    q = mx.full((3, 8), 1 / 8)
    tree = DraftTree.chain(5, [1, 2, 3], q)
    assert tree.tokens == (5, 1, 2, 3) and tree.parents == (-1, 0, 1, 2)
    assert tree.size == 3 and tree.depth == 3 and tree.depths == (0, 1, 2, 3)
    assert tree.draws == ((1,), (2,), (3,), ())
    assert tree.q is not None and tree.q.shape == (4, 8) and float(tree.q[3].sum()) == 0
    assert tree.path(3) == [0, 1, 2, 3]
    assert DraftTree.root_only(5).size == 0


def test_tree_paths_children_and_pruning_past_the_vocabulary():
    #        0
    #      /   \
    #     1(4)  2(9)
    #     |      |
    #     3(6)  4(2)
    tree = DraftTree((7, 4, 9, 6, 2), (-1, 0, 0, 1, 2), mx.ones((5, 12)) / 12)
    assert tree.children == ((1, 2), (3,), (4,), (), ())
    assert tree.path(4) == [0, 2, 4] and tree.child(0, 9) == 2 and tree.child(1, 9) is None
    pruned = tree.within(8)  # token 9 and its subtree go; its draw stays (always rejected)
    assert pruned.tokens == (7, 4, 6) and pruned.parents == (-1, 0, 1)
    assert pruned.draws[0] == (4, 9)
    assert pruned.q is not None and pruned.q.shape == (3, 8)
    assert tree.within(12) is tree


def test_bad_trees_and_shapes_are_refused():
    with pytest.raises(ValueError, match="parent must come before it"):
        DraftTree((1, 2, 3), (-1, 2, 0))
    with pytest.raises(TreeShapeError, match="at least 1"):
        TreeShape(0, 2)
    with pytest.raises(TreeShapeError, match="more than one pass verifies"):
        TreeShape(4, 4, MAX_TREE_NODES)
    with pytest.raises(TreeShapeError, match="DEPTH,WIDTH"):
        TreeShape.parse("4")
    assert TreeShape.parse("4,2") == TreeShape(4, 2) and TreeShape(4, 2).budget == 8
    assert TreeShape.parse("6,3,16").budget == 16
    assert TreeShape(40, 4).budget == MAX_TREE_NODES - 1


# ---------------------------------------------------------------- n-gram branches


def test_ngram_tree_branches_on_every_earlier_match():
    context = [1, 2, 3, 7, 9, 2, 3, 8, 1, 2, 3, 5, 6, 0, 2, 3]
    drafter = NgramDrafter(min_ngram=1, max_ngram=3)
    chain = drafter.propose_tree(context, TreeShape(3, 1))
    assert list(chain.tokens[1:]) == drafter.propose(context, 3)[0] == [5, 6, 0]
    tree = drafter.propose_tree(context, TreeShape(3, 3))
    # [2, 3] was followed by 5 6 0, 8 1 2 and 7 9 2: three branches from the root.
    assert tree.tokens[0] == 3 and [tree.tokens[c] for c in tree.children[0]] == [5, 8, 7]
    assert tree.q is None and tree.size == 9 and tree.depth == 3


def test_ngram_tree_merges_shared_prefixes_and_keeps_to_its_budget():
    context = [4, 1, 2, 3, 4, 1, 2, 9, 4, 1, 5, 4, 1]
    tree = NgramDrafter(min_ngram=1, max_ngram=2).propose_tree(context, TreeShape(3, 4, 7))
    # After [4, 1]: 5 4 1, 2 9 4 and 2 3 4; the last two share their first token, and the
    # budget of 7 cuts the last branch's last token.
    assert tree.tokens[1:] == (5, 4, 1, 2, 9, 4, 3)
    (first,) = [c for c in tree.children[0] if tree.tokens[c] == 2]
    assert sorted(tree.tokens[c] for c in tree.children[first]) == [3, 9]
    for node, kids in enumerate(tree.children):
        tokens = [tree.tokens[c] for c in kids]
        assert len(tokens) == len(set(tokens)), f"node {node} repeats a child"


# ---------------------------------------------------------------- acceptance


def test_greedy_verdict_follows_the_argmax_down_the_tree():
    tree = DraftTree((7, 4, 9, 6, 2), (-1, 0, 0, 1, 2))
    assert greedy_verdict([9, 0, 2, 0, 5], tree).tokens == [9, 2, 5]
    assert greedy_verdict([9, 0, 2, 0, 5], tree).path == [0, 2, 4]
    assert greedy_verdict([4, 1, 0, 0, 0], tree).tokens == [4, 1]
    assert greedy_verdict([3, 0, 0, 0, 0], tree).tokens == [3]


MARKOV_VOCAB = 6


def markov_tree(rng: np.random.Generator, root: int, q_table: np.ndarray | None, depth: int,
                branching: int, p_table: np.ndarray) -> DraftTree:
    """A tree whose every node has `branching` children: drawn i.i.d. from the draft's row
    (q_table), or its likeliest distinct tokens (q None); repeated draws merged into one node."""
    tokens, parents, draws = [root], [-1], [()]
    frontier = [0]
    for _ in range(depth):
        nxt = []
        for node in frontier:
            if q_table is None:
                drawn = tuple(int(t) for t in np.argsort(-p_table[tokens[node]] ** 0.5
                                                         + rng.random(MARKOV_VOCAB) * 0.3)[:branching])
            else:
                row = q_table[tokens[node]]
                drawn = tuple(int(t) for t in rng.choice(MARKOV_VOCAB, size=branching, p=row))
            draws[node] = drawn
            for token in dict.fromkeys(drawn):
                nxt.append(len(tokens))
                tokens.append(token)
                parents.append(node)
                draws.append(())
        frontier = nxt
    q = None if q_table is None else mx.array(np.stack([q_table[t] for t in tokens]).astype(np.float32))
    return DraftTree(tuple(tokens), tuple(parents), q, tuple(draws))


@pytest.mark.parametrize("branching", [2, 3, 4, "deterministic"])
def test_sampled_tree_acceptance_follows_the_targets_distribution(branching):
    # A synthetic target whose next token depends on the last (a Markov chain), a draft far
    # from it; a step's tree has depth 2; steps repeat until 3 tokens are out.
    rng = np.random.default_rng(7)
    p_table = rng.dirichlet(np.full(MARKOV_VOCAB, 0.6), size=MARKOV_VOCAB)
    q_table = None if branching == "deterministic" else rng.dirichlet(np.full(MARKOV_VOCAB, 0.6),
                                                                      size=MARKOV_VOCAB)
    width = 3 if branching == "deterministic" else branching
    params = SamplingParams(temperature=1.0)
    key = mx.random.key(11)
    counts: Counter = Counter()
    accepted = rejected_somewhere = 0
    samples = 3000
    for _ in range(samples):
        out = [0]
        while len(out) < 4:
            tree = markov_tree(rng, out[-1], q_table, 2, width, p_table)
            logits = mx.array(np.log(np.stack([p_table[t] for t in tree.tokens])).astype(np.float32))
            verdict, key = accept_tree(logits, out, tree, params, key)
            out += verdict.tokens
            accepted += verdict.accepted
            rejected_somewhere += verdict.accepted < tree.depth
        counts[tuple(out[1:4])] += 1
    joint = np.einsum("a,ab,bc->abc", p_table[0], p_table, p_table)
    p_value, df = chi_square_p(counts, joint, samples)
    assert p_value > SIGNIFICANCE, f"chi-square p={p_value:.2g} (df={df}), branching {branching}"
    assert accepted > 0 and rejected_somewhere > 0


# ---------------------------------------------------------------- the loop's tree steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer_dir) -> dict[str, LocalPipeline]:
    root = tmp_path_factory.mktemp("trees-tiny")
    return {"target": tiny_pipeline(root, smollm2_tokenizer_dir, seed=1),
            "near": tiny_pipeline(root, smollm2_tokenizer_dir, seed=1, noise=0.05),
            "bad-wide": tiny_pipeline(root, smollm2_tokenizer_dir, seed=3, vocab=TINY_VOCAB + 8)}


def plain(pipeline: LocalPipeline, prompt: list[int], params: SamplingParams) -> list[int]:
    return [t.id for t in generate(LocalTarget.open(pipeline), prompt, params)]


REPEATING = [3, 5, 7, 3, 5, 9, 3, 5, 7, 2, 3, 5, 9, 4, 3, 5]


def echo_prompt(model: LocalPipeline) -> list[int]:
    """A prompt that repeats the target's own continuation, so that n-gram drafts are often right."""
    return ([3, 5] + plain(model, [3, 5], SamplingParams(max_tokens=6))) * 2 + [3, 5]


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_greedy_tree_output_is_plain_greedy_with_ngram_branches(width, tiny):
    model = tiny["target"]
    params = SamplingParams(max_tokens=40)
    reference = plain(model, REPEATING, params)
    target = ChainTreeTarget(model)
    generation = generate(target, REPEATING, params, drafter=NgramDrafter(min_ngram=1, max_ngram=3),
                          policy=FixedWindow(4), tree=TreeShape(4, width))
    assert [t.id for t in generation] == reference
    stats = generation.stats
    assert stats.tree_steps > 0 and stats.accepted > 0
    assert stats.drafted == sum(len(tokens) - 1 for tokens, _, _ in target.tree_passes)
    assert max(len(tokens) for tokens, _, _ in target.tree_passes) > (width > 1) * 5
    assert target.length == len(REPEATING) + len(reference) - 1
    depths = stats.to_json()["tree"]["depths_drafted"]
    assert len(depths) == 4 and stats.accept_rate_by_depth[0] >= stats.accept_rate_by_depth[-1]


def test_closing_mid_tree_step_leaves_the_target_at_what_was_yielded(tiny):
    model = tiny["target"]
    params = SamplingParams(max_tokens=40)
    target = ChainTreeTarget(model)
    prompt = echo_prompt(model)
    reference = plain(model, prompt, params)
    steps: list[StepRecord] = []
    generation = generate(target, prompt, params, drafter=NgramDrafter(min_ngram=1, max_ngram=2),
                          policy=FixedWindow(4), tree=TreeShape(4, 2), on_step=steps.append)
    stream = iter(generation)
    taken: list[int] = []
    while not (steps and steps[-1].tokens >= 3 and len(taken) == sum(s.tokens for s in steps[:-1]) + 1):
        taken.append(next(stream).id)  # until inside a step's run of 3 tokens or more, after its first
    stream.close()
    assert taken == reference[:len(taken)]
    committed = prompt + taken
    assert target.length == len(committed) - 1
    fresh = LocalTarget.open(model).forward(committed, 0)[-1]
    assert np.allclose(np.array(target.forward(committed[-1:], len(committed) - 1)[-1]), np.array(fresh),
                       atol=1e-4)


def test_trees_refuse_overlap_and_targets_without_trees(tiny):
    params = SamplingParams(max_tokens=4)
    with pytest.raises(LayerlineError, match="do not overlap"):
        generate(ChainTreeTarget(tiny["target"]), [1, 2], params, drafter=NgramDrafter(),
                 policy=FixedWindow(2), tree=TreeShape(2, 2), overlap=True)
    chain_only = ChainTreeTarget(tiny["target"])
    chain_only.supports_trees = False
    with pytest.raises(LayerlineError, match="cannot verify a token tree"):
        generate(chain_only, [1, 2], params, drafter=NgramDrafter(), policy=FixedWindow(2),
                 tree=TreeShape(2, 2))


def test_sampled_tree_steps_through_the_loop_are_reproducible(tiny):
    model = tiny["target"]

    def tokens(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=20, temperature=1.0, seed=seed)
        generation = generate(ChainTreeTarget(model), REPEATING, params,
                              drafter=NgramDrafter(min_ngram=1, max_ngram=3), policy=FixedWindow(3),
                              tree=TreeShape(3, 3))
        return [t.id for t in generation]

    assert tokens(3) == tokens(3) and tokens(3) != tokens(4)


@pytest.mark.slow
def test_sampled_tree_steps_follow_the_targets_distribution_with_ngram_branches(tiny):
    model = tiny["target"]
    params = SamplingParams(max_tokens=3, temperature=1.0)
    prompt = [3, 5, 7, 3, 5, 9, 3, 5, 4, 3, 5]
    counts: Counter = Counter()
    accepted = 0
    samples = 1200
    for seed in range(samples):
        seeded = replace(params, seed=seed)
        generation = generate(ChainTreeTarget(model), prompt, seeded,
                              drafter=NgramDrafter(min_ngram=1, max_ngram=2), policy=FixedWindow(2),
                              tree=TreeShape(2, 3), first_token_first=False)
        counts[tuple(t.id for t in generation)] += 1
        accepted += generation.stats.accepted
    joint = exact_joint(model, prompt, params)
    p_value, df = chi_square_p(counts, joint, samples)
    assert p_value > SIGNIFICANCE, f"chi-square p={p_value:.2g} (df={df})"
    assert accepted > 0


# ---------------------------------------------------------------- a draft model's trees


TARGETS = {"local": LocalTarget.open, "path-by-path": ChainTreeTarget}


def test_the_tree_pass_agrees_with_running_each_path_as_a_chain(tiny):
    model = tiny["target"]
    prompt = [3, 5, 7, 3, 5]
    tree = DraftTree((5, 7, 9, 3, 1, 4, 2), (-1, 0, 0, 1, 1, 2, 4))
    rows = {}
    for name, make in TARGETS.items():
        target = make(model)
        target.forward(prompt[:-1], 0)
        rows[name] = np.array(target.submit_tree(list(tree.tokens), list(tree.parents), 4).result())
        target.keep_path(4, [0, 1, 4, 6])
        assert target.length == 8
        rows[name + " after"] = np.array(target.forward([8], 8))
    np.testing.assert_allclose(rows["local"], rows["path-by-path"], atol=1e-4)
    np.testing.assert_allclose(rows["local after"], rows["path-by-path after"], atol=1e-4)


@pytest.mark.parametrize("target_kind", list(TARGETS))
@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_greedy_tree_output_is_plain_greedy_with_a_draft_model(width, target_kind, tiny):
    model = tiny["target"]
    params = SamplingParams(max_tokens=30)
    for draft in ("near", "bad-wide"):
        reference = plain(model, [1, 2, 3], params)
        target = TARGETS[target_kind](model)
        drafter = ModelDrafter(tiny[draft], params)
        generation = generate(target, [1, 2, 3], params, drafter=drafter, policy=FixedWindow(4),
                              tree=TreeShape(4, width))
        assert [t.id for t in generation] == reference, draft
        stats = generation.stats
        assert stats.tree_steps > 0 and stats.drafted >= stats.tree_steps * min(width, 2)
        assert target.length == 3 + len(reference) - 1
        assert drafter.fed == ([1, 2, 3] + reference)[:len(drafter.fed)]
        assert drafter.length == len(drafter.fed)
        if draft == "near":
            assert stats.accepted > stats.tree_steps  # the near draft is mostly right


def test_a_model_drafters_tree_is_drafted_depth_by_depth_within_its_shape(tiny):
    params = SamplingParams(max_tokens=30)
    drafter = ModelDrafter(tiny["near"], params)
    committed = [1, 2, 3, 4, 5]
    tree = drafter.propose_tree(committed, TreeShape(4, 3, 10))
    assert tree.tokens[0] == 5 and tree.size == 10 and tree.depth == 4 and tree.q is None
    assert all(n <= 3 for n in Counter(tree.depths[1:]).values())
    assert drafter.fed == committed and drafter.length == len(committed)  # back to the prefix
    chain = drafter.propose_tree(committed, TreeShape(4, 1))
    assert list(chain.tokens[1:]) == ModelDrafter(tiny["near"], params).propose(committed, 4)[0]
    sampled = ModelDrafter(tiny["near"], SamplingParams(temperature=1.0, seed=1))
    tree = sampled.propose_tree(committed, TreeShape(3, 4))
    assert tree.q is not None and tree.q.shape == (len(tree.tokens), TINY_VOCAB)
    assert sum(len(d) for d in tree.draws) == 12  # every depth's 4 draws, repeats included
    for node, kids in enumerate(tree.children):
        assert {tree.tokens[c] for c in kids} == set(tree.draws[node])


def test_a_scheduled_drafters_tree_is_the_model_drafters_and_sessions_share_its_passes(tiny):
    params = SamplingParams(max_tokens=30)
    draft = tiny["near"]
    drafts = one_stage_scheduler(draft)
    committed = [1, 2, 3, 4, 5]
    try:
        sessions = [drafts.open(f"d{i}") for i in range(2)]
        drafters = [ScheduledDrafter(s, draft.head.vocab_size, params, supports_trees=True) for s in sessions]
        expected = ModelDrafter(draft, params).propose_tree(committed, TreeShape(4, 3, 10))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            trees = list(pool.map(lambda d: d.propose_tree(committed, TreeShape(4, 3, 10)), drafters))
        for tree in trees:
            assert (tree.tokens, tree.parents) == (expected.tokens, expected.parents)
        # Then a chain from the committed prefix: the tree's nodes are forgotten by its start_pos.
        chain, _ = drafters[0].propose(committed, 4)
        assert chain == ModelDrafter(draft, params).propose(committed, 4)[0]
        sampled = ScheduledDrafter(sessions[1], draft.head.vocab_size,
                                   SamplingParams(temperature=1.0, seed=1), supports_trees=True)
        tree = sampled.propose_tree(committed, TreeShape(3, 4))
        assert tree.q is not None and sum(len(d) for d in tree.draws) == 12
    finally:
        drafts.close()
    assert drafts.to_json()["max_seen"] == 2  # the two trees' frontiers ran in shared passes


@pytest.mark.parametrize("branching", [2, pytest.param(3, marks=pytest.mark.slow),
                                       pytest.param(4, marks=pytest.mark.slow)])
def test_sampled_tree_steps_follow_the_targets_distribution_with_a_draft_model(branching, tiny):
    model = tiny["target"]
    params = SamplingParams(max_tokens=3, temperature=1.0)
    prompt = [3, 5, 3, 5, 3]
    counts: Counter = Counter()
    drafted = accepted = full = 0
    for seed in range(SAMPLES):
        seeded = replace(params, seed=seed)
        # The first step drafts a tree of depth 2: one pass may accept both levels.
        drafter = ModelDrafter(tiny["bad-wide"], seeded)
        generation = generate(LocalTarget.open(model), prompt, seeded, drafter=drafter, policy=FixedWindow(2),
                              tree=TreeShape(2, branching), first_token_first=False)
        counts[tuple(t.id for t in generation)] += 1
        drafted += generation.stats.drafted
        accepted += generation.stats.accepted
        full += generation.stats.target_passes == 1
    joint = exact_joint(model, prompt, params)
    assert not [cell for cell in counts if joint[cell] == 0]
    p_value, df = chi_square_p(counts, joint, SAMPLES)
    assert p_value > SIGNIFICANCE, f"chi-square p={p_value:.2g} (df={df}), branching {branching}"
    assert 0 < accepted < drafted and full > 0


# Fast path of shared tree passes: test_a_scheduled_drafters_tree_is_the_model_drafters_and_sessions_...
@pytest.mark.slow
@pytest.mark.parametrize("branching", [2, 3, 4])
def test_sampled_trees_of_sessions_sharing_passes_follow_the_targets_distribution(branching, tiny):
    """Stage 0's batching: each session drafts its tree on a scheduled drafter and verifies it on
    the target's batch scheduler while other sessions' trees ride the same passes."""
    model, draft = tiny["target"], tiny["bad-wide"]
    params = SamplingParams(max_tokens=3, temperature=1.0)
    prompt = [3, 5, 3, 5, 3]
    targets, drafts = one_stage_scheduler(model), one_stage_scheduler(draft)

    def sample(seed: int) -> tuple[tuple[int, ...], int, int]:
        seeded = replace(params, seed=seed)
        target = PipelineTarget(targets.open(f"t{seed}"))
        session = drafts.open(f"d{seed}")
        drafter = ScheduledDrafter(session, draft.head.vocab_size, seeded, supports_trees=True)
        try:
            generation = generate(target, prompt, seeded, drafter=drafter, policy=FixedWindow(2),
                                  tree=TreeShape(2, branching), first_token_first=False)
            tokens = tuple(t.id for t in generation)
        finally:
            target.session.close()
            session.close()
        return tokens, generation.stats.drafted, generation.stats.accepted

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            runs = list(pool.map(sample, range(SAMPLES)))
    finally:
        targets.close()
        drafts.close()
    counts = Counter(tokens for tokens, _, _ in runs)
    joint = exact_joint(model, prompt, params)
    assert not [cell for cell in counts if joint[cell] == 0]
    p_value, df = chi_square_p(counts, joint, SAMPLES)
    assert p_value > SIGNIFICANCE, f"chi-square p={p_value:.2g} (df={df}), branching {branching}"
    drafted, accepted = sum(r[1] for r in runs), sum(r[2] for r in runs)
    assert 0 < accepted < drafted
    assert targets.to_json()["max_seen"] > 1 and drafts.to_json()["max_seen"] > 1  # shared passes
