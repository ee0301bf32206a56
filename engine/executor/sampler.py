"""Batched sampler: one step's logits [N, V] -> N token ids, vectorised and without a host sync.

`SamplingBatch` (engine.executor.sampling_batch) holds the step's SamplingParams as per-row device
tensors plus host flags, so `Sampler` skips whatever no row asks for. The only transfer back
to the host is the caller's, of the final token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.executor.sampling_batch import SamplingBatch
from engine.kernels import cpu_kernels
from engine.outputs import SampledLogprobs

# splitmix64 (Steele et al. 2014; java.util.SplittableRandom) constants, as signed int64
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15 - 2**64  # odd: stream step between vocabulary ids
_MIX_1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX_2 = 0x94D049BB133111EB - 2**64
_POSITION_MULT = 0xD1B54A32D192ED03 - 2**64  # odd: separates the output positions of a seed


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [N] int64, on the device
    logprobs: SampledLogprobs | None  # None when no row asked for logprobs


class Sampler:
    """Samples one token per row of a step's logits under that row's SamplingParams."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # noise source of unseeded rows, on the logits' device; None: torch's default generator
        self.generator = generator

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [N, V] float32 on the device, left unchanged. Never syncs with the host."""
        logits = logits.float()
        raw_logits = logits
        if batch.grammar_masks is not None:
            logits = _apply_grammar_masks(logits, *batch.grammar_masks)
        if batch.logit_bias is not None:
            logits = _apply_logit_bias(logits, *batch.logit_bias)
        logits = _apply_penalties(logits, batch)
        if batch.all_greedy:
            sampled = argmax(logits)
        else:
            sampled = self._sample(logits, batch)
            if batch.any_greedy:
                sampled = torch.where(batch.temperature == 0, argmax(logits), sampled)
        logprobs = None
        if batch.max_num_logprobs >= 0:
            logprobs = _gather_logprobs(raw_logits, sampled, batch.max_num_logprobs)
        return SamplerOutput(sampled, logprobs)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        # greedy rows divide by 1 here; their token is the argmax, chosen by the caller
        temperature = torch.where(batch.temperature == 0, 1.0, batch.temperature)
        logits = logits / temperature[:, None]  # a new tensor: the masks below work in place
        # min_p first, then top-k and top-p over what it leaves, as vLLM orders them
        if batch.any_min_p:
            logits = _apply_min_p(logits, batch.min_p)
        if batch.max_top_k:
            logits = _apply_top_k(logits, batch.top_k, batch.max_top_k)
        if batch.top_p_rows.numel():
            logits = _apply_top_p(logits, batch.top_p_rows, batch.top_p)
        probs = logits.softmax(dim=-1)  # [N, V]
        # exponential race: argmax(p_i / q_i), q_i ~ Exp(1), picks i with probability p_i,
        # with no cumulative sum, no torch.multinomial and no host sync (gpt-fast, nano-vllm)
        return argmax(probs.div_(self._exponential_noise(probs.shape, probs.device, batch)))

    def _exponential_noise(
        self, shape: torch.Size, device: torch.device, batch: SamplingBatch
    ) -> torch.Tensor:
        # q: [N, V] ~ Exp(1); unseeded rows share one generator call for the whole step.
        # -log(u), u in [0, 1), lies in (0, inf]: never 0, unlike float32 exponential_, where
        # 0 / 0 = NaN would rank first in argmax and let a masked-out token win. It is also
        # ~5x faster than exponential_ on CPU.
        if batch.any_unseeded:
            q = torch.rand(shape, device=device, generator=self.generator).log_().neg_()
        else:
            q = torch.ones(shape, device=device)
        if batch.seeded_rows.numel():
            rows = batch.seeded_rows
            u = seeded_uniforms(batch.seeds[rows], batch.output_lens[rows], shape[1])  # [S, V]
            q.index_copy_(0, rows, u.log().neg_().float())
        return q


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x [N, V] -> [N] int64, torch.argmax(x, dim=-1). On the CPU through the C++ kernel where it is
    loaded: PyTorch's CPU argmax is scalar, 0.14 ms of a 128-sequence micro/decode step of ~4.4 ms
    (loadtest/RESULTS.md); the kernel returns the same indices (ties and NaNs included) in ~0.02."""
    if (
        x.is_cpu
        and x.dtype == torch.float32
        and x.dim() == 2
        and x.stride(-1) == 1
        and cpu_kernels.is_loaded()
    ):
        return cpu_kernels.argmax_rows(x)
    return x.argmax(dim=-1)


