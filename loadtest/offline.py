"""The engine alone on the same jobs as a load run: the throughput the service is compared with."""

from __future__ import annotations

import time

from engine import EngineConfig, LLMEngine, SamplingParams
from loadtest.driver import Job


def offline_tokens_per_s(engine_config: EngineConfig, jobs: list[Job]) -> float:
    """Output tokens/s of engine.generate() over `jobs` (greedy, EOS ignored, as they were sent)."""
    engine = LLMEngine(engine_config)
    engine.generate([[1, 5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up
    params = [SamplingParams(temperature=0.0, max_tokens=j.max_tokens, ignore_eos=True) for j in jobs]
    start = time.perf_counter()
    outputs = engine.generate([j.prompt for j in jobs], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outputs) / seconds
