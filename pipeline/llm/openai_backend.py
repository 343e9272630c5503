"""Generation through any OpenAI-compatible chat API (`backend: openai` in a pool or a judge).

Requests go out through pipeline.llm.transport (one small aiohttp client: the SDK's per-request
cost capped a 2-core machine below what a server allows; see there), the same way the judge's do.

`OpenAIBackend(spec)` follows `pipeline.llm.base.Backend`. It works against api.openai.com and
against local servers (vLLM, SGLang, TGI, Ollama, our stand-in): set `base_url`, or `base_urls`
for several servers of the same model (pipeline.llm.fleet picks one per request and moves a
request off a server that is down).

- Concurrency is bounded by `spec.max_concurrency`: that many workers pull requests from one
  queue, so a million-request run never holds a million tasks.
- Retries and timeouts are ours (`max_retries`, `timeout_s`): back off on 429, 5xx and
  connection errors, honouring Retry-After. A request that still fails is reported
  through `on_error` with a one-line reason; the others go on.
- The API key comes from the environment variable `spec.api_key_env`. Without a `base_url`
  (the real OpenAI API) a missing key is a configuration error; a local server gets "EMPTY".
- Each request carries its ledger key in an `X-Request-Key` header, so a server-side log (the
  stand-in's, in tests) can tell a repeated request from a new one.

Spending (pipeline.llm.spend): every attempt waits for the spec's throttle (`requests_per_minute`,
`tokens_per_minute`); each answer's usage is counted and priced (`price`); a request whose worst
case would pass `budget_usd` (with what the ledger shows spent in earlier runs, which
`ledgered_generate` hands to `meter.begin`) is not sent, nor any after it. `dry_run=True` builds
no client and needs no key: the stage only plans (`spend.dry_run_plan`).

Request params: `temperature`, `top_p`, `max_new_tokens` (sent as `max_tokens`), `seed`, and,
for the judge, `response_format` and `stop`. No server URL is part of `identity()`: the same
served model behind another host or port (a new Slurm job, another server of a fleet) must
still find its ledger entries.
"""

from __future__ import annotations

import asyncio
import os
from typing import Sequence

from pipeline.config import ConfigError, redact
from pipeline.llm import transport
from pipeline.llm.base import GenRequest, GenResult, OnDone, OnError
from pipeline.llm.fleet import Fleet
from pipeline.llm.spend import Meter
from pipeline.llm.workers import run_workers


def error_reason(err: BaseException) -> str:
    """One line, status code first when there is one, with anything key-like blanked out."""
    status = getattr(err, "status_code", None)
    text = " ".join(str(err).split()) or type(err).__name__
    head = f"{type(err).__name__}" + (f" (HTTP {status})" if status else "")
    return redact(f"{head}: {text}")[:500]


def api_key(spec, where: str) -> str:
    """The key from `spec.api_key_env`; "EMPTY" for a local server; else a ConfigError naming `where`."""
    key = os.environ.get(spec.api_key_env)
    if not key:
        if spec.base_url is None and not spec.base_urls:
            raise ConfigError(f"{where}: no API key: set the environment variable {spec.api_key_env} "
                              "(or give `base_url` for a local server)")
        key = "EMPTY"  # local servers ignore it, but the client insists on one
    return key


def chat_client(spec, key: str, base_url: str | None) -> transport.ChatClient:
    """The chat client for one server (`base_url`, one of `spec.servers`); it never retries
    (the caller does, so that a 429's Retry-After can pause every worker, not one)."""
    return transport.ChatClient(base_url, key, spec.timeout_s)


def sync_client(spec, key: str, where: str):
    """A blocking OpenAI client with the SDK's own retries (the Batch API's files and batches).
    A batch lives on the server it was created on: a fleet cannot hold one."""
    from openai import OpenAI

    if spec.base_urls and len(spec.base_urls) > 1:
        raise ConfigError(f"{where}.base_urls: the Batch API keeps a batch on the server that made it; "
                          "give one server (base_url) for --batch")
    return OpenAI(api_key=key, base_url=spec.servers[0], max_retries=spec.max_retries, timeout=spec.timeout_s)


