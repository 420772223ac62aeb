"""Speculative decoding: the same greedy text as plain decoding, the target's exact sampling
distribution with good and bad drafts, clean rollback, window policy and gate, drafters."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from layerline.packager.window_spec import WindowError, WindowSpec
from layerline.runtime.decode.draft_tree import TreeShape
from layerline.runtime.decode.drafters import ModelDrafter, NgramDrafter
from layerline.runtime.decode.local_pipeline import LocalPipeline
from layerline.runtime.decode.loop import generate
from layerline.runtime.decode.sampling import SamplingParams
from layerline.runtime.decode.targets import LocalTarget
from layerline.runtime.decode.window_cost import SpeculationCosts, StepMeasurement
from layerline.runtime.decode.window_policy import (
    AdaptiveWindow,
    AutoWindow,
    FixedWindow,
    GateSettings,
    WindowPolicy,
    policy_for,
)
from layerline.runtime.model.chat import chat_prompt_tokens, text_prompt_tokens, user_messages
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

# ---------------------------------------------------------------- helpers


def run(pipeline: LocalPipeline, drafter, prompt: list[int], params: SamplingParams,
        policy: WindowPolicy, **kwargs):
    """Tokens (a final stop token left out, as generate() does) and the generation of one
    speculative request on a fresh target session."""
    target = LocalTarget.open(pipeline)
    generation = generate(target, prompt, params, drafter=drafter, policy=policy, **kwargs)
    tokens = [t.id for t in generation]
    if generation.stats.finish_reason == "stop":
        assert tokens[-1] in params.stop_token_ids
        tokens.pop()
    return tokens, generation


def plain(pipeline: LocalPipeline, prompt: list[int], params: SamplingParams) -> list[int]:
    """Tokens of plain decoding, a final stop token left out (as `run` leaves it)."""
    tokens = [t.id for t in generate(LocalTarget.open(pipeline), prompt, params)]
    return tokens[:-1] if tokens and tokens[-1] in params.stop_token_ids else tokens


POLICIES = {
    "fixed-1": lambda: FixedWindow(1),
    "fixed-4": lambda: FixedWindow(4),
    "fixed-16": lambda: FixedWindow(16),
    "adaptive": lambda: AdaptiveWindow(8, 2, 16),
}

# ---------------------------------------------------------------- SmolLM2: greedy identity

CHATS = ["What is the capital of France?", "Write a haiku about the sea."]
CODE = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
        "def mul(a, b):\n")


@pytest.fixture(scope="module")
def smollm2_draft(smollm2_exact_package) -> LocalPipeline:
    return LocalPipeline.load(smollm2_exact_package, tokenizer=False)


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2) -> list[list[int]]:
    manifest = smollm2.package.manifest
    chats = [chat_prompt_tokens(smollm2.tokenizer, manifest, user_messages(c)) for c in CHATS]
    return [*chats, text_prompt_tokens(smollm2.tokenizer, CODE)]


@pytest.fixture(scope="module")
def smollm2_greedy(smollm2) -> SamplingParams:
    return SamplingParams(max_tokens=24, stop_token_ids=smollm2.eos_token_ids)


@pytest.fixture(scope="module")
def smollm2_references(smollm2, smollm2_prompts, smollm2_greedy) -> list[list[int]]:
    return [plain(smollm2, prompt, smollm2_greedy) for prompt in smollm2_prompts]


@pytest.mark.parametrize("policy", [name if name == "adaptive" else pytest.param(name, marks=pytest.mark.slow)
                                    for name in POLICIES])
def test_greedy_output_identical_with_a_draft_model(policy, smollm2, smollm2_draft, smollm2_prompts,
                                                    smollm2_greedy, smollm2_references):
    for prompt, reference in zip(smollm2_prompts, smollm2_references, strict=True):
        drafter = ModelDrafter(smollm2_draft, smollm2_greedy)
        tokens, generation = run(smollm2, drafter, prompt, smollm2_greedy, POLICIES[policy]())
        assert tokens == reference
        assert generation.stats.drafted > 0 and generation.stats.accepted > 0


@pytest.mark.parametrize("policy", [pytest.param(name, marks=pytest.mark.slow)
                                    if name in ("fixed-1", "fixed-16") else name for name in POLICIES])
def test_greedy_output_identical_with_the_ngram_drafter(policy, smollm2, smollm2_prompts,
                                                        smollm2_greedy, smollm2_references):
    accepted = 0
    for prompt, reference in zip(smollm2_prompts, smollm2_references, strict=True):
        tokens, generation = run(smollm2, NgramDrafter(), prompt, smollm2_greedy, POLICIES[policy]())
        assert tokens == reference
        accepted += generation.stats.accepted
    assert accepted > 0  # the code prompt repeats itself


@pytest.mark.slow
def test_greedy_output_identical_with_repetition_penalty(smollm2, smollm2_draft, smollm2_prompts):
    params = SamplingParams(max_tokens=28, repetition_penalty=1.3,
                            stop_token_ids=smollm2.eos_token_ids)
    prompt = smollm2_prompts[2]
    tokens, generation = run(smollm2, ModelDrafter(smollm2_draft, params), prompt, params,
                             FixedWindow(4))
    assert tokens == plain(smollm2, prompt, params)
    assert tokens != plain(smollm2, prompt, SamplingParams(max_tokens=28))  # the penalty matters
    assert generation.stats.accepted > 0


def test_logprobs_are_the_targets_own(smollm2, smollm2_draft, smollm2_prompts):
    params = SamplingParams(max_tokens=8, logprobs=True, top_logprobs=3)
    prompt = smollm2_prompts[0]
    reference = list(generate(LocalTarget.open(smollm2), prompt, params))
    generation = generate(LocalTarget.open(smollm2), prompt, params,
                          drafter=ModelDrafter(smollm2_draft, params), policy=FixedWindow(4))
    tokens = list(generation)
    assert [t.id for t in tokens] == [t.id for t in reference]
    assert any(t.drafted for t in tokens)
    for ours, theirs in zip(tokens, reference, strict=True):
        assert math.isclose(ours.logprob, theirs.logprob, abs_tol=1e-3)
        assert [i for i, _ in ours.top_logprobs] == [i for i, _ in theirs.top_logprobs]


# ---------------------------------------------------------------- tiny models

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smollm2_tokenizer_dir) -> dict[str, LocalPipeline]:
    root = tmp_path_factory.mktemp("speculative-tiny")
    return {
        "target": tiny_pipeline(root, smollm2_tokenizer_dir, seed=1),
        "near": tiny_pipeline(root, smollm2_tokenizer_dir, seed=1, noise=0.05),
        "bad": tiny_pipeline(root, smollm2_tokenizer_dir, seed=2),
        "bad-wide": tiny_pipeline(root, smollm2_tokenizer_dir, seed=3, vocab=TINY_VOCAB + 8),
    }


# ---------------------------------------------------------------- sampled: exact distribution


SAMPLED_CASES = ["near-draft", "bad-draft", "bad-wide-draft-filtered", "ngram"]


@pytest.mark.parametrize("case", [case if case == "near-draft" else pytest.param(case, marks=pytest.mark.slow)
                                  for case in SAMPLED_CASES])
def test_sampled_tokens_follow_the_targets_distribution(case, tiny_models):
    target = tiny_models["target"]
    if case == "bad-wide-draft-filtered":
        params = SamplingParams(max_tokens=3, temperature=0.8, top_k=12, top_p=0.95, min_p=0.02,
                                repetition_penalty=1.2)
    else:
        params = SamplingParams(max_tokens=3, temperature=1.0)
    # A repeat of the target's own continuation, so that n-gram proposals are sometimes right.
    prompt = ([3, 5] + plain(target, [3, 5], SamplingParams(max_tokens=3))) * 2 + [3, 5]
    counts: Counter = Counter()
    drafted = accepted = full = 0
    for seed in range(SAMPLES):
        seeded = replace(params, seed=seed)
        if case == "ngram":
            drafter = NgramDrafter(min_ngram=1, max_ngram=2)
        else:
            draft = tiny_models[case.removesuffix("-filtered").removesuffix("-draft")]
            drafter = ModelDrafter(draft, seeded)
        # The first step drafts too (no first token first): one pass can then accept both drafts.
        tokens, generation = run(target, drafter, prompt, seeded, FixedWindow(2),
                                 first_token_first=False)
        counts[tuple(tokens)] += 1
        drafted += generation.stats.drafted
        accepted += generation.stats.accepted
        full += generation.stats.target_passes == 1
    joint = exact_joint(target, prompt, params)
    outside = [cell for cell in counts if joint[cell] == 0]
    assert not outside, f"sampled sequences the target can never produce: {outside[:5]}"
    p_value, df = chi_square_p(counts, joint, SAMPLES)
    assert p_value > SIGNIFICANCE, f"chi-square p={p_value:.2g} (df={df}) for {case}"
    # Both rules ran: rejections (residual draws) and full acceptances (bonus draws).
    assert 0 < accepted < drafted and full > 0


def test_the_bad_draft_is_far_from_the_target(tiny_models):
    # So the test above would see a rule that let the draft's distribution through.
    params = SamplingParams(temperature=1.0)
    prompt = [3, 5, 3, 5, 3]
    p = exact_joint(tiny_models["target"], prompt, params).sum(axis=(1, 2))
    q = exact_joint(tiny_models["bad"], prompt, params).sum(axis=(1, 2))
    assert 0.5 * np.abs(p - q).sum() > 0.3


def test_same_seed_gives_the_same_tokens_and_other_seeds_differ(tiny_models):
    target, draft = tiny_models["target"], tiny_models["bad"]

    def tokens(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=24, temperature=1.0, seed=seed)
        return run(target, ModelDrafter(draft, params), [1, 2, 3], params,
                   AdaptiveWindow(4, 1, 8))[0]

    assert tokens(5) == tokens(5)
    assert tokens(5) != tokens(6)


# ---------------------------------------------------------------- rollback and limits


class CheckedDrafter:
    """A drafter that checks, at each step's start, that target and draft hold the committed text."""

    def __init__(self, inner: ModelDrafter, target: LocalTarget) -> None:
        self.inner = inner
        self.target = target
        self.steps = 0

    def propose(self, committed: list[int], k: int):
        assert self.target.length == len(committed) - 1  # all but the last token, which is fed next
        assert self.inner.fed == committed[:len(self.inner.fed)]
        assert self.inner.length == len(self.inner.fed)
        self.steps += 1
        return self.inner.propose(committed, k)

    def sync(self, committed: list[int]) -> None:
        self.inner.sync(committed)

    @property
    def replayed(self) -> int:
        return self.inner.replayed


