"""LLMEngine: add_request / abort / step, and generate() for offline use.

Each step the scheduler picks work within the token budget (prompt chunks and decodes of
many requests together), the model runner computes it on the paged KV cache and samples, and
the engine checks every sampled token against its request's stop conditions. Requests join
and leave between any two steps.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from engine.block_manager import BlockManager, PrefixCacheStats
from engine.choice_scoring import ChoiceScoring
from engine.config import EngineConfig
from engine.distributed.executor import MultiprocExecutor, UniprocExecutor
from engine.distributed.layout import check_parallel_layout
from engine.loader import check_checkpoint_folder, load_tokenizer
from engine.outputs import RequestMetrics, RequestOutput, TokenLogprob
from engine.quant import make_plan
from engine.runtime import resolve_runtime
from engine.sampling_params import SamplingParams, StructuredOutputs
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence
from engine.stats import EngineStats
from engine.step_plan import StepPlan
from engine.structured_output import GrammarCompiler, InvalidStructuredOutput

log = logging.getLogger(__name__)


class RequestRejected(ValueError):
    """The request cannot run on this engine (too long, bad token ids); nothing was queued.

    `code` names the kind of problem for callers that report it (the service's error codes).
    """

    def __init__(self, message: str, code: str = "invalid_prompt") -> None:
        super().__init__(message)
        self.code = code


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        hf_config = check_checkpoint_folder(config.model)
        self.tokenizer = load_tokenizer(config.model)
        device = torch.device(config.device)
        self.runtime = resolve_runtime(config)  # the same on every rank (engine/runtime.py)
        self.attention_backend, self.block_size = self.runtime.attention_backend, self.runtime.block_size
        make_plan(
            config, hf_config, device
        )  # refuses a compression mode that cannot run here, before loading
        check_parallel_layout(config, hf_config)
        self.vocab_size: int = hf_config["vocab_size"]
        model_limit = hf_config.get("max_position_embeddings") or 2048
        self.max_model_len = min(config.max_model_len or model_limit, model_limit)
        self.eos_token_ids = _eos_token_ids(hf_config, self.tokenizer)
        # tensor/pipeline parallel: worker processes for the other ranks; this process is rank 0
        executor_class = MultiprocExecutor if config.world_size > 1 else UniprocExecutor
        self.executor = executor_class(config, self.attention_backend, self.block_size)
        self.runner = self.executor.runner  # rank 0's
        self.block_manager = BlockManager(
            self.executor.num_blocks, self.block_size, config.enable_prefix_caching
        )
        self.stats = EngineStats()
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.enable_chunked_prefill,
        )
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        # bitsandbytes' kernels are not known to be capturable (LLM.int8 picks outlier columns
        # from the data), so quantised bitsandbytes models decode eagerly.
        if (
            device.type == "cuda"
            and self.attention_backend in ("flash", "triton")
            and config.quantization in ("none", "fp8")
            and config.world_size == 1  # worker ranks decode eagerly: graphs are rank 0's only
            and not config.enforce_eager
        ):
            self.runner.enable_decode_graphs(self.max_model_len)
        self._seqs: dict[str, Sequence] = {}
        self._choices: dict[str, ChoiceScoring] = {}  # requests whose choice probabilities are due
        self._finished: list[RequestOutput] = []  # aborted between steps, reported by the next step()
        self._logprobs: dict[str, list[TokenLogprob]] = {}

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, priority: int = 0
    ) -> None:
        """Queue a request; it runs from the next step on. Raises RequestRejected if it cannot run."""
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if request_id in self._seqs:
            raise RequestRejected(f"request id {request_id!r} is already running")
        self._check_prompt(token_ids)
        max_tokens = params.max_tokens
        if params.structured_outputs is not None and params.structured_outputs.choice is not None:
            # room for any choice in any tokenisation (every token but EOS holds at least one
            # byte), so that a choice is never cut short: the output is always one of them
            longest = max(len(choice.encode()) for choice in params.structured_outputs.choice)
            max_tokens = max(max_tokens, longest + 1)
        max_tokens = min(max_tokens, self.max_model_len - len(token_ids))
        self._check_fits(len(token_ids), max_tokens)
        seq = Sequence(request_id, token_ids, params, max_tokens, priority)
        if params.structured_outputs is not None:
            seq.grammar = self._grammar(params.structured_outputs)
            if params.structured_outputs.choice is not None:
                self._choices[request_id] = self._choice_scoring(token_ids, params.structured_outputs.choice)
        self._seqs[request_id] = seq
        if params.logprobs is not None:
            self._logprobs[request_id] = []
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Cancel a request now: its blocks return to the pool; the next step() reports it ("abort")."""
        seq = self._seqs.get(request_id)
        scoring = self._choices.pop(request_id, None)
        if scoring is not None:
            for scorer in scoring.scorers:
                if not scorer.is_finished:
                    self.scheduler.finish(scorer, "abort")
            if seq is None and scoring.output is not None:  # finished, waiting for its scores
                scoring.output.finish_reason = "abort"
                self._finished.append(scoring.output)
                return True
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        self._finished.append(self._output(seq))
        return True

    def close(self) -> None:
        """Stop and reap the worker processes of a parallel engine (nothing to do otherwise)."""
        self.executor.shutdown()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._finished)

    @property
    def num_unfinished_requests(self) -> int:
        # requests, not sequences: a choice request's scoring sequences are part of it, and a
        # request whose text is done is unfinished until its choices are scored
        return len(self._seqs) + sum(1 for c in self._choices.values() if c.output is not None)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prompt tokens looked up in the prefix cache since start, and how many were found."""
        return self.block_manager.stats

    def step(self) -> list[RequestOutput]:
        """Run one iteration of the continuous batch; returns the requests that finished."""
        finished, self._finished = self._finished, []
        out = self.scheduler.schedule()
        if out.is_empty:
            return finished
        self.stats.record(out)
        sampled = self.executor.execute(StepPlan.build(out, self.vocab_size))
        token_ids = sampled.sampled_token_ids.tolist() if sampled is not None else []  # the step's one sync
        self.scheduler.update_from_output(out, token_ids)
        sampling = _sampling_seqs(out)
        if sampled is not None and sampled.logprobs is not None:
            self._record_logprobs(sampling, token_ids, sampled.logprobs)
        if sampled is not None and sampled.scored_logprobs is not None:
            finished.extend(self._record_scores(out, sampled.scored_logprobs.tolist()))
        for seq in sampling:
            scoring = self._choices.get(seq.request_id)
            if scoring is not None and not scoring.started:
                self._start_scoring(seq, scoring)  # its prompt is computed, so cached: start now
            reason = self._advance_grammar(seq) or self._stop_reason(seq)
            if reason is not None:
                self.scheduler.finish(seq, *reason)
                output = self._output(seq)
                if scoring is not None and not scoring.is_done:
                    scoring.output = output  # reported once every choice is scored
                else:
                    finished.append(self._with_choices(output))
        return finished

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams],
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Offline: run every prompt to completion; outputs in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, params_list, strict=True):
            self.add_request(request_id, prompt, p)
        outputs: dict[str, RequestOutput] = {}
        with tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while self.has_unfinished_requests():
                done = self.step()
                outputs.update((o.request_id, o) for o in done)
                bar.update(len(done))
        return [outputs[i] for i in ids]

    def _check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise RequestRejected("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise RequestRejected(
                f"the prompt has {len(token_ids)} tokens; this model takes at most "
                f"{self.max_model_len - 1} so that one token can be generated"
            )
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestRejected(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if not self.config.enable_chunked_prefill and len(token_ids) > self.config.max_num_batched_tokens:
            raise RequestRejected(
                f"the prompt has {len(token_ids)} tokens, more than max_num_batched_tokens="
                f"{self.config.max_num_batched_tokens}, and chunked prefill is off"
            )

    def _check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        # A sequence larger than the whole pool would preempt itself forever.
        needed = -(-(num_prompt_tokens + max_tokens) // self.block_size)
        if needed > self.block_manager.num_blocks:
            raise RequestRejected(
                f"prompt ({num_prompt_tokens}) + max_tokens ({max_tokens}) need {needed} KV blocks; "
                f"the cache has {self.block_manager.num_blocks}"
            )

    def _grammar(self, spec: StructuredOutputs):
        try:
            return self.grammars.matcher(spec)
        except InvalidStructuredOutput as e:
            raise RequestRejected(str(e), code="invalid_structured_output") from None

    def _choice_scoring(self, prompt_token_ids: list[int], choices: list[str]) -> ChoiceScoring:
        eos = [
            self.tokenizer.eos_token_id
            if self.tokenizer.eos_token_id is not None
            else min(self.eos_token_ids)
        ]
        token_ids = [self.tokenizer.encode(c, add_special_tokens=False) + eos for c in choices]
        longest = len(prompt_token_ids) + max(map(len, token_ids))
        if longest > self.max_model_len:
            raise RequestRejected(
                f"the prompt and its longest choice with EOS take {longest} tokens; "
                f"this model takes at most {self.max_model_len}"
            )
        self._check_fits(longest, 0)
        return ChoiceScoring(choices, token_ids)

    def _start_scoring(self, seq: Sequence, scoring: ChoiceScoring) -> None:
        for i, choice_ids in enumerate(scoring.token_ids):
            scorer = Sequence(
                f"{seq.request_id}/choice-{i}", seq.prompt_token_ids + choice_ids, seq.params, 0, seq.priority
            )
            scorer.scored_from = seq.num_prompt_tokens
            scoring.scorers.append(scorer)
            self.scheduler.add(scorer)

    def _record_scores(self, out: SchedulerOutput, scores: list[float]) -> list[RequestOutput]:
        """Add the step's scores to its scoring sequences; returns the outputs whose scores are now complete."""
        scorers = [seq for seq in out.seqs if seq.is_scoring]
        done = []
        for scorer, score in zip(scorers, scores, strict=True):
            if scorer.is_finished:
                continue  # aborted with its request
            scorer.score += score
            if scorer.num_uncomputed_tokens == 0:
                self.scheduler.finish(scorer, "stop")
                request_id = scorer.request_id.rsplit("/choice-", 1)[0]
                scoring = self._choices[request_id]
                scoring.num_done += 1
                if scoring.is_done and scoring.output is not None:
                    done.append(self._with_choices(scoring.output))
        return done

    def _with_choices(self, output: RequestOutput) -> RequestOutput:
        scoring = self._choices.pop(output.request_id, None)
        if scoring is not None and scoring.is_done:
            output.choice_probabilities = scoring.probabilities()
        return output

    def _advance_grammar(self, seq: Sequence) -> tuple[str, str | int | None] | None:
        """Feed the sampled token to the sequence's grammar; a grammar with nothing left to add ends it."""
        if seq.grammar is None:
            return None
        token_id = seq.token_ids[-1]
        if not seq.grammar.consume_token(token_id):
            # the mask allowed only what the grammar accepts, so this is a bug, not bad input
            log.error("%r: the grammar refused token %d: %s", seq, token_id, seq.grammar.get_error())
            return "abort", None
        if seq.grammar.is_stopped():
            # complete: either this was EOS, or nothing but EOS could follow (spare that step)
            return "stop", token_id if token_id in self.eos_token_ids else None
        return None

    def _stop_reason(self, seq: Sequence) -> tuple[str, str | int | None] | None:
        token_id = seq.token_ids[-1]
        params = seq.params
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids):
            return "stop", token_id
        if params.stop:
            # Checked every token, so a new occurrence ends in the newest token's text: decoding a
            # tail window is enough, and keeps the check O(1) per token instead of O(output).
            # The window's first characters may decode differently than mid-text (a dropped
            # leading space, a split UTF-8 sequence); at twice the longest stop string plus 8
            # tokens they lie well before any occurrence that reaches the newest token.
            window = 2 * max(map(len, params.stop)) + 8
            text = self._decode(seq.output_token_ids[-window:])
            for stop in params.stop:
                if stop in text:
                    return "stop", stop
        if seq.num_output_tokens >= seq.max_tokens:
            return "length", None
        return None

    def _output(self, seq: Sequence) -> RequestOutput:
        self._seqs.pop(seq.request_id, None)
        output_ids = seq.output_token_ids
        text_ids = (
            output_ids[:-1] if isinstance(seq.stop_reason, int) else output_ids
        )  # the stop token is not text
        text = self._decode(text_ids)
        if isinstance(seq.stop_reason, str):
            text = text[: text.find(seq.stop_reason)]
        metrics = RequestMetrics(seq.arrival_time, seq.first_token_time, time.time(), seq.num_preemptions)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=output_ids,
            text=text,
            finish_reason=seq.finish_reason,
            metrics=metrics,
            stop_reason=seq.stop_reason,
            logprobs=self._logprobs.pop(seq.request_id, None),
        )

    def _record_logprobs(self, sampling: list[Sequence], token_ids: list[int], logprobs) -> None:
        sampled = logprobs.sampled_logprobs.tolist()
        top_ids, top_values = logprobs.top_token_ids.tolist(), logprobs.top_logprobs.tolist()
        for row, seq in enumerate(sampling):
            record = self._logprobs.get(seq.request_id)
            if record is None:
                continue
            k = seq.params.logprobs or 0
            top = list(zip(top_ids[row][:k], top_values[row][:k], strict=True))
            record.append(TokenLogprob(token_ids[row], sampled[row], top))

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _sampling_seqs(out: SchedulerOutput) -> list[Sequence]:
    return [seq for seq, samples in zip(out.seqs, out.is_sampling, strict=True) if samples]


def _eos_token_ids(hf_config: dict, tokenizer) -> set[int]:
    eos = hf_config.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
