"""The one small protocol every generation backend follows.

A backend turns chat requests into texts. It never decides what is cached or retried at the
stage level: the caller gives it only requests whose keys are not in the ledger yet, and it
reports each outcome through a callback *as soon as it is known*, so the caller can make it
durable before the next one arrives. That is what lets a killed run lose only in-flight work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence


@dataclass(frozen=True)
class GenRequest:
    key: str  # ledger key of this request (see pipeline.ledger.request_key)
    messages: tuple[dict, ...]  # chat turns, e.g. ({"role": "system", ...}, {"role": "user", ...})
    params: dict = field(default_factory=dict)  # temperature, top_p, max_new_tokens, seed


@dataclass(frozen=True)
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


OnDone = Callable[[GenRequest, GenResult], None]
OnError = Callable[[GenRequest, str], None]


class Backend(Protocol):
    def identity(self) -> dict:
        """What identifies the model in a request key (never batch size or concurrency)."""

    def generate(self, requests: Sequence[GenRequest], on_done: OnDone, on_error: OnError) -> None:
        """Run every request; call exactly one of on_done / on_error per request."""

    def close(self) -> None:
        """Release the model (the hf backend keeps one model in memory at a time)."""


def make_backend(spec, where: str | None = None, dry_run: bool = False) -> Backend:
    """Build the backend a pool entry (pipeline.config.ModelSpec) asks for. `where`: its recipe
    key (named in messages); `dry_run`: an openai backend that only plans (no client, no key)."""
    if spec.backend == "hf":
        from pipeline.llm.hf import HFBackend

        return HFBackend(spec)
    if spec.backend == "openai":
        from pipeline.llm.openai_backend import OpenAIBackend

        return OpenAIBackend(spec, where=where, dry_run=dry_run)
    raise ValueError(f"unknown backend {spec.backend!r}")


def generate_all(backend: Backend, requests: Sequence[GenRequest], what: str) -> list[str]:
    """Every request's text, in order, then the backend closed; any failure fails the stage
    (evaluations need every answer: a missing one would change the metric silently)."""
    from pipeline.runs import StageFailed

    texts: dict[str, str] = {}
    errors: list[str] = []
    try:
        backend.generate(requests, lambda req, res: texts.__setitem__(req.key, res.text),
                         lambda req, reason: errors.append(reason))
    finally:
        backend.close()
    if errors:
        raise StageFailed(f"{what}: {len(errors)} of {len(requests)} failed, first: {errors[0]}")
    return [texts[r.key] for r in requests]


def ledgered_generate(backend: Backend, requests: Sequence[GenRequest], ledger, desc: str, *, unit: str = "req",
                      tags: Callable[[GenRequest], dict] = lambda req: {},
                      check: Callable[[str], object] | None = None, close: bool = True,
                      stage: str | None = None) -> dict:
    """Send `requests` and record each outcome in `ledger` the moment it completes: ok (text, token
    counts, finish reason) or failure (reason), with `tags(req)` as extra ledger fields. `check(text)`
    raising ValueError turns an answer into a recorded failure that keeps the raw answer. A progress
    bar shows failures and tokens/s. Returns {"failed": n, "tokens": completion tokens}.

    A paid backend (one with a `meter`, pipeline.llm.spend) has every record tagged `billed_to`
    its name, starts from what the ledger shows it spent in earlier runs, and raises
    BudgetReached (after the answers it did get are recorded) when its budget kept requests back."""
    import time

    from tqdm import tqdm

    meter = getattr(backend, "meter", None)
    if meter is not None:
        meter.begin(ledger.billed(meter.name))
        tags = (lambda req, _tags=tags, _name=meter.name: {**_tags(req), "billed_to": _name})

    bar = tqdm(total=len(requests), desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5)
    tally = {"failed": 0, "tokens": 0}
    started = time.monotonic()

    def on_done(req: GenRequest, result: GenResult) -> None:
        raw = {"text": result.text, "prompt_tokens": result.prompt_tokens,
               "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason}
        try:
            if check is not None:
                check(result.text)
        except ValueError as err:
            ledger.record_failure(req.key, str(err), raw=raw, **tags(req))
            tally["failed"] += 1
        else:
            ledger.record_ok(req.key, raw, **tags(req))
            tally["tokens"] += result.completion_tokens
        # refresh=False: a forced redraw per answer would bypass mininterval and flood a log file
        bar.set_postfix(failed=tally["failed"], refresh=False,
                        tok_s=f"{tally['tokens'] / max(time.monotonic() - started, 1e-9):.0f}")
        bar.update()

    def on_error(req: GenRequest, reason: str) -> None:
        ledger.record_failure(req.key, reason, **tags(req))
        tally["failed"] += 1
        bar.set_postfix(failed=tally["failed"], refresh=False)
        bar.update()

    try:
        backend.generate(list(requests), on_done, on_error)
    finally:
        if close:
            backend.close()  # one hf model in memory at a time
        bar.close()
    if meter is not None and meter.stopped:
        from pipeline.llm.spend import BudgetReached

        raise BudgetReached(meter.stop_message(stage or desc.split()[0]))
    return tally
