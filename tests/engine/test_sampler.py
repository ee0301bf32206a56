"""Sampler and SamplingBatch on hand-made logits over a vocabulary of 8 (CPU)."""

import math
from collections import Counter

import pytest
import torch

from engine.core.structured_output import GrammarMasks
from engine.executor.sampler import Sampler, _apply_grammar_masks, _apply_penalties, seeded_uniforms
from engine.executor.sampling_batch import SamplingBatch
from engine.kernels import cpu_kernels
from engine.sampling_params import (
    GREEDY_TEMPERATURE,
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
    SamplingParams,
    SamplingParamsError,
)

V = 8
NONE = torch.tensor([], dtype=torch.long)
EVERY_FEATURE = [  # three rows that together use every part of the sampler
    SamplingParams(temperature=0.0, repetition_penalty=1.3, logprobs=2),
    SamplingParams(top_k=3, top_p=0.9, min_p=0.05, presence_penalty=0.5, seed=3),
    SamplingParams(top_k=2, frequency_penalty=0.2),
]


def _logits(*values: float) -> torch.Tensor:
    return torch.tensor(values + (-1e9,) * (V - len(values)), dtype=torch.float32)


def _probs_logits(*probs: float) -> torch.Tensor:
    """Logits whose softmax at temperature 1 is `probs` (the rest of the vocabulary gets ~0)."""
    return _logits(*(math.log(p) for p in probs))


def _batch(params: list[SamplingParams], prompts=None, outputs=None, vocab_size: int = V) -> SamplingBatch:
    empty = [[]] * len(params)
    return SamplingBatch.build(params, prompts or empty, outputs or empty, "cpu", vocab_size)


def _sample(logits: torch.Tensor, params: list[SamplingParams], seed: int = 0, **kw) -> list[int]:
    sampler = Sampler(torch.Generator().manual_seed(seed))
    return sampler(logits, _batch(params, **kw)).sampled_token_ids.tolist()


def _draws(logits: torch.Tensor, params: SamplingParams, n: int = 2000, seed: int = 0) -> Counter:
    """n independent draws in one step: n rows with the same logits and params."""
    return Counter(_sample(logits.expand(n, -1), [params] * n, seed))


def _greedy(logits: torch.Tensor, seen=NONE, output=NONE, **params) -> int:
    return _sample_next_token(
        logits, SamplingParams(temperature=0.0, **params), seen, output, torch.Generator()
    )


def test_greedy_picks_the_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9, 0.0, 1.0, 2.0, -5.0])
    assert _greedy(logits) == 1


def test_greedy_ignores_the_generator_state() -> None:
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1))
    greedy = SamplingParams(temperature=0.0)
    picks = {
        _sample_next_token(logits, greedy, NONE, NONE, torch.Generator().manual_seed(s)) for s in range(20)
    }
    assert picks == {int(torch.argmax(logits))}


@pytest.mark.parametrize("temperature", [1e-45, 1e-38, 1e-8])
def test_a_temperature_too_small_for_float32_is_greedy(temperature: float) -> None:
    """Below 1e-5 a temperature would overflow float32 logits (NaN) or round to 0.0 and be sampled
    at 1.0: such rows take the argmax, beside sampled rows too."""
    assert SamplingParams(temperature=temperature).is_greedy
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=t) for t in (temperature, 1.0, temperature, 1.0)]
    for seed in range(10):
        picks = _sample(logits, params, seed)
        assert [picks[0], picks[2]] == [int(logits[0].argmax()), int(logits[2].argmax())]


def test_a_nan_temperature_is_refused() -> None:
    with pytest.raises(ValueError, match="temperature must be in"):
        SamplingParams(temperature=float("nan"))


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", INF),
        ("temperature", 1e300),
        ("repetition_penalty", INF),
        ("repetition_penalty", NAN),
        ("repetition_penalty", 1e300),
        ("repetition_penalty", 1e-300),
        ("repetition_penalty", 0.0),
        ("presence_penalty", NAN),
        ("presence_penalty", -INF),
        ("frequency_penalty", 1e300),
        ("top_p", NAN),
        ("min_p", NAN),
    ],
)
def test_a_float_that_float32_cannot_carry_through_the_sampler_is_refused_by_name(field, value) -> None:
    """MessagePack carries inf and NaN, and float32 turns 1e300 into inf and 1e-300 into 0: any
    of them would make NaN logits, so no such row may reach the sampler."""
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field


