"""Stage `annotate`: the UltraFeedback judge over completion sets, paid for exactly once.

Per prompt (mode `faithful`, the default): one call per aspect rating all of its completions at
once, shown in a shuffled order (seeded by `annotation.seed` and the prompt id, written with
each ledger record) and mapped back; one critique call per completion, ending in an overall
score 1-10. `structured` asks the same calls for JSON with a schema; `compact` rates the four
aspects in one call. `fine-grained_score` is the mean of the non-N/A aspect ratings.

Exactly once. Every request is keyed (pipeline.ledger) by the judge model, the template version,
the messages and the sampling parameters, and its answer is recorded as soon as it arrives. An
answer that does not parse is asked again with a corrective message (a new request with its own
key), at most `max_reasks` times; the whole chain replays from the ledger on a rerun, so a rerun
never sends a request that already succeeded. A request that fails after retries is recorded
with its reason; `--retry-failed` sends those again and grants unparseable items new re-asks.

Spending. A client-side throttle keeps requests and tokens per minute under the recipe's
limits and pauses everything for a 429's Retry-After. Usage from the server is priced with
`annotation.prices`; `--dry-run` prints the calls, tokens and cost still to pay; `budget_usd`
stops the stage cleanly (requests in flight finish and are kept) once spent.

Batch API: `--batch submit` writes the pending requests as JSONL files within the API's limits,
uploads them, starts batches and saves a manifest; `--batch collect` waits for them, puts their
answers (partial ones too) into the ledger, then runs the normal path, which sends only what is
still missing (failed lines, expired stragglers, re-asks).

Outputs: `dataset/` (openbmb/UltraFeedback rows, annotated), `failures.jsonl` (every item that
failed, with its reason), `summary.json`, `report/*.png`, `_SUCCESS` last. The raw answers are
kept in `ledger.jsonl`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipeline import records
from pipeline.config import ConfigError, LaunchSection, ModelSpec, RunSection, StageRef, Strict
from pipeline.judge import rubric
from pipeline.judge.parse import ParseError, parse_aspect, parse_compact, parse_critique
from pipeline.ledger import Ledger, request_key
from pipeline.llm.openai_backend import _reason
from pipeline.records import empty_annotations, prompt_id, saved_rows
from pipeline.report import figure
from pipeline.runs import (
    DATASET,
    RunOptions,
    StageFailed,
    atomic_dir,
    atomic_write_text,
    clear_done,
    mark_done,
    resolve_input,
    save_config,
    stage_dir,
    write_json,
)


class PriceSpec(Strict):
    """Dollars per million tokens, as price lists state them."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class AnnotateInputs(Strict):
    completions: StageRef | str = Field(
        description="The generate stage output, or a dataset folder / JSONL / parquet in the "
        "openbmb/UltraFeedback row shape"
    )


class AnnotationSection(Strict):
    judge: ModelSpec = Field(description="The judge: an `openai`-backend model")
    mode: Literal["faithful", "structured", "compact"] = Field(
        "faithful", description="faithful: a call per aspect (UltraFeedback); structured: the same "
        "calls answered as JSON with a schema; compact: one call for all four aspects"
    )
    critique: bool = Field(True, description="One critique call per completion (overall score 1-10)")
    temperature: float = Field(0.0, ge=0, le=2)
    aspect_max_tokens: int = Field(1024, ge=16)
    critique_max_tokens: int = Field(1024, ge=16)
    seed: int = Field(0, description="Seeds the order in which completions are shown to the judge")
    max_reasks: int = Field(2, ge=0, description="Re-asks (with a corrective message) after an unusable answer")
    max_failure_fraction: float = Field(0.05, ge=0, le=1)
    requests_per_minute: float | None = Field(None, gt=0, description="Client-side request throttle")
    tokens_per_minute: float | None = Field(None, gt=0, description="Client-side token throttle")
    budget_usd: float | None = Field(None, gt=0, description="Stop cleanly once this much is spent")
    prices: dict[str, PriceSpec] = Field(
        default_factory=dict, description="Judge model id -> price; needed for cost and budget"
    )
    allow_unknown_sources: bool = Field(False, description="Accept sources other than UltraFeedback's")
    batch_poll_s: float = Field(30.0, gt=0, description="Batch API: seconds between status checks")
    batch_max_requests: int = Field(50_000, ge=1, description="Batch API: requests per input file")
    batch_max_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="Batch API: bytes per input file")

    @model_validator(mode="after")
    def _judge_is_remote(self) -> "AnnotationSection":
        if self.judge.backend != "openai":
            raise ValueError("judge: the judge must use backend 'openai' (any OpenAI-compatible server)")
        if self.budget_usd is not None and self.price is None:
            raise ValueError(f"budget_usd is set but `prices` has no entry for judge model "
                             f"{self.judge_model!r}: the spend cannot be counted")
        return self

    @property
    def judge_model(self) -> str:
        return self.judge.model or self.judge.name

    @property
    def price(self) -> PriceSpec | None:
        return self.prices.get(self.judge_model)


