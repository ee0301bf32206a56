"""The engine a ServiceConfig describes, loaded: what `python -m service` and the `--local`
client runs (`sluice label --local`, `sluice batch --local`) both start from."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from engine import EngineConfig, EngineThread, LLMEngine
from service.config import ServiceConfig

log = logging.getLogger("sluice")


async def load_engine(
    config: ServiceConfig, announce: Callable[[str], None] = log.info
) -> tuple[LLMEngine, EngineThread]:
    """The engine of `config.engine` (the demo model when it names none) and the EngineThread that
    loaded it, which then steps it: one OpenMP pool (engine/engine_thread.py). `announce` is told
    what loads; a failure to load (EngineConfigError, ModelLoadError, ...) ends the thread and
    goes to the caller."""
    engine_config = resolve_engine_config(config)
    announce(f"loading {engine_config.model} ({engine_config.dtype} on {engine_config.device})")
    engine_thread = EngineThread()
    try:
        return await engine_thread.run(LLMEngine, engine_config), engine_thread
    except BaseException:
        engine_thread.close()
        raise


def resolve_engine_config(config: ServiceConfig) -> EngineConfig:
    """The engine options; with no model folder configured, the built-in demo model's (built
    once, then cached)."""
    if config.engine.model:
        return config.engine
    from engine import ensure_demo_checkpoint

    cache = Path(config.build_dir) / "models"
    log.info(
        "no model configured (SLUICE_ENGINE_MODEL): using the built-in %r demo model", config.demo_preset
    )
    return dataclasses.replace(
        config.engine, model=str(ensure_demo_checkpoint(cache, preset=config.demo_preset))
    )
