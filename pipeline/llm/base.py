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


def make_backend(spec) -> Backend:
    """Build the backend a pool entry (pipeline.config.ModelSpec) asks for."""
    if spec.backend == "hf":
        from pipeline.llm.hf import HFBackend

        return HFBackend(spec)
    if spec.backend == "openai":
        from pipeline.llm.openai_backend import OpenAIBackend

        return OpenAIBackend(spec)
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