class TimedCosts(SpeculationCosts):
    """The server's cost model, keeping what the loop told it of drafting."""

    def __init__(self) -> None:
        super().__init__()
        self.drafts: list[int] = []
        self.tree_drafts: list[int] = []

    def record_draft(self, tokens: int, seconds: float) -> None:
        self.drafts.append(tokens)
        super().record_draft(tokens, seconds)

    def record_tree_draft(self, depths: int, seconds: float) -> None:
        self.tree_drafts.append(depths)
        super().record_tree_draft(depths, seconds)


@pytest.mark.parametrize("tree", [None, TreeShape(3, 2, 6)], ids=["chain", "tree"])
def test_drafting_that_caught_up_on_the_prompt_is_not_timed_as_drafting(tiny_models, tree):
    """The first drafting step replays the prompt through the draft: timing it as drafting
    would make an auto policy think drafts dear and stop drafting (then catch up, and stop again)."""
    params = SamplingParams(max_tokens=12)
    drafter = ModelDrafter(tiny_models["near"], params)
    steps: list[int] = []
    real_propose = drafter.propose_tree if tree else drafter.propose
    prompt = list(range(1, 41))

    def propose(committed, *args, **kwargs):
        out = real_propose(committed, *args, **kwargs)
        steps.append(drafter.replayed)
        return out

    setattr(drafter, "propose_tree" if tree else "propose", propose)
    costs = TimedCosts()
    generation = generate(LocalTarget.open(tiny_models["target"]), prompt, params, drafter=drafter,
                          policy=FixedWindow(3, costs=costs), tree=tree)
    assert len(list(generation)) == 12 and generation.stats.target_passes > 2
    assert steps[0] == len(prompt) + 1  # the prompt and the token streamed at once, caught up first
    # Then at most the last token and a window's last draft, or a tree's accepted path and the token after it.
    assert all(n <= 2 + (tree.depth if tree else 0) for n in steps[1:])
    timed = costs.tree_drafts if tree else costs.drafts
    assert len(timed) == len(steps) - 1  # every drafting step but the first was timed


