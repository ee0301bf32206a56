"""LoRA adapters in the service: a job's `model` names the base model or an adapter, and the
result carries that name; `SLUICE_ENGINE_LORA_ADAPTERS` and `sluice batch --local --lora` set them.
A batch file mixing three adapters and the base model gives each line its own adapter's output,
through the broker and through `sluice batch --local`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import msgspec
import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.async_engine import AsyncLLMEngine
from schemas.responses_api import OutputMessage
from service.batcher import DynamicBatcher
from service.config import ConfigError, ServiceConfig, load_config
from service.jobs import JobHandler
from tests.engine.lora_adapters import build_adapter
from tests.service.client.label_helpers import run_sluice, sluice_env

PROMPT = [1, 17, 42, 99, 7, 256, 31]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory) -> dict[str, str]:
    folders = {}
    targets_of = {
        "formal": ["q_proj", "v_proj"],
        "casual": ["down_proj"],
        "terse": ["k_proj", "o_proj", "gate_proj", "up_proj"],
    }
    for seed, (name, targets) in enumerate(targets_of.items()):
        folders[name] = str(tmp_path_factory.mktemp(name))
        build_adapter(tiny_checkpoint, folders[name], seed + 1, r=4, lora_alpha=8, target_modules=targets)
    return folders


@pytest.fixture(scope="module")
def lora_engine(tiny_checkpoint, adapters) -> LLMEngine:
    return LLMEngine(
        EngineConfig(dtype="float32", model=str(tiny_checkpoint), max_model_len=256, lora_adapters=adapters)
    )


@pytest.fixture
async def handle(lora_engine):
    async_engine = AsyncLLMEngine(lora_engine)
    async_engine.start()
    batcher = DynamicBatcher(async_engine, max_batch_size=8, max_wait_ms=1)
    handler = JobHandler(ServiceConfig(model_name="tiny", engine=lora_engine.config), batcher, lora_engine)

    async def run(model: str, url: str = "/v1/completions", body: dict | None = None):
        if body is None:
            body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        if url == "/v1/embeddings":
            body = {"input": "Hello"}
        job = json.dumps({"custom_id": "j", "url": url, "body": {**body, "model": model}}).encode()
        outcome = await handler.handle(job, [], int(time.time() * 1000), "jobs/0/1")
        return outcome.result

    yield run
    await async_engine.stop()


@pytest.fixture(scope="module")
def reference_engine(tiny_checkpoint, adapters) -> LLMEngine:
    """An engine of its own for the expected texts: lora_engine is stepped by the service's engine
    thread, and an LLMEngine is never driven from two threads."""
    return LLMEngine(
        EngineConfig(dtype="float32", model=str(tiny_checkpoint), max_model_len=256, lora_adapters=adapters)
    )


def _engine_text(engine: LLMEngine, lora_name: str | None) -> str:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, lora_name=lora_name)
    [output] = engine.generate([PROMPT], params, use_tqdm=False)
    return output.text


async def test_a_job_naming_an_adapter_runs_with_it_and_its_result_names_it(handle, reference_engine) -> None:
    texts = {}
    for model, lora_name in [("formal", "formal"), ("casual", "casual"), ("tiny", None), ("", None)]:
        result = await handle(model)
        assert result.response.status_code == 200
        assert result.response.body.model == (model or "tiny")
        texts[model] = result.response.body.choices[0].text
        assert texts[model] == _engine_text(reference_engine, lora_name)
    assert len({texts["formal"], texts["casual"], texts["tiny"]}) == 3


async def test_a_responses_job_naming_an_adapter_runs_with_it_as_the_chat_job_it_means(handle) -> None:
    chat = {"messages": [{"role": "user", "content": "Name a river."}], "max_tokens": 8, "temperature": 0}
    responses = {"input": "Name a river.", "max_output_tokens": 8, "temperature": 0}
    texts = {}
    for model in ("formal", "tiny"):
        chat_result = await handle(model, "/v1/chat/completions", chat)
        result = await handle(model, "/v1/responses", responses)
        assert result.response.status_code == 200 and result.response.body.model == model
        [message] = [item for item in result.response.body.output if isinstance(item, OutputMessage)]
        texts[model] = message.content[0].text
        assert texts[model] == chat_result.response.body.choices[0].message.content
    assert texts["formal"] != texts["tiny"]


async def test_a_name_that_is_neither_the_model_nor_an_adapter_is_a_404(handle) -> None:
    result = await handle("gpt-4o")
    assert result.response.status_code == 404
    assert result.response.body.error.code == "model_not_found"


async def test_an_embeddings_job_naming_an_adapter_is_refused(handle) -> None:
    result = await handle("formal", "/v1/embeddings")
    assert result.response.status_code == 400
    assert result.response.body.error.param == "model"


def test_adapters_come_from_the_environment_as_name_path_pairs() -> None:
    config = load_config({"SLUICE_ENGINE_LORA_ADAPTERS": "a=/x/a, b=/y/b", "SLUICE_ENGINE_MAX_LORAS": "2"})
    assert config.engine.lora_adapters == {"a": "/x/a", "b": "/y/b"}
    assert config.engine.max_loras == 2
    with pytest.raises(ConfigError, match="expected NAME=VALUE"):
        load_config({"SLUICE_ENGINE_LORA_ADAPTERS": "a"})


def test_an_adapter_named_like_the_served_model_is_refused() -> None:
    with pytest.raises(ConfigError, match="'tiny' is also the served model's name"):
        load_config({"SLUICE_MODEL_NAME": "tiny", "SLUICE_ENGINE_LORA_ADAPTERS": "tiny=/x"})


# a line per adapter and one for the base model: (custom_id, the line's `model`, its adapter)
BATCH_LINES = [
    ("f", "formal", "formal"),
    ("c", "casual", "casual"),
    ("t", "terse", "terse"),
    ("b", "tiny", None),
]


@pytest.mark.slow
async def test_sluice_batch_local_runs_each_line_with_the_adapter_its_model_names(
    tiny_checkpoint, adapters, reference_engine, tmp_path
) -> None:
    env = {
        **os.environ,
        "SLUICE_ENGINE_MODEL": str(tiny_checkpoint),
        "SLUICE_ENGINE_DTYPE": "float32",
        "SLUICE_MODEL_NAME": "tiny",
        "OMP_NUM_THREADS": "1",
    }
    lora = [arg for name, path in adapters.items() for arg in ("--lora", f"{name}={path}")]
    batch, out = _write_batch(tmp_path), tmp_path / "out.jsonl"
    done = await run_sluice("batch", str(batch), str(out), "--local", "--no-progress", *lora, env=env)
    assert done.returncode == 0, done.stderr
    _assert_each_line_from_its_own_adapter(out, reference_engine)
    refused = await run_sluice("batch", str(batch), str(out), "--lora", "a=/x", env=env)
    assert refused.returncode == 2 and "--lora needs --local" in refused.stderr


@pytest.mark.slow
@pytest.mark.kafka
async def test_sluice_batch_through_kafka_runs_each_line_with_the_adapter_its_model_names(
    service_config, run_service, lora_engine, reference_engine, tmp_path
) -> None:
    # the service consumes the jobs topic on lora_engine; the expected texts come from reference_engine
    config = msgspec.structs.replace(service_config, engine=lora_engine.config)
    batch, out = _write_batch(tmp_path), tmp_path / "out.jsonl"
    async with run_service(config, engine=lora_engine):
        done = await run_sluice("batch", str(batch), str(out), "--no-progress", env=sluice_env(config))
    assert done.returncode == 0, done.stderr
    _assert_each_line_from_its_own_adapter(out, reference_engine)


def _write_batch(folder: Path) -> Path:
    batch = folder / "batch.jsonl"
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    batch.write_text(
        "".join(
            json.dumps({"custom_id": cid, "url": "/v1/completions", "body": {**body, "model": model}}) + "\n"
            for cid, model, _ in BATCH_LINES
        )
    )
    return batch


def _assert_each_line_from_its_own_adapter(out: Path, reference_engine: LLMEngine) -> None:
    """Each line's result names its `model` and has that adapter's greedy text (computed alone on
    the reference engine); the four texts differ, so a line run with another adapter would show."""
    lines = {r["custom_id"]: r["response"]["body"] for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(lines) == sorted(cid for cid, _, _ in BATCH_LINES)
    for cid, model, adapter in BATCH_LINES:
        assert lines[cid]["model"] == model
        assert lines[cid]["choices"][0]["text"] == _engine_text(reference_engine, adapter), cid
    assert len({body["choices"][0]["text"] for body in lines.values()}) == len(BATCH_LINES)
