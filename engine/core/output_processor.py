"""OutputProcessor: from sampled tokens to RequestOutputs (text, stop strings, logprobs).

The last stage of a step. Stop strings need text, which the scheduler does not have: the
processor checks each new token's tail window for them and returns the sequences they end as
effects (StageEffects.finish), which the engine applies with the stages' own. A request's text
is decoded once, when it finishes; nothing decodes a whole output per token.

A stop string counts from `min_tokens` on, and only where it ends in the newest token's text
(as vLLM's check): an occurrence the output held before `min_tokens` neither stops the request
nor marks where its text is cut.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.core.sequence import Sequence
from engine.core.stages import StageEffects
from engine.outputs import OutputLogprob, RequestMetrics, RequestOutput, SampledLogprobs


@dataclass(slots=True)
class ProcessedStep:
    outputs: list[tuple[Sequence, RequestOutput]]  # sequences finished this step, with their outputs
    effects: StageEffects  # running sequences a stop string ended: to finish ("stop", the string)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._logprobs: dict[Sequence, list[OutputLogprob]] = {}  # requests that asked for logprobs

    def add(self, seq: Sequence) -> None:
        """Follow a sequence whose output the request sees (others are ignored)."""
        if seq.gives_output and seq.params.logprobs is not None:
            self._logprobs[seq] = []

    def process(
        self,
        sampling: list[Sequence],
        token_ids: list[int],
        logprobs: SampledLogprobs | None,
        finished: list[Sequence],
        failures: dict[Sequence, Exception] | None = None,
    ) -> ProcessedStep:
        """One step: `sampling` sampled `token_ids` (row order); the scheduler finished `finished`.
        A sequence whose text fails (the tokenizer's decode of its tokens raises) is recorded in
        `failures`, with no output and no stop, and the others go on; without `failures` it raises."""
        if logprobs is not None:
            self._record_logprobs(sampling, token_ids, logprobs)
        stops = {}
        for seq in sampling:
            if (stop := _guarded(self._stop_string, seq, failures)) is not None:
                stops[seq] = stop
        stopped = [(seq, "stop", stop) for seq, stop in stops.items() if not seq.is_finished]
        ended = [*finished, *(seq for seq, _, _ in stopped)]
        outputs = []
        for seq in ended:
            if seq.gives_output and seq not in (failures or ()):
                output = _guarded(self._output, seq, failures, stops.get(seq))
                if output is not None:
                    outputs.append((seq, output))
        return ProcessedStep(outputs, StageEffects(finish=stopped))

    def abort(self, seq: Sequence) -> RequestOutput:
        """The output of a request the engine has just aborted."""
        return self._output(seq, None)

    def forget(self, seq: Sequence) -> None:
        """Drop what was recorded for a sequence that ends without an output of its own (an
        aborted request's samples)."""
        self._logprobs.pop(seq, None)

    def _stop_string(self, seq: Sequence) -> str | None:
        stop_strings = seq.params.stop
        # a stop token or a grammar that ended the sequence this step comes first; a stop string
        # completed by the last token max_tokens allows still counts as a stop
        if not stop_strings or seq.finish_reason not in (None, "length"):
            return None
        if seq.num_output_tokens < seq.params.min_tokens:
            return None
        # Checked every token, so a new occurrence ends in the newest token's text: decoding a
        # tail window is enough, and keeps the check O(1) per token instead of O(output).
        # The window's first characters may decode differently than mid-text (a dropped
        # leading space, a split UTF-8 sequence); at twice the longest stop string plus 8
        # tokens they lie well before any occurrence that reaches the newest token.
        window = seq.output_token_ids[-(2 * max(map(len, stop_strings)) + 8) :]
        skip = seq.params.skip_special_tokens
        text = self._decode(window, skip)
        found = [stop for stop in stop_strings if stop in text]
        if not found:  # the common case: one decode per token
            return None
        before = self._decode(window[:-1], skip)
        return next((stop for stop in found if _ends_in_newest(text, before, stop) >= 0), None)

    def _output(self, seq: Sequence, stop_string: str | None) -> RequestOutput:
        finish_reason, stop_reason = (
            ("stop", stop_string) if stop_string else (seq.finish_reason, seq.stop_reason)
        )
        output_ids = seq.output_token_ids
        params = seq.params
        # the stop token is not text (unless asked for: then it is, as vLLM does)
        is_stop_token = seq.ended_by_stop_token and not stop_string and not params.include_stop_str_in_output
        text = self._decode(output_ids[:-1] if is_stop_token else output_ids, params.skip_special_tokens)
        if stop_string:  # cut where the occurrence that stopped it starts
            end = _ends_in_newest(
                text, self._decode(output_ids[:-1], params.skip_special_tokens), stop_string
            )
            end = end if end >= 0 else text.find(stop_string)
            text = text[: end + len(stop_string) if params.include_stop_str_in_output else end]
        metrics = RequestMetrics(seq.arrival_time, seq.first_token_time, time.time(), seq.num_preemptions)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=output_ids,
            text=text,
            finish_reason=finish_reason,
            metrics=metrics,
            stop_reason=stop_reason,
            logprobs=self._logprobs.pop(seq, None),
            num_cached_tokens=seq.num_cached_tokens or 0,
        )

    def _record_logprobs(
        self, sampling: list[Sequence], token_ids: list[int], logprobs: SampledLogprobs
    ) -> None:
        sampled = logprobs.sampled_logprobs.tolist()
        top_ids, top_values = logprobs.top_token_ids.tolist(), logprobs.top_logprobs.tolist()
        for row, seq in enumerate(sampling):
            record = self._logprobs.get(seq)
            if record is None:
                continue
            k = seq.params.logprobs or 0
            top = list(zip(top_ids[row][:k], top_values[row][:k], strict=True))
            record.append(OutputLogprob(token_ids[row], sampled[row], top))

    def _decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


def _guarded(fn, seq: Sequence, failures: dict[Sequence, Exception] | None, *args):
    """fn(seq, *args), or None with the error recorded as the sequence's (one request's text)."""
    if failures is None:
        return fn(seq, *args)
    if seq in failures:
        return None
    try:
        return fn(seq, *args)
    except Exception as e:
        failures[seq] = e
        return None


def _ends_in_newest(text: str, before: str, stop: str) -> int:
    """Where in `text` the first occurrence of `stop` that ends in the newest token's characters
    starts (`before`: the text without the newest token), or -1."""
    return text.find(stop, max(0, len(before) - len(stop) + 1))