def test_target_and_draft_hold_exactly_the_committed_tokens_after_rejections(tiny_models):
    target_model, draft = tiny_models["target"], tiny_models["near"]
    params = SamplingParams(max_tokens=40)
    target = LocalTarget.open(target_model)
    checked = CheckedDrafter(ModelDrafter(draft, params), target)
    generation = generate(target, [1, 2, 3], params, drafter=checked, policy=FixedWindow(6))
    tokens = [t.id for t in generation]
    assert tokens == plain(target_model, [1, 2, 3], params)
    stats = generation.stats
    assert 0 < stats.accepted < stats.drafted and stats.target_passes > 1
    # The first step streams the prompt's token at once, and a last step with no room drafts nothing.
    assert checked.steps >= stats.target_passes - 2
    assert target.length == 3 + len(tokens) - 1


def assert_caches_hold(committed, target, drafter, model, params) -> None:
    """After a closed generation both caches hold `committed` (the target all but its last
    token): the next logits and drafts match a fresh computation."""
    assert target.length == len(committed) - 1
    assert drafter.fed == committed[:len(drafter.fed)] and drafter.length == len(drafter.fed)
    fresh = LocalTarget.open(model).forward(committed, 0)[-1]
    assert np.allclose(np.array(target.forward(committed[-1:], len(committed) - 1)[-1]),
                       np.array(fresh), atol=1e-4)
    assert drafter.propose(committed, 4)[0] == ModelDrafter(model, params).propose(committed, 4)[0]


