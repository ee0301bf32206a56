"""load_engine: the one way `python -m service` and the `--local` client runs load the engine."""

from __future__ import annotations

import threading

import pytest

from engine import EngineConfig, ModelLoadError
from service.config import ServiceConfig
from service.engine_loading import load_engine


async def test_the_configured_checkpoint_loads_on_the_engine_thread_that_will_step_it(tiny_checkpoint):
    # no C++ kernels: loading is what is tested here, not their build
    engine_config = EngineConfig(
        model=str(tiny_checkpoint),
        dtype="float32",
        max_model_len=256,
        kv_cache_memory_gib=0.1,
        attention_backend="sdpa",
        cpu_fused_ops=False,
    )
    config = ServiceConfig(engine=engine_config)
    told: list[str] = []
    engine, engine_thread = await load_engine(config, announce=told.append)
    try:
        assert told == [f"loading {tiny_checkpoint} (float32 on cpu)"]
        assert engine.max_model_len > 0
        assert await engine_thread.run(threading.get_ident) == engine_thread.ident
    finally:
        engine.close()
        engine_thread.close()


async def test_a_model_that_cannot_load_is_the_callers_error_and_leaves_no_thread(tmp_path):
    config = ServiceConfig(engine=EngineConfig(model=str(tmp_path / "absent"), dtype="float32"))
    before = _engine_threads()
    with pytest.raises(ModelLoadError):
        await load_engine(config, announce=lambda what: None)
    for thread in _engine_threads() - before:  # closed: ends once its last call is done
        thread.join(timeout=10)
        assert not thread.is_alive()


def _engine_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == "engine"}
