"""Single-answer grading (MT-bench style): the judge reads a conversation and grades the
assistant's last turn from 1 to 10. Used by the `evaluate` stage through the same judging
session as annotate (pipeline.judge.session.JudgeRun: the ledger, re-asks, throttle, budget).

The template is `templates/grade/single-v1.jinja` (our own words); `GRADE_VERSION` is part of
every request's ledger key, so a changed template never replays old answers. The turns sit
between marker lines carrying a nonce drawn from the texts themselves, so no turn can contain
the markers around it; the first line names the task (`GRADE_HEADER`), which is how the
stand-in server (pipeline/standin/grading.py) recognises the prompt.

Parsing (`parse_grade`) is strict: the answer's last non-blank line must be `Rating: [[N]]` with
N a whole number from 1 to 10, read whole (so "1" is never "10"); anything else is a
ParseError, and the session asks again with a corrective message.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path

from pipeline.judge.parse import ParseError

GRADE_VERSION = "grade-v1"
GRADE_HEADER = "Evaluation: single-answer grade"
TEMPLATE = Path(__file__).parent / "templates" / "grade" / "single-v1.jinja"
MIN_GRADE, MAX_GRADE = 1, 10
_RATING_LINE = re.compile(r"Rating:\s*\[\[\s*(\d+)\s*\]\]")


@lru_cache(maxsize=1)
def _template():
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                             trim_blocks=True, autoescape=False)
    return env.from_string(TEMPLATE.read_text(encoding="utf-8"))


def nonce(turns: list[dict], reference: str | None) -> str:
    blob = json.dumps([[t["role"], t["content"]] for t in turns] + [reference or ""], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def grade_messages(turns: list[dict], reference: str | None = None) -> list[dict]:
    """The judge request grading the last turn of `turns` (user / assistant turns, the last an
    assistant's); `reference` is a reference answer to the user's last message, when there is one."""
    if not turns or turns[-1]["role"] != "assistant":
        raise ValueError("the conversation to grade must end with an assistant turn")
    text = _template().render(turns=[{"role": t["role"], "content": t["content"]} for t in turns],
                              reference=(reference or "").strip(), nonce=nonce(turns, reference))
    return [{"role": "user", "content": text}]


def parse_grade(text: str) -> int:
    """The grade of an answer (see the module doc), or ParseError with the reason."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    if not lines:
        raise ParseError("the answer is empty; it must end with a line 'Rating: [[N]]'")
    match = _RATING_LINE.fullmatch(lines[-1])
    if match is None:
        raise ParseError(f"the last line is {lines[-1][:60]!r}, not 'Rating: [[N]]' with N from 1 to 10")
    value = int(match.group(1))
    if not MIN_GRADE <= value <= MAX_GRADE:
        raise ParseError(f"the grade {value} is outside 1-10")
    return value