class Recipe(Strict):
    stage: Literal["annotate"]
    run: RunSection
    inputs: AnnotateInputs
    annotation: AnnotationSection
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return [("inputs.completions", self.inputs.completions)] if isinstance(self.inputs.completions, str) else []


LEDGER = "ledger.jsonl"
FAILURES = "failures.jsonl"
BATCH_DIR = "batches"
MANIFEST = "manifest.json"

# Sources of the public UltraFeedback rows and of our prompts stage; anything else is a typo
# unless the recipe allows it (the truthfulness aspect's world knowledge depends on the source).
KNOWN_SOURCES = ("evol_instruct", "false_qa", "flan", "flan_v2_cot", "flan_v2_flan2021", "flan_v2_niv2",
                 "flan_v2_p3", "sharegpt", "truthful_qa", "ultrachat")

# Rough answer sizes for --dry-run estimates (tokens): per rated text, and per critique.
EST_TOKENS_PER_RATED_TEXT = {"aspect": 70, "compact": 220}
EST_CRITIQUE_TOKENS = 160


class BudgetReached(Exception):
    pass


# ---------------------------------------------------------------- input


def check_row(row: dict, where: str, allow_unknown_sources: bool) -> dict:
    """A completion set as the judge needs it, or a ConfigError naming `where`."""
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ConfigError(f"{where}: `instruction` must be a non-empty string")
    source = row.get("source")
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{where}: `source` must be a non-empty string")
    if source not in KNOWN_SOURCES and not allow_unknown_sources:
        raise ConfigError(f"{where}: unknown source {source!r} (known: {', '.join(KNOWN_SOURCES)}; "
                          "set annotation.allow_unknown_sources to accept others)")
    completions = row.get("completions")
    if not isinstance(completions, list) or not completions:
        raise ConfigError(f"{where}: `completions` must be a non-empty list")
    for i, completion in enumerate(completions):
        if not isinstance(completion, dict) or not isinstance(completion.get("response"), str):
            raise ConfigError(f"{where}: completions[{i}] has no string `response`")
        if not isinstance(completion.get("model"), str):
            raise ConfigError(f"{where}: completions[{i}] has no string `model`")
    out = dict(row)
    out["prompt_id"] = row.get("prompt_id") or prompt_id(instruction)
    for key in ("correct_answers", "incorrect_answers"):
        out[key] = list(row.get(key) or [])
    out["reference"] = row.get("reference") or ""
    out["models"] = [c["model"] for c in completions]
    return out


def load_rows(recipe: Recipe) -> list[dict]:
    path = resolve_input(recipe, recipe.inputs.completions, "inputs.completions")
    allow = recipe.annotation.allow_unknown_sources
    rows = [check_row(row, where, allow) for where, row in saved_rows(path)]
    if not rows:
        raise ConfigError(f"inputs.completions: {path} holds no completion sets")
    return rows


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Item:
    """One judge question: an aspect (or all, compact) over a row's texts, or one critique."""

    row: int
    kind: str  # "aspect", "compact" or "critique"
    aspect: str | None = None
    completion: int | None = None


@functools.lru_cache(maxsize=4096)  # asked once per aspect of a prompt; seeding a Random is not free
def shuffled_order(seed: int, pid: str, n: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"{seed}:{pid}").shuffle(order)
    return tuple(order)


def plan(rows: list[dict], recipe: Recipe) -> list[Item]:
    ann = recipe.annotation
    items = []
    for r, row in enumerate(rows):
        if ann.mode == "compact":
            items.append(Item(r, "compact"))
        else:
            items += [Item(r, "aspect", aspect=a) for a in rubric.ASPECTS]
        if ann.critique:
            items += [Item(r, "critique", completion=c) for c in range(len(row["completions"]))]
    return items


