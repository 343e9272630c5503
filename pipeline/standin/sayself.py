"""The stand-in server's answers to the SaySelf stages' prompts: fixed rules, NOT a model.

Two kinds of request are recognised (anything else gets ordinary generated text):

Rationale request (`sayself-rationale`; template pipeline/judge/templates/sayself/rationale-v1.jinja)
    recognised by   the first user message's first line, "Self-reflection request: sayself-rationale v1".
    read            the answer blocks between "[[ANSWER n NONCE]]" and "[[END n NONCE]]", the nonce
                    taken from the last marker before the final "## How to answer" heading (so text
                    inside a block cannot move the blocks' boundaries); each block's answer is
                    its "Answer:" line (pipeline.methods.sayself.parse_answer), else its last line.
    answer          "I am not sure whether the answer is A or B[ or C]; I do not reliably remember
                    the fact that decides between them." with the distinct answers (normalised,
                    first three, in block order); one distinct answer: "I am not sure that my
                    reasoning towards A holds; ...". A prompt it cannot read gets generated text.

Chain request (`sayself-sample`: a user message ending in pipeline.methods.sayself.CHAIN_INSTRUCTION)
    candidates      the option letters when the message lists options ("A. ..." lines), else up
                    to four content words of the question (the stand-in knows no facts, so its
                    open answers are practically always wrong).
    pick            a favourite candidate per question (from a hash of the message); greedy
                    (temperature 0) always answers it; sampling answers it with probability equal
                    to the model's quality level (textgen.model_quality: standin-strong 0.85,
                    standin-medium 0.55, standin-weak 0.20) and otherwise a candidate drawn
                    uniformly, from (model, message, seed, choice index). The favourite is
                    unrelated to the gold answer, so agreement with the gold varies by question.
    answer          "Reasoning: (stand-in rule) Of what I can tell, X fits the question best.\n
                    Answer: X".
"""

from __future__ import annotations

import hashlib
import re

from pipeline.methods.sayself import CHAIN_INSTRUCTION, normalise_answer, parse_answer
from pipeline.standin.rating import content_words
from pipeline.standin.textgen import message_text, model_quality

RATIONALE_HEADER = "Self-reflection request: sayself-rationale v1"
_HOW_TO_ANSWER = "\n## How to answer"
_END = re.compile(r"(?m)^\[\[END (\d+) ([0-9a-f]+)\]\][ \t]*$")
_OPTION = re.compile(r"(?m)^([A-Z])\. \S")


def _unit(*parts) -> float:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _user_texts(messages) -> list[str]:
    if not isinstance(messages, list):
        return []
    return [message_text(m.get("content")) for m in messages if isinstance(m, dict) and m.get("role") == "user"]


def rationale_answers(prompt: str) -> list[str] | None:
    """The answers of the blocks of a rationale request, or None when it cannot be read."""
    prompt = prompt.replace("\r\n", "\n")
    cut = prompt.rfind(_HOW_TO_ANSWER)
    if cut < 0:
        return None
    ends = list(_END.finditer(prompt[:cut]))
    if not ends:
        return None
    last, nonce = int(ends[-1].group(1)), ends[-1].group(2)
    answers = []
    for n in range(1, last + 1):
        block = re.search(rf"(?ms)^\[\[ANSWER {n} {nonce}\]\][^\n]*\n(.*?)^\[\[END {n} {nonce}\]\]", prompt[:cut])
        if block is None:
            return None
        text = block.group(1).strip()
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        answer = parse_answer(text) or (lines[-1] if lines else "")
        if answer:
            answers.append(answer)
    return answers or None


def rationale_reply(messages) -> str | None:
    users = _user_texts(messages)
    if not users or users[0].lstrip().split("\n", 1)[0].strip() != RATIONALE_HEADER:
        return None
    answers = rationale_answers(users[0])
    if answers is None:
        return None
    distinct: dict[str, str] = {}
    for a in answers:
        distinct.setdefault(normalise_answer(a) or a, a)
    shown = list(distinct.values())[:3]
    tail = "; I do not reliably remember the fact that decides between them."
    if len(shown) == 1:
        return f"I am not sure that my reasoning towards {shown[0]} holds" + tail.replace("between them", "it")
    return "I am not sure whether the answer is " + ", ".join(shown[:-1]) + f" or {shown[-1]}" + tail


def chain_reply(messages, model: str, temperature: float, seed, index: int) -> str | None:
    users = _user_texts(messages)
    if not users or not users[-1].rstrip().endswith(CHAIN_INSTRUCTION):
        return None
    question = users[-1].rstrip()[: -len(CHAIN_INSTRUCTION)]
    candidates = _OPTION.findall(question) or content_words(question)[:4] or ["unknown"]
    favourite = candidates[int(_unit("favourite", question) * len(candidates))]
    pick = favourite
    if temperature > 0 and _unit("keep", model, question, seed, index) >= model_quality(model):
        pick = candidates[int(_unit("draw", model, question, seed, index) * len(candidates))]
    return f"Reasoning: (stand-in rule) Of what I can tell, {pick} fits the question best.\nAnswer: {pick}"


def reply(messages, model: str, temperature: float, seed, index: int = 0) -> tuple[str, str] | None:
    """(kind, answer text) for a SaySelf request, else None."""
    text = rationale_reply(messages)
    if text is not None:
        return "sayself-rationale", text
    text = chain_reply(messages, model, temperature, seed, index)
    if text is not None:
        return "sayself-chain", text
    return None
