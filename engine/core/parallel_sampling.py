"""Parallel samples: `n` (and `best_of`) answers to one prompt, as vLLM's parallel sampling.

A request with best_of (else n) > 1 samples that many sequences: its own, and one fork per
extra sample. The forks start once the request's own prompt is computed, so that they find
the prompt's KV blocks in the prefix cache and share them instead of computing them again
(as ChoiceScorer's scoring forks do; with the prefix cache off they compute it themselves).
Forking at admission would put every copy in the same first step, before any block of the
prompt is cached, and each would compute the whole prompt. A fork recomputes only its last
prompt token, whose logits it samples its own first token from.

Each sample has its own randomness: a seeded request's sample i samples with seed + i (as
vLLM's ParentRequest does; sample 0 is the request's own sequence, with the seed as given).
The request's output waits here until every sample is done; it is sample 0's, with
`samples` holding the returned ones by index. With best_of > n the n samples with the
highest log probability per token (OpenAI's definition of "best": the mean of the sampled
tokens' logprobs, raw model distribution) return, best first; each keeps its cumulative
logprob. vLLM ranks by the cumulative logprob, which favours shorter samples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.core.sequence import Sequence
from engine.core.stages import StageEffects, StepResult
from engine.outputs import RequestOutput


@dataclass(slots=True)
class _Samples:
    """The samples of one request, being generated."""

    forks: list[Sequence] = field(default_factory=list)  # samples 1.. once forked
    outputs: dict[Sequence, RequestOutput] = field(default_factory=dict)  # finished samples
    strip_logprobs: bool = False  # logprobs recorded only to rank best_of samples


class ParallelSampler:
    """Owns the forked samples of every request with n or best_of > 1, by object (a PostStepStage)."""

    def __init__(self, grammar_of: Callable[[Sequence], object | None]) -> None:
        self._grammar_of = grammar_of  # a fresh grammar matcher for a fork (None: unconstrained)
        self._requests: dict[Sequence, _Samples] = {}  # a request's own sequence -> its samples
        self._parents: dict[Sequence, Sequence] = {}  # a fork -> its request's own sequence

    def add(self, seq: Sequence) -> None:
        """Sample this request `num_samples` times (call before the OutputProcessor sees it)."""
        params = seq.params
        if params.num_samples == 1:
            return
        request = _Samples()
        if params.num_samples > params.n and params.logprobs is None:
            # ranking needs each sampled token's logprob: record it, leave it out of the output
            seq.params = dataclasses.replace(params, logprobs=0)
            request.strip_logprobs = True
        self._requests[seq] = request

    def update(self, step: StepResult) -> StageEffects:
        """After a step: fork the samples of requests whose prompt is now computed."""
        effects = StageEffects()
        for seq in step.scheduled.seqs:
            request = self._requests.get(seq)
            if request is not None and not request.forks and seq.num_computed_tokens >= seq.num_prompt_tokens:
                effects.forks += self._fork(seq, request)
        return effects

    def hold(self, seq: Sequence, output: RequestOutput) -> tuple[Sequence, RequestOutput] | None:
        """A finished sequence's output: (its request's own sequence, the request's output) once every
        sample is done, else None (held). Requests with one sample pass through."""
        parent = self._parents.get(seq, seq)
        request = self._requests.get(parent)
        if request is None:
            return seq, output
        request.outputs[seq] = output
        if not request.forks or len(request.outputs) < 1 + len(request.forks):
            return None
        return parent, self._release(parent)

    def abort(self, seq: Sequence) -> StageEffects:
        """Forget the request: its unfinished forks, to finish."""
        request = self._requests.pop(seq, None)
        if request is None:
            return StageEffects()
        for fork in request.forks:
            self._parents.pop(fork, None)
        return StageEffects(finish=[(fork, "abort", None) for fork in request.forks if not fork.is_finished])

    def _fork(self, seq: Sequence, request: _Samples) -> list[Sequence]:
        params = seq.params
        for index in range(1, params.num_samples):
            seed = None if params.seed is None else params.seed + index
            fork_params = params if seed is None else dataclasses.replace(params, seed=seed)
            fork = Sequence(seq.request_id, seq.prompt_token_ids, fork_params, seq.max_tokens, seq.priority)
            fork.parent = seq
            fork.arrival_time = seq.arrival_time
            fork.grammar = self._grammar_of(fork)
            request.forks.append(fork)
            self._parents[fork] = seq
        return request.forks

    def _release(self, seq: Sequence) -> RequestOutput:
        request = self._requests.pop(seq)
        for fork in request.forks:
            self._parents.pop(fork, None)
        samples = [request.outputs[s] for s in [seq, *request.forks]]
        for sample in samples:
            if sample.logprobs is not None:
                sample.cumulative_logprob = math.fsum(lp.logprob for lp in sample.logprobs)
        params = seq.params
        if params.num_samples > params.n:  # every sample recorded its logprobs
            samples = sorted(samples, key=_logprob_per_token, reverse=True)[: params.n]
        for sample in samples:
            if request.strip_logprobs:
                sample.logprobs = None
        return dataclasses.replace(samples[0], samples=samples)


def _logprob_per_token(sample: RequestOutput) -> float:
    return sample.cumulative_logprob / max(1, len(sample.logprobs))