class OpenAIBackend:
    def __init__(self, spec, where: str | None = None, dry_run: bool = False):
        """`where`: the spec's recipe key (budget messages); `dry_run`: plan only, no key needed."""
        self.spec = spec
        if spec.model is not None and not isinstance(spec.model, str):
            raise ValueError(f"model {spec.name!r}: model {spec.model!r} names a stage; resolve it first "
                             "(pipeline.runs.resolve_model_paths, which the launcher calls)")
        self.model = spec.model or spec.name
        self.where = where or f"model {spec.name!r}"
        self.dry_run = dry_run
        self._api_key = None if dry_run else api_key(spec, self.where)
        self.fleet = Fleet.for_spec(spec)  # one server, or several (base_urls)
        self.meter = Meter(spec, self.where)

    def identity(self) -> dict:
        return {"backend": "openai", "model": self.model}

    def close(self) -> None:
        pass  # one client per generate() call, closed there

    def generate(self, requests: Sequence[GenRequest], on_done: OnDone, on_error: OnError) -> None:
        if self.dry_run:
            raise RuntimeError(f"{self.where}: a dry-run backend sends nothing")
        if requests:
            asyncio.run(self._run_all(list(requests), on_done, on_error))

    async def _run_all(self, requests: list[GenRequest], on_done: OnDone, on_error: OnError) -> None:
        queue: asyncio.Queue[GenRequest] = asyncio.Queue()
        for req in requests:
            queue.put_nowait(req)
        async with await self.fleet.open(lambda url: chat_client(self.spec, self._api_key, url)):
            # A callback that raises (the ledger cannot write) stops every worker.
            await run_workers(min(self.spec.max_concurrency, len(requests)),
                              lambda: self._worker(queue, on_done, on_error))

    async def _worker(self, queue: asyncio.Queue, on_done: OnDone, on_error: OnError) -> None:
        while True:
            try:
                req = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if self.meter.stopped:  # the budget: this one and the rest stay unsent, unrecorded
                self.meter.unsent += 1
                continue
            body = transport.encode(transport.chat_body(self.model, req.messages, req.params))
            data = reserved = None
            try:
                data, reserved = await self._send(body, req)
                if data is None:
                    self.meter.unsent += 1
                    continue
                choice = data["choices"][0]
                text = choice["message"]["content"]
                if text is None:
                    raise ValueError(f"the server returned no text (finish_reason={choice.get('finish_reason')})")
            except (transport.APIError, ValueError, IndexError, KeyError, TypeError) as err:
                if reserved is not None:  # an answer came but is unusable: it may still be billed
                    self.meter.settle(reserved, data.get("usage") if isinstance(data, dict) else None,
                                      req.messages, None)
                on_error(req, error_reason(err))
                continue
            prompt, completion = self.meter.settle(reserved, data.get("usage") or {}, req.messages, text)
            on_done(req, GenResult(
                text=text, prompt_tokens=prompt, completion_tokens=completion,
                finish_reason=str(choice.get("finish_reason") or "stop"),
            ))

    async def _send(self, body: bytes, req: GenRequest) -> tuple[dict | None, float | None]:
        """One request, through the fleet, tried again (after a pause) while that can help:
        (answer, its reserved worst-case cost), or (None, None) when the budget keeps it back."""
        attempt = 0
        meter = self.meter
        while True:
            reserved = await meter.admit(req.messages, req.params)
            if reserved is None:
                return None, None

            def post(client):
                meter.sent += 1  # each HTTP request, on whichever server
                return client.chat(body, req.key)

            try:
                return await self.fleet.call(post), reserved
            except transport.APIError as err:
                meter.settle(reserved, None, req.messages, None)
                delay = transport.retry_delay(err, attempt)
                if delay is None or attempt >= self.spec.max_retries:
                    raise
                if isinstance(err, transport.RateLimitError):
                    meter.throttle.pause(delay)  # every worker waits, not only this one
            await asyncio.sleep(delay)
            attempt += 1
