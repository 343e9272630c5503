"""Files and Batches endpoints of the stand-in server: enough of OpenAI's Batch API for the
`openai` python client (files.create/retrieve/content/delete/list, batches.create/retrieve/
cancel/list). A stand-in, NOT OpenAI: everything is held in memory and lost when the server
stops; ids look like OpenAI's ("file-...", "batch_...", "batch_req_...").

Files
    POST   /v1/files                 multipart fields `file` and `purpose` -> file object
    GET    /v1/files                 list (newest first), optional ?purpose=
    GET    /v1/files/{id}            file object
    GET    /v1/files/{id}/content    the raw bytes
    DELETE /v1/files/{id}            {"id", "object": "file", "deleted": true}

Batches
    POST   /v1/batches               {input_file_id, endpoint: "/v1/chat/completions",
                                      completion_window: "24h", metadata?} -> batch "validating"
    GET    /v1/batches               list (newest first)
    GET    /v1/batches/{id}          batch object
    POST   /v1/batches/{id}/cancel   "cancelling", then "cancelled" with partial results

A batch runs as a task on the server's event loop: validating -> in_progress -> finalizing ->
completed (or failed / expired / cancelled). The input file must hold one JSON object per
non-blank line with a unique string `custom_id`, `method` "POST", `url` equal to the batch's
endpoint and an object `body`; otherwise the batch fails and `errors.data` lists the problems
(code, 1-based line, message, param). Each line is answered by the server's chat logic (judge
answers included); the line's custom_id becomes the stats log entry's `request_key`.

Lines are spread evenly over `batch_delay_s` (settings are read when the batch is created).
With `batch_expire_after` = k > 0 and more than k lines, only the first k lines are answered and
the batch ends "expired"; like OpenAI, the unanswered lines go to the error file with
`"response": null, "error": {"code": "batch_expired", ...}`. request_counts: total = lines in the
file, completed = lines answered with status 200, failed = lines answered with an error status.

Output file lines (purpose "batch_output"), in input order:
    {"id": "batch_req_...", "custom_id": ..., "response": {"status_code": 200, "request_id":
     "req_...", "body": <chat.completion>}, "error": null}
Error file lines: the same with the error status and body {"error": {...}}. An output or error
file exists only when it has at least one line (otherwise its id is null).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import secrets
import time
from typing import Callable

from aiohttp import web

FILE_PURPOSES = ("assistants", "assistants_output", "batch", "batch_output", "fine-tune",
                 "fine-tune-results", "vision", "user_data", "evals")
BATCH_ENDPOINTS = ("/v1/chat/completions",)
COMPLETION_WINDOWS = ("24h",)
WINDOW_SECONDS = 24 * 3600
MAX_LISTED_ERRORS = 100
ACTIVE = ("validating", "in_progress", "finalizing")

# (state, settings, body, custom_id, batch_id) -> (status code, response body)
AnswerLine = Callable[[dict, object, object, str, str], tuple[int, dict]]


def new_store() -> dict:
    """Files and batches of one server; kept across /standin/reset."""
    return {"files": {}, "batches": {}, "jobs": {}}


def _error(status: int, message: str, err_type: str = "invalid_request_error", code: str | None = None,
           param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return web.json_response(body, status=status)


def _now() -> int:
    return int(time.time())


def _page(items: list[dict], request: web.Request) -> dict:
    """Cursor pagination like OpenAI's lists (`after`, `limit`)."""
    after = request.query.get("after")
    try:
        limit = max(1, min(10000, int(request.query.get("limit", "10000"))))
    except ValueError:
        limit = 10000
    if after:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > len(page)}


def add_file(store: dict, data: bytes, filename: str, purpose: str) -> dict:
    meta = {
        "id": f"file-{secrets.token_hex(12)}",
        "object": "file",
        "bytes": len(data),
        "created_at": _now(),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }
    store["files"][meta["id"]] = {"meta": meta, "data": data}
    return meta