def test_closing_mid_run_leaves_target_and_draft_consistent(tiny_models):
    model = tiny_models["target"]
    params = SamplingParams(max_tokens=30)
    prompt = [1, 2, 3]
    target = LocalTarget.open(model)
    drafter = ModelDrafter(model, params)  # the target itself: every draft is accepted
    generation = generate(target, prompt, params, drafter=drafter, policy=FixedWindow(8))
    stream = iter(generation)
    taken = [next(stream).id for _ in range(3)]  # the first step's token, then inside a run of 9
    stream.close()
    committed = prompt + taken
    assert generation.stats.target_passes == 2 and generation.stats.accepted == 8
    assert_caches_hold(committed, target, drafter, model, params)


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 17])
def test_max_tokens_is_never_exceeded(max_tokens, tiny_models):
    model = tiny_models["target"]
    params = SamplingParams(max_tokens=max_tokens)
    tokens, generation = run(model, ModelDrafter(model, params), [1, 2, 3], params,
                             FixedWindow(16))
    assert len(tokens) == max_tokens and generation.stats.finish_reason == "length"
    # The first step drafts nothing (its token streams at once); then windows shrink to what is left.
    assert generation.stats.drafted == max(0, max_tokens - 2)


def test_generation_stops_at_the_context_length(tiny_models):
    model = tiny_models["target"]
    context = model.context_length
    prompt = [5] * (context - 4)
    params = SamplingParams(max_tokens=50)
    tokens, generation = run(model, ModelDrafter(model, params), prompt, params,
                             FixedWindow(16), context_length=context)
    assert len(tokens) == 5 and generation.stats.finish_reason == "length"


