"""How every chat request reaches an OpenAI-compatible server: one small aiohttp client.

`ChatClient(base_url, api_key, timeout_s)` posts a ready JSON body to `<base_url>/chat/completions`
and returns the parsed answer; the judge (pipeline.judge.session) and the `openai` backend
(pipeline.llm.openai_backend) both send through it, each server of a fleet (pipeline.llm.fleet)
with its own client. The callers retry (see `retry_delay`); the client never does.

Why not the `openai` SDK's client here: measured on this project's bench (2 cores, the stand-in
at 100 ms), the SDK's `post` cost about 1.0 ms of CPU per request more than aiohttp alone
(1.35 against 0.39 ms: httpx2 URL, header and request models built for every request even on
its aiohttp transport, then a response model), which by itself used up most of the 1.5 ms a
request the whole annotate stage may spend to keep up with the server. The SDK remains the
client of the Batch API (files and batches: a few calls a run, pipeline.judge.batch).

Errors: the kinds the callers act on, named as in the SDK so that recorded reasons read the
same. `APIConnectionError` (no answer: refused, reset, cut) and its subclass `APITimeoutError`
say the server is down or slow; `APIStatusError` is an HTTP error status, `RateLimitError` (429,
its Retry-After kept) and `InternalServerError` (5xx) among them. A 200 whose body is not JSON
raises ValueError.

The request is what the SDK would send: `Authorization: Bearer <key>`, JSON with the SDK's
encoding (compact, UTF-8), `OpenAI-Organization` / `OpenAI-Project` from OPENAI_ORG_ID /
OPENAI_PROJECT_ID when set, and no `base_url` meaning OPENAI_BASE_URL or api.openai.com. Proxy
variables are not read (as the SDK's aiohttp transport): local judges are reached directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import random

DEFAULT_BASE_URL = "https://api.openai.com/v1"

# our request params -> the chat API's names
PASSED_PARAMS = {"temperature": "temperature", "top_p": "top_p", "max_new_tokens": "max_tokens",
                 "seed": "seed", "response_format": "response_format", "stop": "stop"}


class APIError(Exception):
    status_code: int | None = None


class APIConnectionError(APIError):
    def __init__(self, message: str = "Connection error."):
        super().__init__(message)


class APITimeoutError(APIConnectionError):
    def __init__(self, message: str = "Request timed out."):
        super().__init__(message)


class APIStatusError(APIError):
    def __init__(self, status: int, headers, body: bytes):
        self.status_code = status
        self.headers = headers
        self.body = body
        try:
            shown = json.loads(body)
        except ValueError:
            shown = body.decode("utf-8", "replace")
        super().__init__(f"Error code: {status} - {shown}")


class RateLimitError(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


def status_error(status: int, headers, body: bytes) -> APIStatusError:
    kind = RateLimitError if status == 429 else InternalServerError if status >= 500 else APIStatusError
    return kind(status, headers, body)


def chat_body(model: str, messages, params: dict) -> dict:
    """The chat.completions request body for our request params (see PASSED_PARAMS)."""
    body = {"model": model, "messages": list(messages)}
    body.update((out, params[name]) for name, out in PASSED_PARAMS.items() if name in params)
    return body


def encode(body: dict) -> bytes:
    """JSON as the SDK encodes it, so a server sees the same bytes from either."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def retry_after(err: BaseException) -> float | None:
    """A 429's Retry-After in seconds, when it says."""
    try:
        value = err.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, ValueError):
        return None


def backoff(attempt: int) -> float:
    return min(8.0, 0.25 * 2 ** attempt) * (0.5 + random.random() / 2)


def retry_delay(err: BaseException, attempt: int) -> float | None:
    """Seconds to wait before trying again after `err`, or None when trying again cannot help
    (a 4xx other than 429, an answer of the wrong shape)."""
    if isinstance(err, RateLimitError):
        return retry_after(err) or backoff(attempt)
    if isinstance(err, (APIConnectionError, InternalServerError)):
        return backoff(attempt)
    return None


class ChatClient:
    """One server's chat endpoint; an async context manager (it holds a connection pool)."""

    def __init__(self, base_url: str | None, api_key: str, timeout_s: float):
        base = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.url = base + "/chat/completions"
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
                        "Accept": "application/json"}
        for header, variable in (("OpenAI-Organization", "OPENAI_ORG_ID"), ("OpenAI-Project", "OPENAI_PROJECT_ID")):
            if os.environ.get(variable):
                self.headers[header] = os.environ[variable]
        self._session = None

    async def __aenter__(self) -> "ChatClient":
        return self  # the pool is made on the first request: a run that sends nothing opens nothing

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _pool(self):
        import aiohttp

        if self._session is None:
            # limit=0: the callers' workers bound the requests in flight; no second queue here
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                                  timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self._session

    async def chat(self, body: bytes, key: str | None = None) -> dict:
        """POST one encoded body (`key`: our ledger key, sent as X-Request-Key); the parsed answer."""
        import aiohttp

        headers = self.headers if key is None else {**self.headers, "X-Request-Key": key}
        try:
            async with self._pool().post(self.url, data=body, headers=headers) as response:
                data = await response.read()
                status = response.status
                if status >= 400:
                    raise status_error(status, response.headers, data)
        except asyncio.TimeoutError:
            raise APITimeoutError() from None
        except aiohttp.ClientError as err:
            raise APIConnectionError(f"Connection error: {type(err).__name__}: {err}") from err
        return json.loads(data)
