"""The judging session: the plan of judge items, their requests, sending them (throttled, with
our own retries), re-asks after an unusable answer, the cost and token tally, the --dry-run
estimate, and assembling the ratings into completion rows. See pipeline.stages.annotate.

`recipe` below is the annotate stage's recipe (anything with its `annotation` section); it is
not imported here, so that this package does not depend on pipeline.stages.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from pipeline.judge import positions, rubric
from pipeline.judge.parse import ParseError, parse_aspect, parse_compact, parse_critique
from pipeline.ledger import Ledger, request_key
from pipeline.llm.fleet import Fleet
from pipeline.llm import transport
from pipeline.llm.openai_backend import api_key, chat_client, error_reason
from pipeline.llm.spend import estimate_tokens
from pipeline.llm.throttle import Throttle
from pipeline.llm.workers import run_workers
from pipeline.records import empty_annotations

# Rough answer sizes for --dry-run estimates (tokens): per rated text, and per critique.
EST_TOKENS_PER_RATED_TEXT = {"aspect": 70, "compact": 220}
EST_CRITIQUE_TOKENS = 160


class BudgetReached(Exception):
    pass


@dataclass(frozen=True, slots=True)  # slots: a large run holds hundreds of thousands
class Item:
    """One judge question: an aspect (or all, compact) over a row's texts, or one critique.
    `order` indexes the row's orders (pipeline.judge.positions): 0 unless position_debias is
    permute."""

    row: int
    kind: str  # "aspect", "compact" or "critique"
    aspect: str | None = None
    completion: int | None = None
    order: int = 0


@functools.lru_cache(maxsize=4096)  # asked once per aspect of a prompt; seeding a Random is not free
def shuffled_order(seed: int, pid: str, n: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"{seed}:{pid}").shuffle(order)
    return tuple(order)


def orders_asked(ann, n: int) -> int:
    """How many orders each rated question of a row with `n` completions is asked in at first
    (`ann`: the recipe's annotation section)."""
    if ann.position_debias != "permute":
        return 1
    return min(ann.position_orders, len(positions.order_family(tuple(range(n)), ann.position_orders)))


def plan(rows: list[dict], recipe) -> list[Item]:
    ann = recipe.annotation
    items = []
    for r, row in enumerate(rows):
        orders = range(orders_asked(ann, len(row["completions"])))
        if ann.mode == "compact":
            items += [Item(r, "compact", order=o) for o in orders]
        else:
            items += [Item(r, "aspect", aspect=a, order=o) for a in rubric.ASPECTS for o in orders]
        if ann.critique:
            items += [Item(r, "critique", completion=c) for c in range(len(row["completions"]))]
    return items


class Requests:
    """Builds each item's first request: messages, parameters and ledger key."""

    def __init__(self, rows: list[dict], recipe):
        self.rows = rows
        self.ann = recipe.annotation
        self.structured = self.ann.mode == "structured"
        self.identity = {"backend": "openai", "model": self.ann.judge_model}
        self.version = rubric.TEMPLATE_VERSION + (f"+json-{rubric.schema_digest()}" if self.structured else "")
        self._orders: dict[int, list[tuple[int, ...]]] = {}
        self._contexts: dict[int, str] = {}

    def context(self, r: int) -> str:
        """A digest of everything that shapes row `r`'s requests: the row as loaded, the template
        version, the judge and the settings that enter the messages or parameters (or decide the
        orders). Same digest, same first request for every item of the row: what lets a parsed
        answer be reused without rendering it (pipeline.judge.parsecache)."""
        digest = self._contexts.get(r)
        if digest is None:
            ann = self.ann
            settings = [ann.mode, ann.temperature, ann.aspect_max_tokens, ann.critique_max_tokens,
                        ann.schema_max_chars, ann.seed, ann.position_debias, ann.position_orders]
            blob = json.dumps([self.version, self.identity, settings, self.rows[r]], sort_keys=True,
                              ensure_ascii=False, default=str)
            digest = self._contexts[r] = hashlib.sha256(blob.encode("utf-8")).hexdigest()
        return digest

    def item_key(self, item: Item) -> str:
        """The parse cache's key of an item (not a ledger key: nothing is rendered for it)."""
        blob = f"{self.context(item.row)}|{item.kind}|{item.aspect}|{item.completion}|{item.order}"
        return hashlib.sha256(blob.encode()).hexdigest()

    def orders(self, r: int) -> list[tuple[int, ...]]:
        """Row `r`'s orders: the ones asked first, then (permute) the one extra order, if any."""
        if r not in self._orders:
            row = self.rows[r]
            n = len(row["completions"])
            if self.ann.position_debias == "none":
                self._orders[r] = [tuple(range(n))]
            else:
                base = shuffled_order(self.ann.seed, row["prompt_id"], n)
                self._orders[r] = ([base] if self.ann.position_debias == "shuffle"
                                   else positions.order_family(base, self.ann.position_orders + 1))
        return self._orders[r]

    def order(self, item: Item) -> tuple[int, ...]:
        """Which completion is shown at each position."""
        return self.orders(item.row)[item.order]

    def _nonce(self, item: Item, texts: list[str]) -> str:
        # Derived from the texts themselves, so no text can contain the marker lines around it.
        # An order after the first is part of it: each order is its own request and ledger key
        # even where two orders show the same texts (duplicate completions). Order 0 keeps the
        # nonce `shuffle` uses, so a shuffle run's answers serve a permute run.
        fields = [self.ann.seed, item.kind, item.aspect, item.completion, texts]
        blob = json.dumps(fields + [item.order] if item.order else fields)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def first(self, item: Item) -> tuple[list[dict], dict]:
        row = self.rows[item.row]
        ann, structured = self.ann, self.structured
        if item.kind == "critique":
            completion = row["completions"][item.completion]
            nonce = self._nonce(item, [completion["response"]])
            messages = rubric.critique_messages(row, completion, nonce, structured)
            params = {"temperature": ann.temperature, "max_new_tokens": ann.critique_max_tokens}
            schema = ("critique", rubric.critique_schema(ann.schema_max_chars and 2 * ann.schema_max_chars))
        else:
            texts = [row["completions"][i]["response"] for i in self.order(item)]
            nonce = self._nonce(item, texts)
            if item.kind == "compact":
                messages = rubric.compact_messages(row, texts, nonce, structured)
                schema = ("compact", rubric.compact_schema(len(texts), ann.schema_max_chars))
            else:
                messages = rubric.aspect_messages(item.aspect, row, texts, nonce, structured)
                schema = (item.aspect, rubric.aspect_schema(item.aspect, len(texts), ann.schema_max_chars))
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
    def __init__(self, recipe, rows: list[dict], ledger: Ledger, retry_failed: bool, cache=None, requests=None):
        """`requests` (default: the annotate calls of `Requests`, shared: it keeps each row's orders and
        digest) builds, keys and parses the items' requests; another judge task (evaluate's
        single-answer grades) brings its own, with the same `first`, `key`, `parse`, `order` and
        `structured`, and a `recipe.annotation` section holding the judge, throttle, budget and
        re-ask fields. `cache` (annotate's parse cache) lets a rebuild skip rendering and parsing."""
        self.recipe = recipe
        self.ann = recipe.annotation
        self.rows = rows
        self.requests = requests if requests is not None else Requests(rows, recipe)
        self.ledger = ledger
        self.retry_failed = retry_failed
        self.tally = Tally()
        self.throttle = Throttle(self.ann.requests_per_minute, self.ann.tokens_per_minute)
        self.fleet = Fleet.for_spec(self.ann.judge)  # one server, or several (base_urls)
        self.price = self.ann.price
        self.stopped = False
        self.spent_before = 0.0  # what the ledger says earlier runs spent (the budget covers all runs)
        self.count_replays = True
        self.keep_pending = True  # replay keeps the messages of what is still to send
        self.cache = cache  # a ParseCache, or None: every answer is parsed from the ledger

    def cached(self, item: Item) -> Outcome | None:
        """The item's outcome from the parse cache, if the entry still holds: its final answer is
        in the ledger, and the chain of re-asks it took fits this run's max_reasks (with
        --retry-failed a replayed re-ask never counts, so any finished chain fits)."""
        entry = self.cache.get(self.requests.item_key(item))
        if entry is None:
            return None
        key, reasks, value = entry
        if not self.ledger.is_ok(key) or (reasks > self.ann.max_reasks and not self.retry_failed):
            return None
        if self.count_replays:
            self.tally.replayed += reasks + 1  # every request of the chain comes from the ledger
        self.cache.hits += 1
        return Outcome("ok", value=value, reasks=reasks)

    def api_key(self) -> str:
        return api_key(self.ann.judge, "annotation.judge")

    async def open_clients(self):
        """One client per server of the judge's fleet; the returned stack closes them."""
        key = self.api_key()
        return await self.fleet.open(lambda url: chat_client(self.ann.judge, key, url))

    def over_budget(self) -> bool:
        budget = self.ann.budget_usd
        return budget is not None and self.spent_before + self.tally.cost_usd >= budget

    async def send(self, fleet: Fleet, key: str, messages: list[dict], params: dict, meta: dict) -> dict | None:
        """One request with our retries; the outcome is in the ledger before this returns. Every
        attempt goes through the fleet, which sends it again on another server when the first
        one is down; whichever server answers, the record is the same (the key names none)."""
        body = transport.encode(transport.chat_body(self.ann.judge_model, messages, params))
        spec = self.ann.judge
        reason = "no attempt made"
        for attempt in range(spec.max_retries + 1):
            await self.throttle.acquire(estimate_tokens(messages) + params["max_new_tokens"])
            if self.stopped or self.over_budget():
                self.stopped = True
                raise BudgetReached()

            def post(client):
                self.tally.sent += 1  # each HTTP request, on whichever server
                return client.chat(body, key)

            try:
                data = await fleet.call(post)
                choice = data["choices"][0]
                text = (choice.get("message") or {}).get("content")
                if text is None:
                    raise ValueError(f"the server returned no text (finish_reason={choice.get('finish_reason')})")
            except (transport.APIError, ValueError, IndexError, KeyError, TypeError, AttributeError) as err:
                reason = error_reason(err)
                delay = transport.retry_delay(err, attempt)
                if delay is None:  # 4xx other than 429, or an answer without the chat shape: final
                    break
                if isinstance(err, transport.RateLimitError):
                    self.throttle.pause(delay)  # every worker waits, not only this one
                else:
                    await asyncio.sleep(delay)
                continue
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

    async def resolve(self, fleet: Fleet | None, item: Item) -> Outcome:
        """Ask (or replay) one item until it parses, running out of re-asks, or fails (`fleet`
        None: replay only)."""
        if self.cache is not None and (outcome := self.cached(item)) is not None:
            return outcome
        messages, params = self.requests.first(item)
        row = self.rows[item.row]
        meta = {"prompt_id": row["prompt_id"], "kind": item.kind, "aspect": item.aspect,
                "completion": item.completion, "seed": self.ann.seed,
                "order": self.requests.order(item) if item.kind != "critique" else None,
                "order_index": item.order}
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
                if fleet is None:  # replay only: this is where spending would start
                    # (--dry-run prices the messages; a real run renders them again when it sends,
                    # rather than hold every unsent request's text at once)
                    return Outcome("pending", value=(messages, params) if self.keep_pending else None,
                                   reasks=reasks)
                try:
                    result = await self.send(fleet, key, messages, params, {**meta, "reask": reasks})
                except BudgetReached:
                    return Outcome("stopped", reasks=reasks)
                if reasks:  # a re-ask sent now, whether the answer it corrects is fresh or replayed
                    self.tally.reasks += 1
                if result is None:
                    return Outcome("failed", reason=self.ledger.failure(key)["reason"], reasks=reasks)
            elif self.count_replays:
                self.tally.replayed += 1
            try:
                value = self.requests.parse(item, result["text"])
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
                continue
            if self.cache is not None:
                self.cache.put(self.requests.item_key(item), key, reasks, value)
            return Outcome("ok", value=value, reasks=reasks)

    def replay_all(self, items: list[Item]) -> list[Outcome]:
        """Each item as far as the ledger answers it, sending nothing ("pending": what to send next)."""
        async def replay() -> list[Outcome]:
            return [await self.resolve(None, item) for item in items]

        return asyncio.run(replay())

    async def run_all(self, items: list[Item], bar, failed_before: int = 0, on_outcome=None) -> dict[Item, Outcome]:
        """Send what `items` still need. `on_outcome(item, outcome)`, when given, receives each
        outcome instead of the returned dict (which stays empty, so a long run holds none of
        them) and returns the items to ask next (permute: a row's extra orders)."""
        outcomes: dict[Item, Outcome] = {}
        failed = [failed_before]
        queue: asyncio.Queue[Item] = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)

        next_postfix = [0.0]

        async def worker(fleet: Fleet) -> None:
            while not queue.empty():
                item = queue.get_nowait()
                outcome = await self.resolve(fleet, item)
                if on_outcome is None:
                    outcomes[item] = outcome
                else:
                    for follow in on_outcome(item, outcome):
                        queue.put_nowait(follow)
                failed[0] += outcome.status == "failed"
                bar.update()
                now = time.monotonic()
                if now < next_postfix[0]:  # built for every item, the postfix cost as much as parsing
                    continue
                next_postfix[0] = now + 0.5
                postfix = {"sent": self.tally.sent, "reasks": self.tally.reasks, "failed": failed[0]}
                if self.price is not None:
                    postfix["spent"] = f"${self.spent_before + self.tally.cost_usd:.4f}"
                bar.set_postfix(postfix, refresh=False)

        async with await self.open_clients():
            await run_workers(max(1, min(self.ann.judge.max_concurrency, len(items))), lambda: worker(self.fleet))
        return outcomes


