"""JobHandler: one consumed job -> its outcome (a result, or an error result + dead letter).

Nothing here raises for bad input: every way a job can fail becomes an error result with a
stable code and a message that says why. The handler sees a job as its bytes, headers and
timestamp, not as a Kafka record: the service and `sluice label --local` both hand jobs to it.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from engine import EngineDeadError, LLMEngine, PoolingParams, RequestOutput, RequestRejected
from schemas.batch import BatchResponseLine
from schemas.codec import JobDecodeError, decode_job, normalize_content_type, peek_custom_id
from schemas.embeddings import EmbeddingRequest
from schemas.responses_api import ResponsesRequest
from service.backpressure import Backpressure
from service.batcher import DynamicBatcher
from service.config import ServiceConfig
from service.embeddings import embed, embedding_inputs, to_embedding_line
from service.fingerprint import system_fingerprint
from service.headers import (
    DeadlineExceeded,
    check_deadline,
    check_header_keys,
    excerpt,
    header_deadline,
    header_dict,
)
from service.limits import check_job_size, check_limits, check_prompt_tokens, output_tokens
from service.reasoning import resolve_reasoning_parser
from service.responses_api import responses_param, to_chat_job
from service.responses_output import to_response_line
from service.routing import ReplyTopics
from service.sampling import max_tokens_of
from service.translate import (
    EngineRequest,
    TranslationError,
    check_model,
    new_request_id,
    to_decode_error_line,
    to_engine_request,
    to_error_line,
    to_failure_line,
    to_result_line,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Outcome:
    result: BatchResponseLine
    content_type: str  # the job's own encoding, used for its result too
    reply_to: str | None  # the job's `reply_to` header: where its result goes instead of the default
    output: RequestOutput | None = None  # the engine's output when inference ran (for spans)
    request_id: str = ""  # the job's (translate.new_request_id): its result's, spans' and logs'

    @property
    def is_error(self) -> bool:
        return self.result.is_error


class JobHandler:
    def __init__(
        self,
        config: ServiceConfig,
        batcher: DynamicBatcher,
        engine: LLMEngine,
        backpressure: Backpressure | None = None,
        reply_topics: ReplyTopics | None = None,
    ) -> None:
        """Answers jobs as `config` says (the served model name and its aliases, default_max_tokens,
        unknown_fields, the limits, embedding pooling, the tool-call and reasoning parsers) on
        `engine`, whose max_model_len and architectures the limits and the `auto` parsers read; the
        service and the `--local` client runs both build it so, and answer a job the same way.
        `reply_topics`: where a job's `reply_to` may send its result (None: anywhere, for callers
        that publish nothing, as `sluice label --local`)."""
        self._batcher = batcher
        self._backpressure = backpressure or Backpressure(max_jobs=2**31, max_tokens=2**62)
        self._model_name = config.served_model_name
        self._served_names = frozenset([self._model_name, *config.model_aliases])
        # a job whose `model` names a LoRA adapter runs with it, and its result carries that name
        self._adapters = frozenset(config.engine.lora_adapters)
        self._unknown_fields = config.unknown_fields
        self._default_max_tokens = config.default_max_tokens
        self._limits = config.limits
        self._max_model_len = engine.max_model_len
        self._reply_topics = reply_topics
        # Tokenising and templating a long prompt (and building a long result) take a while: they
        # run on a thread of their own, with a tokenizer of their own (a tokenizer switches its
        # special-token handling per call, so it must not be shared with the engine's thread).
        self._tokenizer = copy.deepcopy(batcher.tokenizer)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sluice-tokenize")
        self._pooling = PoolingParams(config.embedding_pooling)  # of /v1/embeddings jobs
        self._tool_call_parser = config.tool_call_parser
        # resolved: none, harmony or deepseek_r1
        self._reasoning_parser = resolve_reasoning_parser(config.reasoning_parser, engine.architectures)
        self._system_fingerprint = system_fingerprint(engine)

    async def handle(
        self,
        value: bytes,
        headers: Sequence[tuple[str, bytes | None]],
        timestamp_ms: int,
        ref: str,
        tag=None,
        request_id: str | None = None,
    ) -> Outcome:
        """The job's outcome.

        `headers`: the job's (name, value) pairs; `timestamp_ms`: when it was produced (its queue
        time starts there); `ref`: where it came from ("topic/partition/offset"), for logs and the
        custom_id of a job without one; `tag` goes with the job into its admission batch (the
        job's span); `request_id`: the job's id (new_request_id; a new one when None), written
        as its result's `response.request_id` and used as its engine request's id.
        """
        request_id = request_id or new_request_id()
        header_values = header_dict(headers)
        content_type = normalize_content_type(header_values.get("content-type"))
        reply_to = header_values.get("reply_to") or header_values.get("reply-to") or None
        custom_id = peek_custom_id(value, content_type) or ref  # never raises
        refusal = None
        if reply_to is not None and self._reply_topics is not None:
            refusal = self._reply_topics.refusal(reply_to)
        output = None
        try:
            check_header_keys(headers)
            if refusal is not None:
                raise TranslationError("invalid_reply_to", refusal, param="reply_to")
            check_job_size(value, self._limits)
            deadline = header_deadline(header_values)
            result, output = await self._run(value, content_type, timestamp_ms, request_id, deadline, tag)
        except Exception as e:
            result = _error_line(custom_id, ref, e, request_id)
        # a refused reply_to's error result goes to the results topic
        return Outcome(result, content_type, None if refusal else reply_to, output, request_id)

    async def _run(
        self,
        value: bytes,
        content_type: str,
        timestamp_ms: int,
        request_id: str,
        deadline: float | None,
        tag,
    ) -> tuple[BatchResponseLine, RequestOutput]:
        check_deadline(deadline, "before decoding")
        job = decode_job(value, content_type, self._unknown_fields)
        check_model(job, self._served_names | self._adapters)
        adapter = job.body.model if job.body.model in self._adapters else None
        if job.body.sluice_deadline_ms is not None:
            deadline = min(deadline or math.inf, job.body.sluice_deadline_ms / 1000)
        check_deadline(deadline, "before inference")
        if isinstance(job.body, EmbeddingRequest):
            if adapter is not None:
                raise TranslationError(
                    "invalid_request",
                    "LoRA adapters serve completions and chats, not embeddings",
                    param="model",
                )
            return await self._embed(job, request_id, deadline, tag)
        if isinstance(job.body, ResponsesRequest):  # runs as the chat job it means
            chat_job = to_chat_job(job, getattr(self._tokenizer, "chat_template", None))
            try:
                line, output = await self._generate_line(
                    chat_job, timestamp_ms, request_id, deadline, tag, adapter
                )
            except (TranslationError, RequestRejected) as e:  # named as the job named its field
                e.param = responses_param(e.param)
                raise
            return to_response_line(job, line), output
        return await self._generate_line(job, timestamp_ms, request_id, deadline, tag, adapter)

    async def _generate_line(
        self, job, timestamp_ms: int, request_id: str, deadline: float | None, tag, adapter: str | None
    ) -> tuple[BatchResponseLine, RequestOutput]:
        max_tokens = max_tokens_of(job.body, self._default_max_tokens, self._batcher.generation_defaults)
        check_limits(job, self._limits, max_tokens, self._max_model_len)
        request = await self._translate(job)
        if adapter is not None:
            request.params = dataclasses.replace(request.params, lora_name=adapter)
        num_prompt_tokens = len(request.prompt_token_ids)
        check_prompt_tokens(num_prompt_tokens, self._limits, self._max_model_len)
        check_deadline(deadline, "after tokenising")
        output = await self._generate(request, request_id, deadline, tag)
        enqueued_time = timestamp_ms / 1000
        line = await self._off_loop(
            functools.partial(
                to_result_line,
                tool_call_parser=self._tool_call_parser,
                reasoning_parser=self._reasoning_parser,
                request_id=request_id,
                system_fingerprint=self._system_fingerprint,
            ),
            job,
            output,
            adapter or self._model_name,
            enqueued_time,
            self._tokenizer,
        )
        return line, output

    async def _translate(self, job) -> EngineRequest:
        """The job's engine request. Translation reads nothing but the job (and the tokenizer), so
        an error it did not foresee is still the job's: a 400, never an engine_error."""
        try:
            return await self._off_loop(
                to_engine_request,
                job,
                self._tokenizer,
                self._default_max_tokens,
                self._batcher.generation_defaults,
                self._limits.allow_special_tokens,
                self._reasoning_parser,
            )
        except (TranslationError, RequestRejected):
            raise
        except Exception as e:
            log.warning("translating job %s failed unforeseen", job.custom_id, exc_info=e)
            raise TranslationError(
                "invalid_request",
                f"the job could not be translated: {type(e).__name__}: {excerpt(str(e), 200)}",
            ) from None

    async def _generate(
        self, request: EngineRequest, request_id: str, deadline: float | None, tag
    ) -> RequestOutput:
        """Admit the request into the engine under the job's id and wait for its output, holding
        its tokens in flight."""
        num_prompt_tokens = len(request.prompt_token_ids)
        generation = self._batcher.generate(
            request_id, request.prompt_token_ids, request.params, request.priority, tag=tag
        )
        # what it may hold in the KV cache: the prompt once (its samples share it), each sample's
        # output as the engine clips max_tokens to the model's length
        max_tokens = output_tokens(request.params.max_tokens, num_prompt_tokens, self._max_model_len)
        tokens = num_prompt_tokens + request.params.num_samples * max_tokens
        self._backpressure.add(tokens=tokens)
        try:
            # Past the deadline the awaiting task is cancelled, which aborts the request in the engine.
            timeout = None if deadline is None else deadline - time.time()
            return await asyncio.wait_for(generation, timeout)
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed during inference; the request was aborted") from None
        finally:
            self._backpressure.remove(tokens=tokens)

    async def _embed(
        self, job, request_id: str, deadline: float | None, tag
    ) -> tuple[BatchResponseLine, RequestOutput]:
        inputs = await self._off_loop(embedding_inputs, job.body, self._tokenizer)
        for ids in inputs:
            check_prompt_tokens(len(ids), self._limits, self._max_model_len)
        tokens = sum(map(len, inputs))
        # each input is an engine request of its own; the record was counted once when fetched
        more_jobs = len(inputs) - 1
        self._backpressure.add(tokens=tokens, jobs=more_jobs)
        try:
            timeout = None if deadline is None else deadline - time.time()
            outputs = await embed(
                self._batcher, request_id, inputs, self._pooling, job.body.priority, timeout, tag
            )
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed during inference; the request was aborted") from None
        finally:
            self._backpressure.remove(tokens=tokens, jobs=more_jobs)
        if any(out.finish_reason == "abort" for out in outputs):
            return to_error_line(
                job.custom_id, "engine_error", "the engine aborted the request", 500, request_id=request_id
            ), outputs[0]
        return to_embedding_line(job, outputs, self._model_name, request_id), outputs[0]

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


def _error_line(
    custom_id: str, ref: str, error: Exception, request_id: str | None = None
) -> BatchResponseLine:
    """The error result for a job that failed with `error`; EngineDeadError is re-raised: not the
    job's fault, the job stays uncommitted and is redone elsewhere."""
    match error:
        case DeadlineExceeded():  # not an HTTP error: OpenAI's batch_expired has this shape
            return to_failure_line(custom_id, "deadline_exceeded", str(error))
        case JobDecodeError():
            return to_decode_error_line(custom_id, error, request_id)
        case TranslationError():
            return to_error_line(
                custom_id, error.code, error.message, error.status_code, error.param, request_id
            )
        case RequestRejected():  # invalid_prompt; invalid_structured_output: a bad schema/regex
            return to_error_line(custom_id, error.code, str(error), param=error.param, request_id=request_id)
        case EngineDeadError():
            raise error
    log.error("job %s (%s) failed in the engine", ref, request_id, exc_info=error)
    return to_error_line(
        custom_id, "engine_error", f"{type(error).__name__}: {error}", 500, request_id=request_id
    )
