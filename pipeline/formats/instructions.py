"""Instruction sources: public row shapes -> prompt records (`pipeline.records.PROMPT_FEATURES`).

`ADAPTERS` maps each shape name to its adapter `(row, where) -> (instruction, correct answers,
incorrect answers, reference)`; `SOURCE_FORMATS` (the recipe's `format` choices) is its keys.
Two shapes are the public rows `pipeline.formats.fetch` caches: `bigbench-truthful_qa` (BIG-bench's
truthful_qa questions: "Question", "True answers", "False answers", "Best answer") and `mt-bench`
(MT-bench questions; the first of `turns` is the instruction, the first `reference` the reference).
A row that does not fit is a ConfigError naming `where` (file:line) and the field.
"""

from __future__ import annotations

from typing import Callable

from pipeline.config import ConfigError
from pipeline.records import prompt_id


def _text(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise ConfigError(f"{where}: missing field {key!r} (has {', '.join(sorted(row)) or 'none'})")
    value = row[key]
    if not isinstance(value, str):
        raise ConfigError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ConfigError(f"{where}: field {key!r} is empty")
    return value.strip()


def _answers(row: dict, key: str, where: str) -> list[str]:
    value = row.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: field {key!r} must be a list of strings")
    return [v.strip() for v in value if v.strip()]


def _optional_text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value.strip()


def _first_user_turn(row: dict, where: str) -> str:
    turns = row.get("conversations")
    if turns is None:
        raise ConfigError(f"{where}: missing field 'conversations'")
    if not isinstance(turns, list):
        raise ConfigError(f"{where}: field 'conversations' must be a list of turns")
    for turn in turns:
        if isinstance(turn, dict) and turn.get("from", turn.get("role")) in ("human", "user"):
            return _text(turn, "value" if "value" in turn else "content", f"{where} (first user turn)")
    raise ConfigError(f"{where}: 'conversations' has no human/user turn")


def _first_of_dialogue(row: dict, where: str) -> str:
    data = row.get("data")
    if data is None:
        raise ConfigError(f"{where}: missing field 'data'")
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{where}: field 'data' must be a non-empty list of turns")
    return _text({"data[0]": data[0]}, "data[0]", where)


def _generic(row: dict, where: str) -> str:
    for key in ("instruction", "prompt", "question"):
        if key in row:
            return _text(row, key, where)
    raise ConfigError(f"{where}: missing field: one of 'instruction', 'prompt', 'question'")


def evol_instruct(row: dict, where: str):
    return _text(row, "instruction", where), [], [], ""


def false_qa(row: dict, where: str):
    return _text(row, "question", where), [], [], _optional_text(row, "answer", where)


def flan(row: dict, where: str):
    return _text(row, "inputs", where), [], [], _optional_text(row, "targets", where)


def sharegpt(row: dict, where: str):
    return _first_user_turn(row, where), [], [], ""


def truthful_qa(row: dict, where: str):
    instruction = _text(row, "question", where)
    correct = _answers(row, "correct_answers", where)
    incorrect = _answers(row, "incorrect_answers", where)
    return instruction, correct, incorrect, _optional_text(row, "best_answer", where)


def bigbench_truthful_qa(row: dict, where: str):
    """{"Question", "Category", "True answers": [...], "False answers": [...], "Best answer"}; the
    same rows serve as a decontamination set (`inputs.eval_sets` with fields [Question])."""
    instruction = _text(row, "Question", where)
    correct = _answers(row, "True answers", where)
    incorrect = _answers(row, "False answers", where)
    return instruction, correct, incorrect, _optional_text(row, "Best answer", where)


def mt_bench(row: dict, where: str):
    """{"question_id", "category", "turns": [first, follow-up], "reference": [...] (some rows)}."""
    turns = row.get("turns")
    if turns is None:
        raise ConfigError(f"{where}: missing field 'turns' (has {', '.join(sorted(row)) or 'none'})")
    if not isinstance(turns, list) or not turns:
        raise ConfigError(f"{where}: field 'turns' must be a non-empty list of strings")
    instruction = _text({"turns[0]": turns[0]}, "turns[0]", where)
    reference = row.get("reference") or []
    if not isinstance(reference, list) or not all(isinstance(r, str) for r in reference):
        raise ConfigError(f"{where}: field 'reference' must be a list of strings")
    return instruction, [], [], reference[0].strip() if reference else ""


def ultrachat(row: dict, where: str):
    return _first_of_dialogue(row, where), [], [], ""


def generic(row: dict, where: str):
    instruction = _generic(row, where)
    correct = _answers(row, "correct_answers", where)
    incorrect = _answers(row, "incorrect_answers", where)
    return instruction, correct, incorrect, _optional_text(row, "reference", where)


ADAPTERS: dict[str, Callable[[dict, str], tuple[str, list[str], list[str], str]]] = {
    "evol_instruct": evol_instruct, "false_qa": false_qa, "flan": flan, "sharegpt": sharegpt,
    "truthful_qa": truthful_qa, "ultrachat": ultrachat, "generic": generic,
    "bigbench-truthful_qa": bigbench_truthful_qa, "mt-bench": mt_bench,
}
SOURCE_FORMATS = tuple(ADAPTERS)


def to_prompt(shape: str, source: str, row: dict, where: str) -> dict:
    """Map one raw row of a known shape to a prompt record."""
    adapter = ADAPTERS.get(shape)
    if adapter is None:  # the recipe validator allows only known shapes
        raise ConfigError(f"source {source!r}: unknown format {shape!r}")
    instruction, correct, incorrect, reference = adapter(row, where)
    return {"prompt_id": prompt_id(instruction), "source": source, "instruction": instruction,
            "correct_answers": correct, "incorrect_answers": incorrect, "reference": reference}