@pytest.mark.parametrize("top_p", [1e-45, 1e-50, 1e-300])
def test_a_top_p_below_float32s_range_keeps_only_the_top_token(top_p: float) -> None:
    # float32 would make it 0 (or a denormal), masking every token: a NaN row sampled as <unk>
    counts = _draws(_probs_logits(0.2, 0.5, 0.3), SamplingParams(temperature=1.0, top_p=top_p), n=500)
    assert counts == Counter({1: 500})


@pytest.mark.parametrize("penalty", [MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY])
def test_the_extreme_repetition_penalties_give_finite_logits(penalty: float) -> None:
    # seen tokens with a positive, a zero, a negative and an all but masked logit
    logits = torch.tensor([[3.0, 0.0, -2.0, -1e9, 50.0, 1.0, 2.0, -100.0]])
    seen = [[0, 1, 2, 3, 4]]
    for params in (
        SamplingParams(repetition_penalty=penalty, temperature=GREEDY_TEMPERATURE),
        SamplingParams(repetition_penalty=penalty),
    ):
        penalised = _apply_penalties(logits, _batch([params], prompts=seen))
        assert torch.isfinite(penalised).all()
        for seed in range(20):
            assert _sample(logits, [params], seed, prompts=seen)[0] in range(V)


def test_greedy_rows_take_the_argmax_in_a_batch_with_sampled_rows() -> None:
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=t) for t in (0.0, 1.0, 0.0, 2.0, 0.0, 0.5)]
    for seed in range(10):
        picks = _sample(logits, params, seed)
        assert [picks[i] for i in (0, 2, 4)] == logits[[0, 2, 4]].argmax(dim=-1).tolist()


def test_same_generator_seed_gives_the_same_sequence_of_samples() -> None:
    logits = torch.randn(V, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, top_p=0.95)

    def sequence(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [_sample_next_token(logits, params, NONE, NONE, generator) for _ in range(50)]

    assert sequence(7) == sequence(7)
    assert sequence(7) != sequence(8)


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


def test_each_row_keeps_its_own_top_k_and_top_p_in_one_batch() -> None:
    logits = _probs_logits(0.4, 0.3, 0.2, 0.1).expand(3 * 500, -1)
    rows = [SamplingParams(top_k=2), SamplingParams(top_p=0.75), SamplingParams(top_k=3, top_p=0.5)]
    picks = _sample(logits, rows * 500)
    assert [set(picks[i::3]) for i in range(3)] == [{0, 1}, {0, 1, 2}, {0, 1}]


def test_rows_without_top_p_keep_the_whole_vocabulary_when_other_rows_use_it(monkeypatch) -> None:
    # a float32 cumsum over 32k probabilities reaches 1 before the tail ends
    logits = torch.randn(2, 32000, generator=torch.Generator().manual_seed(7))
    rarest = logits.argmin(dim=-1, keepdim=True)  # [2, 1]

    def uniforms(shape, **kw) -> torch.Tensor:  # the rarest token wins unless masked out
        return torch.full(shape, 0.5).scatter_(1, rarest, 1 - 2**-24)

    monkeypatch.setattr(torch, "rand", uniforms)
    picks = _sample(logits, [SamplingParams(top_p=0.9), SamplingParams()], vocab_size=32000)
    assert picks == [logits[0].argmax().item(), rarest[1].item()]


def test_min_p_removes_tokens_below_min_p_times_the_top_probability() -> None:
    # 0.5, 0.3, 0.15, 0.05 with min_p 0.25: threshold 0.125 drops only the last
    logits = _probs_logits(0.5, 0.3, 0.15, 0.05)
    assert set(_draws(logits, SamplingParams(temperature=1.0), n=4000)) == {0, 1, 2, 3}
    assert set(_draws(logits, SamplingParams(temperature=1.0, min_p=0.25), n=4000)) == {0, 1, 2}


def test_min_p_applies_before_top_p_as_vllm_orders_them() -> None:
    """Issue 30, defect 9. min_p 0.25 leaves 0.5, 0.25, 0.15 (renormalised 0.56, 0.28, 0.17), where
    top_p 0.8 keeps two; top_p first would keep three (0.5 + 0.25 < 0.8) and min_p all of them."""
    logits = _probs_logits(0.5, 0.25, 0.15, 0.1)
    assert set(_draws(logits, SamplingParams(temperature=1.0, min_p=0.25, top_p=0.8), n=4000)) == {0, 1}


def test_temperature_sharpens_the_distribution() -> None:
    cold = _draws(_probs_logits(0.5, 0.3, 0.2), SamplingParams(temperature=0.2), n=2000)
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
    penalties = {"presence_penalty": 2.0, "frequency_penalty": 2.0}
    assert _greedy(_logits(2.0, 1.5), seen=torch.tensor([0]), output=NONE, **penalties) == 0


def test_negative_presence_penalty_encourages_repeats() -> None:
    logits = _logits(1.5, 2.0)
    output = torch.tensor([0])
    assert _greedy(logits, seen=output, output=output, presence_penalty=-1.0) == 0


def test_rows_without_penalties_are_untouched_in_a_mixed_batch() -> None:
    logits = _logits(2.0, 1.5).expand(4, -1)
    greedy = SamplingParams(temperature=0.0)
    params = [greedy, SamplingParams(temperature=0.0, repetition_penalty=2.0), greedy]
    params.append(SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=1.0))
    history = [[0, 0]] * 4
    assert _sample(logits, params, prompts=history, outputs=history) == [0, 1, 0, 1]