def _reason_kind(reason: str) -> str:
    """Group parse-failure reasons for the summary: the text before any quoted value."""
    head = reason.split("'")[0].split('"')[0]
    return " ".join(w for w in head.split() if not w.rstrip(":").isdigit())[:80].strip() or reason[:80]


def spent_so_far(ledger: Ledger, price) -> float:
    if price is None:
        return 0.0
    prompt, completion = _token_sums(ledger)
    return (prompt * price.input_per_mtok + completion * price.output_per_mtok) / 1e6




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



def dry_run(run: JudgeRun, items: list[Item]) -> dict:
    calls = tokens_in = tokens_out = 0
    outcomes = dict(zip(items, run.replay_all(items)))
    # permute: the extra orders the ledger already shows to be needed are counted; the others
    # depend on answers not bought yet, and at most one per rated question can follow.
    extras = extra_items(run.requests, items, outcomes)
    outcomes.update(zip(extras, run.replay_all(extras)))
    possible = sum(1 for group in rated_groups(items).values() if _may_need_extra(run.requests, group, outcomes))
    for item, outcome in outcomes.items():
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
    extra_note = (f"; {len(extras)} extra order(s) known to be needed, up to {possible} more if ratings "
                  "disagree" if run.ann.position_debias == "permute" else "")
    print(f"annotate --dry-run: {calls} call(s) to send (of {len(outcomes)} items; re-asks not counted"
          f"{extra_note}), about {tokens_in:,} prompt + {tokens_out:,} completion tokens, "
          + (f"about ${dollars:,.2f}" if dollars is not None else
             f"cost unknown (no price for {run.ann.judge_model!r} in annotation.prices)"))
    return {"calls": calls, "prompt_tokens": tokens_in, "completion_tokens": tokens_out, "cost_usd": dollars,
            "extra_orders_known": len(extras), "extra_orders_possible": possible}


