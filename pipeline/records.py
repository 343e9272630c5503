"""Record schemas shared by stages, in the public shapes where one exists.

- prompt: `source`, `instruction`, `correct_answers`, `incorrect_answers`, `prompt_id`
  (+ `reference`: a reference answer such as FLAN's target, used later by the judge's
  truthfulness aspect; empty when the source has none).
- completion set: the `openbmb/UltraFeedback` row shape, plus `prompt_id` and `reference` (the
  judge's truthfulness aspect needs the reference answer; loaders treat a missing one as empty).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

from datasets import Features, List, Value

from pipeline.config import ConfigError

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


def saved_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) for a `datasets` folder, a parquet file or a JSONL file of completion sets;
    `where` is `file:line` (JSONL) or `file:row N`, for error messages."""
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            dataset = load_from_disk(str(path))
        except Exception as err:
            raise ConfigError(f"{path}: not a saved `datasets` folder ({str(err).splitlines()[0]})") from None
        if isinstance(dataset, DatasetDict):
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
