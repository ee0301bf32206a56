"""JobHandler: one consumed job -> its outcome (a result, or an error result + dead letter).

Nothing here raises for bad input: every way a job can fail becomes an error result with a
stable code and a message that says why. The handler sees a job as its bytes, headers and
timestamp, not as a Kafka record: the service and `sluice label --local` both hand jobs to it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from engine import EngineDeadError, RequestOutput, RequestRejected
from engine.pooling import PoolingParams
from schemas.batch import BatchResponseLine
from schemas.codec import JobDecodeError, decode_job, normalize_content_type, peek_custom_id
from schemas.embeddings import EmbeddingRequest
from service.backpressure import Backpressure
from service.batcher import DynamicBatcher
from service.embeddings import embed, embedding_inputs, to_embedding_line
from service.translate import (
    TranslationError,
    check_model,
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

    @property
    def is_error(self) -> bool:
        return self.result.is_error


class JobHandler:
    def __init__(
        self,
        batcher: DynamicBatcher,
        model_name: str,
        default_max_tokens: int,
        backpressure: Backpressure | None = None,
        model_aliases: Sequence[str] = (),
        unknown_fields: str = "reject",
        embedding_pooling: str = "last",
        tool_call_parser: str = "auto",
    ) -> None:
        """`model_aliases`: other names a job's `model` may give; `unknown_fields`: "reject" (a
        body field no schema declares is an error, as OpenAI does) or "ignore" (vLLM's leniency)."""
        self._batcher = batcher
        self._backpressure = backpressure or Backpressure(max_jobs=2**31, max_tokens=2**62)
        self._model_name = model_name
        self._served_names = frozenset([model_name, *model_aliases])
        self._unknown_fields = unknown_fields
        self._default_max_tokens = default_max_tokens
        self._pooling = PoolingParams(embedding_pooling)  # of /v1/embeddings jobs
        self._tool_call_parser = tool_call_parser

    async def handle(
        self,
        value: bytes,
        headers: Sequence[tuple[str, bytes | None]],
        timestamp_ms: int,
        ref: str,
        tag=None,
    ) -> Outcome:
        """The job's outcome.

        `headers`: the job's (name, value) pairs; `timestamp_ms`: when it was produced (its queue
        time starts there); `ref`: where it came from ("topic/partition/offset"), for request ids,
        logs and the custom_id of a job without one; `tag` goes with the job into its admission
        batch (the job's span).
        """
        header_values = header_dict(headers)
        content_type = normalize_content_type(header_values.get("content-type"))
        reply_to = header_values.get("reply_to") or header_values.get("reply-to") or None
        custom_id = peek_custom_id(value, content_type) or ref
        output = None
        deadline = _header_deadline(header_values)
        try:
            result, output = await self._run(value, content_type, timestamp_ms, ref, deadline, tag)
        except DeadlineExceeded as e:  # not an HTTP error: OpenAI's batch_expired has this shape
            result = to_failure_line(custom_id, "deadline_exceeded", str(e))
        except JobDecodeError as e:
            if e.code == "invalid_encoding":  # not a request line at all
                result = to_failure_line(custom_id, e.code, e.message)
            else:
                result = to_error_line(custom_id, e.code, e.message, param=e.param)
        except TranslationError as e:
            result = to_error_line(custom_id, e.code, e.message, e.status_code, e.param)
        except (
            RequestRejected
        ) as e:  # code: invalid_prompt, or invalid_structured_output for a bad schema/regex
            result = to_error_line(custom_id, e.code, str(e))
        except EngineDeadError:
            raise  # not the job's fault: no result, the job stays uncommitted and is redone elsewhere
        except Exception as e:
            log.exception("job %s failed in the engine", ref)
            result = to_error_line(custom_id, "engine_error", f"{type(e).__name__}: {e}", 500)
        return Outcome(result, content_type, reply_to, output)

    async def _run(
        self, value: bytes, content_type: str, timestamp_ms: int, ref: str, deadline: float | None, tag
    ) -> tuple[BatchResponseLine, RequestOutput]:
        _check_deadline(deadline, "before decoding")
        job = decode_job(value, content_type, self._unknown_fields)
        check_model(job, self._served_names)
        if job.body.sluice_deadline_ms is not None:
            deadline = min(deadline or math.inf, job.body.sluice_deadline_ms / 1000)
        _check_deadline(deadline, "before inference")
        if isinstance(job.body, EmbeddingRequest):
            return await self._embed(job, ref, deadline, tag)
        batcher = self._batcher
        request = to_engine_request(
            job, batcher.tokenizer, self._default_max_tokens, batcher.generation_defaults
        )
        # Unique per delivery: a redelivered record is a new engine request.
        request_id = f"{ref}/{uuid.uuid4().hex[:8]}"
        generation = self._batcher.generate(
            request_id, request.prompt_token_ids, request.params, request.priority, tag=tag
        )
        # what it may hold in the KV cache: the prompt once (its samples share it), each sample's output
        tokens = len(request.prompt_token_ids) + request.params.num_samples * request.params.max_tokens
        self._backpressure.add(tokens=tokens)
        try:
            # Past the deadline the awaiting task is cancelled, which aborts the request in the engine.
            timeout = None if deadline is None else deadline - time.time()
            output = await asyncio.wait_for(generation, timeout)
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed during inference; the request was aborted") from None
        finally:
            self._backpressure.remove(tokens=tokens)
        line = to_result_line(
            job,
            output,
            self._model_name,
            enqueued_time=timestamp_ms / 1000,
            tokenizer=self._batcher.tokenizer,
            tool_call_parser=self._tool_call_parser,
        )
        return line, output

    async def _embed(
        self, job, ref: str, deadline: float | None, tag
    ) -> tuple[BatchResponseLine, RequestOutput]:
        inputs = embedding_inputs(job.body, self._batcher.tokenizer)
        tokens = sum(map(len, inputs))
        self._backpressure.add(tokens=tokens)
        try:
            timeout = None if deadline is None else deadline - time.time()
            request_id = f"{ref}/{uuid.uuid4().hex[:8]}"
            outputs = await embed(
                self._batcher, request_id, inputs, self._pooling, job.body.priority, timeout, tag
            )
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed during inference; the request was aborted") from None
        finally:
            self._backpressure.remove(tokens=tokens)
        if any(out.finish_reason == "abort" for out in outputs):
            return to_error_line(
                job.custom_id, "engine_error", "the engine aborted the request", 500
            ), outputs[0]
        return to_embedding_line(job, outputs, self._model_name), outputs[0]


class DeadlineExceeded(Exception):
    pass


def _header_deadline(headers: dict[str, str]) -> float | None:
    """The `sluice-deadline-ms` header (Unix time in milliseconds) in seconds; None if absent or unreadable."""
    raw = headers.get("sluice-deadline-ms")
    try:
        return int(raw) / 1000 if raw else None
    except ValueError:
        return None


def _check_deadline(deadline: float | None, when: str) -> None:
    if deadline is not None and time.time() >= deadline:
        late_ms = (time.time() - deadline) * 1000
        raise DeadlineExceeded(f"the job's deadline passed {late_ms:.0f} ms ago, {when}; it was not run")


def header_dict(headers: Sequence[tuple[str, bytes | None]] | None) -> dict[str, str]:
    """Kafka headers as a dict of lower-cased names to text values (the last one wins)."""
    out: dict[str, str] = {}
    for key, value in headers or ():
        if value is not None:
            out[key.lower()] = value.decode("utf-8", "replace")
    return out