# ---------------------------------------------------------------- several orders (permute)


def rated_groups(items: list[Item]) -> dict[tuple[int, str, str | None], dict[int, Item]]:
    """The rated (non-critique) items by question (row, kind, aspect), then by order index."""
    groups: dict[tuple[int, str, str | None], dict[int, Item]] = {}
    for item in items:
        if item.kind != "critique":
            groups.setdefault((item.row, item.kind, item.aspect), {})[item.order] = item
    return groups


def _per_position(item: Item, value) -> list[dict[str, dict]]:
    """aspect -> parsed annotation, for each shown position of a rated item's answer."""
    return value if item.kind == "compact" else [{item.aspect: parsed} for parsed in value]


def shown_by_completion(requests: Requests, group: dict[int, Item], outcomes: dict,
                        indices) -> list[dict[str, list[dict]]] | None:
    """For each completion of the group's row: aspect -> its annotation in each order of
    `indices`, mapped back through that order; None when one of them has no usable answer."""
    out: list[dict[str, list[dict]]] | None = None
    for index in indices:
        item = group.get(index)
        if item is None or outcomes.get(item) is None or outcomes[item].status != "ok":
            return None
        order = requests.order(item)
        if out is None:
            out = [{} for _ in order]
        for position, shown in enumerate(_per_position(item, outcomes[item].value)):
            for aspect, annotation in shown.items():
                out[order[position]].setdefault(aspect, []).append(annotation)
    return out


