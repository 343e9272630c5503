"""Shared pieces of the SaySelf stages: the answer format, its parser, the confidence target and the
RL reward (facts: ../shared/METHODS.md, SaySelf).

A SaySelf response is four labelled lines, in this order (the last two may be left out by the
ablation variants of `sayself-data`):

    Reasoning: <one or more sentences>
    Answer: <the final answer>
    Self-reflection: <first person: which knowledge the model is unsure of>
    Confidence: <integer 1-10>

Sampled chains (`sayself-sample`) are asked for the first two lines only. Parsing is strict about
labels (case-insensitive, at a line start) and lenient about spacing; an answer or a confidence
that cannot be read is None, never a guess.
"""

from __future__ import annotations

import re
import string

from pipeline.config import ConfigError, ModelSpec
from pipeline.methods.rtuning import question_text

REASONING, ANSWER, REFLECTION, CONFIDENCE = "Reasoning:", "Answer:", "Self-reflection:", "Confidence:"
CONFIDENCE_RANGE = (1, 10)

# What the model is asked, after the question, when it samples chains and when it is trained.
CHAIN_INSTRUCTION = "Reply in two lines: Reasoning: <brief>, then Answer: <final answer>."
SAYSELF_INSTRUCTION = ("Reply in four lines: Reasoning: <brief>, Answer: <final answer>, "
                       "Self-reflection: <what you are unsure of>, Confidence: <1-10>.")

_LABELLED = re.compile(r"^[ \t]*(reasoning|answer|self-reflection|confidence)[ \t]*:[ \t]*(.*)$",
                       re.IGNORECASE | re.MULTILINE)
_INTEGER = re.compile(r"^\s*(\d+)(?:\s*/\s*10)?\s*\.?\s*$")


def _fields(text: str) -> dict[str, str]:
    """Label (lower case) -> its text, up to the next label; the first occurrence of a label wins."""
    found: dict[str, str] = {}
    matches = list(_LABELLED.finditer(text or ""))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        label = m.group(1).lower()
        if label not in found:
            found[label] = (m.group(2) + text[m.end():end]).strip()
    return found


def parse_answer(text: str) -> str | None:
    """The text of the `Answer:` field (its first line), or None when there is none or it is empty."""
    value = _fields(text).get("answer")
    if not value:
        return None
    first = value.splitlines()[0].strip()
    return first or None


def parse_confidence(text: str) -> int | None:
    """The integer of the `Confidence:` field when it is in 1-10 ("7", "7/10", "7."), else None."""
    value = _fields(text).get("confidence")
    if value is None:
        return None
    m = _INTEGER.match(value.splitlines()[0] if value else "")
    if not m:
        return None
    c = int(m.group(1))
    return c if CONFIDENCE_RANGE[0] <= c <= CONFIDENCE_RANGE[1] else None


def parse_response(text: str) -> dict:
    fields = _fields(text)
    return {"reasoning": fields.get("reasoning") or None, "answer": parse_answer(text),
            "reflection": fields.get("self-reflection") or None, "confidence": parse_confidence(text)}


def format_response(reasoning: str, answer: str, reflection: str | None = None, confidence: int | None = None) -> str:
    """The training target; a confidence outside 1-10 is a ValueError (callers name the row)."""
    lines = [f"{REASONING} {reasoning.strip()}", f"{ANSWER} {answer.strip()}"]
    if reflection is not None:
        lines.append(f"{REFLECTION} {reflection.strip()}")
    if confidence is not None:
        if isinstance(confidence, bool) or not isinstance(confidence, int) or not (
                CONFIDENCE_RANGE[0] <= confidence <= CONFIDENCE_RANGE[1]):
            raise ValueError(f"confidence must be an integer in 1-10, got {confidence!r}")
        lines.append(f"{CONFIDENCE} {confidence}")
    return "\n".join(lines)


def normalise_answer(answer: str) -> str:
    """Lower case, punctuation and articles dropped, spaces collapsed: the clustering key."""
    text = answer.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def is_correct(answer: str | None, gold: list[str]) -> bool:
    """Correct when a gold string is a case-insensitive substring of the answer (as the paper)."""
    if not answer:
        return False
    a = answer.lower()
    return any(g.strip() and g.strip().lower() in a for g in gold)


