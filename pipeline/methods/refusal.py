"""Refusal detection shared by the evaluations (`unknown-eval`, `rtuning-eval`): does an answer
decline to answer, say it does not know, or say the thing asked about does not exist?

Keyword patterns cannot read intent, so they aim at explicit statements; a bare negation is not
a refusal ("There is no doubt that Paris is the capital", "No, the Earth is not flat").
"""

from __future__ import annotations

import re

# (pattern, what it catches). Matched case-insensitively on the answer with curly quotes made
# straight; the first pattern that matches is recorded in eval.json.
REFUSAL_PATTERNS: list[tuple[str, str]] = [
    (r"\bi (?:do not|don'?t|really don'?t) know\b", "not knowing: I don't know"),
    (r"\bi(?:'m| am) not (?:sure|certain|aware)\b", "uncertainty: I'm not sure / certain / aware"),
    (r"\bi(?:'m| am) (?:unable|not able) to\b", "inability: I am unable to"),
    (r"\bi (?:cannot|can'?t|can not|could not|couldn'?t) (?:answer|say|determine|tell|know|find|"
     r"provide|confirm|verify|identify|locate)\b", "inability: I cannot answer / say / find ..."),
    (r"\b(?:cannot|can'?t|can not) be (?:answered|determined|known|verified)\b", "cannot be answered / known"),
    (r"\b(?:it is|it's) (?:impossible|not possible) to (?:know|say|tell|determine|answer)\b",
     "impossible to know / say"),
    (r"\bno one (?:knows|can know|can say)\b|\bnobody knows\b", "nobody knows"),
    (r"\b(?:hard|difficult) to (?:say|tell|know)\b", "hedge: hard to say / tell"),
    (r"\bi (?:have|had|'ve) no (?:information|knowledge|idea|record|data)\b|\bi have no way of knowing\b",
     "no information on my side"),
    (r"\b(?:not enough|insufficient|no reliable) (?:information|data|evidence)\b", "not enough information"),
    (r"\bi(?:'m| am) not familiar with\b|\bi (?:have not|haven'?t) heard of\b|\bnot aware of any\b",
     "not familiar with the thing asked about"),
    (r"\bthere (?:is|are|was|were|'s) no (?:such|known|record|records|evidence|information|data|"
     r"way to know|reliable|definitive|documented)\b", "there is no such / no record / no known ..."),
    (r"\bno such\b", "no such thing"),
    (r"\b(?:does|do|did) not (?:actually )?exist\b|\b(?:doesn'?t|don'?t|didn'?t) (?:actually )?exist\b|"
     r"\bnever existed\b|\bnon-?existent\b", "does not exist"),
    (r"\b(?:is|are|was|seems to be|appears to be) (?:fictional|fictitious|made[- ]up|not real|"
     r"unknown|unanswerable|not known)\b", "fictional / unknown / unanswerable"),
    (r"\b(?:false|mistaken|incorrect|flawed) (?:premise|assumption)\b", "false premise"),
    (r"\bunable to (?:answer|find|determine|verify|provide)\b", "unable to answer / find"),
    (r"\bi(?:'m| am) unsure\b", "uncertainty: I am unsure"),
    (r"\bi (?:do not|don'?t) have (?:the|enough|any) (?:knowledge|information)\b",
     "no knowledge: I don't have the knowledge"),
    (r"\bbeyond (?:what i know|my knowledge)\b|\bwon'?t guess\b", "beyond what I know / won't guess"),
]
_REFUSAL_RES = [(re.compile(p, re.IGNORECASE), p) for p, _ in REFUSAL_PATTERNS]



def _normalise(text: str | None) -> str:
    return (text or "").replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")


def detect_refusal(answer: str | None) -> str | None:
    """The first refusal pattern (its regex text) that matches `answer`, or None."""
    text = _normalise(answer)
    for regex, pattern in _REFUSAL_RES:
        if regex.search(text):
            return pattern
    return None
