"""OpenAI's batch output line as JSON Schema, written from the API reference (platform.openai.com/docs/
api-reference: "The request output object" of the Batch API, "The chat completion object", "The
completion object", Responses' "The response object", and the error body every endpoint returns with a 4xx/5xx status).

Extra properties are allowed where OpenAI's own objects carry more than the reference lists
(`system_fingerprint`, `service_tier`) and for the extensions vLLM and Sluice add (`stop_reason`,
`body.sluice`); everything the reference names is checked: required fields, types and enums.
"""

from __future__ import annotations

_INT = {"type": "integer"}
_STR = {"type": "string"}
_BYTES = {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0, "maximum": 255}}

USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": _INT,
        "completion_tokens": _INT,
        "total_tokens": _INT,
        "prompt_tokens_details": {
            "type": ["object", "null"],
            "properties": {"cached_tokens": _INT, "audio_tokens": _INT},
        },
        "completion_tokens_details": {
            "type": ["object", "null"],
            "properties": {
                "reasoning_tokens": _INT,
                "audio_tokens": _INT,
                "accepted_prediction_tokens": _INT,
                "rejected_prediction_tokens": _INT,
            },
        },
    },
}

TOP_LOGPROB = {
    "type": "object",
    "required": ["token", "logprob", "bytes"],
    "properties": {"token": _STR, "logprob": {"type": "number"}, "bytes": _BYTES},
}

CHAT_LOGPROBS = {
    "type": ["object", "null"],
    "required": ["content"],
    "properties": {
        "content": {
            "type": ["array", "null"],
            "items": {
                "type": "object",
                "required": ["token", "logprob", "bytes", "top_logprobs"],
                "properties": {
                    **TOP_LOGPROB["properties"],
                    "top_logprobs": {"type": "array", "items": TOP_LOGPROB},
                },
            },
        },
        "refusal": {"type": ["array", "null"]},
    },
}

TOOL_CALL = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {
        "id": _STR,
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {"name": _STR, "arguments": _STR},
        },
    },
}

CHAT_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": _STR,
        "object": {"const": "chat.completion"},
        "created": _INT,
        "model": _STR,
        "usage": USAGE,
        "system_fingerprint": {"type": ["string", "null"]},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason", "logprobs"],
                "properties": {
                    "index": _INT,
                    "finish_reason": {
                        "enum": ["stop", "length", "tool_calls", "content_filter", "function_call"]
                    },
                    "logprobs": CHAT_LOGPROBS,
                    "message": {
                        "type": "object",
                        "required": ["role", "content"],
                        "properties": {
                            "role": {"const": "assistant"},
                            "content": {"type": ["string", "null"]},
                            "refusal": {"type": ["string", "null"]},
                            "tool_calls": {"type": "array", "items": TOOL_CALL},
                        },
                    },
                },
            },
        },
    },
}

TEXT_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": _STR,
        "object": {"const": "text_completion"},
        "created": _INT,
        "model": _STR,
        "usage": USAGE,
        "system_fingerprint": {"type": ["string", "null"]},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "text", "finish_reason", "logprobs"],
                "properties": {
                    "index": _INT,
                    "text": _STR,
                    "finish_reason": {"enum": ["stop", "length", "content_filter"]},
                    "logprobs": {
                        "type": ["object", "null"],
                        "properties": {
                            "tokens": {"type": "array", "items": _STR},
                            "token_logprobs": {"type": "array", "items": {"type": ["number", "null"]}},
                            "top_logprobs": {
                                "type": ["array", "null"],
                                "items": {
                                    "type": ["object", "null"],
                                    "additionalProperties": {"type": "number"},
                                },
                            },
                            "text_offset": {"type": "array", "items": _INT},
                        },
                    },
                },
            },
        },
    },
}

ERROR_BODY = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": _STR,
                "type": _STR,
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

# CreateEmbeddingResponse (API reference: Embeddings > The embedding object)
EMBEDDING_RESPONSE = {
    "type": "object",
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "object": {"const": "list"},
        "model": _STR,
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"const": "embedding"},
                    "index": _INT,
                    # floats, or a base64 string with encoding_format "base64"
                    "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}}, _STR]},
                },
            },
        },
        "usage": {
            "type": "object",
            "required": ["prompt_tokens", "total_tokens"],
            "properties": {"prompt_tokens": _INT, "total_tokens": _INT},
        },
    },
}