def confidence_target(agreeing: int, total: int) -> int:
    """Share s of chains agreeing with the gold answer as the confidence c in 1-10 whose c/10 is
    nearest to s (halves round up; s below 0.15 gives 1, the floor of the scale).

    c/10 is what the confidence means everywhere else (the RL reward's p, ECE, Brier), so the
    target must be the representable probability closest to the share; the linear map 1 + 9s
    (0 -> 1, 1 -> 10) overstates every share below 1, by up to 0.1 (s = 0.1 -> 2)."""
    if total <= 0 or not 0 <= agreeing <= total:
        raise ValueError(f"need 0 <= agreeing <= total and total > 0, got {agreeing}/{total}")
    return max(1, (20 * agreeing + total) // (2 * total))  # floor(10 s + 1/2) in integers


def sayself_reward(text: str, gold: list[str], correctness_weight: float = 0.0, *,
                   correct: bool | None = None) -> float:
    """R = 1 - 2 (c - p)^2 with c = correctness, p = confidence / 10; -1 without a parsable
    confidence; plus `correctness_weight` x c (the optional correctness term). c is the gold
    substring test unless `correct` gives it already graded (`item_correct` of a choice item)."""
    confidence = parse_confidence(text)
    if confidence is None:
        return -1.0
    if correct is None:
        correct = is_correct(parse_answer(text), gold)
    c = 1.0 if correct else 0.0
    return 1.0 - 2.0 * (c - confidence / 10) ** 2 + correctness_weight * c


# "B", "b.", "(B)", "B) teal", "B: teal"; a bare letter followed by a word ("A lute") is not one.
_LETTER = re.compile(r"^(?:\(([A-Za-z])\)|([A-Za-z])(?:[.):]|$))")


def choice_letter(answer: str | None, choices: list[str]) -> str | None:
    """The option letter an answer to a multiple-choice item names, or None when it names none of
    `choices`. The option's own text (compared normalised: "a lute" is option "lute") is tried
    first, then a letter at the start ("B", "(b)", "B. teal")."""
    if not answer or not choices:
        return None
    letters = string.ascii_uppercase[: len(choices)]
    key = normalise_answer(answer)
    for letter, choice in zip(letters, choices):
        if key and key == normalise_answer(choice):
            return letter
    m = _LETTER.match(answer.strip())
    letter = (m.group(1) or m.group(2)).upper() if m else None
    return letter if letter and letter in letters else None


def item_answer(answer: str | None, item: dict) -> str | None:
    """An answer as graded against a QA item (pipeline.records.QA_FEATURES): the option letter for
    a choice item when the answer names one, else the answer as written."""
    if answer is not None and item.get("kind") == "choice":
        return choice_letter(answer, item.get("choices") or []) or answer
    return answer


def item_correct(answer: str | None, item: dict) -> bool:
    """Choice items: the answer names the right option; open items: `is_correct` on the gold
    strings; unanswerable items are never answered correctly."""
    kind = item.get("kind")
    if kind == "choice":
        return choice_letter(answer, item.get("choices") or []) == string.ascii_uppercase[item["answer_index"]]
    if kind == "open":
        return is_correct(answer, list(item.get("answers") or []))
    return False


# --- the SaySelf chat and its generations (sayself-sample's split, sayself-eval and sayself-rl) ---

# Split of the QA items the SaySelf data stages read and write.
SPLIT = "train"


def sayself_prompt(item: dict) -> tuple[dict, ...]:
    """The chat a SaySelf model is tuned and asked with (the sayself-data user turn)."""
    return ({"role": "user", "content": f"{question_text(item)}\n\n{SAYSELF_INSTRUCTION}"},)


def load_tokenizer(model_dir):
    """The model's tokenizer; ConfigError (key `model`) when it has no chat template (prompts are chats)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if not tokenizer.chat_template:
        raise ConfigError(f"model: the tokenizer in {model_dir} has no chat template (the SaySelf prompts are chats)")
    return tokenizer


def resolve_dtype(dtype: str) -> str:
    """`auto`: bfloat16 on a GPU that has it (a 7B model in fp32 barely fits a card), else float32."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def generate(model_dir, items: list[dict], *, max_new_tokens: int, batch_size: int, dtype: str = "auto",
             device: str = "auto", temperature: float = 0.0, seed: int = 0) -> list[str]:
    """One response per item to `sayself_prompt(item)` from the hf backend; greedy unless a
    temperature is given. A failed batch fails the stage (StageFailed): an evaluation with holes
    would report numbers on a different set of questions."""
    from pipeline.llm.base import GenRequest, generate_all
    from pipeline.llm.hf import HFBackend

    backend = HFBackend(ModelSpec(name="sayself", backend="hf", path=str(model_dir), batch_size=batch_size,
                                  dtype=resolve_dtype(dtype), device=device))
    params = {"temperature": temperature, "max_new_tokens": max_new_tokens}
    if temperature > 0:
        params["seed"] = seed
    requests = [GenRequest(key=str(i), messages=sayself_prompt(item), params=params) for i, item in enumerate(items)]
    return generate_all(backend, requests, "sayself-eval: generations")