def check_input(data: bytes, endpoint: str) -> tuple[list[dict], list[dict]]:
    """(requests, errors) of a batch input file; any error fails the whole batch."""
    errors: list[dict] = []
    requests: list[dict] = []

    def problem(code: str, line: int | None, message: str, param: str | None = None) -> None:
        errors.append({"code": code, "line": line, "message": message, "param": param})

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        problem("invalid_file", None, "the input file is not UTF-8 text")
        return [], errors
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            problem("invalid_json_line", number, "this line is not valid JSON")
            continue
        if not isinstance(item, dict):
            problem("invalid_request", number, "each line must be a JSON object")
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            problem("missing_custom_id", number, "'custom_id' must be a non-empty string", "custom_id")
        elif custom_id in seen:
            problem("duplicate_custom_id", number, f"custom_id {custom_id!r} appears more than once", "custom_id")
        else:
            seen.add(custom_id)
        if item.get("method") != "POST":
            problem("invalid_method", number, "'method' must be \"POST\"", "method")
        if item.get("url") != endpoint:
            problem("invalid_url", number, f"'url' must be {endpoint!r}, the batch's endpoint", "url")
        if not isinstance(item.get("body"), dict):
            problem("invalid_body", number, "'body' must be a JSON object", "body")
        requests.append({"line": number, "custom_id": custom_id, "body": item.get("body")})
    if not requests and not errors:
        problem("empty_file", None, "the input file holds no requests")
    return requests, errors


def _request_id(batch_id: str, custom_id: str) -> str:
    return hashlib.sha256(f"{batch_id}:{custom_id}".encode()).hexdigest()


