"""Spending controls for paid models (`backend: openai`): throttle, tokens and dollars, budget, plan.

One mechanism for every stage that sends calls through `pipeline.llm.openai_backend`
(generate, sayself-sample, sayself-rationale, unknown-eval); the fields live on the model spec
(`pipeline.config.ModelSpec`: `requests_per_minute`, `tokens_per_minute`, `price`, `budget_usd`).
Annotate and evaluate send through the judge session, which has its own copy of the same controls
on `annotation` / `grading`.

- The throttle (pipeline.llm.throttle) is acquired before every attempt, with the prompt's
  estimate plus `max_new_tokens` as the request's tokens.
- Tokens come from each answer's `usage` (an estimate when a server sends none); dollars are
  those tokens at `price`.
- The budget covers every run: what the stage's ledger records as billed to this model when a
  batch of requests starts, plus this batch. Before a request is sent, its worst case (prompt
  estimate, all of `max_new_tokens`) is reserved; when spent + reserved + that worst case would
  pass `budget_usd`, it and every request after it stay unsent and the stage stops with
  `BudgetReached` (answers already paid for are in the ledger; nothing else is written).
- `dry_run_plan` counts what a stage would still send, without a client or an API key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.llm.throttle import Throttle
from pipeline.runs import StageFailed

DEFAULT_MAX_TOKENS = 1024  # a request without max_new_tokens: what we assume it may cost


def estimate_tokens(messages) -> int:
    """A cheap upper-side estimate (about four characters a token) for throttling and --dry-run."""
    return sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)


def dollars(price, prompt: int, completion: int) -> float | None:
    if price is None:
        return None
    return (prompt * price.input_per_mtok + completion * price.output_per_mtok) / 1e6


class BudgetReached(StageFailed):
    """The stage stopped before a model's budget would be passed (CLI exit code 1)."""


