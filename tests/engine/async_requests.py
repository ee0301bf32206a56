"""One request through an AsyncLLMEngine, as its callers (the DynamicBatcher) do it: add, then wait."""

from __future__ import annotations

from engine import AsyncLLMEngine, RequestOutput, SamplingParams


async def generate(
    async_engine: AsyncLLMEngine, request_id: str, prompt: str | list[int], params: SamplingParams
) -> RequestOutput:
    (future,) = async_engine.add_requests([(request_id, prompt, params, 0)])
    return await async_engine.wait(request_id, future)