class Requests:
    """Builds each item's first request: messages, parameters and ledger key."""

    def __init__(self, rows: list[dict], recipe: Recipe):
        self.rows = rows
        self.ann = recipe.annotation
        self.structured = self.ann.mode == "structured"
        self.identity = {"backend": "openai", "model": self.ann.judge_model}
        self.version = rubric.TEMPLATE_VERSION + (f"+json-{rubric.schema_digest()}" if self.structured else "")

    def order(self, item: Item) -> list[int]:
        row = self.rows[item.row]
        return shuffled_order(self.ann.seed, row["prompt_id"], len(row["completions"]))

    def _nonce(self, item: Item, texts: list[str]) -> str:
        # Derived from the texts themselves, so no text can contain the marker lines around it.
        blob = json.dumps([self.ann.seed, item.kind, item.aspect, item.completion, texts])
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def first(self, item: Item) -> tuple[list[dict], dict]:
        row = self.rows[item.row]
        ann, structured = self.ann, self.structured
        if item.kind == "critique":
            completion = row["completions"][item.completion]
            nonce = self._nonce(item, [completion["response"]])
            messages = rubric.critique_messages(row, completion, nonce, structured)
            params = {"temperature": ann.temperature, "max_new_tokens": ann.critique_max_tokens}
            schema = ("critique", rubric.CRITIQUE_SCHEMA)
        else:
            texts = [row["completions"][i]["response"] for i in self.order(item)]
            nonce = self._nonce(item, texts)
            if item.kind == "compact":
                messages = rubric.compact_messages(row, texts, nonce, structured)
                schema = ("compact", rubric.compact_schema())
            else:
                messages = rubric.aspect_messages(item.aspect, row, texts, nonce, structured)
                schema = (item.aspect, rubric.aspect_schema(item.aspect))
            params = {"temperature": ann.temperature, "max_new_tokens": ann.aspect_max_tokens}
        if structured:
            params["response_format"] = rubric.response_format(*schema)
        return messages, params

    def key(self, messages: list[dict], params: dict) -> str:
        return request_key(self.identity, self.version, messages, params)

    def parse(self, item: Item, text: str):
        n = len(self.rows[item.row]["completions"])
        if item.kind == "critique":
            return parse_critique(text, self.structured)
        if item.kind == "compact":
            return parse_compact(text, n, self.structured)
        return parse_aspect(item.aspect, text, n, self.structured)


def reask(messages: list[dict], answer: str, reason: str, structured: bool) -> list[dict]:
    return [*messages, {"role": "assistant", "content": answer}, rubric.corrective_message(reason, structured)]


# ---------------------------------------------------------------- spending


def estimate_tokens(messages: list[dict]) -> int:
    """A cheap upper-side estimate (about four characters a token) for throttling and --dry-run."""
    return sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)


class Throttle:
    """Requests and tokens per minute as two token buckets, and a shared pause for Retry-After."""

    def __init__(self, rpm: float | None, tpm: float | None):
        self.rpm, self.tpm = rpm, tpm
        now = time.monotonic()
        self.requests = (rpm or 0) / 6  # start with ten seconds' worth, not a full minute's burst
        self.tokens = (tpm or 0) / 6
        self.updated = now
        self.paused_until = 0.0

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    async def acquire(self, tokens: int) -> None:
        while True:
            now = time.monotonic()
            if now < self.paused_until:
                await asyncio.sleep(self.paused_until - now)
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
                return
            await asyncio.sleep(wait)


@dataclass
class Tally:
    sent: int = 0
    replayed: int = 0
    failed_requests: int = 0
    reasks: int = 0
    parse_failures: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def add_usage(self, result: dict, price) -> None:
        self.prompt_tokens += result.get("prompt_tokens", 0)
        self.completion_tokens += result.get("completion_tokens", 0)
        if price is not None:
            self.cost_usd += cost(result, price)


def cost(result: dict, price) -> float:
    return (result.get("prompt_tokens", 0) * price.input_per_mtok
            + result.get("completion_tokens", 0) * price.output_per_mtok) / 1e6


# ---------------------------------------------------------------- the judge loop