@dataclass
class Meter:
    """One paid model's throttle, tally and budget; `where` is its recipe key (for messages)."""

    spec: object
    where: str
    throttle: Throttle = field(init=False)
    spent_before: float = 0.0  # the ledger's record when this batch started (all earlier calls)
    sent: int = 0  # HTTP requests sent this run (attempts, retries included)
    prompt_tokens: int = 0  # this run
    completion_tokens: int = 0
    batch_cost: float = 0.0  # this batch, what spent_before does not hold yet
    reserved: float = 0.0  # worst cases of the requests in flight
    unsent: int = 0  # requests the budget kept back in this batch

    def __post_init__(self) -> None:
        self.throttle = Throttle(self.spec.requests_per_minute, self.spec.tokens_per_minute)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def price(self):
        return self.spec.price

    def begin(self, billed: dict) -> None:
        """A new batch of requests; `billed` is the ledger's {calls, prompt, completion} for this model."""
        self.spent_before = dollars(self.price, billed["prompt"], billed["completion"]) or 0.0
        self.batch_cost = self.reserved = 0.0
        self.unsent = 0

    @property
    def stopped(self) -> bool:
        return self.unsent > 0

    @property
    def cost_usd(self) -> float | None:
        return dollars(self.price, self.prompt_tokens, self.completion_tokens)

    async def admit(self, messages, params: dict) -> float | None:
        """Wait for the throttle, then reserve the request's worst-case cost; None: the budget
        would be passed (the request must not be sent)."""
        prompt = estimate_tokens(messages)
        most = int(params.get("max_new_tokens") or DEFAULT_MAX_TOKENS)
        if self.stopped:
            return None
        await self.throttle.acquire(prompt + most)
        worst = dollars(self.price, prompt, most) or 0.0
        budget = self.spec.budget_usd
        if self.stopped or (budget is not None
                            and self.spent_before + self.batch_cost + self.reserved + worst > budget):
            return None
        self.reserved += worst
        return worst

    def settle(self, reserved: float, usage: dict | None, messages, text: str | None) -> tuple[int, int]:
        """Free a request's reservation and count what it used: (prompt, completion) tokens."""
        self.reserved -= reserved
        if usage is None:  # no answer (an error): nothing billed
            return 0, 0
        prompt = int(usage.get("prompt_tokens") or 0) or estimate_tokens(messages)
        completion = int(usage.get("completion_tokens") or 0) or len(text or "") // 4
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.batch_cost += dollars(self.price, prompt, completion) or 0.0
        return prompt, completion

    def stop_message(self, stage: str) -> str:
        spent = self.spent_before + self.batch_cost
        return (f"{stage}: {self.where}.budget_usd={self.spec.budget_usd} would be passed (${spent:.4f} spent on "
                f"{self.name!r} in all runs); {self.unsent} request(s) not sent, every answer paid for is kept in "
                f"the ledger and nothing else was written. Raise {self.where}.budget_usd and rerun to continue.")

    def summary(self, billed: dict) -> dict:
        """This run's and all runs' (the ledger's `billed`) calls, tokens and dollars."""
        return {
            "requests_sent": self.sent, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": _round(self.cost_usd),
            "calls_all_runs": billed["calls"], "prompt_tokens_all_runs": billed["prompt"],
            "completion_tokens_all_runs": billed["completion"],
            "cost_usd_all_runs": _round(dollars(self.price, billed["prompt"], billed["completion"])),
            "budget_usd": self.spec.budget_usd, "throttled_waits": self.throttle.waits,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def spend_summary(backends: dict, ledger) -> dict:
    """Per paid model (those with a meter) of a stage: its Meter.summary against `ledger`."""
    return {name: b.meter.summary(ledger.billed(name)) for name, b in backends.items()
            if getattr(b, "meter", None) is not None}


def dry_run_plan(stage: str, todo: list, billed: dict) -> dict:
    """Print and return, per model, what is still to send: `todo` holds (model spec, its pending
    requests (GenRequest)) pairs, `billed` is `pipeline.ledger.billed_tokens` of the stage's ledgers.
    Completion tokens are counted at `max_new_tokens` (an upper bound)."""
    plan, total_calls, total_cost, unknown = {}, 0, 0.0, []
    for spec, requests in todo:
        prompt = sum(estimate_tokens(r.messages) for r in requests)
        completion = sum(int(r.params.get("max_new_tokens") or DEFAULT_MAX_TOKENS) for r in requests)
        paid = spec.backend == "openai"
        price = spec.price if paid else None
        before = billed.get(spec.name) or {"calls": 0, "prompt": 0, "completion": 0}
        cost = dollars(price, prompt, completion) if paid else 0.0
        spent = dollars(price, before["prompt"], before["completion"])
        plan[spec.name] = {"backend": spec.backend, "calls": len(requests), "prompt_tokens": prompt,
                           "completion_tokens_at_most": completion, "cost_usd_at_most": _round(cost),
                           "spent_usd_all_runs": _round(spent), "budget_usd": spec.budget_usd}
        total_calls += len(requests)
        if cost is None:
            unknown.append(spec.name)
        else:
            total_cost += cost
        how = ("local hf model, unpaid" if not paid else
               f"at most ${cost:,.4f}" if cost is not None else "cost unknown (no price)")
        budget = "" if spec.budget_usd is None else f"; ${spent or 0:,.4f} of budget ${spec.budget_usd} spent"
        print(f"{stage} --dry-run: {spec.name}: {len(requests)} call(s) to send, about {prompt:,} prompt + "
              f"at most {completion:,} completion tokens, {how}{budget}")
    print(f"{stage} --dry-run: {total_calls} call(s) in all, at most ${total_cost:,.4f}"
          + (f" plus {', '.join(unknown)} (no price)" if unknown else "") + "; nothing sent, nothing written")
    return {"calls": total_calls, "cost_usd_at_most": _round(total_cost), "models": plan}
