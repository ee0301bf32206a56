"""Shutdown that ends: each closing step gets a bounded time, and a step that fails or hangs
(a broker that is gone) is logged and left behind, so that the next steps still run."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 15.0  # per closing step: a last commit, leaving the group, flushing a producer


async def bounded(step: Awaitable, what: str) -> None:
    """Await `step` for at most CLOSE_TIMEOUT_S; a timeout or an error is logged, not raised."""
    try:
        await asyncio.wait_for(step, CLOSE_TIMEOUT_S)
    except TimeoutError:
        log.warning("%s did not finish within %.0fs; going on", what, CLOSE_TIMEOUT_S)
    except Exception:
        log.exception("%s failed; going on", what)