def test_batch_without_penalties_builds_no_penalty_tensors() -> None:
    batch = _batch([SamplingParams(), SamplingParams(temperature=0.0)], outputs=[[1, 2], [3]])
    assert batch.seen_mask is None and batch.output_counts is None


def test_sampler_leaves_the_callers_logits_unchanged() -> None:
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(4))
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, top_k=3, top_p=0.8, min_p=0.1)]
    _sample(logits, params * 2, prompts=[[0, 1], [2]], outputs=[[0], [3, 3]])
    assert torch.equal(logits, before)


def test_seeded_row_samples_the_same_tokens_in_any_batch_and_position() -> None:
    vocab, steps = 50, 20
    table = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(5))  # the row's logits
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    others = [SamplingParams(temperature=0.8), SamplingParams(temperature=0.0), SamplingParams(seed=9)]

    def run(row: int, companions: list[SamplingParams], generator_seed: int) -> list[int]:
        params = [*companions[:row], seeded, *companions[row:]]
        sampler, out = Sampler(torch.Generator().manual_seed(generator_seed)), []
        for step in range(steps):
            logits = torch.randn(len(params), vocab)
            logits[row] = table[step]
            batch = _batch(params, outputs=[out] * len(params), vocab_size=vocab)
            out = [*out, sampler(logits, batch).sampled_token_ids[row].item()]
        return out

    alone = run(0, [], 0)
    assert run(2, others, 1) == alone
    assert run(1, others[:1], 2) == alone
    assert len(set(alone)) > 1


def test_seeded_uniforms_look_uniform() -> None:
    seeds = torch.tensor([0, 1, -7, 2**62, 42] * 20)
    u = seeded_uniforms(seeds, torch.arange(100), 1000).flatten()  # 100k values
    assert u.min() > 0 and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)
    expected_cdf = (torch.arange(u.numel(), dtype=torch.float64) + 1) / u.numel()
    assert (u.sort().values - expected_cdf).abs().max().item() < 0.01  # KS 1% critical value ~0.005
    neighbours = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()
    assert abs(neighbours) < 0.02


def test_seeded_uniforms_match_splitmix64_in_plain_python_integers() -> None:
    # pins the stream (seeded outputs stay the same across releases) and the int64 wrap-around
    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        return z ^ (z >> 31)

    def uniform(seed: int, position: int, v: int) -> float:
        key = mix((mix(seed % 2**64) + position * 0xD1B54A32D192ED03) % 2**64)
        return ((mix((key + (v + 1) * 0x9E3779B97F4A7C15) % 2**64) >> 12) + 0.5) * 2.0**-52

    seeds, positions = [0, 12345, -7, 2**63 + 5], [0, 3, 1000, 2]
    expected = [[uniform(s, p, v) for v in range(5)] for s, p in zip(seeds, positions, strict=True)]
    wrapped = torch.tensor([(s + 2**63) % 2**64 - 2**63 for s in seeds])
    assert seeded_uniforms(wrapped, torch.tensor(positions), 5).tolist() == expected


def test_seeded_sampling_frequencies_match_the_probabilities() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    n = 4000
    params = [SamplingParams(temperature=1.0, seed=seed) for seed in range(n)]
    counts = Counter(_sample(_probs_logits(*probs).expand(n, -1), params))
    chi_square = sum((counts[i] - n * p) ** 2 / (n * p) for i, p in enumerate(probs))
    assert chi_square < 16.3  # 3 degrees of freedom, p = 0.001


def _logprobs_case(temperature: float = 1.0):
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(6))
    params = [SamplingParams(temperature=temperature, logprobs=k) for k in (0, 3, None)]
    params[0].repetition_penalty = 3.0
    out = Sampler(torch.Generator().manual_seed(0))(logits, _batch(params, prompts=[[0, 1, 2]] * 3))
    return logits, out


