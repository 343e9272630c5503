"""The OpenAI Batch API for the judge: `submit` writes the pending requests as JSONL files within
the API's limits, uploads them, starts batches and saves a manifest; `collect` waits for them and
puts their answers (partial ones too) into the ledger. The normal path then sends what is missing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.judge.session import Item, JudgeRun
from pipeline.llm.openai_backend import sync_client
from pipeline.runs import atomic_write_text, write_json

BATCH_DIR = "batches"
MANIFEST = "manifest.json"


def _batch_lines(run: JudgeRun, items: list[Item]) -> list[tuple[str, str]]:
    """(key, JSONL line) for every item whose next request is not answered yet."""
    lines = []
    for item, outcome in zip(items, run.replay_all(items)):
        if outcome.status != "pending":
            continue
        messages, params = outcome.value
        key = run.requests.key(messages, params)
        body = {"model": run.ann.judge_model, "messages": messages, "temperature": params["temperature"],
                "max_tokens": params["max_new_tokens"]}
        if "response_format" in params:
            body["response_format"] = params["response_format"]
        lines.append((key, json.dumps({"custom_id": key, "method": "POST", "url": "/v1/chat/completions",
                                       "body": body}, ensure_ascii=False)))
    return lines


def batch_submit(run: JudgeRun, items: list[Item], stage_path: Path) -> dict:
    folder = stage_path / BATCH_DIR
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"batches": []}
    open_keys = {k for b in manifest["batches"] if not b.get("collected") for k in b["keys"]}
    lines = [(k, line) for k, line in _batch_lines(run, items) if k not in open_keys]
    seen, unique = set(), []
    for key, line in lines:  # the same request can come from two items only by accident; send it once
        if key not in seen:
            seen.add(key)
            unique.append((key, line))
    chunks, current, size = [], [], 0
    for key, line in unique:
        n = len(line.encode()) + 1
        if current and (len(current) >= run.ann.batch_max_requests or size + n > run.ann.batch_max_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append((key, line))
        size += n
    if current:
        chunks.append(current)
    spec = run.ann.judge
    client = sync_client(spec, run.api_key(), "annotation.judge")
    folder.mkdir(parents=True, exist_ok=True)
    for chunk in chunks:
        index = len(manifest["batches"])
        path = folder / f"input-{index:04d}.jsonl"
        atomic_write_text(path, "".join(line + "\n" for _, line in chunk))
        with open(path, "rb") as handle:
            uploaded = client.files.create(file=handle, purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h", metadata={"stage": "annotate"})
        manifest["batches"].append({"batch_id": batch.id, "input_file_id": uploaded.id, "file": path.name,
                                    "requests": len(chunk), "keys": [k for k, _ in chunk],
                                    "collected": False})
        write_json(manifest_path, manifest)  # after each batch: a crash never forgets a paid batch
    print(f"annotate --batch submit: {len(unique)} request(s) in {len(chunks)} new batch(es); "
          f"manifest {manifest_path}")
    return {"submitted": len(unique), "batches": len(chunks)}


TERMINAL = {"completed", "expired", "cancelled", "failed"}


def batch_collect(run: JudgeRun, stage_path: Path, poll_s: float) -> dict:
    """Wait for every open batch, then put its answers and errors into the ledger."""
    manifest_path = stage_path / BATCH_DIR / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(f"annotate --batch collect: no batches submitted ({manifest_path} is missing)")
    manifest = json.loads(manifest_path.read_text())
    spec = run.ann.judge
    client = sync_client(spec, run.api_key(), "annotation.judge")
    ingested = errors = 0
    for entry in manifest["batches"]:
        if entry.get("collected"):
            continue
        while True:
            batch = client.batches.retrieve(entry["batch_id"])
            if batch.status in TERMINAL:
                break
            counts = batch.request_counts
            print(f"  batch {batch.id}: {batch.status} "
                  f"({getattr(counts, 'completed', 0)}/{getattr(counts, 'total', 0)} done); waiting {poll_s:g} s")
            time.sleep(poll_s)
        keys = set(entry["keys"])
        for file_id, is_error in ((batch.output_file_id, False), (batch.error_file_id, True)):
            if not file_id:
                continue
            for raw in client.files.content(file_id).text.splitlines():
                if not raw.strip():
                    continue
                line = json.loads(raw)
                key = line.get("custom_id")
                if key not in keys or run.ledger.is_ok(key):
                    continue
                response = line.get("response") or {}
                body = response.get("body") or {}
                if response.get("status_code") == 200 and not is_error and body.get("choices"):
                    choice = body["choices"][0]
                    usage = body.get("usage") or {}
                    content = (choice.get("message") or {}).get("content")
                    if content is not None:
                        result = {"text": content, "prompt_tokens": int(usage.get("prompt_tokens", 0)),
                                  "completion_tokens": int(usage.get("completion_tokens", 0)),
                                  "finish_reason": str(choice.get("finish_reason") or "stop")}
                        run.ledger.record_ok(key, result, batch=batch.id)
                        run.tally.add_usage(result, run.price)
                        ingested += 1
                        continue
                errors += 1  # left out of the ledger: the normal path sends it again
        entry.update(collected=True, status=batch.status)
        write_json(manifest_path, manifest)
    print(f"annotate --batch collect: {ingested} answer(s) ingested, {errors} error line(s) "
          "(those go through the normal path now)")
    return {"ingested": ingested, "error_lines": errors}
