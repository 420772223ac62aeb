"""Sampling: settings are validated, filters keep the right tokens, seeds reproduce."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from layerline.errors import SamplingError
from layerline.runtime.decode.sampling import Sampler, SamplingParams, log_softmax

# Probabilities 0.5, 0.25, 0.15, 0.07, 0.03 over a five-token vocabulary.
PROBS = [0.5, 0.25, 0.15, 0.07, 0.03]
LOGITS = mx.array([[math.log(p) for p in PROBS]])


def draws(params: SamplingParams, n: int = 400, logits: mx.array = LOGITS) -> set[int]:
    sampler = Sampler(params)
    return {int(sampler(logits).item()) for _ in range(n)}


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -1), ("min_p", 1.2), ("repetition_penalty", 0.0), ("max_tokens", 0),
    ("seed", -3), ("top_logprobs", 21), ("stop", ("",)),
])
def test_invalid_sampling_values_are_refused_naming_the_setting(field, value):
    with pytest.raises(SamplingError, match=f"invalid {field}"):
        SamplingParams(**{field: value})


def test_greedy_picks_the_most_likely_token():
    assert draws(SamplingParams(temperature=0.0), n=5) == {0}


def test_temperature_sampling_reaches_every_token():
    assert draws(SamplingParams(temperature=1.0, seed=1), n=800) == {0, 1, 2, 3, 4}


def test_top_k_keeps_the_k_likeliest():
    assert draws(SamplingParams(temperature=1.0, top_k=2, seed=2)) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    # 0.5 + 0.25 = 0.75 < 0.8, so the third token is needed, the fourth is not.
    assert draws(SamplingParams(temperature=1.0, top_p=0.8, seed=3)) == {0, 1, 2}


def test_min_p_drops_tokens_below_a_share_of_the_likeliest():
    # Threshold 0.4 * 0.5 = 0.2: tokens of 0.25 and 0.5 stay.
    assert draws(SamplingParams(temperature=1.0, min_p=0.4, seed=4)) == {0, 1}


def test_repetition_penalty_turns_greedy_away_from_recent_tokens():
    sampler = Sampler(SamplingParams(repetition_penalty=5.0), prompt=[0])
    logits = mx.array([[2.0, 1.0, 0.5, -1.0, -2.0]])
    assert int(sampler(logits).item()) == 1  # 2.0 / 5 < 1.0
    assert int(sampler(logits).item()) == 2  # now token 1 is recent too


def test_same_seed_draws_the_same_sequence_and_other_seeds_differ():
    logits = mx.zeros((1, 1000))

    def sequence(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [int(sampler(logits).item()) for _ in range(20)]

    assert sequence(7) == sequence(7)
    assert sequence(7) != sequence(8)


def test_log_softmax_gives_the_models_log_probabilities():
    np.testing.assert_allclose(np.exp(np.array(log_softmax(LOGITS))), [PROBS], atol=1e-6)