def test_a_stop_token_ends_the_generation_and_rolls_back(tiny_models):
    model = tiny_models["target"]
    free = plain(model, [1, 2, 3], SamplingParams(max_tokens=12))
    stop = free[4]
    params = SamplingParams(max_tokens=12, stop_token_ids=(stop,))
    target = LocalTarget.open(model)
    generation = generate(target, [1, 2, 3], params, drafter=ModelDrafter(model, params),
                          policy=FixedWindow(8))
    tokens = [t.id for t in generation]
    assert tokens == free[:free.index(stop) + 1] and generation.stats.finish_reason == "stop"
    assert target.length == 3 + len(tokens) - 1


def test_stats_count_drafts_acceptances_and_passes(tiny_models):
    params = SamplingParams(max_tokens=30)
    tokens, generation = run(tiny_models["target"], ModelDrafter(tiny_models["bad"], params),
                             [1, 2, 3], params, AdaptiveWindow(4, 1, 8, gate=None))
    stats = generation.stats
    assert stats.tokens == len(tokens) == 30
    assert stats.accept_rate == stats.accepted / stats.drafted
    assert stats.tokens_per_pass == stats.tokens / stats.target_passes
    assert 1 <= stats.tokens_per_pass <= 9
    assert stats.draft_seconds > 0 and stats.verify_seconds > 0
    assert stats.to_json()["accept_rate"] == round(stats.accept_rate, 4)
    assert stats.gate is not None


def test_the_split_pipeline_session_is_a_target(tiny_models):
    model = tiny_models["target"]
    scheduler = one_stage_scheduler(model)
    params = SamplingParams(max_tokens=20)
    session = scheduler.open("spec-test")
    generation = generate(PipelineTarget(session), [1, 2, 3], params,
                          drafter=ModelDrafter(tiny_models["bad"], params), policy=FixedWindow(4))
    assert [t.id for t in generation] == plain(model, [1, 2, 3], params)
    assert generation.stats.accepted < generation.stats.drafted  # rolled back on every stage
    scheduler.close()


# ---------------------------------------------------------------- model drafter


def test_model_drafter_proposes_the_draft_models_greedy_continuation(tiny_models):
    draft = tiny_models["bad"]
    params = SamplingParams(max_tokens=6)
    tokens, q = ModelDrafter(draft, params).propose([1, 2, 3], 6)
    assert tokens == plain(draft, [1, 2, 3], params) and q is None


class CountingModel:
    """A model that records how many tokens each call feeds."""

    def __init__(self, model: LocalPipeline) -> None:
        self.model = model
        self.head = model.head
        self.fed: list[int] = []

    def __call__(self, tokens: mx.array, caches):
        self.fed.append(tokens.shape[1])
        return self.model(tokens, caches)

    def make_cache(self):
        return self.model.make_cache()


def test_model_drafter_feeds_last_draft_and_bonus_after_full_acceptance(tiny_models):
    counting = CountingModel(tiny_models["bad"])
    drafter = ModelDrafter(counting, SamplingParams())
    committed = [1, 2, 3, 4]
    drafts, _ = drafter.propose(committed, 4)
    assert counting.fed == [4, 1, 1, 1]  # the prompt, then d1..d3 (d4 is never fed)
    counting.fed.clear()
    drafter.sync(committed + drafts + [7])  # all four accepted, plus the target's bonus
    drafter.propose(committed + drafts + [7], 2)
    assert counting.fed == [2, 1]  # [d4, bonus], then the new d1


