"""Choice probabilities: how likely the model finds each allowed string, renormalised over the choices.

A choice's probability is the product of its tokens' probabilities after the prompt, the end
of sequence included: P(c) = P(c_1 | prompt) ... P(c_n | prompt, c_<n) P(EOS | prompt, c),
then divided by the sum over the choices. The EOS factor is what makes it the probability of
answering exactly c: without it "pos" would always score at least as high as "positive"
whenever "pos" tokenises as a prefix of it. Each choice is scored in its own tokenisation
(the tokenizer's encoding of the string alone).

Each choice is scored by a scoring sequence forked from the request's own: the prompt, the
choice's tokens and EOS, prefilled like any prompt (so the prompt's blocks come from the prefix
cache) but never sampled, with prompt logprobs from the first choice token on. The forks start
once the request's own prompt is computed, so that they find it cached; the request's output
waits here until every choice is scored.

A greedy (temperature 0) choice request is not decoded at all: its own sequence only computes
the prompt, and its answer is the most probable choice, so the label always agrees with the
probabilities. A sampled one is decoded token by token under the choice grammar.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from engine.core.sequence import Sequence
from engine.core.stages import StageEffects, StepResult
from engine.outputs import OutputLogprob, RequestOutput


@dataclass(slots=True)
class _Choices:
    """The choice probabilities of one request, being computed."""

    choices: list[str]
    token_ids: list[list[int]]  # each choice's tokens, EOS appended
    scorers: list[Sequence] = field(default_factory=list)  # one per choice once forked
    output: RequestOutput | None = None  # the request's output, held until every choice is scored

    @property
    def is_done(self) -> bool:
        return bool(self.scorers) and all(seq.is_finished for seq in self.scorers)


class ChoiceScorer:
    """Owns the scoring sequences of every `choice` request, by object (a PostStepStage)."""

    def __init__(self) -> None:
        self._requests: dict[Sequence, _Choices] = {}  # a request's own sequence -> its choices
        # each scoring sequence's logprobs by token position: a recomputed position (after a
        # preemption) overwrites its value instead of counting twice
        self._logprobs: dict[Sequence, dict[int, float]] = {}
        # a greedy choice's alternatives at each position, where its request asked for logprobs
        self._top: dict[Sequence, dict[int, list[tuple[int, float]]]] = {}

    def add(self, seq: Sequence, choices: list[str], token_ids: list[list[int]]) -> None:
        """Score these choices (`token_ids`: each one's tokens with EOS) for the request `seq`."""
        self._requests[seq] = _Choices(choices, token_ids)

    def update(self, step: StepResult) -> StageEffects:
        """After a step: record its prompt logprobs (and their alternatives), fork the scorers of
        requests whose prompt is now computed, and release the held outputs whose choices are
        now all scored."""
        rows, logprobs, top = step.prompt_logprob_rows, step.prompt_logprobs, step.prompt_top_logprobs
        effects = StageEffects()
        if rows is not None:
            for row, ((scorer, position), logprob) in enumerate(zip(rows.owners, logprobs, strict=True)):
                if scorer in self._logprobs:
                    self._logprobs[scorer][position] = logprob
                    if top is not None and (k := scorer.params.logprobs):
                        self._top.setdefault(scorer, {})[position] = list(
                            zip(top[0][row][:k], top[1][row][:k], strict=True)
                        )
        for seq in step.scheduled.seqs:
            request = self._requests.get(seq)
            if (
                request is not None
                and not request.scorers
                and seq.num_computed_tokens >= seq.num_prompt_tokens
            ):
                effects.forks += self._fork(seq, request)
        done = [seq for seq, r in self._requests.items() if r.output is not None and r.is_done]
        effects.released += [(seq, self._release(seq)) for seq in done]
        return effects

    def hold(self, seq: Sequence, output: RequestOutput) -> tuple[Sequence, RequestOutput] | None:
        """A finished request's output, or None while its choices are still being scored."""
        request = self._requests.get(seq)
        if request is None:
            return seq, output
        request.output = output
        return (seq, self._release(seq)) if request.is_done else None

    def abort(self, seq: Sequence) -> StageEffects:
        """Forget the request: its unfinished scoring sequences, to finish; its held output (its
        text was done, its choices were being scored), released as aborted."""
        request = self._requests.pop(seq, None)
        if request is None:
            return StageEffects()
        for scorer in request.scorers:
            self._logprobs.pop(scorer, None)
            self._top.pop(scorer, None)
        effects = StageEffects(finish=[(s, "abort", None) for s in request.scorers if not s.is_finished])
        if request.output is not None:
            request.output.finish_reason = "abort"
            effects.released.append((seq, request.output))
        return effects

    def _fork(self, seq: Sequence, request: _Choices) -> list[Sequence]:
        for choice_ids in request.token_ids:
            scorer = Sequence(seq.request_id, seq.prompt_token_ids + choice_ids, seq.params, 0, seq.priority)
            scorer.parent = seq
            scorer.prompt_logprobs_from = seq.num_prompt_tokens
            request.scorers.append(scorer)
            self._logprobs[scorer] = {}
        return request.scorers

    def _release(self, seq: Sequence) -> RequestOutput:
        request = self._requests.pop(seq)
        logprobs = [self._logprobs.pop(scorer) for scorer in request.scorers]
        tops = [self._top.pop(scorer, {}) for scorer in request.scorers]
        scores = [math.fsum(values.values()) for values in logprobs]
        output = request.output
        assert output is not None
        output.choice_probabilities = _renormalised(request.choices, scores)
        if seq.is_prefill_only and output.finish_reason != "abort":
            best = max(range(len(scores)), key=scores.__getitem__)
            _answer(output, request.choices[best], request.token_ids[best], logprobs[best], tops[best])
        return output


def _answer(
    output: RequestOutput,
    choice: str,
    token_ids: list[int],
    logprobs: dict[int, float],
    top: dict[int, list[tuple[int, float]]],
) -> None:
    """A greedy choice request's output: the choice, as if decoded under its grammar (its tokens;
    the grammar ends there, so EOS is never generated). `token_ids`: the choice's, then EOS."""
    token_ids = token_ids[:-1]
    output.text = choice
    output.token_ids = list(token_ids)
    output.finish_reason, output.stop_reason = "stop", None
    output.metrics.first_token_time = output.metrics.finished_time = time.time()
    if output.logprobs is not None:  # asked for: each token's own, in order, with its alternatives
        positions = sorted(logprobs)[: len(token_ids)]
        output.logprobs = [
            OutputLogprob(t, logprobs[p], top.get(p, [])) for t, p in zip(token_ids, positions, strict=True)
        ]


def _renormalised(choices: list[str], scores: list[float]) -> dict[str, float]:
    """Each choice's probability renormalised over the choices (a softmax of the log-probabilities)."""
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = math.fsum(weights)
    return {choice: w / total for choice, w in zip(choices, weights, strict=True)}
