"""How often the event loop came round while a test awaited the engine: it must not be blocked."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Ticks:
    count = 0  # turns of a task that sleeps 1 ms a turn


@contextlib.asynccontextmanager
async def loop_ticks() -> AsyncIterator[Ticks]:
    ticks = Ticks()

    async def tick() -> None:
        while True:
            ticks.count += 1
            await asyncio.sleep(0.001)

    ticker = asyncio.create_task(tick())
    try:
        yield ticks
    finally:
        ticker.cancel()
