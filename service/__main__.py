"""`python -m service`: run Sluice in the foreground until SIGINT/SIGTERM (Ctrl-C)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import uvloop

from engine import EngineConfigError, EngineDeadError, ModelLoadError
from service.app import Service
from service.config import ConfigError, ServiceConfig, load_config
from service.engine_loading import load_engine
from service.kafka_security import KafkaLoginError

log = logging.getLogger("sluice")


def main() -> int:
    try:
        config = load_config()
    except ConfigError as e:
        print(f"sluice: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("aiokafka", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights: 100%" bars are noise in service logs
    return uvloop.run(serve(config))


async def serve(config: ServiceConfig) -> int:
    try:
        engine, engine_thread = await load_engine(config)
    except (EngineConfigError, EngineDeadError, ModelLoadError, ValueError) as e:
        log.error("cannot start the engine: %s", e)
        return 2
    service = Service(config, engine, engine_thread)
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    try:
        await service.start()
    except KafkaLoginError as e:
        log.error("cannot connect: %s", e)
        return 2
    log.info("ready; Ctrl-C to stop")
    try:
        await service.run(stop)
    finally:
        await service.stop()
        engine.close()  # a parallel engine's worker processes
        engine_thread.close()
    return 1 if service.engine_failure is not None else 0


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now, in-flight jobs will be redone", signal.Signals(signum).name)
            sys.exit(130)
        log.info("%s: finishing in-flight jobs, then stopping (again to force)", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)


if __name__ == "__main__":
    sys.exit(main())
