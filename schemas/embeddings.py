"""OpenAI's `/v1/embeddings`: the request body and the response body, as its API reference has them.

`input` is a string, a list of strings, a list of token ids, or a list of token-id lists (each
one an input, embedded on its own); the kind is checked where the job is translated.
"""

from __future__ import annotations

from typing import Any, Literal

from msgspec import Struct

from schemas.openai import PositiveInt, Priority, UnixTimeMs


class EmbeddingRequest(Struct, kw_only=True, omit_defaults=True):
    input: str | list[Any]
    model: str = ""
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None  # the first `dimensions` components, renormalised
    user: Any = None  # OpenAI's end-user id: no effect
    # vLLM's extra fields
    truncate_prompt_tokens: PositiveInt | None = None
    add_special_tokens: bool = True
    priority: Priority = 0
    request_id: Any = None  # vLLM's own request id: no effect (Sluice names requests itself)
    # vLLM's output options Sluice has one way of: read so that another is refused, not dropped
    normalize: Any = None
    embed_dtype: Any = None
    endianness: Any = None
    # Sluice's extension: Unix time in milliseconds after which the job is not worth running
    sluice_deadline_ms: UnixTimeMs | None = None


class Embedding(Struct, kw_only=True, tag_field="object", tag="embedding"):
    index: int
    embedding: list[float] | str  # str: little-endian float32 bytes in base64 (encoding_format)


class EmbeddingUsage(Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(Struct, kw_only=True, tag_field="object", tag="list"):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