def test_model_drafter_rolls_back_rejected_drafts(tiny_models):
    draft = tiny_models["bad"]
    params = SamplingParams(temperature=1.0, seed=3)
    drafter = ModelDrafter(draft, params)
    committed = [1, 2, 3, 4]
    drafts, q = drafter.propose(committed, 5)
    assert q is not None and q.shape == (5, TINY_VOCAB)
    np.testing.assert_allclose(np.array(q.sum(axis=-1)), 1.0, atol=1e-5)
    other = next(t for t in range(TINY_VOCAB) if t != drafts[2])
    committed = committed + drafts[:2] + [other]  # two accepted, then the target's own token
    drafter.sync(committed)
    assert drafter.fed == committed[:-1] and drafter.length == len(committed) - 1
    greedy = SamplingParams()
    assert (ModelDrafter(draft, greedy).propose(committed, 3)[0]
            == plain(draft, committed, SamplingParams(max_tokens=3)))


# ---------------------------------------------------------------- n-gram drafter


def test_ngram_drafter_continues_the_longest_match():
    drafter = NgramDrafter(min_ngram=1, max_ngram=3)
    # The trigram [1, 2, 3] last occurred at the start (then 7); the bigram [2, 3] more
    # recently (then 8): the longer match wins.
    assert drafter.propose([1, 2, 3, 7, 9, 2, 3, 8, 1, 2, 3], 2) == ([7, 9], None)


def test_ngram_drafter_takes_the_most_recent_occurrence():
    assert NgramDrafter().propose([4, 5, 6, 4, 5, 7, 4, 5], 1) == ([7], None)


def test_ngram_drafter_extends_a_repeating_pattern_past_the_end():
    assert NgramDrafter().propose([1, 2, 1, 2], 5)[0] == [1, 2, 1, 2, 1]


def test_ngram_drafter_proposes_nothing_without_a_match():
    assert NgramDrafter().propose([1, 2, 3, 4, 5], 4) == ([], None)
    assert NgramDrafter().propose([1, 2, 1, 2], 0) == ([], None)


def test_ngram_drafter_follows_a_rewritten_context():
    drafter = NgramDrafter()
    assert drafter.propose([1, 2, 3, 1, 2], 1)[0] == [3]
    assert drafter.propose([8, 2, 9, 8, 2], 1)[0] == [9]  # not a continuation: index rebuilt
    assert drafter.propose([8, 2, 9, 8, 2, 9, 8], 2)[0] == [2, 9]  # grown incrementally


# ---------------------------------------------------------------- window policy


def test_fixed_window_is_constant_and_clipped_to_what_is_left():
    policy = FixedWindow(4)
    for drafted, accepted in [(4, 0), (4, 4), (4, 2)]:
        policy.record(StepMeasurement(drafted, accepted, 0.01, accepted + 1))
        assert policy.next_window(100) == 4
    assert policy.next_window(3) == 3 and policy.next_window(0) == 0


def test_adaptive_window_grows_by_two_after_full_acceptance_up_to_max():
    policy = AdaptiveWindow(4, 2, 9, gate=None)
    windows = []
    for _ in range(4):
        w = policy.next_window(100)
        policy.record(StepMeasurement(w, w, 0.01, w + 1))
        windows.append(policy.next_window(100))
    assert windows == [6, 8, 9, 9]


def test_adaptive_window_halves_towards_what_a_rejected_step_used():
    policy = AdaptiveWindow(16, 2, 16, gate=None)
    windows = []
    for _ in range(5):
        policy.record(StepMeasurement(policy.next_window(100), 0, 0.01, 1))  # rejected at the first draft
        windows.append(policy.window)
    assert windows == [9, 5, 3, 2, 2]
    policy = AdaptiveWindow(10, 2, 16, gate=None)
    policy.record(StepMeasurement(10, 9, 0.01, 10))  # only the last draft rejected: one smaller
    assert policy.window == 9


def test_adaptive_window_stays_within_its_bounds():
    rng = np.random.default_rng(0)
    policy = AdaptiveWindow(5, 3, 11, gate=None)
    for _ in range(500):
        w = policy.next_window(int(rng.integers(0, 20)))
        assert 0 <= w <= 11
        if w:
            accepted = int(rng.integers(0, w + 1))
            policy.record(StepMeasurement(w, accepted, 0.01, accepted + 1))
        assert 3 <= policy.window <= 11