@dataclass
class Outcome:
    status: str  # "ok", "failed" or "stopped"
    value: object = None
    reason: str = ""
    reasks: int = 0


class JudgeRun:
    def __init__(self, recipe: Recipe, rows: list[dict], ledger: Ledger, retry_failed: bool):
        self.recipe = recipe
        self.ann = recipe.annotation
        self.rows = rows
        self.requests = Requests(rows, recipe)
        self.ledger = ledger
        self.retry_failed = retry_failed
        self.tally = Tally()
        self.throttle = Throttle(self.ann.requests_per_minute, self.ann.tokens_per_minute)
        self.price = self.ann.price
        self.stopped = False
        self.spent_before = 0.0  # what the ledger says earlier runs spent (the budget covers all runs)
        self.count_replays = True
        self.keep_pending = True  # replay keeps the messages of what is still to send

    def api_key(self) -> str:
        spec = self.ann.judge
        key = os.environ.get(spec.api_key_env)
        if not key:
            if spec.base_url is None:
                raise ConfigError(f"annotation.judge: no API key: set the environment variable "
                                  f"{spec.api_key_env} (or give `base_url` for a local server)")
            key = "EMPTY"
        return key

    def client(self):
        from openai import AsyncOpenAI, DefaultAioHttpClient

        spec = self.ann.judge
        # Retries are ours (below), so that a 429's Retry-After pauses every worker, not one.
        # The SDK's aiohttp transport: the default httpx2 one spends about 2.5 ms of CPU per
        # request, which caps a 2-core machine well below what the server allows.
        return AsyncOpenAI(api_key=self.api_key(), base_url=spec.base_url, max_retries=0, timeout=spec.timeout_s,
                           http_client=DefaultAioHttpClient(timeout=spec.timeout_s))

    def over_budget(self) -> bool:
        budget = self.ann.budget_usd
        return budget is not None and self.spent_before + self.tally.cost_usd >= budget

    async def send(self, client, key: str, messages: list[dict], params: dict, meta: dict) -> dict | None:
        """One request with our retries; the outcome is in the ledger before this returns."""
        import openai

        body = {"model": self.ann.judge_model, "messages": messages, "temperature": params["temperature"],
                "max_tokens": params["max_new_tokens"]}
        if "response_format" in params:
            body["response_format"] = params["response_format"]
        spec = self.ann.judge
        reason = "no attempt made"
        for attempt in range(spec.max_retries + 1):
            await self.throttle.acquire(estimate_tokens(messages) + params["max_new_tokens"])
            if self.stopped or self.over_budget():
                self.stopped = True
                raise BudgetReached()
            self.tally.sent += 1
            try:
                # The client's low-level post: same auth, errors and connection pool as
                # chat.completions.create, without its per-request parameter transform and
                # response models, which cost more CPU than everything else here together.
                data = await client.post("/chat/completions", cast_to=object, body=body,
                                         options={"headers": {"X-Request-Key": key}})
                choice = data["choices"][0]
                text = (choice.get("message") or {}).get("content")
                if text is None:
                    raise ValueError(f"the server returned no text (finish_reason={choice.get('finish_reason')})")
            except openai.RateLimitError as err:
                reason = _reason(err)
                self.throttle.pause(_retry_after(err) or _backoff(attempt))
                continue
            except (openai.APITimeoutError, openai.APIConnectionError, openai.InternalServerError) as err:
                reason = _reason(err)
                await asyncio.sleep(_backoff(attempt))
                continue
            except (openai.APIStatusError, ValueError, IndexError, KeyError, TypeError, AttributeError) as err:
                reason = _reason(err)  # 4xx other than 429, or an answer without the chat shape: final
                break
            usage = data.get("usage") or {}
            result = {"text": text,
                      "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                      "completion_tokens": int(usage.get("completion_tokens") or 0),
                      "finish_reason": str(choice.get("finish_reason") or "stop")}
            self.ledger.record_ok(key, result, **meta)
            self.tally.add_usage(result, self.price)
            return result
        self.ledger.record_failure(key, reason, **meta)
        self.tally.failed_requests += 1
        return None

    async def resolve(self, client, item: Item) -> Outcome:
        """Ask (or replay) one item until it parses, running out of re-asks, or fails."""
        messages, params = self.requests.first(item)
        row = self.rows[item.row]
        meta = {"prompt_id": row["prompt_id"], "kind": item.kind, "aspect": item.aspect,
                "completion": item.completion, "seed": self.ann.seed,
                "order": self.requests.order(item) if item.kind != "critique" else None}
        counted = 0  # re-asks that count against max_reasks in this run
        reasks = 0
        while True:
            key = self.requests.key(messages, params)
            result = self.ledger.result(key)
            fresh = result is None
            if fresh:
                failure = self.ledger.failure(key)
                if failure is not None and not self.retry_failed:
                    return Outcome("failed", reason=failure.get("reason", "failed"), reasks=reasks)
                if client is None:  # replay only: this is where spending would start
                    # (--dry-run prices the messages; a real run renders them again when it sends,
                    # rather than hold every unsent request's text at once)
                    return Outcome("pending", value=(messages, params) if self.keep_pending else None,
                                   reasks=reasks)
                try:
                    result = await self.send(client, key, messages, params, {**meta, "reask": reasks})
                except BudgetReached:
                    return Outcome("stopped", reasks=reasks)
                if result is None:
                    return Outcome("failed", reason=self.ledger.failure(key)["reason"], reasks=reasks)
            elif self.count_replays:
                self.tally.replayed += 1
            try:
                return Outcome("ok", value=self.requests.parse(item, result["text"]), reasks=reasks)
            except ParseError as err:
                reason = str(err)
                if fresh or not self.retry_failed:  # --retry-failed grants new re-asks
                    counted += 1
                if fresh:
                    self.tally.parse_failures[_reason_kind(reason)] += 1
                if counted > self.ann.max_reasks:
                    return Outcome("failed", reason=f"unusable answer after {reasks} re-ask(s): {reason}",
                                   reasks=reasks)
                messages = reask(messages, result["text"], reason, self.requests.structured)
                reasks += 1
                if fresh:
                    self.tally.reasks += 1

    def replay_all(self, items: list[Item]) -> list[Outcome]:
        """Each item as far as the ledger answers it, sending nothing ("pending": what to send next)."""
        async def replay() -> list[Outcome]:
            return [await self.resolve(None, item) for item in items]

        return asyncio.run(replay())

    async def run_all(self, items: list[Item], bar, failed_before: int = 0) -> dict[Item, Outcome]:
        outcomes: dict[Item, Outcome] = {}
        failed = [failed_before]
        queue: asyncio.Queue[Item] = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)

        async def worker(client) -> None:
            while not queue.empty():
                item = queue.get_nowait()
                outcome = await self.resolve(client, item)
                outcomes[item] = outcome
                failed[0] += outcome.status == "failed"
                bar.update()
                postfix = {"sent": self.tally.sent, "reasks": self.tally.reasks, "failed": failed[0]}
                if self.price is not None:
                    postfix["spent"] = f"${self.spent_before + self.tally.cost_usd:.4f}"
                bar.set_postfix(postfix, refresh=False)

        async with self.client() as client:
            workers = [asyncio.create_task(worker(client))
                       for _ in range(max(1, min(self.ann.judge.max_concurrency, len(items))))]
            try:
                done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    if task.exception() is not None:
                        raise task.exception()
            finally:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
        return outcomes


