"""The wire format: OpenAI Batch API lines as msgspec types. Knows nothing of Kafka or the engine."""

from schemas.batch import (
    SCHEMA_VERSION,
    BatchError,
    BatchRequestLine,
    BatchResponse,
    BatchResponseLine,
)
from schemas.codec import JobDecodeError, decode_job, encode_result, peek_custom_id

__all__ = [
    "SCHEMA_VERSION",
    "BatchError",
    "BatchRequestLine",
    "BatchResponse",
    "BatchResponseLine",
    "JobDecodeError",
    "decode_job",
    "encode_result",
    "peek_custom_id",
]
