"""The auto tree: the (depth, width) of best expected tokens per second, on synthetic costs."""

from __future__ import annotations

from layerline.runtime.decode.draft_tree import TreeShape
from layerline.runtime.decode.tree_policy import INITIAL_SHAPE, PROBE_SHAPE, AutoTree, FixedTree
from layerline.runtime.decode.window_cost import PassCost, SpeculationCosts, TreeAcceptance, choose_tree

# A drafter like the Qwen 0.5B for the 1.5B on code: 79 % per chain depth, the target's token
# among the draft's top 2 / 3 / 4 in 88 / 91 / 93 % of positions.
CODE = TreeAcceptance(by_depth=(0.79,) * 8, top_r=(0.79, 0.88, 0.91, 0.93))


def rates(acceptance: TreeAcceptance, depths: int = 8, widths: int = 4) -> list[list[float]]:
    return [[acceptance.continue_rate(d, w) for d in range(1, depths + 1)] for w in range(1, widths + 1)]


def test_more_candidates_per_depth_miss_less_by_the_calibrated_ranks():
    assert CODE.continue_rate(1, 1) == 0.79
    assert abs(CODE.continue_rate(1, 2) - 0.88) < 1e-9 and abs(CODE.continue_rate(1, 4) - 0.93) < 1e-9
    uncalibrated = TreeAcceptance(by_depth=(0.6,))
    assert uncalibrated.continue_rate(5, 1) == 0.6 < uncalibrated.continue_rate(5, 2) < 1


def test_a_slow_link_buys_a_wide_deep_tree():
    # 20 ms links: a pass costs 60 ms whatever its rows, a draft depth 8 ms.
    choice = choose_tree(rates(CODE), PassCost(0.060, 0.0005), 0.008, max_nodes=32)
    assert choice.width >= 2 and choice.depth >= 4, choice
    assert choice.gain is not None and choice.gain > choose_tree(
        rates(CODE)[:1], PassCost(0.060, 0.0005), 0.008, max_nodes=32).gain  # beats the best chain


def test_a_cheap_pass_shrinks_the_tree_to_a_chain_or_nothing():
    # Rows as dear as the pass itself: extra nodes never pay.
    narrow = choose_tree(rates(CODE), PassCost(0.004, 0.004), 0.002, max_nodes=32)
    assert narrow.width == 1 or narrow.depth == 0, narrow
    # A draft depth as dear as the pass: nothing pays.
    off = choose_tree(rates(CODE), PassCost(0.004, 0.0001), 0.010, max_nodes=32)
    assert off.depth == 0 and off.gain is not None and off.gain < 1, off


def test_under_batch_load_the_tree_counts_its_nodes_as_rows_beside_the_others():
    cost = PassCost(0.020, 0.004)  # rows dear next to the pass: a CPU under load
    alone = choose_tree(rates(CODE), cost, 0.002, max_nodes=32)
    shared = choose_tree(rates(CODE), cost, 0.002, max_nodes=32, sessions=8)
    assert shared.nodes < alone.nodes, (alone, shared)


def test_the_auto_tree_starts_from_the_calibration_and_learns_what_it_sees():
    costs = SpeculationCosts()
    policy = AutoTree(costs, acceptance=CODE)
    assert policy.next_shape(16) == INITIAL_SHAPE  # no cost measured yet
    costs.record_pass(1, 0.060, None)
    costs.record_pass(9, 0.064, None)
    costs.record_tree_draft(4, 0.032)
    wide = policy.next_shape(16)
    assert wide is not None and wide.width >= 2 and costs.last_tree_choice is policy.last_choice
    # Its trees never go past depth 1: the learnt rates drop, and the tree with them.
    for _ in range(40):
        policy.record(wide.width, wide.depth, 0)
    shallow = policy.next_shape(16)
    assert shallow is None or shallow.depth < wide.depth
    assert policy.next_shape(16, gated=False) == INITIAL_SHAPE  # a seeded sampled request
    assert costs.accept_prior < 0.5  # its trees' misses moved the server's mean too
    assert policy.next_shape(2) is None or policy.next_shape(2).depth <= 2


def test_a_fixed_tree_keeps_its_shape_within_what_is_left():
    tree = FixedTree(TreeShape(6, 3, 16))
    assert tree.next_shape(10) == TreeShape(6, 3, 16)
    assert tree.next_shape(2) == TreeShape(2, 3, 6)
    assert tree.next_shape(0) is None


def test_after_an_off_period_a_small_tree_probes_again():
    costs = SpeculationCosts()
    costs.record_pass(1, 0.004, None)
    costs.record_pass(9, 0.040, None)
    costs.record_tree_draft(4, 0.040)  # drafting as dear as the pass: nothing pays
    policy = AutoTree(costs, acceptance=CODE)
    shapes = [policy.next_shape(16) for _ in range(18)]
    assert shapes[:17] == [None] * 17 and shapes[17] == PROBE_SHAPE
