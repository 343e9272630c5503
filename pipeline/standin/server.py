"""The stand-in OpenAI-compatible HTTP server (aiohttp), for offline runs, tests and benchmarks.

It is NOT a model. Chat answers come from `pipeline.standin.textgen` (deterministic sentence
pieces); every response is labelled: header `X-Standin: 1`, `system_fingerprint: "standin"`,
and only model ids starting with `standin-` are served.

Endpoints
    POST /v1/chat/completions   OpenAI chat schema, non-streaming (stream=true -> 400).
                                Honours n, max_tokens / max_completion_tokens (finish_reason
                                "length"), stop, temperature, seed, and response_format
                                json_object / json_schema (valid JSON content).
                                When the first user message is a judge prompt of
                                `pipeline.judge.rubric`, the answer is a judge's, from the
                                fixed rating rule (see `judge.py`), in text or JSON form.
                                SaySelf rationale and chain prompts get the fixed rules
                                of `sayself.py`, single-answer grade prompts (the
                                evaluate stage) those of `grading.py`.
    GET  /v1/models             the stand-in model ids.
    /v1/files, /v1/batches      OpenAI's Files and Batch API, in memory (see `batches.py`).
    GET  /standin/stats         counters, peak concurrency and a log of every chat request
                                and every answered batch line (entry "source": "chat" or
                                "batch"; a batch line's "request_key" is its custom_id).
    POST /standin/reset         clears counters, the log and the per-body attempt counts.
    GET  /standin/config        current settings.
    POST /standin/config        JSON object of settings to change; unknown field -> 400.

Token counts (`usage`) are whitespace-separated words, not real tokenizer tokens: prompt tokens
are the words of every message's text, completion tokens the words of every returned choice.

Faults are decided per attempt from (seed, sha256 of the body, attempt number of that body),
so a test that sends the same bodies in the same order sees the same faults. Judge answers can
also be deliberately malformed (setting fail_malformed; its own draw, only when no other fault
hit; log entry "fault": "malformed" and "malformed": <variant>). Batch lines draw the same way
(body hash = sha256 of the line's body as sorted-key JSON); only first_n, 5xx and malformed
apply to them. The Authorization header is accepted in any form (or absent) and never read,
logged or stored.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import json
import os
import random
import re
import signal
import sys
import tempfile
import time

from aiohttp import web

from pipeline.standin import batches, grading, judge, sayself
from pipeline.standin.settings import FIELD_TYPES, FLAG_FOR_FIELD, StandinSettings, check_value, updated
from pipeline.standin.textgen import generate_answer, message_text

KNOWN_MODELS = ("standin-strong", "standin-medium", "standin-weak")
MODEL_PREFIX = "standin-"
FINGERPRINT = "standin"
MAX_N = 16
MAX_BODY_BYTES = 256 * 1024 * 1024  # batch input files can be large (OpenAI allows 200 MB)

STATE = web.AppKey("standin_state", dict)


def _new_state(settings: StandinSettings) -> dict:
    # One plain dict per app; the server is single-threaded asyncio, so no locks are needed.
    return {
        "settings": settings,
        "requests_total": 0,
        "by_status": collections.Counter(),
        "log": [],
        "attempts": collections.Counter(),  # body sha256 -> attempts seen so far
        "active": 0,  # chat requests past the concurrency gate
        "waiters": collections.deque(),  # futures of chat requests waiting at the gate
        "peak": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "store": batches.new_store(),  # uploaded files and batches (kept across reset)
    }


# ---------------------------------------------------------------- concurrency gate (FIFO)


def _wake(state: dict) -> None:
    """Hand free slots to waiting requests, oldest first."""
    while state["waiters"] and state["active"] < state["settings"].max_concurrency:
        fut = state["waiters"].popleft()
        if fut.done():  # its request was cancelled while waiting
            continue
        state["active"] += 1  # the slot is taken on the waiter's behalf, before it runs
        state["peak"] = max(state["peak"], state["active"])
        fut.set_result(None)


async def _acquire(state: dict) -> None:
    if state["active"] < state["settings"].max_concurrency and not state["waiters"]:
        state["active"] += 1
        state["peak"] = max(state["peak"], state["active"])
        return
    fut = asyncio.get_running_loop().create_future()
    state["waiters"].append(fut)
    try:
        await fut
    except asyncio.CancelledError:
        if fut.done() and not fut.cancelled():  # a slot was handed over just as we were cancelled
            _release(state)
        raise


def _release(state: dict) -> None:
    state["active"] -= 1
    _wake(state)


# ---------------------------------------------------------------- helpers


def _error_body(message: str, err_type: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


def _error(status: int, message: str, err_type: str, code: str | None = None, headers=None) -> web.Response:
    return web.json_response(_error_body(message, err_type, code), status=status, headers=headers)


def _unit(*parts) -> float:
    """A deterministic number in [0, 1) from the given parts."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _count_words(text: str) -> int:
    return len(text.split())


