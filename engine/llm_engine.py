"""LLMEngine: add_request / abort / step, and generate() for offline use.

This first engine is the simplest correct one: Transformers' own model with its own KV cache,
one forward per running request per step. Every step advances each running request by one
token, so requests join and leave between steps and abort takes effect at once. The paged,
continuously batched engine replaces the inside of this class behind the same API.
"""

from __future__ import annotations

import inspect
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from engine.config import EngineConfig
from engine.loader import check_checkpoint_folder, load_reference_model, load_tokenizer
from engine.outputs import RequestMetrics, RequestOutput
from engine.sampler import sample_next_token
from engine.sampling_params import SamplingParams


class RequestRejected(ValueError):
    """The request cannot run on this engine (too long, bad token ids); nothing was queued."""


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    generator: torch.Generator
    metrics: RequestMetrics
    output_token_ids: list[int] = field(default_factory=list)
    past_key_values: object = None  # Transformers' cache, filled by the first forward
    text: str = ""


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        hf_config = check_checkpoint_folder(config.model)
        self.tokenizer = load_tokenizer(config.model)
        self.model = load_reference_model(config.model, config.dtype, config.device)
        self.vocab_size: int = hf_config["vocab_size"]
        model_limit = hf_config.get("max_position_embeddings") or 2048
        self.max_model_len = min(config.max_model_len or model_limit, model_limit)
        self.eos_token_ids = _eos_token_ids(hf_config, self.tokenizer)
        self._requests: OrderedDict[str, _Request] = OrderedDict()
        self._aborted: list[RequestOutput] = []
        # Transformers 5 renamed `past_key_values` to `cache`; accept either.
        self._cache_kwarg = (
            "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        )
        self._lock = threading.Lock()  # add_request/abort may come from another thread than step

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; it runs from the next step on. Raises RequestRejected if it cannot run."""
        self._check_prompt(prompt_token_ids)
        max_tokens = min(params.max_tokens, self.max_model_len - len(prompt_token_ids))
        generator = torch.Generator(device="cpu").manual_seed(
            params.seed
            if params.seed is not None
            else zlib.crc32(f"{self.config.seed}/{request_id}".encode())
        )
        request = _Request(
            request_id, list(prompt_token_ids), params, max_tokens, generator, RequestMetrics(time.time())
        )
        with self._lock:
            if request_id in self._requests:
                raise RequestRejected(f"request id {request_id!r} is already running")
            self._requests[request_id] = request

    def abort(self, request_id: str) -> bool:
        """Cancel a request; the next step() reports it finished with finish_reason "abort"."""
        with self._lock:
            request = self._requests.pop(request_id, None)
            if request is not None:
                self._aborted.append(self._finish(request, "abort"))
        return request is not None

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._aborted)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Advance every running request by one token; returns the requests that finished."""
        with self._lock:
            running = list(self._requests.values())
            finished, self._aborted = self._aborted, []
        for request in running:
            token_id = self._next_token(request)
            reason = self._append_token(request, token_id)
            if reason is not None:
                with self._lock:
                    if self._requests.pop(request.request_id, None) is not None:
                        finished.append(self._finish(request, *reason))
        return finished

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams) -> list[RequestOutput]:
        """Offline: run every prompt to completion; outputs in prompt order."""
        ids = [f"generate-{i}" for i in range(len(prompts))]
        for request_id, prompt in zip(ids, prompts, strict=True):
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            self.add_request(request_id, token_ids, params)
        outputs: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            outputs.update((o.request_id, o) for o in self.step())
        return [outputs[i] for i in ids]

    def _check_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise RequestRejected("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestRejected(
                f"the prompt has {len(prompt_token_ids)} tokens; this model takes at most "
                f"{self.max_model_len - 1} so that one token can be generated"
            )
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestRejected(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")

    def _next_token(self, request: _Request) -> int:
        # prefill on the first step, then decode one token against the request's own cache
        new_ids = request.output_token_ids[-1:] if request.output_token_ids else request.prompt_token_ids
        input_ids = torch.tensor([new_ids], device=self.config.device)  # [1, S]
        if request.past_key_values is None:
            request.past_key_values = DynamicCache()  # filled in place by every forward
        out = self.model(input_ids=input_ids, use_cache=True, **{self._cache_kwarg: request.past_key_values})
        logits = out.logits[0, -1].float().cpu()  # [V]
        seen = torch.tensor(request.prompt_token_ids + request.output_token_ids, dtype=torch.long)
        output = torch.tensor(request.output_token_ids, dtype=torch.long)
        return sample_next_token(logits, request.params, seen, output, request.generator)

    def _append_token(self, request: _Request, token_id: int) -> tuple[str, str | int | None] | None:
        """Record the token; returns (finish_reason, stop_reason) when the request is done."""
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = time.time()
        request.output_token_ids.append(token_id)
        params = request.params
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids):
            return "stop", token_id
        request.text = self.tokenizer.decode(request.output_token_ids, skip_special_tokens=True)
        for stop in params.stop:
            cut = request.text.find(stop)
            if cut != -1:
                request.text = request.text[:cut]
                return "stop", stop
        if len(request.output_token_ids) >= request.max_tokens:
            return "length", None
        return None

    def _finish(self, request: _Request, reason: str, stop_reason: str | int | None = None) -> RequestOutput:
        request.metrics.finished_time = time.time()
        request.past_key_values = None  # frees the request's KV memory now, not at collection
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=list(request.output_token_ids),
            text=request.text,
            finish_reason=reason,
            metrics=request.metrics,
            stop_reason=stop_reason,
        )


def _eos_token_ids(hf_config: dict, tokenizer) -> set[int]:
    eos = hf_config.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
