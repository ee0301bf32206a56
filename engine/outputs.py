"""RequestOutput: what the engine hands back for one request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float  # time.time() when add_request was called
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens, the stop token included if one ended the request
    text: str  # generated text, stop string and special tokens excluded
    finish_reason: str | None  # "stop" | "length" | "abort"; None while running
    metrics: RequestMetrics
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    extra: dict = field(default_factory=dict)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None
