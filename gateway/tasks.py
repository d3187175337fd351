"""Background tasks: the one way to stop one (the reaper, the audit checkpoint timer,
KEK re-wrapping, the change feed's listener). Imports nothing of credgate."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has stopped. Its cancellation is
    expected; any other exception it ended with propagates."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
