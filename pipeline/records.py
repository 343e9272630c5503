"""Record schemas shared by stages, in the public shapes where one exists.

- prompt: `source`, `instruction`, `correct_answers`, `incorrect_answers`, `prompt_id`
  (+ `reference`: a reference answer such as FLAN's target, used later by the judge's
  truthfulness aspect; empty when the source has none).
- completion set: the `openbmb/UltraFeedback` row shape, plus `prompt_id` and `reference` (the
  judge's truthfulness aspect needs the reference answer; loaders treat a missing one as empty).
"""

from __future__ import annotations

import hashlib

from datasets import Features, List, Value

PROMPT_FEATURES = Features(
    {
        "prompt_id": Value("string"),
        "source": Value("string"),
        "instruction": Value("string"),
        "correct_answers": List(Value("string")),
        "incorrect_answers": List(Value("string")),
        "reference": Value("string"),
    }
)

_RATED = {"Rating": Value("string"), "Rationale": Value("string")}
_TYPED = {
    "Type": List(Value("string")),
    "Rationale": Value("string"),
    "Rating": Value("string"),
    "Rationale For Rating": Value("string"),
}
ANNOTATION_FEATURES = {
    "instruction_following": _RATED,
    "honesty": _RATED,
    "truthfulness": _TYPED,
    "helpfulness": _TYPED,
}

COMPLETION_FEATURES = {
    "annotations": ANNOTATION_FEATURES,
    "critique": Value("string"),
    "custom_system_prompt": Value("string"),
    "fine-grained_score": Value("float64"),
    "model": Value("string"),
    "overall_score": Value("float64"),
    "principle": Value("string"),
    "response": Value("string"),
}

COMPLETION_SET_FEATURES = Features(
    {
        "prompt_id": Value("string"),
        "source": Value("string"),
        "instruction": Value("string"),
        "models": List(Value("string")),
        "completions": List(COMPLETION_FEATURES),
        "correct_answers": List(Value("string")),
        "incorrect_answers": List(Value("string")),
        "reference": Value("string"),
    }
)


def prompt_id(instruction: str) -> str:
    """Stable id: the sha256 of the instruction text, as in ultrafeedback_binarized."""
    return hashlib.sha256(instruction.encode("utf-8")).hexdigest()


def empty_annotations() -> dict:
    return {
        "instruction_following": {"Rating": None, "Rationale": None},
        "honesty": {"Rating": None, "Rationale": None},
        "truthfulness": {"Type": None, "Rationale": None, "Rating": None, "Rationale For Rating": None},
        "helpfulness": {"Type": None, "Rationale": None, "Rating": None, "Rationale For Rating": None},
    }


def unannotated_completion(model: str, principle: str, system_prompt: str, response: str) -> dict:
    return {
        "annotations": empty_annotations(),
        "critique": None,
        "custom_system_prompt": system_prompt,
        "fine-grained_score": None,
        "model": model,
        "overall_score": None,
        "principle": principle,
        "response": response,
    }
