"""sample_next_token on hand-made logits over a vocabulary of 8."""

import math
from collections import Counter

import pytest
import torch

from engine.sampler import sample_next_token
from engine.sampling_params import SamplingParams

V = 8
NONE = torch.tensor([], dtype=torch.long)


def _logits(*values: float) -> torch.Tensor:
    return torch.tensor(values + (-1e9,) * (V - len(values)), dtype=torch.float32)


def _probs_logits(*probs: float) -> torch.Tensor:
    """Logits whose softmax at temperature 1 is `probs` (the rest of the vocabulary gets ~0)."""
    return _logits(*(math.log(p) for p in probs))


def _draws(logits: torch.Tensor, params: SamplingParams, n: int = 2000, seed: int = 0, **kw) -> Counter:
    generator = torch.Generator().manual_seed(seed)
    seen = kw.get("seen", NONE)
    output = kw.get("output", NONE)
    return Counter(sample_next_token(logits, params, seen, output, generator) for _ in range(n))


def _greedy(logits: torch.Tensor, seen=NONE, output=NONE, **params) -> int:
    return sample_next_token(
        logits, SamplingParams(temperature=0.0, **params), seen, output, torch.Generator()
    )


def test_greedy_picks_the_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9, 0.0, 1.0, 2.0, -5.0])
    assert _greedy(logits) == 1


def test_greedy_ignores_the_generator_state() -> None:
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1))
    picks = {
        sample_next_token(
            logits, SamplingParams(temperature=0.0), NONE, NONE, torch.Generator().manual_seed(s)
        )
        for s in range(20)
    }
    assert picks == {int(torch.argmax(logits))}


def test_top_k_1_always_gives_the_argmax_at_temperature_1() -> None:
    logits = torch.tensor([1.0, 1.2, 0.9, 1.1, 0.0, 1.15, 0.5, 1.0])
    assert _draws(logits, SamplingParams(temperature=1.0, top_k=1), n=300) == Counter({1: 300})


def test_top_k_keeps_only_the_k_most_likely_tokens() -> None:
    logits = torch.tensor([1.0, 1.2, 0.9, 1.1, 0.0, 1.15, 0.5, 1.0])
    assert set(_draws(logits, SamplingParams(temperature=1.0, top_k=3))) == {1, 3, 5}


def test_full_distribution_is_sampled_without_cuts() -> None:
    counts = _draws(_probs_logits(0.5, 0.3, 0.2), SamplingParams(temperature=1.0), n=4000)
    assert set(counts) == {0, 1, 2}
    assert counts[0] / 4000 == pytest.approx(0.5, abs=0.04)
    assert counts[2] / 4000 == pytest.approx(0.2, abs=0.04)


def test_top_p_keeps_the_smallest_prefix_whose_mass_reaches_p() -> None:
    counts = _draws(_probs_logits(0.5, 0.3, 0.2), SamplingParams(temperature=1.0, top_p=0.6))
    assert set(counts) == {0, 1}
    # renormalised over the kept prefix: 0.5 / 0.8
    assert counts[0] / 2000 == pytest.approx(0.625, abs=0.04)


def test_top_p_below_the_top_probability_keeps_only_the_top_token() -> None:
    counts = _draws(_probs_logits(0.2, 0.5, 0.3), SamplingParams(temperature=1.0, top_p=0.4), n=500)
    assert counts == Counter({1: 500})


def test_min_p_removes_tokens_below_min_p_times_the_top_probability() -> None:
    # 0.5, 0.3, 0.15, 0.05 with min_p 0.25: threshold 0.125 drops only the last
    logits = _probs_logits(0.5, 0.3, 0.15, 0.05)
    assert set(_draws(logits, SamplingParams(temperature=1.0), n=4000)) == {0, 1, 2, 3}
    assert set(_draws(logits, SamplingParams(temperature=1.0, min_p=0.25), n=4000)) == {0, 1, 2}


def test_temperature_sharpens_the_distribution() -> None:
    logits = _probs_logits(0.5, 0.3, 0.2)
    cold = _draws(logits, SamplingParams(temperature=0.2), n=2000)
    assert cold[0] / 2000 > 0.9


def test_repetition_penalty_divides_a_seen_positive_logit_and_flips_greedy() -> None:
    logits = _logits(2.0, 1.5, 0.5)
    assert _greedy(logits) == 0
    seen = torch.tensor([0, 0, 4])
    assert _greedy(logits, seen=seen, repetition_penalty=1.2) == 0  # 2.0 / 1.2 = 1.67 still > 1.5
    assert _greedy(logits, seen=seen, repetition_penalty=1.5) == 1  # 2.0 / 1.5 = 1.33 < 1.5


def test_repetition_penalty_multiplies_a_seen_negative_logit() -> None:
    logits = _logits(-1.0, -1.2, -3.0)
    assert _greedy(logits, seen=torch.tensor([0]), repetition_penalty=1.5) == 1  # -1.5 < -1.2


def test_repetition_penalty_counts_prompt_tokens_not_just_output() -> None:
    logits = _logits(2.0, 1.5)
    assert _greedy(logits, seen=torch.tensor([0]), output=NONE, repetition_penalty=2.0) == 1


def test_presence_penalty_lowers_every_output_token_once() -> None:
    logits = _logits(2.0, 1.5)
    output = torch.tensor([0, 0, 0])
    assert _greedy(logits, seen=output, output=output, presence_penalty=0.4) == 0  # 1.6 > 1.5
    assert _greedy(logits, seen=output, output=output, presence_penalty=0.6) == 1  # 1.4 < 1.5


def test_frequency_penalty_grows_with_the_count() -> None:
    logits = _logits(2.0, 1.5)
    once, thrice = torch.tensor([0]), torch.tensor([0, 0, 0])
    assert _greedy(logits, seen=once, output=once, frequency_penalty=0.3) == 0  # 1.7
    assert _greedy(logits, seen=thrice, output=thrice, frequency_penalty=0.3) == 1  # 1.1


def test_presence_and_frequency_penalties_ignore_prompt_only_tokens() -> None:
    logits = _logits(2.0, 1.5)
    assert (
        _greedy(logits, seen=torch.tensor([0]), output=NONE, presence_penalty=2.0, frequency_penalty=2.0) == 0
    )


def test_negative_presence_penalty_encourages_repeats() -> None:
    logits = _logits(1.5, 2.0)
    output = torch.tensor([0])
    assert _greedy(logits, seen=output, output=output, presence_penalty=-1.0) == 0


def test_sampler_leaves_the_callers_logits_unchanged() -> None:
    logits = _logits(2.0, 1.5, 0.5)
    before = logits.clone()
    _greedy(
        logits,
        seen=torch.tensor([0, 1]),
        output=torch.tensor([0]),
        repetition_penalty=2.0,
        presence_penalty=1.0,
    )
    assert torch.equal(logits, before)


def test_same_generator_seed_gives_the_same_sequence_of_samples() -> None:
    logits = torch.randn(V, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, top_p=0.95)

    def sequence(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [sample_next_token(logits, params, NONE, NONE, generator) for _ in range(50)]

    assert sequence(7) == sequence(7)
    assert sequence(7) != sequence(8)
