"""Record schemas shared by stages, in the public shapes where one exists.

- prompt: `source`, `instruction`, `correct_answers`, `incorrect_answers`, `prompt_id`
  (+ `reference`: a reference answer such as FLAN's target, used later by the judge's
  truthfulness aspect; empty when the source has none).
- completion set: the `openbmb/UltraFeedback` row shape, plus `prompt_id` and `reference` (the
  judge's truthfulness aspect needs the reference answer; loaders treat a missing one as empty).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Iterator

from pipeline.config import ConfigError

# UltraFeedback's four aspects, in its order: the annotation record's fields, the judge's rubric
# (pipeline/judge/rubric.py) and the pair strategies all read them from here. Typed aspects carry a
# `Type` list and a second rationale; only honesty may be "N/A".
ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
TYPED_ASPECTS = ("truthfulness", "helpfulness")
NA_ASPECTS = ("honesty",)

# The `datasets` Features are built on first use (module __getattr__), so importing a stage to
# validate its recipe does not import `datasets`.
_FEATURE_NAMES = ("PROMPT_FEATURES", "ANNOTATION_FEATURES", "COMPLETION_FEATURES", "COMPLETION_SET_FEATURES",
                  "PERMUTED_COMPLETION_SET_FEATURES", "QA_FEATURES")


@functools.cache
def _features() -> dict:
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
    ANNOTATION_FEATURES = {aspect: _TYPED if aspect in TYPED_ASPECTS else _RATED for aspect in ASPECTS}

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

    # annotate with position_debias=permute: each completion also carries, per aspect, its rating
    # in each order it was shown in (order index 0, 1, ...; an extra order last), their mean and
    # spread (max - min; null when all were N/A), and the aspects still inconsistent after the
    # extra order. Everything else keeps the public shape.
    POSITION_FEATURES = {
        "ratings": {aspect: List(Value("string")) for aspect in ASPECTS},
        "mean": {aspect: Value("float64") for aspect in ASPECTS},
        "spread": {aspect: Value("float64") for aspect in ASPECTS},
        "inconsistent": List(Value("string")),
    }
    PERMUTED_COMPLETION_SET_FEATURES = Features({
        **COMPLETION_SET_FEATURES,
        "completions": List({**COMPLETION_FEATURES, "position_debias": POSITION_FEATURES}),
    })

    # One QA item. `kind`: open (free answer; correct when a gold answer is a substring of the
    # model's), choice (`choices` listed as A, B, ...; `answer_index` is the right one), unanswerable
    # (no answer exists: a false premise, an unknown entity; a good model refuses). `answers` holds the
    # gold strings (for choice: the right choice's text; empty when unanswerable). `context` is given
    # evidence (HotpotQA paragraphs, a FEVER/WiCE claim's evidence), else "". `domain` groups items
    # for ID/OOD splits (a ParaRel relation, an MMLU subject, a fact-world attribute).
    QA_FEATURES = Features(
        {
            "qid": Value("string"),
            "dataset": Value("string"),
            "domain": Value("string"),
            "kind": Value("string"),
            "question": Value("string"),
            "context": Value("string"),
            "choices": List(Value("string")),
            "answer_index": Value("int64"),
            "answers": List(Value("string")),
        }
    )
    return {name: value for name, value in locals().items() if name in _FEATURE_NAMES}


def __getattr__(name: str):
    if name in _FEATURE_NAMES:
        return _features()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prompt_id(instruction: str) -> str:
    """Stable id: the sha256 of the instruction text, as in ultrafeedback_binarized."""
    return hashlib.sha256(instruction.encode("utf-8")).hexdigest()


def empty_annotations() -> dict:
    typed = {"Type": None, "Rationale": None, "Rating": None, "Rationale For Rating": None}
    return {aspect: dict(typed) if aspect in TYPED_ASPECTS else {"Rating": None, "Rationale": None}
            for aspect in ASPECTS}


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


def jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(`file:line`, row) for each non-blank line of a JSONL file; a bad line is a ConfigError."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as err:  # malformed JSON or bytes that are not UTF-8
                raise ConfigError(f"{path}:{number}: not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{number}", row


def saved_rows(path: Path, split: str | None = None) -> Iterator[tuple[str, dict]]:
    """(where, row) for a `datasets` folder, a parquet file or a JSONL file; `where` is
    `file:line` (JSONL) or `file:row N`, for error messages. A folder holding a DatasetDict gives
    `split`, or without one its 'train' split or its only split."""
    if path.is_dir():
        from datasets import DatasetDict

        from pipeline.hub import open_dataset

        try:
            dataset = open_dataset(path)
        except Exception as err:
            raise ConfigError(f"{path}: not a saved `datasets` folder ({str(err).splitlines()[0]})") from None
        if isinstance(dataset, DatasetDict) and split is not None:
            if split not in dataset:
                raise ConfigError(f"{path}: no split {split!r} (has {', '.join(dataset)})")
            dataset = dataset[split]
        elif isinstance(dataset, DatasetDict):
            if "train" not in dataset and len(dataset) != 1:
                raise ConfigError(f"{path}: a DatasetDict needs a 'train' split or exactly one split "
                                  f"(has {', '.join(dataset)})")
            dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
        for index, row in enumerate(dataset):
            yield f"{path}:row {index + 1}", row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            handle = pq.ParquetFile(str(path))
            batches = handle.iter_batches(batch_size=1024)
            index = 0
            for batch in batches:
                for row in batch.to_pylist():
                    index += 1
                    yield f"{path}:row {index}", row
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(f"{path}: cannot read parquet ({str(err).splitlines()[0]})") from None
    elif path.suffix in (".jsonl", ".json"):
        yield from jsonl_rows(path)
    else:
        raise ConfigError(f"{path}: unknown file type (use .jsonl, .parquet or a `datasets` folder)")


# --- question answering (R-Tuning, UnknownBench, SaySelf) ----------------------------------------

QA_KINDS = ("open", "choice", "unanswerable")
QA_COLUMNS = ("qid", "dataset", "domain", "kind", "question", "context", "choices", "answer_index", "answers")

def qa_id(dataset: str, question: str, context: str = "") -> str:
    """Stable id of a QA item: sha256 of its dataset, question and context."""
    return hashlib.sha256(f"{dataset}\n{question}\n{context}".encode("utf-8")).hexdigest()


def qa_item(dataset: str, question: str, kind: str, *, answers=(), choices=(), answer_index: int = -1,
            context: str = "", domain: str = "") -> dict:
    """A QA item in the QA_FEATURES shape, checked (callers add the file:line to a ValueError)."""
    if kind not in QA_KINDS:
        raise ValueError(f"kind must be one of {', '.join(QA_KINDS)}, got {kind!r}")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("empty question")
    choices, answers = [str(c) for c in choices], [str(a) for a in answers]
    if kind == "choice":
        if len(choices) < 2 or not 0 <= answer_index < len(choices):
            raise ValueError(f"a choice item needs 2+ choices and answer_index in range (got {answer_index} "
                             f"for {len(choices)} choices)")
        answers = [choices[answer_index]]
    elif kind == "open" and not any(a.strip() for a in answers):
        raise ValueError("an open item needs at least one non-empty gold answer")
    elif kind == "unanswerable":
        answers, choices, answer_index = [], [], -1
    return {"qid": qa_id(dataset, question, context), "dataset": dataset, "domain": domain or dataset,
            "kind": kind, "question": question.strip(), "context": context, "choices": choices,
            "answer_index": answer_index if kind == "choice" else -1, "answers": answers}


# --- row schemas: what every training and evaluation stage checks before it starts -----------------

ROLES = ("system", "user", "assistant")


def field_problem(value, kind: str) -> str | None:
    """Why `value` is not a `kind` (None when it is). Kinds: text (a non-empty string), str (any
    string), messages (a non-empty list of {role, content} turns with non-empty text), chat (text or
    messages), number (finite int or float, never a bool), number? (the same or null), int, flag,
    texts (a list of strings)."""
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    if kind in ("text", "str"):
        if not isinstance(value, str):
            return f"must be a string, got {type(value).__name__}"
        return "is empty" if kind == "text" and not value.strip() else None
    if kind == "chat":
        return field_problem(value, "text" if isinstance(value, str) else "messages")
    if kind == "messages":
        if not isinstance(value, list) or not value:
            return (f"must be a non-empty list of {{role, content}} turns, got "
                    f"{'an empty list' if isinstance(value, list) else type(value).__name__}")
        for i, turn in enumerate(value):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES:
                return f"turn {i} must be a {{role, content}} mapping with role in {', '.join(ROLES)}"
            content = turn.get("content")
            if not isinstance(content, str):
                return f"turn {i} content must be a string, got {type(content).__name__}"
            if not content.strip():
                return f"turn {i} ({turn['role']}) has empty content"
        return None
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {type(value).__name__} {value!r}"
        import math

        return None if math.isfinite(value) else f"must be a finite number, got {value!r}"
    if kind == "int":
        return None if isinstance(value, int) and not isinstance(value, bool) else \
            f"must be an integer, got {type(value).__name__} {value!r}"
    if kind == "flag":
        return None if isinstance(value, bool) else f"must be true or false, got {type(value).__name__} {value!r}"
    if kind == "texts":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return f"must be a list of strings, got {type(value).__name__}"
        return None
    raise ValueError(f"unknown field kind {kind!r}")


def check_rows(rows, schema: dict[str, str], key: str, *, unique: tuple[str, ...] = (),
               distinct: tuple[str, str] | None = None) -> None:
    """Check every (where, row) against `schema` (field -> kind, see `field_problem`) before any
    work starts; the first problem is a ConfigError naming `key`, the row's place (file:line or
    split and row) and the field. `unique`: these fields together may not repeat (a duplicate id
    would make failures and outputs ambiguous); `distinct`: two fields that may not be equal
    (chosen == rejected teaches nothing and scores as a win)."""
    seen: dict = {}
    for where, row in rows:
        if not isinstance(row, dict):
            raise ConfigError(f"{key}: {where}: expected a mapping, got {type(row).__name__}")
        for name, kind in schema.items():
            if name not in row and not kind.endswith("?"):
                raise ConfigError(f"{key}: {where}: missing field {name!r}")
            problem = field_problem(row.get(name), kind)
            if problem:
                raise ConfigError(f"{key}: {where}: field {name!r} {problem}")
        if distinct and row[distinct[0]] == row[distinct[1]]:
            raise ConfigError(f"{key}: {where}: {distinct[0]} equals {distinct[1]} (the pair prefers nothing)")
        if unique:
            ident = json.dumps([row.get(name) for name in unique], sort_keys=True, default=str)
            if ident in seen:
                shown = ", ".join(f"{name} {str(row.get(name))[:40]!r}" for name in unique)
                raise ConfigError(f"{key}: {where}: duplicate {shown} (first at {seen[ident]})")
            seen[ident] = where


QA_SCHEMA = {"qid": "text", "kind": "text", "question": "text", "context": "str", "choices": "texts",
             "answer_index": "int", "answers": "texts"}


def check_qa_rows(rows, key: str, columns=None) -> None:
    """QA items (the QA_FEATURES shape; only the fields in `columns` when given) checked for types,
    empty questions and repeated qids."""
    schema = {k: v for k, v in QA_SCHEMA.items() if columns is None or k in columns}
    check_rows(rows, schema, key, unique=("qid",) if "qid" in schema else ())


def split_rows(dataset, path, split: str):
    """(where, row) of a `datasets` split, `where` = `folder/split:row N` (1-based) for messages."""
    return ((f"{path}/{split}:row {i + 1}", row) for i, row in enumerate(dataset))