def _disagrees(shown: list[dict[str, list[dict]]], gap: float) -> bool:
    return any(not positions.all_agree([a["Rating"] for a in annotations], gap)
               for per_aspect in shown for annotations in per_aspect.values())


def _may_need_extra(requests: Requests, group: dict[int, Item], outcomes: dict) -> bool:
    """An extra order exists for this question and its first orders are not all answered yet."""
    item = next(iter(group.values()))
    asked = orders_asked(requests.ann, len(requests.rows[item.row]["completions"]))
    return (requests.ann.position_debias == "permute" and asked < len(requests.orders(item.row))
            and shown_by_completion(requests, group, outcomes, range(asked)) is None)


def extra_items(requests: Requests, items: list[Item], outcomes: dict) -> list[Item]:
    """permute: one more order for every question whose answers in the first orders disagree
    (by more than max_position_gap) on some completion, where the row has another order. Derived
    from the answers alone, so a resumed run finds the same extra questions in the ledger."""
    ann = requests.ann
    if ann.position_debias != "permute":
        return []
    extras = []
    for (r, kind, aspect), group in rated_groups(items).items():
        asked = orders_asked(ann, len(requests.rows[r]["completions"]))
        if asked >= len(requests.orders(r)) or asked in group:
            continue
        shown = shown_by_completion(requests, group, outcomes, range(asked))
        if shown is not None and _disagrees(shown, ann.max_position_gap):
            extras.append(Item(r, kind, aspect, order=asked))
    return extras



