"""Tensor and pipeline parallelism on CPU worker processes (gloo) give one process's greedy tokens.

Each layout starts its worker processes once (spawn is slow) and every test of the module
shares that engine. The batch mixes prompt lengths, and a tiny KV pool forces preemption.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import pytest

from engine import AsyncLLMEngine, EngineConfig, LLMEngine, RequestRejected, SamplingParams
from engine.core.pooling import PoolingParams
from engine.demo.checkpoints import ensure_checkpoint
from tests.engine.async_requests import generate

MAX_TOKENS = 12
# 24 blocks of 4 tokens cannot hold the batch: sequences are preempted and recomputed
SMALL_KV = {"num_kv_blocks": 24, "block_size": 4, "max_num_batched_tokens": 32}
LAYOUTS = [
    pytest.param(("tiny", 2, 1), id="tp2"),
    pytest.param(("tiny", 1, 2), id="pp2"),
    pytest.param(("tiny-mqa", 2, 1), id="tp2-mqa-replicated-kv-head"),
    pytest.param(("tiny", 2, 2), id="tp2xpp2", marks=pytest.mark.slow),
    # tied embeddings held by both stages, q/k/v biases, sliding windows
    pytest.param(("tiny-qwen2", 1, 2), id="pp2-qwen2-tied", marks=pytest.mark.slow),
    # o_proj and down_proj biases added once after the all-reduce, llama3 rope scaling
    pytest.param(("tiny-llama3", 2, 1), id="tp2-llama3-row-biases", marks=pytest.mark.slow),
]


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    lengths = [1, 3, 17, 40, 5, 64, 9, 33]
    return [[1] + [rng.randrange(4, vocab) for _ in range(n - 1)] for n in lengths]


LOGPROBS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3)


def _greedy(engine: LLMEngine, prompts: list[list[int]]):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return engine.generate(prompts, params, use_tqdm=False)


@dataclass
class Layout:
    engine: LLMEngine  # the parallel engine
    prompts: list[list[int]]
    # what one process gives for the same checkpoint
    reference: list[list[int]]  # greedy tokens of each prompt
    single_process_params: int
    single_logprobs: list  # of the first three prompts under LOGPROBS
    single_embedding: list[float]  # the first prompt's, mean-pooled


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request, model_cache):
    preset, tp, pp = request.param
    checkpoint = ensure_checkpoint(model_cache, preset=preset)
    with LLMEngine(EngineConfig(dtype="float32", model=str(checkpoint), **SMALL_KV)) as single:
        prompts = _prompts(single.vocab_size)
        reference = [o.token_ids for o in _greedy(single, prompts)]
        single_process_params = single.executor.num_parameters_per_rank[0]
        single_logprobs = [o.logprobs for o in single.generate(prompts[:3], LOGPROBS, use_tqdm=False)]
        (pooled,) = single.generate(prompts[:1], PoolingParams("mean"), use_tqdm=False)
    config = EngineConfig(
        dtype="float32", model=str(checkpoint), tensor_parallel_size=tp, pipeline_parallel_size=pp, **SMALL_KV
    )
    with LLMEngine(config) as engine:
        yield Layout(engine, prompts, reference, single_process_params, single_logprobs, pooled.embedding)


def test_greedy_output_matches_one_process_with_preemption(layout):
    engine = layout.engine
    outputs = _greedy(engine, layout.prompts)
    assert [o.token_ids for o in outputs] == layout.reference
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_each_rank_holds_only_its_share_of_the_weights(layout):
    engine = layout.engine
    config = engine.runner.model.config
    tp, pp = engine.config.tensor_parallel_size, engine.config.pipeline_parallel_size
    counts = engine.executor.num_parameters_per_rank
    expected = [_expected_rank_params(config, tp, pp, rank) for rank in range(tp * pp)]
    assert counts == expected
    # the shards add up to the whole model, plus the copies that the layout requires
    assert sum(counts) == layout.single_process_params + _copies(config, tp, pp)


def test_async_engine_runs_a_parallel_engine(layout):
    engine, prompts = layout.engine, layout.prompts
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

    async def run():
        async_engine = AsyncLLMEngine(engine)
        async_engine.start()
        try:
            return await asyncio.gather(
                *(generate(async_engine, f"async-{i}", prompts[i], params) for i in range(3))
            )
        finally:
            await async_engine.stop()

    assert [o.token_ids for o in asyncio.run(run())] == layout.reference[:3]


def test_logprobs_come_back_from_the_sampling_rank(layout):
    outputs = layout.engine.generate(layout.prompts[:3], LOGPROBS, use_tqdm=False)
    for got, expected in zip((o.logprobs for o in outputs), layout.single_logprobs, strict=True):
        assert [t.token_id for t in got] == [t.token_id for t in expected]
        assert [[tid for tid, _ in t.top] for t in got] == [[tid for tid, _ in t.top] for t in expected]
        # the ranks sum partial products in another order: equal up to float32 rounding
        assert [t.logprob for t in got] == pytest.approx([t.logprob for t in expected], abs=1e-4)


def test_pooling_on_tensor_parallel_ranks_equals_one_process(layout):
    if layout.engine.config.pipeline_parallel_size > 1:
        pytest.skip("pipeline parallel engines refuse pooling requests")
    (got,) = layout.engine.generate(layout.prompts[:1], PoolingParams("mean"), use_tqdm=False)
    assert got.embedding == pytest.approx(layout.single_embedding, abs=1e-4)


def test_pipeline_stages_refuse_pooling_requests(layout):
    if layout.engine.config.pipeline_parallel_size == 1:
        pytest.skip("one pipeline stage pools")
    with pytest.raises(RequestRejected, match="pipeline_parallel_size 1"):
        layout.engine.add_request("pool", layout.prompts[0], PoolingParams())


def test_a_second_parallel_engine_in_the_same_process_is_refused(layout):
    with pytest.raises(RuntimeError, match="already running in this process"):
        LLMEngine(layout.engine.config)


def _expected_rank_params(config, tp: int, pp: int, rank: int) -> int:
    """Elements rank `rank` should hold, from the model's shapes (not from the engine's modules)."""
    stage = rank // tp  # every TP rank of a stage holds the same amount
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = hidden // config.num_attention_heads
    qkv_bias, o_bias, mlp_bias = _biases(config)
    qkv_rows = (config.num_attention_heads // tp + 2 * max(1, config.num_key_value_heads // tp)) * head_dim
    qkv = qkv_rows * (hidden + qkv_bias)
    o_proj = config.num_attention_heads // tp * head_dim * hidden + o_bias * hidden  # bias whole
    mlp = 3 * inter // tp * hidden + mlp_bias * (2 * inter // tp + hidden)  # down_proj's bias whole
    layer = qkv + o_proj + mlp + 2 * hidden  # + the two norms, whole
    total = _num_stage_layers(config, pp, stage) * layer
    tied = config.tie_word_embeddings
    if stage == 0 or (tied and stage == pp - 1):
        total += vocab // tp * hidden  # embedding
    if stage == pp - 1:
        total += hidden + (0 if tied else vocab // tp * hidden)  # final norm, LM head
    return total


def _copies(config, tp: int, pp: int) -> int:
    """Elements held by more than one rank, counted once per extra copy."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads
    qkv_bias, o_bias, mlp_bias = _biases(config)
    whole = (2 * layers + 1) * hidden + (o_bias + mlp_bias) * hidden * layers  # norms, row biases
    # KV heads copied to tp / num_kv_heads ranks when there are fewer of them than ranks
    kv_copies = (tp * max(1, kv // tp) - kv) * 2 * head_dim * (hidden + qkv_bias) * layers
    # a tied embedding is needed by the first stage (embedding) and the last (LM head)
    tied_copy = config.vocab_size * hidden if config.tie_word_embeddings and pp > 1 else 0
    return (tp - 1) * whole + kv_copies + tied_copy


def _biases(config) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o_proj bias, MLP biases): Qwen2 always has q/k/v biases and no other;
    Llama's attention_bias covers q/k/v/o and mlp_bias the MLP."""
    if config.model_type == "qwen2":
        return True, False, False
    attention = bool(getattr(config, "attention_bias", False))
    return attention, attention, bool(getattr(config, "mlp_bias", False))


def _num_stage_layers(config, pp: int, stage: int) -> int:
    base, extra = divmod(config.num_hidden_layers, pp)
    return base + (1 if stage < extra else 0)
