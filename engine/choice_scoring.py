"""Choice probabilities: how likely the model finds each allowed string, renormalised over the choices.

A choice's probability is the product of its tokens' probabilities after the prompt, the end
of sequence included: P(c) = P(c_1 | prompt) ... P(c_n | prompt, c_<n) P(EOS | prompt, c),
then divided by the sum over the choices. The EOS factor is what makes it the probability of
answering exactly c: without it "pos" would always score at least as high as "positive"
whenever "pos" tokenises as a prefix of it. Each choice is scored in its own tokenisation
(the tokenizer's encoding of the string alone).

Each choice is scored by a scoring sequence: the prompt, the choice's tokens and EOS, prefilled
like any prompt (so the prompt's blocks come from the prefix cache) but never sampled; the model
runner gathers the log-probabilities of the tokens after the prompt. The scoring sequences
start once the request's own prompt is computed, so that they find it cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.outputs import RequestOutput
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence


@dataclass(slots=True)
class ChoiceScoring:
    """The choice probabilities of one request, being computed."""

    choices: list[str]
    token_ids: list[list[int]]  # each choice's tokens, EOS appended
    scorers: list[Sequence] = field(default_factory=list)  # one per choice once started
    num_done: int = 0
    output: RequestOutput | None = None  # the request's output, held until every choice is scored

    @property
    def started(self) -> bool:
        return bool(self.scorers)

    @property
    def is_done(self) -> bool:
        return self.num_done == len(self.choices)

    def probabilities(self) -> dict[str, float]:
        """Each choice's probability renormalised over the choices (a softmax of the log-probabilities)."""
        scores = [seq.score for seq in self.scorers]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        total = math.fsum(weights)
        return {choice: w / total for choice, w in zip(self.choices, weights, strict=True)}


def scoring_rows(out: SchedulerOutput) -> tuple[list[int], list[int], list[int]]:
    """For one step's scoring sequences: (row of the step's flat hidden states, target token, owner).

    The hidden state at position p predicts token p + 1; a scoring sequence wants the
    log-probability of every token from `scored_from` on that this step's chunk predicts.
    `owner` numbers the step's scoring sequences in batch order.
    """
    rows, targets, owners = [], [], []
    offset = 0
    owner = 0
    for seq, num_new in zip(out.seqs, out.num_new_tokens, strict=True):
        if seq.is_scoring:
            start = seq.num_computed_tokens
            for position in range(max(start, seq.scored_from - 1), start + num_new):
                if position + 1 < seq.num_tokens:
                    rows.append(offset + position - start)
                    targets.append(seq.token_ids[position + 1])
                    owners.append(owner)
            owner += 1
        offset += num_new
    return rows, targets, owners