def test_invalid_windows_are_refused():
    with pytest.raises(WindowError, match="out of order: min_window 2, initial_window 1"):
        AdaptiveWindow(1, 2, 16)
    with pytest.raises(WindowError, match="draft window 0 is out of range"):
        FixedWindow(0)
    with pytest.raises(WindowError, match="window policy 'sometimes' is unknown"):
        policy_for(WindowSpec("sometimes", 4, 2, 8))


def drive(policy: WindowPolicy, steps: int, *, step_s: float, tokens: int, plain_s: float,
          gated: bool = True) -> list[int]:
    """Run `steps` steps in which speculating costs step_s for `tokens` tokens; the windows used."""
    windows = []
    for _ in range(steps):
        w = policy.next_window(100, gated=gated)
        windows.append(w)
        if w:
            policy.record(StepMeasurement(w, tokens - 1, step_s, tokens))
        else:
            policy.record(StepMeasurement(0, 0, plain_s, 1))
    return windows


GATE = GateSettings(measure_steps=3, baseline_steps=2, off_steps=4, max_off_steps=8)


def test_gate_turns_drafting_off_when_speculation_loses_and_probes_again():
    policy = AdaptiveWindow(4, 2, 16, gate=GATE)
    # 2 tokens per 0.03 s speculative step against 0.01 s per plain token: 0.67x.
    windows = drive(policy, 5, step_s=0.03, tokens=2, plain_s=0.01)
    assert 0 not in windows[:3]
    assert windows[3:] == [0, 0]  # the baseline
    decision = policy.decision
    assert decision.drafting is False and "loses" in decision.reason
    assert decision.speedup == pytest.approx(0.01 / 0.015)
    assert decision.plain_s_per_token == pytest.approx(0.01)
    assert decision.speculative_s_per_token == pytest.approx(0.015)
    assert decision.tokens_per_pass == pytest.approx(2)
    assert decision.accept_rate is not None and 0 < decision.accept_rate < 1
    assert drive(policy, 4, step_s=0.03, tokens=2, plain_s=0.01) == [0] * 4  # off for off_steps
    assert policy.decision.drafting and "probing" in policy.decision.reason
    assert policy.next_window(100) == 4  # probing again, from the initial window
    # Losing again doubles the off period (up to max_off_steps).
    windows = drive(policy, 3 + 8, step_s=0.03, tokens=2, plain_s=0.01)
    assert windows[3:] == [0] * 8 and policy.next_window(100) > 0


def test_gate_keeps_drafting_while_speculation_wins():
    policy = AdaptiveWindow(4, 2, 16, gate=GATE)
    windows = drive(policy, 30, step_s=0.02, tokens=5, plain_s=0.01)  # 2.5x
    assert windows.count(0) == 2  # only the baseline measurement
    assert policy.decision.drafting and policy.decision.speedup == pytest.approx(2.5)


def test_ungated_requests_and_gateless_policies_never_stop_drafting():
    policy = AdaptiveWindow(4, 2, 16, gate=GATE)
    assert 0 not in drive(policy, 20, step_s=0.03, tokens=2, plain_s=0.01, gated=False)
    policy = AdaptiveWindow(4, 2, 16, gate=None)
    assert 0 not in drive(policy, 20, step_s=0.03, tokens=2, plain_s=0.01)


# ---------------------------------------------------------------- overlap and run-ahead

OVERLAP_MODES = {"overlap": {"overlap": True}, "run-ahead": {"run_ahead": True}}


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "policy"), [
    ("run-ahead", "auto"), ("overlap", "fixed-4"), ("overlap", "adaptive"), ("run-ahead", "fixed-4")])