def _retry_after(err) -> float | None:
    try:
        value = err.response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, ValueError):
        return None


def _backoff(attempt: int) -> float:
    return min(8.0, 0.25 * 2 ** attempt) * (0.5 + random.random() / 2)


def _reason_kind(reason: str) -> str:
    """Group parse-failure reasons for the summary: the text before any quoted value."""
    head = reason.split("'")[0].split('"')[0]
    return " ".join(w for w in head.split() if not w.rstrip(":").isdigit())[:80].strip() or reason[:80]


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rho (Pearson's r of average ranks); NaN when undefined. No scipy: its import
    alone costs more than a whole replayed rerun's parsing of a thousand answers."""
    import numpy as np
    import pandas as pd

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return float("nan")
    rx, ry = pd.Series(xs).rank().to_numpy(), pd.Series(ys).rank().to_numpy()
    return float(np.corrcoef(rx, ry)[0, 1])


def spent_so_far(ledger: Ledger, price) -> float:
    if price is None:
        return 0.0
    prompt, completion = _token_sums(ledger)
    return (prompt * price.input_per_mtok + completion * price.output_per_mtok) / 1e6


# ---------------------------------------------------------------- assembling rows


def assemble(rows: list[dict], items: list[Item], outcomes: dict, requests: Requests, with_critique: bool):
    """Annotated rows (complete completions only) and the failures, one record per lost item."""
    by_row: dict[int, list[Item]] = {}
    for item in items:
        by_row.setdefault(item.row, []).append(item)
    out_rows, failures = [], []
    incomplete = 0
    for r, row in enumerate(rows):
        n = len(row["completions"])
        annotations = [empty_annotations() for _ in range(n)]
        have = [set() for _ in range(n)]
        critiques: list[tuple[str, int] | None] = [None] * n
        for item in by_row.get(r, []):
            outcome = outcomes[item]
            if outcome.status != "ok":
                failures.append({"prompt_id": row["prompt_id"], "kind": item.kind, "aspect": item.aspect,
                                 "completion": item.completion, "status": outcome.status,
                                 "reason": outcome.reason})
                continue
            if item.kind == "critique":
                critiques[item.completion] = outcome.value
                continue
            order = requests.order(item)
            for position, parsed in enumerate(outcome.value):
                c = order[position]
                if item.kind == "compact":
                    for aspect in rubric.ASPECTS:
                        annotations[c][aspect] = parsed[aspect]
                        have[c].add(aspect)
                else:
                    annotations[c][item.aspect] = parsed
                    have[c].add(item.aspect)
        completions = []
        for c, completion in enumerate(row["completions"]):
            if len(have[c]) < len(rubric.ASPECTS) or (with_critique and critiques[c] is None):
                incomplete += 1
                continue
            ratings = [int(annotations[c][a]["Rating"]) for a in rubric.ASPECTS
                       if annotations[c][a]["Rating"] != "N/A"]
            feedback, score = critiques[c] if critiques[c] is not None else ("", None)
            completions.append({
                **{k: completion.get(k) for k in ("custom_system_prompt", "model", "principle", "response")},
                "annotations": annotations[c],
                "critique": feedback,
                "overall_score": float(score) if score is not None else None,
                "fine-grained_score": sum(ratings) / len(ratings) if ratings else None,
            })
        if completions:
            out_rows.append({
                "prompt_id": row["prompt_id"], "source": row["source"], "instruction": row["instruction"],
                "models": [c["model"] for c in completions], "completions": completions,
                "correct_answers": row["correct_answers"], "incorrect_answers": row["incorrect_answers"],
                "reference": row["reference"],
            })
    return out_rows, failures, incomplete


# ---------------------------------------------------------------- report


def write_report(rows: list[dict], report_dir: Path) -> dict:
    """PNG plots of the annotated rows; returns a few figures for the summary."""
    ratings = {a: Counter() for a in rubric.ASPECTS}
    per_model: dict[str, dict[str, list[int]]] = {}
    overall, fine = [], []
    for row in rows:
        for c in row["completions"]:
            for aspect in rubric.ASPECTS:
                value = c["annotations"][aspect]["Rating"]
                ratings[aspect][value] += 1
                if value != "N/A":
                    per_model.setdefault(c["model"], {}).setdefault(aspect, []).append(int(value))
            if c["overall_score"] is not None and c["fine-grained_score"] is not None:
                overall.append(c["overall_score"])
                fine.append(c["fine-grained_score"])

    labels = ["1", "2", "3", "4", "5", "N/A"]
    with figure(report_dir / "ratings_per_aspect.png", dpi=110, ncols=4, figsize=(14, 3.2), sharey=True) as (_, axes):
        for ax, aspect in zip(axes, rubric.ASPECTS):
            ax.bar(labels, [ratings[aspect][v] for v in labels], color="#4c72b0")
            ax.set_title(aspect.replace("_", " "))
            ax.set_xlabel("rating")
        axes[0].set_ylabel("completions")

    models = sorted(per_model)
    with figure(report_dir / "ratings_per_model.png", dpi=110, figsize=(max(6, 1.4 * len(models)), 3.5)) as (_, ax):
        width = 0.8 / len(rubric.ASPECTS)
        for k, aspect in enumerate(rubric.ASPECTS):
            means = [sum(v) / len(v) if (v := per_model[m].get(aspect)) else 0 for m in models]
            ax.bar([i + k * width for i in range(len(models))], means, width, label=aspect.replace("_", " "))
        ax.set_xticks([i + 1.5 * width for i in range(len(models))], models, rotation=20)
        ax.set_ylabel("mean rating (1-5)")
        ax.set_ylim(0, 5)
        ax.legend(fontsize=7)

    rho = spearman(overall, fine)
    with figure(report_dir / "overall_vs_fine_grained.png", dpi=110, figsize=(4.5, 4)) as (_, ax):
        jitter = random.Random(0)
        ax.scatter([x + jitter.uniform(-0.15, 0.15) for x in fine],
                   [y + jitter.uniform(-0.15, 0.15) for y in overall], s=8, alpha=0.5)
        ax.set_xlabel("fine-grained score (mean aspect rating)")
        ax.set_ylabel("overall score (critique)")
        ax.set_title(f"agreement: Spearman {rho:.2f} (n={len(overall)})")
    return {"spearman_overall_vs_fine_grained": None if math.isnan(rho) else round(rho, 4),
            "rating_counts": {a: dict(sorted(c.items())) for a, c in ratings.items()},
            "plots": sorted(p.name for p in report_dir.glob("*.png"))}


# ---------------------------------------------------------------- batch API


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
    from openai import OpenAI

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
    client = OpenAI(api_key=run.api_key(), base_url=spec.base_url, max_retries=spec.max_retries,
                    timeout=spec.timeout_s)
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
    from openai import OpenAI

    manifest_path = stage_path / BATCH_DIR / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(f"annotate --batch collect: no batches submitted ({manifest_path} is missing)")
    manifest = json.loads(manifest_path.read_text())
    spec = run.ann.judge
    client = OpenAI(api_key=run.api_key(), base_url=spec.base_url, max_retries=spec.max_retries,
                    timeout=spec.timeout_s)
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


# ---------------------------------------------------------------- the stage


def dry_run(run: JudgeRun, items: list[Item]) -> dict:
    calls = tokens_in = tokens_out = 0
    for item, outcome in zip(items, run.replay_all(items)):
        if outcome.status != "pending":
            continue
        messages, params = outcome.value
        calls += 1
        tokens_in += estimate_tokens(messages)
        n = 1 if item.kind == "critique" else len(run.rows[item.row]["completions"])
        guess = EST_CRITIQUE_TOKENS if item.kind == "critique" else EST_TOKENS_PER_RATED_TEXT[item.kind] * n
        tokens_out += min(guess, params["max_new_tokens"])
    price = run.price
    dollars = None if price is None else (tokens_in * price.input_per_mtok + tokens_out * price.output_per_mtok) / 1e6
    print(f"annotate --dry-run: {calls} call(s) to send (of {len(items)} items; re-asks not counted), "
          f"about {tokens_in:,} prompt + {tokens_out:,} completion tokens, "
          + (f"about ${dollars:,.2f}" if dollars is not None else
             f"cost unknown (no price for {run.ann.judge_model!r} in annotation.prices)"))
    return {"calls": calls, "prompt_tokens": tokens_in, "completion_tokens": tokens_out, "cost_usd": dollars}


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    from datasets import Dataset
    from tqdm import tqdm

    rows = load_rows(recipe)
    items = plan(rows, recipe)
    stage_path = stage_dir(recipe)
    stage_path.mkdir(parents=True, exist_ok=True)
    with Ledger(stage_path / LEDGER) as ledger:
        judge = JudgeRun(recipe, rows, ledger, opts.retry_failed)
        judge.api_key()  # a missing key is a config error before anything else
        if opts.dry_run:
            return dry_run(judge, items)
        clear_done(stage_path)
        save_config(stage_path, recipe)
        if opts.batch == "submit":
            return batch_submit(judge, items, stage_path)
        if opts.batch == "collect":
            batch_collect(judge, stage_path, recipe.annotation.batch_poll_s)
        judge.spent_before = spent_so_far(ledger, judge.price) - judge.tally.cost_usd
        started = time.monotonic()
        # First everything the ledger already answers (no client, no event-loop traffic), then
        # only what is still to send: a rerun of a finished run never opens a connection.
        judge.keep_pending = False
        outcomes = dict(zip(items, judge.replay_all(items)))
        pending = [item for item in items if outcomes[item].status == "pending"]
        if pending:
            failed_before = sum(outcome.status == "failed" for outcome in outcomes.values())
            bar = tqdm(total=len(items), initial=len(items) - len(pending), desc="annotate", unit="item",
                       dynamic_ncols=True, mininterval=0.5)
            judge.count_replays = False  # the replay pass above counted them
            try:
                outcomes.update(asyncio.run(judge.run_all(pending, bar, failed_before)))
            finally:
                bar.close()
        elapsed = time.monotonic() - started
        tokens = ledger_tokens(ledger)

    tally = judge.tally
    stopped = [i for i in items if outcomes[i].status == "stopped"]
    failed = [i for i in items if outcomes[i].status == "failed"]
    spent_total = judge.spent_before + tally.cost_usd
    if stopped:
        raise StageFailed(
            f"annotate: budget_usd={recipe.annotation.budget_usd} reached (${spent_total:.4f} spent in all "
            f"runs); {len(items) - len(stopped)} of {len(items)} items done and kept in the ledger. "
            "Raise annotation.budget_usd and rerun to continue.")
    out_rows, failures, incomplete = assemble(rows, items, outcomes, judge.requests, recipe.annotation.critique)
    atomic_write_text(stage_path / FAILURES, "".join(json.dumps(f) + "\n" for f in failures))
    limit = recipe.annotation.max_failure_fraction
    if len(failed) / len(items) > limit or not out_rows:
        reasons = Counter(outcomes[i].reason.split(":")[0] for i in failed).most_common(3)
        raise StageFailed(
            f"annotate: {len(failed)} of {len(items)} judge items failed (more than "
            f"max_failure_fraction={limit}); see {stage_path / FAILURES}; commonest: "
            + "; ".join(f"{n}x {r}" for r, n in reasons) + ". Fix the cause and rerun with --retry-failed.")
    with atomic_dir(stage_path / DATASET) as tmp:
        Dataset.from_list(out_rows, features=records.COMPLETION_SET_FEATURES).save_to_disk(str(tmp))
    report = write_report(out_rows, stage_path / "report")
    annotated = sum(len(r["completions"]) for r in out_rows)
    requests_this_run = tally.sent
    summary = {
        "mode": recipe.annotation.mode, "judge_model": recipe.annotation.judge_model,
        "template_version": judge.requests.version, "seed": recipe.annotation.seed,
        "rows_in": len(rows), "rows_out": len(out_rows), "completions_annotated": annotated,
        "completions_incomplete": incomplete, "items": len(items), "items_failed": len(failed),
        "requests_sent_this_run": requests_this_run, "requests_replayed": tally.replayed,
        "failed_requests_this_run": tally.failed_requests,
        "reasks_this_run": tally.reasks, "parse_failures_this_run": dict(tally.parse_failures),
        "tokens": tokens,
        "cost_usd_all_runs": round(spent_total, 6) if judge.price is not None else None,
        "seconds": round(elapsed, 2),
        "report": report,
    }
    summary["tokens_per_prompt"] = round(summary["tokens"]["total"] / max(len(rows), 1), 1)
    write_json(stage_path / "summary.json", summary)
    mark_done(stage_path, {"rows": len(out_rows), "completions": annotated})
    print_summary(summary, stage_path)
    return summary


def ledger_tokens(ledger: Ledger) -> dict:
    """Tokens of every successful request in the ledger (all runs, re-asks included)."""
    prompt, completion = _token_sums(ledger)
    return {"prompt": prompt, "completion": completion, "total": prompt + completion}


def _token_sums(ledger: Ledger) -> tuple[int, int]:
    prompt = completion = 0
    for p, c in ledger.token_counts():
        prompt += p
        completion += c
    return prompt, completion


def print_summary(summary: dict, stage_path: Path) -> None:
    cost_text = (f", ${summary['cost_usd_all_runs']:.4f} spent in all runs"
                 if summary["cost_usd_all_runs"] is not None else "")
    print(f"annotate ({summary['mode']}): {summary['rows_out']} rows, {summary['completions_annotated']} "
          f"completions annotated ({summary['items_failed']} items failed) -> {stage_path / DATASET}")
    print(f"  requests: {summary['requests_sent_this_run']} sent now, {summary['requests_replayed']} from the "
          f"ledger, {summary['reasks_this_run']} re-asks; tokens {summary['tokens']['total']:,} "
          f"({summary['tokens_per_prompt']:,} per prompt){cost_text}")
    print(f"  report: {stage_path / 'report'}")
