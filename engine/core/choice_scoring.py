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

from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.core.sequence import Sequence
from engine.core.step_plan import PromptLogprobRows
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
    """Owns the scoring sequences of every `choice` request, by object."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._requests: dict[Sequence, _Choices] = {}  # a request's own sequence -> its choices
        # each scoring sequence's logprobs by token position: a recomputed position (after a
        # preemption) overwrites its value instead of counting twice
        self._logprobs: dict[Sequence, dict[int, float]] = {}
        # a greedy choice's alternatives at each position, where its request asked for logprobs
        self._top: dict[Sequence, dict[int, list[tuple[int, float]]]] = {}

    def add(self, seq: Sequence, choices: list[str], token_ids: list[list[int]]) -> None:
        """Score these choices (`token_ids`: each one's tokens with EOS) for the request `seq`."""
        self._requests[seq] = _Choices(choices, token_ids)

    def update(
        self,
        out: SchedulerOutput,
        rows: PromptLogprobRows | None,
        logprobs: list[float],
        top: tuple[list[list[int]], list[list[float]]] | None = None,
    ) -> list[RequestOutput]:
        """After a step: record its prompt logprobs (and alternatives, `top`: [R, K] ids and
        logprobs), fork the scorers of requests whose prompt is now computed, and return the
        held outputs whose choices are now all scored."""
        if rows is not None:
            for row, ((scorer, position), logprob) in enumerate(zip(rows.owners, logprobs, strict=True)):
                if scorer in self._logprobs:
                    self._logprobs[scorer][position] = logprob
                    if top is not None and (k := scorer.params.logprobs):
                        self._top.setdefault(scorer, {})[position] = list(
                            zip(top[0][row][:k], top[1][row][:k], strict=True)
                        )
        for seq in out.seqs:
            request = self._requests.get(seq)
            if (
                request is not None
                and not request.scorers
                and seq.num_computed_tokens >= seq.num_prompt_tokens
            ):
                self._fork(seq, request)
        done = [seq for seq, r in self._requests.items() if r.output is not None and r.is_done]
        return [self._release(seq) for seq in done]

    def hold(self, seq: Sequence, output: RequestOutput) -> RequestOutput | None:
        """The output of a finished request, or None while its choices are still being scored."""
        request = self._requests.get(seq)
        if request is None:
            return output
        request.output = output
        return self._release(seq) if request.is_done else None

    def abort(self, seq: Sequence) -> tuple[list[Sequence], RequestOutput | None]:
        """Forget the request: its unfinished scoring sequences (to finish) and its held output, if any."""
        request = self._requests.pop(seq, None)
        if request is None:
            return [], None
        for scorer in request.scorers:
            self._logprobs.pop(scorer, None)
            self._top.pop(scorer, None)
        return [s for s in request.scorers if not s.is_finished], request.output

    def _fork(self, seq: Sequence, request: _Choices) -> None:
        for choice_ids in request.token_ids:
            scorer = Sequence(seq.request_id, seq.prompt_token_ids + choice_ids, seq.params, 0, seq.priority)
            scorer.parent = seq
            scorer.prompt_logprobs_from = seq.num_prompt_tokens
            request.scorers.append(scorer)
            self._logprobs[scorer] = {}
            self._scheduler.add(scorer)

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