def seeded_uniforms(seeds: torch.Tensor, output_lens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniforms in (0, 1), [S, V] float64: a pure function of (seed, output index, vocab id).

    Why a hash rather than one torch.Generator per seeded request: a seeded request must
    sample the same tokens whatever else shares its batch and in whichever row it sits, and
    per-row generators would mean a Python loop of N small kernel launches every step. A
    counter-based hash gives each (seed, position) its own stream, vectorised over the batch.
    It is splitmix64: key = mix(mix(seed) + position * M), value_v = mix(key + (v + 1) * gamma),
    in int64 torch ops (multiplication wraps mod 2^64 on CPU and CUDA; right shifts are made
    logical by masking off the sign-extended bits).
    """
    keys = _mix64_(_mix64_(seeds.clone()) + output_lens * _POSITION_MULT)  # [S]
    steps = torch.arange(1, vocab_size + 1, device=seeds.device) * _GOLDEN_GAMMA  # [V]
    bits = _mix64_(keys[:, None] + steps[None, :])  # [S, V]
    # the top 52 bits, centred in their bucket: u in [2^-53, 1 - 2^-53], so -log(u) > 0
    return _shift_right(bits, 12).double().add_(0.5).mul_(2.0**-52)


def _apply_grammar_masks(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    # out of place, like the penalties, and only on the constrained rows: bit j of word i of a
    # row's bitmask allows token 32 * i + j. On the CPU one C++ pass (a copy, then the rows' words)
    if logits.is_cpu and logits.dtype == torch.float32 and cpu_kernels.is_loaded():
        return cpu_kernels.apply_token_bitmask(logits, rows, bitmask)
    vocab_size = logits.shape[1]
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().view(bitmask.shape[0], -1)[:, :vocab_size]
    return logits.index_copy(0, rows, logits[rows].masked_fill_(~allowed, float("-inf")))


def _apply_logit_bias(logits: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    # out of place; index: [B] into the flattened [N, V] logits, values: [B] (-inf holds a token back)
    return logits.flatten().index_add(0, index, values).view_as(logits)


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    # out of place: the caller's logits stay raw (they also feed the logprobs)
    if batch.seen_mask is not None:
        rep = batch.repetition_penalty[:, None]
        # vLLM's (and Transformers') convention: shrink positive logits, push negative ones down
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(batch.seen_mask, penalised, logits)
    if batch.output_counts is not None:
        counts = batch.output_counts
        logits = logits - batch.frequency_penalty[:, None] * counts
        logits = logits - batch.presence_penalty[:, None] * (counts > 0)
    return logits


def _apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    # topk of the largest k in use rather than a full sort of V (vLLM's apply_top_k_only)
    top = logits.topk(max_top_k, dim=-1).values  # [N, K] descending
    kth = top.gather(1, (top_k.clamp(max=max_top_k) - 1)[:, None])  # [N, 1]
    kth.masked_fill_((top_k > max_top_k)[:, None], float("-inf"))  # rows without top-k
    return logits.masked_fill_(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, rows: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    # sorts only the rows that use top-p: the full-vocabulary sort is the sampler's costliest op,
    # and rows with top_p = 1 must not lose a tail to rounding in a float32 cumsum
    sorted_logits, order = logits.index_select(0, rows).sort(dim=-1, descending=True)  # [R, V]
    probs = sorted_logits.softmax(dim=-1)  # renormalised after top-k, whose cuts are -inf here
    mass_before = probs.cumsum(dim=-1).sub_(probs)
    # keep the smallest prefix whose mass reaches top_p; the top token always stays
    sorted_logits.masked_fill_(mass_before >= top_p[rows][:, None], float("-inf"))
    return logits.index_copy_(0, rows, torch.empty_like(sorted_logits).scatter_(1, order, sorted_logits))


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    # p >= min_p * p_max  <=>  logit >= max logit + log(min_p); log(0) = -inf keeps every token
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log()[:, None]  # [N, 1]
    return logits.masked_fill_(logits < threshold, float("-inf"))


def _gather_logprobs(raw_logits: torch.Tensor, sampled: torch.Tensor, num_logprobs: int) -> SampledLogprobs:
    # raw logprobs (vLLM's default): what the model thinks, not what the sampler was shaped to
    logprobs = raw_logits.log_softmax(dim=-1)  # [N, V]
    top_logprobs, top_token_ids = logprobs.topk(max(num_logprobs, 1), dim=-1)
    return SampledLogprobs(logprobs.gather(1, sampled[:, None]).squeeze(1), top_token_ids, top_logprobs)


def _mix64_(z: torch.Tensor) -> torch.Tensor:
    # splitmix64's finaliser on int64 bit patterns, in place (z is a temporary: [S, V] is big)
    z ^= _shift_right(z, 30)
    z *= _MIX_1
    z ^= _shift_right(z, 27)
    z *= _MIX_2
    return z.bitwise_xor_(_shift_right(z, 31))


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    # logical right shift: torch's >> on int64 is arithmetic, so mask the copied sign bits
    return (z >> bits).bitwise_and_((1 << (64 - bits)) - 1)