def _truncate_words(text: str, limit: int) -> tuple[str, bool]:
    """Keep the first `limit` words, preserving the original spacing between them."""
    spans = list(re.finditer(r"\S+", text))
    if len(spans) <= limit:
        return text, False
    return (text[: spans[limit - 1].end()] if limit > 0 else ""), True


def _format_seconds(value: float) -> str:
    # Integral seconds as "2", fractions as "0.25" (clients we use parse floats).
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _fake_from_schema(schema, rng: random.Random, text: str, root: dict, depth: int = 0):
    """A value that validates against a (simple) JSON schema; good enough for strict schemas
    made of objects, arrays, enums, numbers with bounds, strings and booleans."""
    if not isinstance(schema, dict) or depth > 12:
        return None
    if "$ref" in schema:
        ref = schema["$ref"]
        target = root
        for part in ref.lstrip("#/").split("/") if ref.startswith("#/") else []:
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return _fake_from_schema(target, rng, text, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            options = [s for s in schema[key] if not (isinstance(s, dict) and s.get("type") == "null")]
            return _fake_from_schema((options or schema[key])[0], rng, text, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties", {})
        return {name: _fake_from_schema(sub, rng, text, root, depth + 1) for name, sub in props.items()}
    if kind == "array":
        count = max(1, int(schema.get("minItems", 1)))
        return [_fake_from_schema(schema.get("items", {}), rng, text, root, depth + 1) for _ in range(count)]
    if kind in ("integer", "number"):
        lo = schema.get("minimum", schema.get("exclusiveMinimum", 0) + (1 if "exclusiveMinimum" in schema else 0))
        hi = schema.get("maximum", max(lo, 10))
        if kind == "integer":
            return rng.randint(int(lo), int(hi)) if hi >= lo else int(lo)
        return round(rng.uniform(lo, hi), 3)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    first = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0] if text.strip() else "n/a"
    max_len = schema.get("maxLength")
    return first[:max_len] if isinstance(max_len, int) else first


def _json_content(response_format: dict, text: str, rng: random.Random) -> str:
    if response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") or {"type": "object", "properties": {"answer": {"type": "string"}}}
        value = _fake_from_schema(schema, rng, text, schema)
    else:
        value = {"answer": text}
    return json.dumps(value, ensure_ascii=False)


def _validate_chat(body) -> str | None:
    """The first problem with a chat request body, or None."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "'model' is required and must be a string"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return "'messages' must be a non-empty list of objects"
    if body.get("stream"):
        return "streaming is not supported by the stand-in server; send stream=false"
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        return f"'n' must be an integer between 1 and {MAX_N}"
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return f"'{key}' must be a positive integer"
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2):
        return "'temperature' must be a number between 0 and 2"
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema")):
        return "'response_format.type' must be one of text, json_object, json_schema"
    return None


def _completion(body: dict, reply: str | None = None) -> dict:
    """Build the chat.completion object for a valid request body; `reply` (a judge answer)
    replaces the generated text of every choice."""
    model = body["model"]
    messages = body["messages"]
    temperature = 1.0 if body.get("temperature") is None else float(body["temperature"])
    seed = body.get("seed")
    n = body.get("n") or 1
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if isinstance(s, str) and s]
    fmt = body.get("response_format") or {}

    choices = []
    completion_tokens = 0
    for index in range(n):
        if reply is not None:
            text = reply
        else:
            text = generate_answer(model, messages, temperature, seed, index)
        if reply is None and fmt.get("type") in ("json_object", "json_schema"):
            rng = random.Random(hashlib.sha256(f"{text}:{index}".encode()).digest())
            text = _json_content(fmt, text, rng)
        for s in stops:
            if s in text:
                text = text[: text.index(s)]
        finish = "stop"
        if limit is not None:
            text, cut = _truncate_words(text, limit)
            finish = "length" if cut else "stop"
        completion_tokens += _count_words(text)
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        )
    prompt_tokens = sum(_count_words(message_text(m.get("content"))) for m in messages)
    key = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "id": f"chatcmpl-standin-{key[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


# ---------------------------------------------------------------- handlers


def _new_entry(state: dict, body, sha: str, request_key, source: str) -> dict:
    """Count one attempt of a body and start its log entry (appended by the caller)."""
    state["requests_total"] += 1
    state["attempts"][sha] += 1
    return {
        "t": time.time(),
        "status": None,  # filled in when the answer is sent
        "model": body.get("model") if isinstance(body, dict) else None,
        "request_key": request_key,
        "body_sha256": sha,
        "attempt": state["attempts"][sha],
        "fault": None,
        "source": source,  # "chat" or "batch"
        "batch": source == "batch",  # marker: answered as a line of a batch
        "batch_id": None,  # the batch of a batch line
        "judge": None,  # the judge prompt kind, when the request was one
    }


def _request_problem(body) -> tuple[int, dict] | None:
    """(status, error body) when a chat request cannot be answered at all, else None."""
    if body is None:
        return 400, _error_body("request body is not valid JSON", "invalid_request_error")
    problem = _validate_chat(body)
    if problem:
        return 400, _error_body(problem, "invalid_request_error")
    if not body["model"].startswith(MODEL_PREFIX):
        return 404, _error_body(
            f"model {body['model']!r} is not served here: this is a stand-in server that only "
            f"answers for ids starting with {MODEL_PREFIX!r} (e.g. {', '.join(KNOWN_MODELS)})",
            "invalid_request_error",
            "model_not_found",
        )
    return None


def _fault_band(s: StandinSettings, sha: str, attempt: int) -> str | None:
    """The injected fault of this attempt: "first_n", "timeout", "429", "5xx" or None."""
    if attempt <= s.fail_first_n:
        return "first_n"
    u = _unit(s.seed, sha, attempt, "fault")
    if u < s.fail_timeout:
        return "timeout"
    if u < s.fail_timeout + s.fail_429:
        return "429"
    if u < s.fail_timeout + s.fail_429 + s.fail_5xx:
        return "5xx"
    return None


def _first_n_error(s: StandinSettings, attempt: int) -> dict:
    return _error_body(f"stand-in injected failure: attempt {attempt} of {s.fail_first_n} failing attempts",
                       "server_error", "standin_injected_fault")


def _answer_body(state: dict, s: StandinSettings, body: dict, sha: str, attempt: int, entry: dict) -> dict:
    """The chat.completion for a valid body: a judge answer (possibly deliberately malformed)
    when the first user message is a judge prompt, generated text otherwise. Counts usage."""
    reply = None
    prompt = judge.parse_prompt(body["messages"])
    if prompt is None:
        reply = grading.reply(body["messages"])  # evaluate's single-answer grades (fixed rule, grading.py)
        if reply is not None:
            entry["judge"] = "grade"
    if prompt is not None:
        fmt = body.get("response_format") or {}
        structured = fmt.get("type") in ("json_object", "json_schema")
        entry["judge"] = prompt.label
        bias = judge.PositionBias(s.position_bonus_first, s.position_penalty)
        if entry["fault"] is None and s.fail_malformed > 0 and _unit(s.seed, sha, attempt, "malformed") < s.fail_malformed:
            variant, reply = judge.malformed_answer(prompt, structured, _unit(s.seed, sha, attempt, "malformed-kind"),
                                                   bias)
            entry["fault"] = "malformed"
            entry["malformed"] = variant
        else:
            reply = judge.answer(prompt, structured, bias)
    elif reply is None:
        temperature = 1.0 if body.get("temperature") is None else float(body["temperature"])
        found = sayself.reply(body["messages"], body["model"], temperature, body.get("seed"))
        if found is not None:  # a SaySelf rationale or chain request (fixed rules, see sayself.py)
            kind, reply = found
            if kind == "sayself-rationale":
                entry["judge"] = kind
    result = _completion(body, reply)
    state["prompt_tokens"] += result["usage"]["prompt_tokens"]
    state["completion_tokens"] += result["usage"]["completion_tokens"]
    return result


async def chat_completions(request: web.Request) -> web.Response:
    state = request.app[STATE]
    raw = await request.read()
    sha = hashlib.sha256(raw).hexdigest()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    entry = _new_entry(state, body, sha, request.headers.get("X-Request-Key"), "chat")
    log = state["log"]
    log.append(entry)
    status = 499  # what the log says if the client goes away before an answer
    try:
        response = await _answer_chat(state, body, sha, entry["attempt"], entry)
        status = response.status
        return response
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # an answer must always be JSON, and the log must say 500
        status = 500
        return _error(500, f"stand-in internal error: {type(exc).__name__}: {exc}", "server_error")
    finally:
        entry["status"] = status
        if state["log"] is log:  # not counted if /standin/reset came in while it ran
            state["by_status"][str(status)] += 1


async def _answer_chat(state: dict, body, sha: str, attempt: int, entry: dict) -> web.Response:
    refused = _request_problem(body)
    if refused:
        return web.json_response(refused[1], status=refused[0])

    await _acquire(state)
    try:
        s = state["settings"]
        delay = s.latency_s + s.latency_jitter_s * _unit(s.seed, sha, attempt, "jitter")
        if delay > 0:
            await asyncio.sleep(delay)
        s = state["settings"]  # a config change during the sleep applies to the fault draw
        fault = _fault_band(s, sha, attempt)
        if fault is not None:
            entry["fault"] = fault
        if fault == "first_n":
            return web.json_response(_first_n_error(s, attempt), status=500)
        if fault == "timeout":
            await asyncio.sleep(s.timeout_sleep_s)  # then answer normally, far too late
        elif fault == "429":
            headers = {
                "Retry-After": _format_seconds(s.retry_after_s),
                "retry-after-ms": str(int(round(s.retry_after_s * 1000))),
            }
            return _error(429, "stand-in injected rate limit; retry later", "requests", "rate_limit_exceeded", headers)
        elif fault == "5xx":
            return _error(500, "stand-in injected server error", "server_error", "standin_injected_fault")
        return web.json_response(_answer_body(state, s, body, sha, attempt, entry))
    finally:
        _release(state)


def answer_batch_line(state: dict, s: StandinSettings, body, custom_id: str, batch_id: str) -> tuple[int, dict]:
    """Answer one batch line as a chat request would be answered, without the concurrency
    gate, latency or timeouts; a 429 makes no sense in a batch, so the timeout and 429 bands
    give a normal answer. Logged like a chat request (request_key = custom_id)."""
    sha = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    entry = _new_entry(state, body, sha, custom_id, "batch")
    entry["batch_id"] = batch_id
    state["log"].append(entry)
    try:
        refused = _request_problem(body)
        if refused:
            status, payload = refused
        else:
            fault = _fault_band(s, sha, entry["attempt"])
            if fault == "first_n":
                entry["fault"] = fault
                status, payload = 500, _first_n_error(s, entry["attempt"])
            elif fault == "5xx":
                entry["fault"] = fault
                status, payload = 500, _error_body("stand-in injected server error", "server_error",
                                                   "standin_injected_fault")
            else:
                status, payload = 200, _answer_body(state, s, body, sha, entry["attempt"], entry)
    except Exception as exc:  # one bad line must not stop the batch
        status = 500
        payload = _error_body(f"stand-in internal error: {type(exc).__name__}: {exc}", "server_error")
    entry["status"] = status
    state["by_status"][str(status)] += 1
    return status, payload


async def list_models(request: web.Request) -> web.Response:
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "standin"} for m in KNOWN_MODELS]
    return web.json_response({"object": "list", "data": data})


async def get_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {
            "requests_total": state["requests_total"],
            "requests_by_status": dict(state["by_status"]),
            "peak_concurrency": state["peak"],
            "in_flight": state["active"],
            "waiting": sum(1 for f in state["waiters"] if not f.done()),
            "usage": {"prompt_tokens": state["prompt_tokens"], "completion_tokens": state["completion_tokens"]},
            "log": state["log"],
        }
    )


async def reset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    fresh = _new_state(state["settings"])
    # Requests still running keep their slots: carry the gate over, and the files and batches
    # (a running batch logs into the new log); restart everything else.
    for key in ("active", "waiters", "store"):
        fresh[key] = state[key]
    fresh["peak"] = state["active"]
    state.clear()
    state.update(fresh)
    return web.json_response({"ok": True})


async def get_config(request: web.Request) -> web.Response:
    return web.json_response(dataclasses.asdict(request.app[STATE]["settings"]))


async def set_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        fields = await request.json()
    except ValueError:
        return _error(400, "config body must be a JSON object", "invalid_request_error")
    if not isinstance(fields, dict):
        return _error(400, "config body must be a JSON object", "invalid_request_error")
    try:
        state["settings"] = updated(state["settings"], fields)
    except ValueError as exc:
        return _error(400, str(exc), "invalid_request_error")
    _wake(state)  # a larger max_concurrency lets waiting requests in at once
    return web.json_response(dataclasses.asdict(state["settings"]))


async def _label(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Standin"] = "1"


def make_app(settings: StandinSettings | None = None) -> web.Application:
    """The aiohttp application; `settings` default to StandinSettings()."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE] = _new_state(settings or StandinSettings())
    app.on_response_prepare.append(_label)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/standin/stats", get_stats)
    app.router.add_post("/standin/reset", reset)
    app.router.add_get("/standin/config", get_config)
    app.router.add_post("/standin/config", set_config)
    batches.add_routes(app, STATE, answer_batch_line)
    return app


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.standin",
        description="Offline OpenAI-compatible stand-in server (NOT a real model).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the bound port here (atomically) once listening")
    parser.add_argument("--url-file", help="write the base URL here once listening, for recipes that name it as "
                        "`base_url_file` (the demo's: data/runs/standin.url); removed again on shutdown")
    defaults = StandinSettings()
    for name, flag in FLAG_FOR_FIELD.items():
        kind = int if FIELD_TYPES[name] == "int" else float
        parser.add_argument(flag, dest=name, type=kind, default=getattr(defaults, name))
    return parser


def _write_atomically(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".port-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


async def _serve(args, settings: StandinSettings) -> None:
    # handler_cancellation: when a client gives up (e.g. on an injected timeout) its handler
    # stops and frees its concurrency slot instead of sleeping on.
    runner = web.AppRunner(make_app(settings), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = runner.addresses[0][1]
    base_url = f"http://{args.host}:{port}/v1"
    if args.url_file:  # before the port file, which is what start_standin waits for
        os.makedirs(os.path.dirname(os.path.abspath(args.url_file)), exist_ok=True)
        _write_atomically(args.url_file, base_url + "\n")
    if args.port_file:
        _write_atomically(args.port_file, f"{port}\n")
    print(f"stand-in OpenAI-compatible server (NOT a real model) listening on {base_url}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        _remove_if_ours(args.url_file, base_url)


def _remove_if_ours(url_file: str | None, base_url: str) -> None:
    # Another stand-in may have written its own URL there since; leave that one in place.
    try:
        if url_file and open(url_file).read().strip() == base_url:
            os.remove(url_file)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = StandinSettings(**{n: check_value(n, getattr(args, n)) for n in FLAG_FOR_FIELD})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_serve(args, settings))
    return 0
