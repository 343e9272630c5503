"""Several servers of one model behind one caller: a fleet (`base_urls`, or `base_url_file` as a
list, in a model spec; one server is a fleet of one).

- Each request goes to the healthy server with the fewest requests in flight (ties: the one
  sent the fewest so far), so a slow server gets less work and a fast one more.
- A server whose requests fail `set_aside_after` times in a row (a connection error, a timeout
  or a 5xx: the server is down or sick, not the request) is set aside for `set_aside_s`
  seconds, then tried again; one more failure sets it aside again, a success restores it.
  When every server is set aside the one whose time is up first is used: never a refusal.
- A request that fails that way is sent again at once on another server not tried yet for it
  (a request in flight on a server that died is not lost); when none is left the error goes
  to the caller, whose own retry rules apply. The caller records the answer once, under a
  ledger key that does not name the server.
- Any other answer (4xx, 429) comes from a live server and is the caller's business.

Each server has its own chat client (pipeline.llm.transport, the one way we send a chat request);
the fleet only chooses among them and counts, per server, the requests sent and those that failed.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

from pipeline.config import redact

T = TypeVar("T")


def server_failures() -> tuple[type[BaseException], ...]:
    """The errors that say a server is down or sick (not that the request was wrong)."""
    from pipeline.llm import transport

    return (transport.APIConnectionError, transport.InternalServerError)  # a timeout is a connection error


@dataclass
class Server:
    url: str | None  # None: api.openai.com
    client: object = None  # a transport.ChatClient, while the fleet is open
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    failures_in_a_row: int = 0
    set_aside_until: float = 0.0
    times_set_aside: int = 0

    @property
    def name(self) -> str:
        return redact(self.url or "api.openai.com")


@dataclass
class Fleet:
    urls: list[str | None]
    set_aside_after: int = 3
    set_aside_s: float = 30.0
    clock: Callable[[], float] = time.monotonic  # (tests move it on)
    servers: list[Server] = field(init=False)

    def __post_init__(self) -> None:
        self.servers = [Server(url) for url in self.urls]

    @classmethod
    def for_spec(cls, spec) -> "Fleet":
        return cls(spec.servers, spec.set_aside_after, spec.set_aside_s)

    async def open(self, make_client: Callable[[str | None], object]) -> AsyncExitStack:
        """Give every server a client (`make_client(url)`); closing the returned stack closes them."""
        async with AsyncExitStack() as stack:  # a client that cannot be made closes those made before it
            for server in self.servers:
                server.client = await stack.enter_async_context(make_client(server.url))
            return stack.pop_all()

    def pick(self, tried: list[Server] = ()) -> Server:
        """The least-loaded usable server not in `tried` (all tried: any of them)."""
        now = self.clock()
        fresh = [s for s in self.servers if s not in tried] or self.servers
        usable = [s for s in fresh if s.set_aside_until <= now]
        if not usable:  # all set aside: the one back soonest rather than no server at all
            return min(fresh, key=lambda s: s.set_aside_until)
        return min(usable, key=lambda s: (s.in_flight, s.requests))

    async def call(self, send: Callable[[object], Awaitable[T]]) -> T:
        """`send(client)` on the least-loaded server, again on another one while servers fail."""
        failures = server_failures()
        tried: list[Server] = []
        while True:
            server = self.pick(tried)
            server.in_flight += 1
            server.requests += 1
            try:
                result = await send(server.client)
            except failures:
                self._failed(server)
                tried.append(server)
                if len(tried) >= len(self.servers):
                    raise
                continue
            except Exception:
                server.failures_in_a_row = 0  # it answered: alive, whatever it said
                raise
            finally:
                server.in_flight -= 1
            server.failures_in_a_row = 0
            return result

    def _failed(self, server: Server) -> None:
        server.failures += 1
        server.failures_in_a_row += 1
        now = self.clock()
        # requests that were in flight when it went down fail after it is set aside: once is enough
        if server.failures_in_a_row >= self.set_aside_after and len(self.servers) > 1 \
                and server.set_aside_until <= now:
            server.set_aside_until = now + self.set_aside_s
            server.times_set_aside += 1

    def counts(self, reset: bool = False) -> dict[str, dict[str, int]]:
        """Per server: requests sent, those that failed (server down or sick), times set aside;
        `reset`: and start counting again (one shard's counts, where a process runs several)."""
        out = {s.name: {"requests": s.requests, "failed": s.failures, "set_aside": s.times_set_aside}
               for s in self.servers}
        if reset:
            for s in self.servers:
                s.requests = s.failures = s.times_set_aside = 0
        return out


def add_counts(total: dict[str, dict[str, int]], more: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Per-server counts of several runs (shards) added up."""
    out = {name: dict(c) for name, c in total.items()}
    for name, c in more.items():
        into = out.setdefault(name, {key: 0 for key in c})
        for key, value in c.items():
            into[key] = into.get(key, 0) + value
    return out
