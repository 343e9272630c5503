"""A fixed number of asyncio workers draining one queue: the request loop of every OpenAI-compatible
caller (generation, the judge)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable


async def run_workers(count: int, worker: Callable[[], Awaitable[None]]) -> None:
    """Run `count` copies of `worker()` until all return. The first one that raises stops the
    others and its error propagates: a result that cannot be recorded (the ledger cannot write)
    must not keep being bought."""
    tasks = [asyncio.create_task(worker()) for _ in range(count)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
