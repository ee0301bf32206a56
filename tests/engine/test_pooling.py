"""Pooling (embedding) requests: the prompt's final hidden states, last token or mean, equal to
Transformers' last hidden layer, batched with generation, in chunks, and with the prefix cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.core.pooling import PoolingParams

PROMPTS = [list(range(5, 5 + 37)), [9, 8, 7, 6, 5]]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> list[torch.Tensor]:
    """Transformers' final hidden states (after the last norm) of each prompt, [T, H]."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([p]), output_hidden_states=True).hidden_states[-1][0] for p in PROMPTS]


def _embed(engine: LLMEngine, pooling: str, with_generation: bool = False) -> list[torch.Tensor]:
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"e{i}", prompt, PoolingParams(pooling))
    if with_generation:
        engine.add_request("g", PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0))
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step())
    return [torch.tensor(done[f"e{i}"].embedding) for i in range(len(PROMPTS))]


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 16}], ids=["whole", "chunked"])
def test_pooled_vectors_equal_transformers_last_hidden_layer(tiny_checkpoint, reference, options) -> None:
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint), **options))
    last = _embed(engine, "last", with_generation=True)
    mean = _embed(engine, "mean")  # after the prompts are cached: mean pooling must not use the cache
    for i, hidden in enumerate(reference):
        torch.testing.assert_close(last[i], hidden[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mean[i], hidden.mean(0), atol=1e-4, rtol=1e-4)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_an_embedding_request_finishes_without_generating(tiny_checkpoint) -> None:
    engine = LLMEngine(EngineConfig(dtype="float32", model=str(tiny_checkpoint)))
    engine.add_request("e", PROMPTS[1], PoolingParams())
    (out,) = engine.step()
    assert (out.token_ids, out.finish_reason, len(out.embedding)) == (
        [],
        "stop",
        engine.runner.model.config.hidden_size,
    )
