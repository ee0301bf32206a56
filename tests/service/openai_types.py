"""Output bodies against OpenAI's own client library: its published pydantic types, strictly.

`check_body(url, body)` validates a 200 body with `Model.model_validate(body, strict=True)` (no
coercion: a string where OpenAI has a number fails) and then checks that nothing of ours was
dropped or changed on the way: the model dumped back (its declared fields and the extras it
keeps) equals the body. An extra of Sluice's that OpenAI's type has a type for must be of that
type; where the library rejects an extra, the extra is wrong.

One allowance: a base64 embedding (`encoding_format: "base64"`) is a string on the wire, as
OpenAI's API sends it, while the library's type holds the floats its client decodes from it; it
is checked as those floats.
"""

from __future__ import annotations

import base64
import copy
import struct
from typing import Any

from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from pydantic import BaseModel

MODELS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletion,
    "/v1/completions": Completion,
    "/v1/embeddings": CreateEmbeddingResponse,
    "/v1/responses": Response,
}


def check_body(url: str, body: dict[str, Any]) -> BaseModel:
    """The body as OpenAI's type for `url`'s response; fails where the library disagrees with it."""
    if url == "/v1/embeddings":
        body = _as_floats(body)
    model = MODELS[url].model_validate(body, strict=True)
    kept = model.model_dump(mode="json", by_alias=True, exclude_unset=True, warnings=False)
    _assert_same(body, kept, "body")
    return model


def _assert_same(ours: Any, theirs: Any, path: str) -> None:
    if isinstance(ours, dict):
        assert isinstance(theirs, dict), f"{path}: {theirs!r} is no object in OpenAI's type"
        dropped = set(ours) - set(theirs)
        assert not dropped, f"{path}: OpenAI's type dropped {sorted(dropped)}"
        for key, value in ours.items():
            _assert_same(value, theirs[key], f"{path}.{key}")
    elif isinstance(ours, list):
        assert isinstance(theirs, list) and len(ours) == len(theirs), f"{path}: {theirs!r}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _assert_same(a, b, f"{path}[{i}]")
    else:
        assert ours == theirs, f"{path}: ours {ours!r}, OpenAI's type made it {theirs!r}"


def _as_floats(body: dict[str, Any]) -> dict[str, Any]:
    """An embeddings body with each base64 embedding decoded (little-endian float32), as OpenAI's client does."""
    body = copy.deepcopy(body)
    for item in body.get("data", ()):
        if isinstance(item.get("embedding"), str):
            raw = base64.b64decode(item["embedding"])
            item["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return body
