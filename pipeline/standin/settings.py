"""Settings of the stand-in server, and the table that maps each setting to its CLI flag.

Kept free of third-party imports so that `pipeline.standin` (and its `start_standin` helper)
stays cheap to import: the aiohttp server code lives in `server.py` and is loaded only when
needed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class StandinSettings:
    latency_s: float = 0.0  # sleep added to every chat request
    latency_jitter_s: float = 0.0  # plus a deterministic extra in [0, jitter)
    max_concurrency: int = 64  # chat requests above this many wait their turn (FIFO)
    # Fault injection. Each chat attempt draws one number u in [0, 1) from
    # (seed, body hash, attempt number of that body) and takes the first band it falls in:
    # [0, fail_timeout) -> slow answer, then fail_429, then fail_5xx; otherwise a normal answer.
    fail_5xx: float = 0.0
    fail_429: float = 0.0
    retry_after_s: float = 1.0  # value of the Retry-After header on injected 429s
    fail_timeout: float = 0.0
    timeout_sleep_s: float = 30.0  # how long a "timeout" answer sleeps before it is sent
    fail_first_n: int = 0  # the first n attempts of every distinct body get a 500
    # Judge prompts only: the share of attempts whose answer is deliberately unusable (a rating
    # out of range, a missing or duplicated block, invalid JSON, ...). Drawn separately from
    # the bands above, from (seed, body hash, attempt), and only when no other fault hit.
    fail_malformed: float = 0.0
    # Position bias of the judge (aspect and compact prompts only; a critique shows one text).
    # Every aspect rating of the text shown at 0-based position i is moved by
    # (position_bonus_first if i == 0 else 0) - position_penalty * i, then rounded half up and
    # clipped to 1-5. Off (0) by default; it lets a test show what annotation.position_debias
    # removes, as real judges favour some positions (arXiv 2305.17926, 2406.07791).
    position_bonus_first: float = 0.0
    position_penalty: float = 0.0
    seed: int = 0  # seeds the fault draws and the jitter (not the generated texts)
    # Batches (/v1/batches): how long a batch stays in progress (its lines are spread over this
    # time), and, when > 0, how many lines are answered before the batch "expires" with
    # partial results. Fault probabilities apply per line (5xx and malformed; no 429/timeout).
    batch_delay_s: float = 0.0
    batch_expire_after: int = 0


# Field name -> CLI flag. One table so the CLI and start_standin() cannot drift apart.
FLAG_FOR_FIELD = {
    "latency_s": "--latency",
    "latency_jitter_s": "--latency-jitter",
    "max_concurrency": "--max-concurrency",
    "fail_5xx": "--fail-5xx",
    "fail_429": "--fail-429",
    "retry_after_s": "--retry-after",
    "fail_timeout": "--fail-timeout",
    "timeout_sleep_s": "--timeout-sleep",
    "fail_first_n": "--fail-first-n",
    "fail_malformed": "--fail-malformed",
    "position_bonus_first": "--position-bonus-first",
    "position_penalty": "--position-penalty",
    "seed": "--seed",
    "batch_delay_s": "--batch-delay",
    "batch_expire_after": "--batch-expire-after",
}

FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(StandinSettings)}
PROBABILITY_FIELDS = ("fail_5xx", "fail_429", "fail_timeout", "fail_malformed")


def check_value(name: str, value):
    """Return `value` converted to the type of setting `name`; raise ValueError if it does not fit.

    Used by the CLI, the /standin/config endpoint and start_standin, so all three refuse the
    same things with the same message.
    """
    if name not in FIELD_TYPES:
        raise ValueError(f"unknown stand-in setting {name!r} (known: {', '.join(FIELD_TYPES)})")
    kind = FIELD_TYPES[name]
    if isinstance(value, bool):  # bool is an int subclass; True as a latency is a mistake
        raise ValueError(f"setting {name!r} must be a number, got {value!r}")
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ValueError(f"setting {name!r} must be an integer, got {value!r}")
    else:
        if not isinstance(value, (int, float)):
            raise ValueError(f"setting {name!r} must be a number, got {value!r}")
        value = float(value)
    if name in PROBABILITY_FIELDS and not 0.0 <= value <= 1.0:
        raise ValueError(f"setting {name!r} is a probability and must lie in [0, 1], got {value}")
    if name == "max_concurrency" and value < 1:
        raise ValueError(f"setting 'max_concurrency' must be at least 1, got {value}")
    if name != "seed" and value < 0:
        raise ValueError(f"setting {name!r} must not be negative, got {value}")
    return value


def updated(settings: StandinSettings, fields: dict) -> StandinSettings:
    """A copy of `settings` with `fields` applied; every field is checked before any is applied."""
    checked = {name: check_value(name, value) for name, value in fields.items()}
    return dataclasses.replace(settings, **checked)