# ---------------------------------------------------------------- assembling rows


def assemble(rows: list[dict], items: list[Item], outcomes: dict, requests: Requests, with_critique: bool):
    """Annotated rows (complete completions only) and the failures: one record per lost item,
    and (permute) one per completion and aspect still inconsistent across orders."""
    by_row: dict[int, list[Item]] = {}
    for item in items:
        by_row.setdefault(item.row, []).append(item)
    out_rows, failures, incomplete = [], [], 0
    for r, row in enumerate(rows):
        out, lost, missing = assemble_row(r, row, by_row.get(r, []), outcomes, requests, with_critique)
        failures += lost
        incomplete += missing
        if out is not None:
            out_rows.append(out)
    return out_rows, failures, incomplete


def item_sort_key(item: Item) -> tuple:
    """Items of one row in the order `plan` makes them (rated before critiques), extra orders
    after the others of their question."""
    return (item.kind == "critique", rubric.ASPECTS.index(item.aspect) if item.aspect else -1, item.order,
            -1 if item.completion is None else item.completion)


def assemble_row(r: int, row: dict, items: list[Item], outcomes: dict, requests: Requests, with_critique: bool):
    """Row `r` annotated from the outcomes of its items (all of them, extra orders included):
    (the row, or None when no completion is complete; its failure records; how many of its
    completions are incomplete). A row needs nothing from any other row, so a stage can write it
    as soon as its own items are done."""
    ann = requests.ann
    permute = ann.position_debias == "permute"
    failures = []
    critiques: dict[int, tuple[str, int]] = {}
    for item in items:
        outcome = outcomes[item]
        if outcome.status != "ok":
            failures.append(item_failure({r: row}, item, outcome))
        elif item.kind == "critique":
            critiques[item.completion] = outcome.value
    n = len(row["completions"])
    annotations = [empty_annotations() for _ in range(n)]
    debiased = [_empty_position_record() for _ in range(n)] if permute else []
    asked = orders_asked(ann, n)
    if not permute:  # one order per question: each answer maps straight back (the common case, kept cheap)
        for item in items:
            outcome = outcomes[item]
            if item.kind != "critique" and outcome.status == "ok":
                order = requests.order(item)
                for position, shown in enumerate(_per_position(item, outcome.value)):
                    annotations[order[position]].update(shown)
    for group in (rated_groups(items).values() if permute else ()):
        shown = shown_by_completion(requests, group, outcomes, range(asked))
        if shown is None:  # an order without a usable answer: its failure is recorded above
            continue
        extra = shown_by_completion(requests, group, outcomes, [asked]) if asked in group else None
        for c in range(n):
            for aspect, per_order in shown[c].items():
                ratings = [a["Rating"] for a in per_order]
                consistent = positions.all_agree(ratings, ann.max_position_gap)
                if not consistent:
                    if extra is not None:
                        ratings.append(extra[c][aspect][0]["Rating"])
                    consistent = positions.majority_agrees(ratings, ann.max_position_gap)
                combined = positions.combine(ratings)
                # Rationales and types are the first order's (the order `shuffle` shows).
                annotations[c][aspect] = {**per_order[0], "Rating": combined["rating"]}
                record = debiased[c]
                record["ratings"][aspect] = ratings
                record["mean"][aspect] = combined["mean"]
                record["spread"][aspect] = combined["spread"]
                if not consistent:
                    record["inconsistent"].append(aspect)
                    failures.append({
                        "prompt_id": row["prompt_id"], "kind": group[0].kind, "aspect": aspect,
                        "completion": c, "status": "inconsistent", "ratings": ratings,
                        "reason": f"ratings {ratings} in {len(ratings)} orders: no majority of them lies "
                                  f"within max_position_gap={ann.max_position_gap:g}; kept as their mean"})
    completions = []
    incomplete = 0
    for c, completion in enumerate(row["completions"]):
        have = [a for a in rubric.ASPECTS if annotations[c][a]["Rating"] is not None]
        critique = critiques.get(c)
        if len(have) < len(rubric.ASPECTS) or (with_critique and critique is None):
            incomplete += 1
            continue
        if permute:  # the unrounded means, not the rounded ratings of the public fields
            ratings = [m for m in debiased[c]["mean"].values() if m is not None]
        else:
            ratings = [int(annotations[c][a]["Rating"]) for a in rubric.ASPECTS
                       if annotations[c][a]["Rating"] != "N/A"]
        feedback, score = critique if critique is not None else ("", None)
        completions.append({
            **{k: completion.get(k) for k in ("custom_system_prompt", "model", "principle", "response")},
            "annotations": annotations[c],
            "critique": feedback,
            "overall_score": float(score) if score is not None else None,
            "fine-grained_score": sum(ratings) / len(ratings) if ratings else None,
            **({"position_debias": debiased[c]} if permute else {}),
        })
    if not completions:
        return None, failures, incomplete
    return ({"prompt_id": row["prompt_id"], "source": row["source"], "instruction": row["instruction"],
             "models": [c["model"] for c in completions], "completions": completions,
             "correct_answers": row["correct_answers"], "incorrect_answers": row["incorrect_answers"],
             "reference": row["reference"]}, failures, incomplete)


def item_failure(rows: list[dict], item: Item, outcome: Outcome) -> dict:
    """The failures.jsonl line of an item without a usable answer."""
    return {"prompt_id": rows[item.row]["prompt_id"], "kind": item.kind, "aspect": item.aspect,
            "completion": item.completion, "order_index": item.order, "status": outcome.status,
            "reason": outcome.reason}


def _empty_position_record() -> dict:
    return {"ratings": {a: [] for a in rubric.ASPECTS}, "mean": {a: None for a in rubric.ASPECTS},
            "spread": {a: None for a in rubric.ASPECTS}, "inconsistent": []}
