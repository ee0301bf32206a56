"""`/v1/embeddings` jobs: inputs -> pooling requests; pooled vectors -> OpenAI's embedding response.

Each input of a job is one engine request (PoolingParams), batched with generation like any
other. A vector is the engine's pooled final hidden state, cut to `dimensions` first and then
normalised to unit length (as OpenAI's text-embedding-3 models shorten theirs), as floats or
as base64 of little-endian float32 (`encoding_format`).
"""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import uuid

from engine import RequestOutput
from schemas.batch import BatchRequestLine, BatchResponse, BatchResponseLine
from schemas.embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from service.fields import TranslationError, check_fields
from service.translate import new_request_id

MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one embeddings request


def embedding_inputs(body: EmbeddingRequest, tokenizer) -> list[list[int]]:
    """Each input's token ids (truncated as asked). Raises TranslationError naming the field."""
    check_fields(body)
    raw = body.input
    if isinstance(raw, str) or (raw and all(isinstance(t, int) and not isinstance(t, bool) for t in raw)):
        inputs = [raw]  # one text, or one input of token ids
    else:
        inputs = raw
    if not inputs or len(inputs) > MAX_INPUTS:
        raise TranslationError("invalid_request", f"input must hold 1 to {MAX_INPUTS} inputs", param="input")
    if len({type(item) for item in inputs}) > 1:
        raise TranslationError(
            "invalid_request", "input must be all strings or all token-id lists, not a mix", param="input"
        )
    ids = [_token_ids(item, i, body.add_special_tokens, tokenizer) for i, item in enumerate(inputs)]
    k = body.truncate_prompt_tokens
    return [item[-k:] if k is not None else item for item in ids]


def _token_ids(item, i: int, add_special_tokens: bool, tokenizer) -> list[int]:
    if isinstance(item, str):
        ids = tokenizer.encode(item, add_special_tokens=add_special_tokens) if item else []
    elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
        ids = list(item)
    else:
        raise TranslationError(
            "invalid_request",
            "input must be a string, a list of strings, a list of token ids or a list of token-id lists",
            param=f"input[{i}]",
        )
    if not ids:
        raise TranslationError("invalid_request", f"input[{i}] is empty", param=f"input[{i}]")
    return ids


def to_embedding_line(
    job: BatchRequestLine, outputs: list[RequestOutput], model_name: str, request_id: str | None = None
) -> BatchResponseLine:
    """The job's pooled outputs (in input order) as an OpenAI embeddings result line, under the
    job's `request_id` (a new one when None)."""
    body = job.body
    data = [
        Embedding(
            index=i, embedding=_encoded(_shortened(out.embedding, body.dimensions), body.encoding_format)
        )
        for i, out in enumerate(outputs)
    ]
    num_tokens = sum(len(out.prompt_token_ids) for out in outputs)
    response_body = EmbeddingResponse(
        data=data, model=model_name, usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens)
    )
    return BatchResponseLine(
        id=f"batch_req_{uuid.uuid4().hex}",
        custom_id=job.custom_id,
        response=BatchResponse(
            status_code=200, request_id=request_id or new_request_id(), body=response_body
        ),
    )


def _shortened(vector: list[float] | None, dimensions: int | None) -> list[float]:
    if vector is None:
        raise TranslationError("engine_error", "the engine returned no embedding", 500)
    if dimensions is not None and dimensions > len(vector):
        raise TranslationError(
            "invalid_request",
            f"dimensions must be at most {len(vector)}, this model's embedding size; got {dimensions}",
            param="dimensions",
        )
    vector = vector[:dimensions] if dimensions is not None else vector
    norm = math.sqrt(math.fsum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def embed(batcher, request_id: str, inputs: list[list[int]], params, priority: int, timeout, tag):
    """Every input's pooled output, in input order; an input the engine refuses aborts the others.
    Raises TimeoutError past `timeout` seconds (None: no limit), the requests aborted."""
    tasks = [
        asyncio.ensure_future(batcher.generate(f"{request_id}/{i}", ids, params, priority, tag=tag))
        for i, ids in enumerate(inputs)
    ]
    try:
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