def test_sampled_logprob_is_the_raw_log_softmax_at_the_sampled_token() -> None:
    logits, out = _logprobs_case(temperature=0.7)
    raw = logits.log_softmax(dim=-1)
    expected = raw.gather(1, out.sampled_token_ids[:, None]).squeeze(1)
    assert torch.allclose(out.logprobs.sampled_logprobs, expected)


def test_top_logprobs_are_the_max_requested_count_sorted_descending() -> None:
    logits, out = _logprobs_case()
    assert out.logprobs.top_logprobs.shape == (3, 3)
    assert torch.all(out.logprobs.top_logprobs[:, :-1] >= out.logprobs.top_logprobs[:, 1:])
    assert torch.equal(out.logprobs.top_token_ids, logits.topk(3, dim=-1).indices)


def test_logprobs_are_raw_whatever_the_temperature() -> None:
    _, hot = _logprobs_case(temperature=2.0)
    _, cold = _logprobs_case(temperature=0.3)
    assert torch.allclose(hot.logprobs.top_logprobs, cold.logprobs.top_logprobs)


def test_no_logprobs_when_no_row_asks_for_them() -> None:
    out = Sampler()(torch.zeros(2, V), _batch([SamplingParams(), SamplingParams(logprobs=None)]))
    assert out.logprobs is None


@pytest.mark.parametrize("logprobs", [-1, 21])
def test_sampling_params_reject_logprobs_outside_0_to_20(logprobs: int) -> None:
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=logprobs)


def test_sampler_never_reads_a_tensor_back_to_the_host(monkeypatch) -> None:
    batch = _batch(EVERY_FEATURE, prompts=[[1, 2]] * 3, outputs=[[2, 3]] * 3)
    logits = torch.randn(3, V)

    def sync(*args, **kw):
        raise AssertionError("host sync inside Sampler.__call__")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    Sampler(torch.Generator())(logits, batch)


@pytest.mark.gpu
def test_on_cuda_build_and_sample_never_sync_and_the_seeded_hash_matches_the_cpu() -> None:
    logits = torch.randn(3, 1000, device="cuda")
    sampler = Sampler(torch.Generator(device="cuda").manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = SamplingBatch.build(EVERY_FEATURE, [[1, 2]] * 3, [[2, 3]] * 3, "cuda", 1000)
        sampler(logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    seeds, positions = torch.tensor([0, -7, 2**62]), torch.tensor([0, 5, 999])
    on_cuda = seeded_uniforms(seeds.cuda(), positions.cuda(), 1000).cpu()
    assert torch.equal(on_cuda, seeded_uniforms(seeds, positions, 1000))


def _sample_next_token(
    logits: torch.Tensor,  # [V] float32
    params: SamplingParams,
    seen_token_ids: torch.Tensor,  # [P + O] prompt and output so far (repetition penalty)
    output_token_ids: torch.Tensor,  # [O] (presence and frequency penalties)
    generator: torch.Generator,
) -> int:
    """One sequence's next token: the batched Sampler with N = 1."""
    # seen already holds the output, so passing it as the prompt gives the same repetition set
    batch = SamplingBatch.build(
        [params], [seen_token_ids.tolist()], [output_token_ids.tolist()], logits.device, logits.numel()
    )
    return int(Sampler(generator)(logits[None], batch).sampled_token_ids[0])


@pytest.mark.parametrize("cpu_kernel", [True, False])  # the C++ pass, and the torch ops CUDA runs
def test_grammar_masks_hold_back_the_disallowed_tokens_of_their_rows_only(monkeypatch, cpu_kernel) -> None:
    if not cpu_kernel:
        monkeypatch.setattr(cpu_kernels, "is_loaded", lambda: False)
    logits = torch.arange(4 * V, dtype=torch.float32).view(4, V)
    # row 1 allows tokens 0 and 2 (bits 0 and 2), row 3 only token 7
    masks = GrammarMasks(torch.tensor([1, 3]), torch.tensor([[0b101], [1 << 7]], dtype=torch.int32))
    params = [SamplingParams(temperature=0.0)] * 4
    batch = SamplingBatch.build(params, [[]] * 4, [[]] * 4, "cpu", V, grammar_masks=masks)
    out = Sampler()(logits, batch)
    assert out.sampled_token_ids.tolist() == [V - 1, 2, V - 1, 7]  # rows 0 and 2: the argmax, untouched
    masked = _apply_grammar_masks(logits, *masks)
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])
    assert masked[1].isinf().sum() == V - 2 and masked[3].isinf().sum() == V - 1
    assert not logits.isinf().any()  # out of place: the raw logits still feed the logprobs