def test_greedy_output_identical_with_overlap(mode, policy, smollm2, smollm2_draft, smollm2_prompts,
                                              smollm2_greedy, smollm2_references):
    hits = misses = 0
    for prompt, reference in zip(smollm2_prompts, smollm2_references, strict=True):
        drafter = ModelDrafter(smollm2_draft, smollm2_greedy)
        made = (AutoWindow(4, 1, 8, overlap=True) if policy == "auto" else POLICIES[policy]())
        tokens, generation = run(smollm2, drafter, prompt, smollm2_greedy, made, **OVERLAP_MODES[mode])
        assert tokens == reference
        hits += generation.stats.overlap_hits
        misses += generation.stats.overlap_misses
    assert hits > 0 and misses > 0  # prepared windows were used and discarded


@pytest.mark.slow
def test_sampled_tokens_follow_the_targets_distribution_with_overlap(tiny_models):
    target, draft = tiny_models["target"], tiny_models["near"]
    params = SamplingParams(max_tokens=4, temperature=1.0)
    prompt = [3, 5, 3, 5, 3]
    counts: Counter = Counter()
    hits = misses = 0
    for seed in range(SAMPLES):
        seeded = replace(params, seed=seed)
        # Window 1 from the first step, so the window drafted during the first pass has room; the
        # first 3 of 4 tokens follow the target's joint distribution of 3.
        tokens, generation = run(target, ModelDrafter(draft, seeded), prompt, seeded, FixedWindow(1),
                                 first_token_first=False, run_ahead=True)
        counts[tuple(tokens[:3])] += 1
        hits += generation.stats.overlap_hits
        misses += generation.stats.overlap_misses
    joint = exact_joint(target, prompt, params)
    assert not [cell for cell in counts if joint[cell] == 0]
    p_value, df = chi_square_p(counts, joint, SAMPLES)
    assert p_value > SIGNIFICANCE, f"chi-square p={p_value:.2g} (df={df}) with overlap"
    assert hits > 50 and misses > 50  # both the prepared window and a fresh one were verified


def test_closing_mid_overlapped_step_leaves_target_and_draft_consistent(tiny_models):
    model = tiny_models["target"]
    params = SamplingParams(max_tokens=40)
    prompt = [1, 2, 3]
    target = LocalTarget.open(model)
    drafter = ModelDrafter(model, params)  # the target itself: every draft and guess holds
    generation = generate(target, prompt, params, drafter=drafter, policy=FixedWindow(4),
                          run_ahead=True)
    stream = iter(generation)
    taken = [next(stream).id for _ in range(8)]  # inside the second window: the third is out already
    assert generation._ahead is not None and drafter.length > len(prompt) + len(taken)
    stream.close()
    committed = prompt + taken
    assert generation.stats.overlap_hits >= 1
    assert_caches_hold(committed, target, drafter, model, params)


def test_the_split_pipeline_session_runs_one_token_now_as_the_local_target_does_lazily(tiny_models):
    model = tiny_models["target"]
    scheduler = one_stage_scheduler(model)
    local, split = LocalTarget.open(model), PipelineTarget(scheduler.open("lazy-test"))
    assert local.lazy and not split.lazy
    assert local.last_trace is None
    for target in (local, split):
        target.forward([1, 2, 3], 0)
    token = mx.array([4], dtype=mx.uint32)
    expected = local.forward_lazy(token, 3)
    logits = split.forward_lazy(token, 3)
    assert logits.shape == expected.shape == (1, local.vocab_size)
    assert mx.allclose(logits, expected, atol=1e-4).item()
    assert split.last_trace is not None and split.last_trace.positions == 1
    scheduler.close()


def test_overlap_through_the_split_pipeline_session(tiny_models):
    model = tiny_models["target"]
    scheduler = one_stage_scheduler(model)
    params = SamplingParams(max_tokens=30)
    generation = generate(PipelineTarget(scheduler.open("overlap-test")), [1, 2, 3], params,
                          drafter=ModelDrafter(tiny_models["near"], params), policy=FixedWindow(3),
                          run_ahead=True)
    assert [t.id for t in generation] == plain(model, [1, 2, 3], params)
    assert generation.stats.overlap_hits > 0 and generation.stats.overlap_misses > 0
    scheduler.close()
