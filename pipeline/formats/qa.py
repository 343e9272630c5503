"""QA loaders: public row shapes of the R-Tuning / UnknownBench / SaySelf sets -> QA items.

One entry point, `load_items(path, format)`, reads a local JSONL file, parquet file or saved
`datasets` folder (through `pipeline.records.saved_rows`, so every row has a `file:line` or
`file:row N` location) and maps each row to a QA item (`pipeline.records.QA_FEATURES`). A row
that does not fit the format is a `ConfigError` naming the location and the field; the whole file
is checked before anything is returned, so a caller never sees half a file.

Formats (the row shape each expects is in its loader's docstring): pararel, mmlu, hotpotqa,
fever, wice, falseqa, nec, selfaware, freshqa, truthfulqa (the rows `pipeline.formats.fetch` caches), and `qa` (rows already in the QA_FEATURES shape, e.g. a
saved `qa-data` split; `qid` is recomputed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from pipeline.config import ConfigError
from pipeline.records import QA_KINDS, qa_item, saved_rows

log = logging.getLogger(__name__)


class _Skip(Exception):
    """A row a loader deliberately leaves out (not an error): FEVER's NOT ENOUGH INFO claims have
    no true/false answer. `load_items` logs how many."""


# ---------------------------------------------------------------- field helpers


class RowError(ValueError):
    """A field problem in one row; `load_items` adds the file:line."""


def _text(row: dict, *keys: str, required: bool = True) -> str:
    """The first of `keys` that the row has, as a non-empty string."""
    for key in keys:
        if key in row and row[key] is not None:
            value = row[key]
            if not isinstance(value, str):
                raise RowError(f"field {key!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise RowError(f"field {key!r} is empty")
            return value.strip()
    if required:
        raise RowError(f"missing field {' / '.join(repr(k) for k in keys)}")
    return ""


def _strings(row: dict, key: str, *, required: bool = True) -> list[str]:
    """A string or a list of strings, as a list of non-empty strings."""
    value = row.get(key)
    if value is None:
        if required:
            raise RowError(f"missing field {key!r}")
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RowError(f"field {key!r} must be a string or a list of strings")
    out = [v.strip() for v in value if v.strip()]
    if required and not out:
        raise RowError(f"field {key!r} is empty")
    return out


def _bool(row: dict, key: str, default: bool | None = None) -> bool:
    value = row.get(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if value is None:
        raise RowError(f"missing field {key!r}")
    raise RowError(f"field {key!r} must be true/false or 1/0, got {value!r}")


# ---------------------------------------------------------------- one loader per format


def pararel(row: dict, dataset: str, **_) -> dict:
    """ParaRel as open QA (R-Tuning's processed rows).

    Shape: {"question": "Which country is Lake Ovrid in?", "answer": "Norway", "relation": "P17"}.
    `prompt` is accepted for `question`; `answer` may be a list of aliases. Without a question, a
    cloze template is turned into one: {"template": "[X] is located in", "subject": "Lake Ovrid",
    "object": "Norway", "relation": "P17"} -> question "Lake Ovrid is located in", answer the
    object. domain = the relation (R-Tuning splits ID/OOD by relation).
    """
    relation = _text(row, "relation", "predicate_id")
    if "question" in row or "prompt" in row:
        question = _text(row, "question", "prompt")
        answers = _strings(row, "answer")
    else:
        template = _text(row, "template")
        if "[X]" not in template:
            raise RowError("field 'template' has no [X] slot for the subject")
        question = template.replace("[X]", _text(row, "subject")).replace("[Y]", "").strip()
        answers = [_text(row, "object", "answer")]
    return qa_item(dataset, question, "open", answers=answers, domain=relation)


LETTERS = "ABCDEFGHIJ"


def mmlu(row: dict, dataset: str, **_) -> dict:
    """MMLU multiple choice (the cais/mmlu shape).

    Shape: {"question": "...", "choices": ["...", "...", "...", "..."], "answer": 2,
    "subject": "astronomy"}; `answer` is a 0-based index or a letter "A".."D". domain = subject.
    """
    question = _text(row, "question")
    choices = row.get("choices")
    if not isinstance(choices, (list, tuple)) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise RowError("field 'choices' must be a list of 4 strings")
    answer = row.get("answer")
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS[:4]:
        index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < 4:
        index = answer
    else:
        raise RowError(f"field 'answer' must be 0-3 or A-D, got {answer!r}")
    return qa_item(dataset, question, "choice", choices=choices, answer_index=index,
                   domain=_text(row, "subject"))


def _hotpot_context(context) -> str:
    """HotpotQA paragraphs as "Title: sentence sentence" blocks separated by blank lines.
    Accepts the HF shape {"title": [...], "sentences": [[...], ...]} and the original list of
    [title, [sentences]] pairs."""
    if isinstance(context, dict):
        titles, sentences = context.get("title"), context.get("sentences")
        if not isinstance(titles, list) or not isinstance(sentences, list) or len(titles) != len(sentences):
            raise RowError("field 'context' needs lists 'title' and 'sentences' of equal length")
        pairs = list(zip(titles, sentences))
    elif isinstance(context, list):
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in context):
            raise RowError("field 'context' must be a list of [title, sentences] pairs")
        pairs = [tuple(p) for p in context]
    else:
        raise RowError("field 'context' must be {title, sentences} or a list of [title, sentences]")
    blocks = []
    for title, sents in pairs:
        if not isinstance(title, str) or not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
            raise RowError("field 'context': each paragraph needs a title string and a list of sentences")
        blocks.append(f"{title}: {' '.join(s.strip() for s in sents)}".strip())
    return "\n\n".join(blocks)


def hotpotqa(row: dict, dataset: str, *, with_context: bool = True, **_) -> dict:
    """HotpotQA as open QA (the hotpot_qa distractor shape).

    Shape: {"question": "...", "answer": "...", "type": "bridge" | "comparison", "level": "easy",
    "context": {"title": [...], "sentences": [[...], ...]}} (or the original list of [title,
    [sentences]] pairs). context -> "Title: sentences" paragraphs; `with_context=False` drops it
    (closed-book, as R-Tuning and SaySelf ask). domain = type (or "hotpotqa" when absent).
    """
    question = _text(row, "question")
    answers = _strings(row, "answer")
    context = ""
    if with_context and row.get("context") is not None:
        context = _hotpot_context(row["context"])
    kind_of = _text(row, "type", required=False)
    return qa_item(dataset, question, "open", answers=answers, context=context, domain=kind_of or dataset)


TRUE_FALSE = ["true", "false"]
CLAIM_QUESTION = "Is the following claim true or false? {claim}"
WICE_QUESTION = "Does the evidence support the following claim? {claim}"
WICE_CHOICES = ["supported", "partially supported", "not supported"]


def _evidence(row: dict, key: str = "evidence") -> str:
    value = row.get(key)
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(v.strip() for v in value if v.strip())
    raise RowError(f"field {key!r} must be a string or a list of strings")


def fever(row: dict, dataset: str, **_) -> dict:
    """FEVER claims as a true/false choice.

    Shape: {"claim": "...", "label": "SUPPORTS" | "REFUTES" | "NOT ENOUGH INFO",
    "evidence": "..." or ["...", ...] (optional)}. Question "Is the following claim true or false?
    <claim>", choices [true, false]; the evidence, when given, becomes the context. NOT ENOUGH INFO
    rows have no true/false answer and are skipped (counted in the log). domain = "fever".
    """
    claim = _text(row, "claim")
    label = _text(row, "label").upper().replace("_", " ")
    if label == "NOT ENOUGH INFO":
        raise _Skip()
    if label not in ("SUPPORTS", "REFUTES"):
        raise RowError(f"field 'label' must be SUPPORTS, REFUTES or NOT ENOUGH INFO, got {row['label']!r}")
    return qa_item(dataset, CLAIM_QUESTION.format(claim=claim), "choice", choices=TRUE_FALSE,
                   answer_index=0 if label == "SUPPORTS" else 1, context=_evidence(row), domain=dataset)


def wice(row: dict, dataset: str, **_) -> dict:
    """WiCE claims against evidence, three-way choice.

    Shape: {"claim": "...", "evidence": ["sentence", ...] or "...", "label": "supported" |
    "partially_supported" | "not_supported"}. Choices [supported, partially supported, not
    supported]; the evidence sentences (one per line) are the context. domain = "wice".
    """
    claim = _text(row, "claim")
    label = _text(row, "label").lower().replace("_", " ").replace("-", " ")
    if label not in WICE_CHOICES:
        raise RowError(f"field 'label' must be supported, partially_supported or not_supported, got {row['label']!r}")
    evidence = _evidence(row)
    if not evidence:
        raise RowError("field 'evidence' is missing or empty")
    return qa_item(dataset, WICE_QUESTION.format(claim=claim), "choice", choices=WICE_CHOICES,
                   answer_index=WICE_CHOICES.index(label), context=evidence, domain=dataset)


def falseqa(row: dict, dataset: str, **_) -> dict:
    """FalseQA: questions whose premise may be false.

    Shape: {"question": "...", "label": 1 | 0, "answer": "..." or [...] (optional)}. label 1 = a
    false premise -> unanswerable (domain "false_premise"); label 0 = a sound question -> open,
    which then needs an answer (domain "valid_premise").
    """
    question = _text(row, "question")
    if _bool(row, "label"):
        return qa_item(dataset, question, "unanswerable", domain="false_premise")
    return qa_item(dataset, question, "open", answers=_strings(row, "answer"), domain="valid_premise")


def nec(row: dict, dataset: str, **_) -> dict:
    """NEC: questions about non-existent concepts (UnknownBench).

    Shape: {"question": "...", "concept": "the made-up term" (optional), "category": "..."
    (optional), "answerable": false (optional, default false), "answer": ... (needed when
    answerable)}. Unanswerable by default; domain = category, else "nonexistent_concept".
    """
    question = _text(row, "question")
    _text(row, "concept", required=False)  # checked when present; not part of the item
    domain = _text(row, "category", required=False) or "nonexistent_concept"
    if "answerable" in row and _bool(row, "answerable"):
        return qa_item(dataset, question, "open", answers=_strings(row, "answer"), domain=domain)
    return qa_item(dataset, question, "unanswerable", domain=domain)


def selfaware(row: dict, dataset: str, **_) -> dict:
    """SelfAware: answerable and unanswerable questions.

    Shape: {"question_id": 7 (optional), "question": "...", "answerable": true | false,
    "answer": ["...", ...] or null, "source": "..." (optional)}. answerable -> open with the
    answers; not answerable -> unanswerable. domain = source, else "selfaware".
    """
    question = _text(row, "question")
    domain = _text(row, "source", required=False) or dataset
    if _bool(row, "answerable"):
        return qa_item(dataset, question, "open", answers=_strings(row, "answer"), domain=domain)
    return qa_item(dataset, question, "unanswerable", domain=domain)


FRESHQA_ANSWERS = tuple(f"answer_{i}" for i in range(10))


def freshqa(row: dict, dataset: str, **_) -> dict:
    """FreshQA (the CSV's rows as JSON; every cell a string).

    Shape: {"id": "0", "split": "TEST" | "DEV", "question": "...", "false_premise": "TRUE" |
    "FALSE", "fact_type": "never-changing" | "slow-changing" | "fast-changing", "answer_0" ..
    "answer_9": "..." or "" , ...}. A false premise -> unanswerable (its answers only rebut the
    premise); otherwise open with the non-empty answers (at least one). domain = fact_type, so a
    recipe can keep the never-changing facts apart from those whose answer moves over time.
    """
    question = _text(row, "question")
    domain = _text(row, "fact_type")
    if _bool(row, "false_premise"):
        return qa_item(dataset, question, "unanswerable", domain=domain)
    answers = [a for key in FRESHQA_ANSWERS for a in _strings(row, key, required=False)]
    if not answers:
        raise RowError(f"no answer in {FRESHQA_ANSWERS[0]}..{FRESHQA_ANSWERS[-1]}")
    return qa_item(dataset, question, "open", answers=answers, domain=domain)


def truthfulqa(row: dict, dataset: str, **_) -> dict:
    """TruthfulQA's generation questions as `pipeline.formats.fetch` caches them from BIG-bench
    (`truthful_qa.jsonl`).

    Shape: {"Question": "...", "Category": "Misconceptions", "Best answer": "...", "True answers":
    [...], "False answers": [...]}. -> open, answers = the best answer then the true ones, domain =
    Category. Gold answers are whole sentences, so substring grading rarely credits a free-form
    answer: use it for refusals and stated confidence (UnknownBench), not for accuracy.
    """
    best = _text(row, "Best answer")
    answers = [best] + [a for a in _strings(row, "True answers", required=False) if a != best]
    return qa_item(dataset, _text(row, "Question"), "open", answers=answers,
                   domain=_text(row, "Category", required=False))


def qa(row: dict, dataset: str, **_) -> dict:
    """Rows already in the QA_FEATURES shape (`qid` is recomputed; `dataset` kept when present).

    Shape: {"question", "kind": open|choice|unanswerable, "answers": [...], "choices": [...],
    "answer_index": int, "context": "", "domain": "", "dataset": ""}.
    """
    kind = _text(row, "kind")
    if kind not in QA_KINDS:
        raise RowError(f"field 'kind' must be one of {', '.join(QA_KINDS)}, got {kind!r}")
    index = row.get("answer_index", -1)
    if not isinstance(index, int) or isinstance(index, bool):
        raise RowError("field 'answer_index' must be an integer")
    context = row.get("context") or ""
    if not isinstance(context, str):
        raise RowError("field 'context' must be a string")
    return qa_item(_text(row, "dataset", required=False) or dataset, _text(row, "question"), kind,
                   answers=_strings(row, "answers", required=False),
                   choices=_strings(row, "choices", required=False), answer_index=index,
                   context=context, domain=_text(row, "domain", required=False))


LOADERS: dict[str, Callable[..., dict]] = {
    "pararel": pararel, "mmlu": mmlu, "hotpotqa": hotpotqa, "fever": fever, "wice": wice,
    "falseqa": falseqa, "nec": nec, "selfaware": selfaware, "freshqa": freshqa, "truthfulqa": truthfulqa, "qa": qa,
}
QA_FORMATS = tuple(LOADERS)


def load_items(path: str | Path, format: str, *, dataset: str | None = None, with_context: bool = True) -> list[dict]:
    """QA items from a local file or `datasets` folder in one of QA_FORMATS.

    `dataset` labels the items (default: the format name). Every row is mapped before the list
    is returned; the first bad row raises ConfigError("<file>:<line>: <field problem>").
    """
    if format not in LOADERS:
        raise ConfigError(f"unknown QA format {format!r} (one of {', '.join(QA_FORMATS)})")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no such file or folder: {path}")
    loader, label = LOADERS[format], dataset or format
    items, skipped = [], 0
    for where, row in saved_rows(path):
        try:
            items.append(loader(row, label, with_context=with_context))
        except _Skip:
            skipped += 1
        except ValueError as err:  # RowError, or qa_item's own checks
            raise ConfigError(f"{where}: {format}: {err}") from None
    if not items:
        raise ConfigError(f"{path}: no {format} rows")
    if skipped:
        log.info("%s: skipped %d row(s) without a usable label", path, skipped)
    return items
