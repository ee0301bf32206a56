"""A Service consuming in the background for the length of a `with` block, in-process."""

from __future__ import annotations

import asyncio
import contextlib

from service.app import Service


@contextlib.asynccontextmanager
async def running(service: Service):
    """Start `service` and its consume loop; on exit stop the loop, drain and commit."""
    await service.start()
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        yield service
    finally:
        stop.set()
        await task
        await service.stop()
