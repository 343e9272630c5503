"""The stand-in server's answer to a single-answer grade request (the `evaluate` stage's MT-bench
grading; template pipeline/judge/templates/grade/single-v1.jinja): a fixed rule, NOT a model.

recognised by   the first user message's first line, `pipeline.judge.grade.GRADE_HEADER`.
read            the turns between "[[TURN n ROLE NONCE]]" and "[[END n NONCE]]" for n = 1..N, the
                nonce taken from the last marker line before the final "## How to answer" heading
                (so nothing inside a turn can move the boundaries), and the reference answer
                between "[[REFERENCE NONCE]]" and "[[END REFERENCE NONCE]]" when there is one.
graded          the last turn (an assistant's) as an answer to the user turn before it:
                grade = `rate(question, answer, reference)["overall"]` (pipeline/standin/rating.py,
                1-10), the rule the annotate judge's critiques use. So an answer that covers the
                question's words, has a sensible length and some structure grades higher, and
                grade-like text inside the answer ("Rating: [[10]]") is cut out and costs points.
answer          "Stand-in rule (a fixed rule, not a model): ..." and a last line "Rating: [[N]]".
                A prompt it cannot read gets ordinary generated text (which then fails to parse).
"""

from __future__ import annotations

import re

from pipeline.judge.grade import GRADE_HEADER
from pipeline.standin.rating import features, rate_features
from pipeline.standin.textgen import message_text

_HOW_TO_ANSWER = "\n## How to answer"
_LAST_MARKER = re.compile(r"(?m)^\[\[END (?:\d+|REFERENCE) ([0-9a-f]+)\]\][ \t]*$")


def read_prompt(prompt: str) -> tuple[list[tuple[str, str]], str | None] | None:
    """([(role, text), ...], reference) of a grade request, or None when it cannot be read."""
    prompt = prompt.replace("\r\n", "\n")
    cut = prompt.rfind(_HOW_TO_ANSWER)
    if cut < 0:
        return None
    head = prompt[:cut]
    markers = list(_LAST_MARKER.finditer(head))
    if not markers:
        return None
    nonce = markers[-1].group(1)
    turns = []
    for m in re.finditer(rf"(?ms)^\[\[TURN (\d+) (USER|ASSISTANT) {nonce}\]\]\n(.*?)\n^\[\[END \1 {nonce}\]\]", head):
        if int(m.group(1)) != len(turns) + 1:
            return None
        turns.append((m.group(2).lower(), m.group(3)))
    if len(turns) < 2 or turns[-1][0] != "assistant" or turns[-2][0] != "user":
        return None
    ref = re.search(rf"(?ms)^\[\[REFERENCE {nonce}\]\]\n(.*?)\n^\[\[END REFERENCE {nonce}\]\]", head)
    return turns, ref.group(1) if ref else None


def reply(messages) -> str | None:
    if not isinstance(messages, list):
        return None
    users = [message_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users or users[0].lstrip().split("\n", 1)[0].strip() != GRADE_HEADER:
        return None
    read = read_prompt(users[0])
    if read is None:
        return None
    turns, reference = read
    f = features(turns[-2][1], turns[-1][1], reference)
    grade = rate_features(f)["overall"]
    notes = [f"Stand-in rule (a fixed rule, not a model): the reply uses about {round(100 * f['coverage'])}% "
             f"of the question's key words in {f['words']} words."]
    if f["reference_overlap"] is not None:
        notes.append(f"It shares about {round(100 * f['reference_overlap'])}% of the reference answer's key words.")
    if f["rating_text"]:
        notes.append("It contains grade-like text aimed at the grader, which was ignored and counts against it.")
    return " ".join(notes) + f"\nRating: [[{grade}]]"
