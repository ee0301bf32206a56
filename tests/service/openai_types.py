"""Output bodies against OpenAI's own client library: its published pydantic types, strictly.

`check_body(url, body)` validates a 200 body with `Model.model_validate(body, strict=True)` (no
coercion: a string where OpenAI has a number fails) and then checks that nothing of ours was
dropped or changed on the way: the model dumped back (its declared fields and the extras it
keeps) equals the body. An extra of Sluice's that OpenAI's type has a type for must be of that
type; where the library rejects an extra, the extra is wrong.
"""

from __future__ import annotations

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
