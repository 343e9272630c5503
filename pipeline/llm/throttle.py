"""A client-side throttle: requests and tokens per minute, and a shared pause for Retry-After.

`clock` and `sleep` are class attributes so that a test can run a throttle on a clock of its own
(and count what it let through, `grants`) instead of waiting out real minutes."""

from __future__ import annotations

import asyncio
import time
from collections import deque


class Throttle:
    """Requests and tokens per minute as two token buckets, and a shared pause for Retry-After."""

    @staticmethod
    def clock() -> float:
        return time.monotonic()  # looked up per call, so patching the module's time works too

    @staticmethod
    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds)

    def __init__(self, rpm: float | None, tpm: float | None):
        self.rpm, self.tpm = rpm, tpm
        now = self.clock()
        self.granted = 0  # acquire() calls let through
        self.grants: deque[float] = deque(maxlen=4096)  # when the latest were let through (clock time)
        self.waits = 0  # acquire() calls that had to wait for the buckets
        self.requests = (rpm or 0) / 6  # start with ten seconds' worth, not a full minute's burst
        self.tokens = (tpm or 0) / 6
        self.updated = now
        self.paused_until = 0.0

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, self.clock() + seconds)

    async def acquire(self, tokens: int) -> None:
        waited = False
        while True:
            now = self.clock()
            if now < self.paused_until:
                await self.sleep(self.paused_until - now)
                continue
            elapsed, self.updated = now - self.updated, now
            wait = 0.0
            if self.rpm:
                self.requests = min(self.rpm / 6, self.requests + elapsed * self.rpm / 60)
                if self.requests < 1:
                    wait = max(wait, (1 - self.requests) * 60 / self.rpm)
            if self.tpm:
                cap = max(self.tpm / 6, tokens)  # one request larger than the burst still runs
                self.tokens = min(cap, self.tokens + elapsed * self.tpm / 60)
                if self.tokens < tokens:
                    wait = max(wait, (tokens - self.tokens) * 60 / self.tpm)
            if wait <= 0:
                if self.rpm:
                    self.requests -= 1
                if self.tpm:
                    self.tokens -= tokens
                self.granted += 1
                self.grants.append(now)
                self.waits += waited
                return
            waited = True
            await self.sleep(wait)