class BatchAPI:
    """The route handlers; `answer_line` is the server's chat logic for one batch line."""

    def __init__(self, state_key, answer_line: AnswerLine):
        self.state_key = state_key
        self.answer_line = answer_line

    def store(self, request: web.Request) -> dict:
        return request.app[self.state_key]["store"]

    # ------------------------------------------------------------ files

    async def create_file(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            return _error(400, "upload the file as multipart/form-data with fields 'file' and 'purpose'")
        form = await request.post()
        upload = form.get("file")
        purpose = form.get("purpose")
        if upload is None or not hasattr(upload, "file"):
            return _error(400, "missing multipart field 'file'", param="file")
        if purpose not in FILE_PURPOSES:
            return _error(400, f"'purpose' must be one of {', '.join(FILE_PURPOSES)}", param="purpose")
        data = upload.file.read()
        meta = add_file(self.store(request), data, upload.filename or "upload", purpose)
        return web.json_response(meta)

    async def list_files(self, request: web.Request) -> web.Response:
        purpose = request.query.get("purpose")
        items = [f["meta"] for f in self.store(request)["files"].values()
                 if purpose is None or f["meta"]["purpose"] == purpose]
        items.sort(key=lambda m: m["created_at"], reverse=True)
        return web.json_response(_page(items, request))

    def _file(self, request: web.Request) -> dict | None:
        return self.store(request)["files"].get(request.match_info["file_id"])

    async def get_file(self, request: web.Request) -> web.Response:
        f = self._file(request)
        if f is None:
            return _error(404, f"No such File object: {request.match_info['file_id']}", param="id")
        return web.json_response(f["meta"])

    async def file_content(self, request: web.Request) -> web.Response:
        f = self._file(request)
        if f is None:
            return _error(404, f"No such File object: {request.match_info['file_id']}", param="id")
        return web.Response(body=f["data"], content_type="application/octet-stream")

    async def delete_file(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        if self.store(request)["files"].pop(file_id, None) is None:
            return _error(404, f"No such File object: {file_id}", param="id")
        return web.json_response({"id": file_id, "object": "file", "deleted": True})

    # ------------------------------------------------------------ batches

    async def create_batch(self, request: web.Request) -> web.Response:
        state = request.app[self.state_key]
        store = state["store"]
        try:
            params = await request.json()
        except ValueError:
            return _error(400, "request body is not valid JSON")
        if not isinstance(params, dict):
            return _error(400, "request body must be a JSON object")
        file_id = params.get("input_file_id")
        endpoint = params.get("endpoint")
        window = params.get("completion_window")
        metadata = params.get("metadata")
        if not isinstance(file_id, str) or file_id not in store["files"]:
            return _error(404, f"No such File object: {file_id}", param="input_file_id")
        if store["files"][file_id]["meta"]["purpose"] != "batch":
            return _error(400, "the input file must be uploaded with purpose 'batch'", param="input_file_id")
        if endpoint not in BATCH_ENDPOINTS:
            return _error(400, f"'endpoint' must be one of {', '.join(BATCH_ENDPOINTS)} "
                               "(the only one the stand-in serves)", param="endpoint")
        if window not in COMPLETION_WINDOWS:
            return _error(400, "'completion_window' must be \"24h\"", param="completion_window")
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            return _error(400, "'metadata' must map strings to strings", param="metadata")
        created = _now()
        batch = {
            "id": f"batch_{secrets.token_hex(12)}",
            "object": "batch",
            "endpoint": endpoint,
            "model": None,
            "errors": None,
            "input_file_id": file_id,
            "completion_window": window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": created,
            "in_progress_at": None,
            "expires_at": created + WINDOW_SECONDS,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "usage": None,
            "metadata": metadata,
        }
        store["batches"][batch["id"]] = batch
        # Settings as they are now: a later config change does not reach a running batch.
        settings = dataclasses.replace(state["settings"])
        job = {"cancel": asyncio.Event(), "task": None}
        job["task"] = asyncio.get_running_loop().create_task(self._run(state, batch, settings, job))
        store["jobs"][batch["id"]] = job
        return web.json_response(batch)

    async def list_batches(self, request: web.Request) -> web.Response:
        items = sorted(self.store(request)["batches"].values(), key=lambda b: b["created_at"], reverse=True)
        return web.json_response(_page(items, request))

    async def get_batch(self, request: web.Request) -> web.Response:
        batch = self.store(request)["batches"].get(request.match_info["batch_id"])
        if batch is None:
            return _error(404, f"No such Batch object: {request.match_info['batch_id']}", param="id")
        return web.json_response(batch)

    async def cancel_batch(self, request: web.Request) -> web.Response:
        store = self.store(request)
        batch = store["batches"].get(request.match_info["batch_id"])
        if batch is None:
            return _error(404, f"No such Batch object: {request.match_info['batch_id']}", param="id")
        if batch["status"] in ("cancelling", "cancelled"):
            return web.json_response(batch)
        if batch["status"] not in ACTIVE:
            return _error(409, f"Cannot cancel a batch with status {batch['status']!r}.")
        batch["status"] = "cancelling"
        batch["cancelling_at"] = _now()
        store["jobs"][batch["id"]]["cancel"].set()
        return web.json_response(batch)

    # ------------------------------------------------------------ the work

    async def _run(self, state: dict, batch: dict, settings, job: dict) -> None:
        cancel: asyncio.Event = job["cancel"]
        loop = asyncio.get_running_loop()

        async def pause(seconds: float) -> None:
            """Sleep up to `seconds`, waking early on cancel; always yields once."""
            if seconds <= 0:
                await asyncio.sleep(0)
                return
            try:
                await asyncio.wait_for(cancel.wait(), timeout=seconds)
            except asyncio.TimeoutError:
                pass

        try:
            await pause(0)  # the create call answers "validating" first
            store = state["store"]
            source = store["files"].get(batch["input_file_id"])
            if source is None:
                requests, errors = [], [{"code": "file_not_found", "line": None, "param": "input_file_id",
                                         "message": "the input file was deleted before the batch started"}]
            else:
                requests, errors = check_input(source["data"], batch["endpoint"])
            if cancel.is_set():
                self._finish(store, batch, [], [], "cancelled")
                return
            if errors:
                batch["errors"] = {"object": "list", "data": errors[:MAX_LISTED_ERRORS]}
                batch["status"] = "failed"
                batch["failed_at"] = _now()
                return
            model = next((r["body"].get("model") for r in requests if isinstance(r["body"].get("model"), str)), None)
            batch["model"] = model
            batch["status"] = "in_progress"
            batch["in_progress_at"] = _now()
            batch["request_counts"]["total"] = len(requests)
            batch["usage"] = {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens": 0, "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": 0}

            limit = settings.batch_expire_after
            todo = requests[:limit] if 0 < limit < len(requests) else requests
            delay = settings.batch_delay_s
            start = loop.time()
            outputs: list[dict] = []
            failures: list[dict] = []
            done = 0
            for i, req in enumerate(todo):
                await pause(start + delay * i / len(todo) - loop.time())
                if cancel.is_set():
                    break
                status, payload = self.answer_line(state, settings, req["body"], req["custom_id"], batch["id"])
                rid = _request_id(batch["id"], req["custom_id"])
                line = {"id": f"batch_req_{rid[:24]}", "custom_id": req["custom_id"],
                        "response": {"status_code": status, "request_id": f"req_{rid[24:48]}", "body": payload},
                        "error": None}
                done += 1
                if status == 200:
                    outputs.append(line)
                    batch["request_counts"]["completed"] += 1
                    usage = payload.get("usage") or {}
                    batch["usage"]["input_tokens"] += usage.get("prompt_tokens", 0)
                    batch["usage"]["output_tokens"] += usage.get("completion_tokens", 0)
                    batch["usage"]["total_tokens"] += usage.get("total_tokens", 0)
                else:
                    failures.append(line)
                    batch["request_counts"]["failed"] += 1
            if not cancel.is_set():
                await pause(start + delay - loop.time())
            if cancel.is_set():
                self._finish(store, batch, outputs, failures, "cancelled")
                return
            if done < len(requests):
                for req in requests[done:]:
                    rid = _request_id(batch["id"], req["custom_id"])
                    failures.append({"id": f"batch_req_{rid[:24]}", "custom_id": req["custom_id"], "response": None,
                                     "error": {"code": "batch_expired", "message": "This request could not be "
                                               "executed before the completion window expired."}})
                self._finish(store, batch, outputs, failures, "expired")
            else:
                self._finish(store, batch, outputs, failures, "completed")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never leave a batch in progress for ever
            batch["status"] = "failed"
            batch["failed_at"] = _now()
            batch["errors"] = {"object": "list", "data": [
                {"code": "server_error", "line": None, "param": None,
                 "message": f"stand-in internal error: {type(exc).__name__}: {exc}"}]}

    def _finish(self, store: dict, batch: dict, outputs: list[dict], failures: list[dict], status: str) -> None:
        batch["status"] = "finalizing"
        batch["finalizing_at"] = _now()
        for kind, lines in (("output", outputs), ("error", failures)):
            if lines:
                data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
                meta = add_file(store, data, f"{batch['id']}_{kind}.jsonl", "batch_output")
                batch[f"{kind}_file_id"] = meta["id"]
        batch["status"] = status
        stamp = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[status]
        batch[stamp] = _now()


async def _stop_jobs(app: web.Application, state_key) -> None:
    jobs = [j["task"] for j in app[state_key]["store"]["jobs"].values() if j["task"] and not j["task"].done()]
    for task in jobs:
        task.cancel()
    if jobs:
        await asyncio.gather(*jobs, return_exceptions=True)


def add_routes(app: web.Application, state_key, answer_line: AnswerLine) -> None:
    api = BatchAPI(state_key, answer_line)
    app.router.add_post("/v1/files", api.create_file)
    app.router.add_get("/v1/files", api.list_files)
    app.router.add_get("/v1/files/{file_id}", api.get_file)
    app.router.add_get("/v1/files/{file_id}/content", api.file_content)
    app.router.add_delete("/v1/files/{file_id}", api.delete_file)
    app.router.add_post("/v1/batches", api.create_batch)
    app.router.add_get("/v1/batches", api.list_batches)
    app.router.add_get("/v1/batches/{batch_id}", api.get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", api.cancel_batch)
    app.on_shutdown.append(lambda a: _stop_jobs(a, state_key))