_LOGPROB = {
    "type": "object",
    "required": ["token", "logprob", "bytes", "top_logprobs"],
    "properties": {
        "token": _STR,
        "logprob": {"type": "number"},
        "bytes": {"type": "array", "items": _INT},
        "top_logprobs": {
            "type": "array",
            "items": {"type": "object", "required": ["token", "logprob", "bytes"]},
        },
    },
}
_ITEM_STATUS = {"enum": ["in_progress", "completed", "incomplete"]}

# Responses' Response object (API reference: Responses > The response object)
RESPONSE = {
    "type": "object",
    "required": [
        "id",
        "object",
        "created_at",
        "status",
        "model",
        "output",
        "usage",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    ],
    "properties": {
        "id": _STR,
        "object": {"const": "response"},
        "created_at": {"type": "number"},
        "status": {"enum": ["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]},
        "incomplete_details": {
            "type": ["object", "null"],
            "properties": {"reason": {"enum": ["max_output_tokens", "content_filter"]}},
        },
        "error": {"type": ["object", "null"]},
        "model": _STR,
        "instructions": {"type": ["string", "array", "null"]},
        "max_output_tokens": {"type": ["integer", "null"]},
        "temperature": {"type": ["number", "null"]},
        "top_p": {"type": ["number", "null"]},
        "metadata": {"type": ["object", "null"], "additionalProperties": _STR},
        "parallel_tool_calls": {"type": "boolean"},
        "tools": {"type": "array", "items": {"type": "object", "required": ["type"]}},
        "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}]},
        "output": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type"],
                "oneOf": [
                    {
                        "properties": {
                            "type": {"const": "message"},
                            "id": _STR,
                            "role": {"const": "assistant"},
                            "status": _ITEM_STATUS,
                            "content": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["type", "text", "annotations"],
                                    "properties": {
                                        "type": {"const": "output_text"},
                                        "text": _STR,
                                        "annotations": {"type": "array"},
                                        "logprobs": {"type": "array", "items": _LOGPROB},
                                    },
                                },
                            },
                        },
                        "required": ["id", "role", "status", "content"],
                    },
                    {
                        "properties": {
                            "type": {"const": "function_call"},
                            "call_id": _STR,
                            "name": _STR,
                            "arguments": _STR,
                            "status": _ITEM_STATUS,
                        },
                        "required": ["call_id", "name", "arguments"],
                    },
                    {
                        "properties": {
                            "type": {"const": "reasoning"},
                            "id": _STR,
                            "summary": {"type": "array"},
                        },
                        "required": ["id", "summary"],
                    },
                ],
            },
        },
        "usage": {
            "type": "object",
            "required": [
                "input_tokens",
                "input_tokens_details",
                "output_tokens",
                "output_tokens_details",
                "total_tokens",
            ],
            "properties": {
                "input_tokens": _INT,
                "input_tokens_details": {
                    "type": "object",
                    "required": ["cached_tokens"],
                    "properties": {"cached_tokens": _INT},
                },
                "output_tokens": _INT,
                "output_tokens_details": {
                    "type": "object",
                    "required": ["reasoning_tokens"],
                    "properties": {"reasoning_tokens": _INT},
                },
                "total_tokens": _INT,
            },
        },
    },
}

# the line; its `response.body` is checked against one of the bodies above (by url and status)
BATCH_OUTPUT_LINE = {
    "type": "object",
    "required": ["id", "custom_id", "response", "error"],
    "properties": {
        "id": _STR,
        "custom_id": _STR,
        "response": {
            "type": ["object", "null"],
            "required": ["status_code", "request_id", "body"],
            "properties": {"status_code": _INT, "request_id": _STR, "body": {"type": "object"}},
        },
        "error": {
            "type": ["object", "null"],
            "required": ["code", "message"],
            "properties": {"code": _STR, "message": _STR},
        },
    },
    # a line is either an HTTP response (error null) or a failure that is not one (response null)
    "oneOf": [
        {"properties": {"response": {"type": "object"}, "error": {"type": "null"}}},
        {"properties": {"response": {"type": "null"}, "error": {"type": "object"}}},
    ],
}


def body_schema(url: str, status_code: int) -> dict:
    if status_code >= 400:
        return ERROR_BODY
    if url == "/v1/embeddings":
        return EMBEDDING_RESPONSE
    if url == "/v1/responses":
        return RESPONSE
    return CHAT_COMPLETION if url == "/v1/chat/completions" else TEXT_COMPLETION
