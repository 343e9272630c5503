"""Stage `sayself-eval`: accuracy and calibration of the confidence a SaySelf model states.

Reads: `model` (a model folder, or a training stage's `model/`: usually sayself-rl's or sft's) and
`inputs.items`, QA items (`pipeline.records.QA_FEATURES`, the qa-data output), splits
`inputs.splits`. Each item is asked once, greedily, through the hf backend (batched, left padded,
the model's chat template), with the prompt the model was tuned on: `question_text(item)` + a
blank line + `pipeline.methods.sayself.SAYSELF_INSTRUCTION`. The response is read with
`pipeline.methods.sayself.parse_response`; the answer is graded with `item_correct` (gold substring for
open items, the right option letter or text for choice items).

Reported per split, and per `dataset` of the split's items side by side (HotpotQA next to
TruthfulQA, say), on the answerable items:
- `accuracy` on all of them, whether or not a confidence could be read; `answer_parse_rate`;
- `parse_rate`: the share with a confidence in 1-10. Rows without one are LEFT OUT of `ece`,
  `auroc`, `brier`, `mean_confidence`, `mean_abs_gap` and the reliability bins (they have no
  confidence to score), and `accuracy_scored` is the accuracy on the rows that are kept;
- `ece`: `sayself.bins` equal-width bins over confidence / 10 against binary correctness;
  `auroc` (None when all kept rows are right, or all wrong); `brier`;
- `mean_confidence` on the 1-10 scale the model writes;
- `mean_abs_gap`: mean |confidence / 10 - correctness| per answer, the number the public SaySelf
  code reports under the name ECE. It is NOT ECE (no binning; a perfectly calibrated 70%
  forecaster scores 0.42 here and 0 in ECE) and is reported separately, under its own name.
Unanswerable items have no correctness: only their count, `unanswerable_parse_rate` and
`unanswerable_mean_confidence` (1-10) are reported.

Writes: `predictions/` (DatasetDict, one split per evaluated split: the item's ids, the raw
response, parsed answer and confidence, correctness), `eval.json`, `report/reliability.png` (one
line per split, and per dataset of a split that has several), `config.yaml`, `_SUCCESS` last; the
table is printed.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field, field_validator

from pipeline.config import LaunchSection, ModelRef, RunSection, StageRef, Strict, local_paths
from pipeline.methods.metrics import auroc, brier, expected_calibration_error, reliability_bins, reliability_diagram
from pipeline.methods.rtuning import load_splits
from pipeline.methods.sayself import generate, item_answer, item_correct, load_tokenizer, parse_response, resolve_dtype
from pipeline.runs import (
    RunOptions,
    atomic_dir,
    clear_done,
    mark_done,
    resolve_model,
    save_config,
    stage_dir,
    write_json,
)


class SayselfEvalInputs(Strict):
    items: StageRef | str = Field(description="QA items (QA_FEATURES): the qa-data output or a DatasetDict folder")
    splits: list[str] = Field(default_factory=lambda: ["test_id", "test_ood", "unanswerable"], min_length=1,
                              description="Splits evaluated; each also reported per `dataset` of its items")

    @field_validator("splits")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a split is listed twice")
        return value


class SayselfEvalSection(Strict):
    max_new_tokens: int = Field(256, ge=1, description="New tokens per greedy answer")
    batch_size: int = Field(16, ge=1, description="Prompts per generate() call (left padded)")
    bins: int = Field(10, ge=1, description="Equal-width bins of ECE and the reliability diagram")
    limit: int | None = Field(None, ge=1, description="Only the first N items of each split (smoke runs)")
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu', 'cuda:0'")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that has it, else float32")


class Recipe(Strict):
    stage: Literal["sayself-eval"]
    run: RunSection
    model: ModelRef | str = Field(description="The model to evaluate: a folder, or a training stage's model")
    inputs: SayselfEvalInputs
    sayself: SayselfEvalSection = SayselfEvalSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return local_paths(model=self.model, **{"inputs.items": self.inputs.items})


PREDICTIONS = "predictions"
REPORT = "report"
NO_DATASET = "(no dataset)"


def grade(item: dict, text: str) -> dict:
    """One prediction row: the parsed response and, for an answerable item, its correctness."""
    parsed = parse_response(text)
    answer = item_answer(parsed["answer"], item)
    answerable = item["kind"] != "unanswerable"
    return {"qid": item["qid"], "dataset": item.get("dataset") or NO_DATASET, "domain": item.get("domain") or "",
            "kind": item["kind"], "question": item["question"], "response": text, "answer": answer,
            "reflection": parsed["reflection"], "confidence": parsed["confidence"],
            "correct": item_correct(answer, item) if answerable else None}


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def group_metrics(rows: list[dict], bins: int = 10) -> dict:
    """The numbers of one group of prediction rows (a split, or one dataset of a split)."""
    answerable = [r for r in rows if r["kind"] != "unanswerable"]
    unanswerable = [r for r in rows if r["kind"] == "unanswerable"]
    out: dict = {"items": len(rows), "answerable": len(answerable), "unanswerable": len(unanswerable)}
    if answerable:
        scored = [r for r in answerable if r["confidence"] is not None]
        out.update({
            "accuracy": _mean(float(bool(r["correct"])) for r in answerable),
            "answer_parse_rate": _mean(float(r["answer"] is not None) for r in answerable),
            "parse_rate": len(scored) / len(answerable),
            "scored": len(scored),
            "accuracy_scored": None, "ece": None, "auroc": None, "brier": None, "mean_confidence": None,
            "mean_abs_gap": None,
        })
        if scored:
            y = [bool(r["correct"]) for r in scored]
            p = [r["confidence"] / 10 for r in scored]
            out.update({
                "accuracy_scored": _mean(float(v) for v in y),
                "ece": expected_calibration_error(y, p, bins),
                "auroc": auroc(y, p),
                "brier": brier(y, p),
                "mean_confidence": _mean(r["confidence"] for r in scored),
                "mean_abs_gap": _mean(abs(c - float(v)) for v, c in zip(y, p)),
                "reliability": reliability_bins(y, p, bins),
            })
    if unanswerable:
        stated = [r["confidence"] for r in unanswerable if r["confidence"] is not None]
        out["unanswerable_parse_rate"] = len(stated) / len(unanswerable)
        out["unanswerable_mean_confidence"] = _mean(stated)
    return out


def split_metrics(rows: list[dict], bins: int = 10) -> dict:
    """{"all": the split's numbers, "datasets": {dataset: its numbers}} (datasets in first-seen order)."""
    by_dataset: dict[str, list[dict]] = {}
    for row in rows:
        by_dataset.setdefault(row["dataset"], []).append(row)
    return {"all": group_metrics(rows, bins), "datasets": {d: group_metrics(rs, bins) for d, rs in by_dataset.items()}}


def columns(results: dict[str, dict]) -> dict[str, dict]:
    """Table columns: each split, then `split/dataset` for a split with more than one dataset."""
    out = {}
    for split, result in results.items():
        out[split] = result["all"]
        if len(result["datasets"]) > 1:
            out.update({f"{split}/{d}": m for d, m in result["datasets"].items()})
    return out


ROWS = ("items", "accuracy", "parse_rate", "ece", "auroc", "brier", "mean_confidence", "mean_abs_gap",
        "unanswerable_parse_rate", "unanswerable_mean_confidence")
LABELS = {"parse_rate": "conf_parse_rate", "mean_confidence": "mean_conf(1-10)", "mean_abs_gap": "mean|c-p| (!ECE)",
          "unanswerable_parse_rate": "unans_parse_rate", "unanswerable_mean_confidence": "unans_conf(1-10)"}


def table(results: dict[str, dict]) -> str:
    """One block per split: the split as a whole, then each of its datasets when it has several."""
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    blocks = []
    for split, result in results.items():
        cols = columns({split: result})
        width = max(12, *(len(n) + 2 for n in cols))
        lines = ["metric".ljust(18) + "".join(n.rjust(width) for n in cols)]
        for key in ROWS:
            lines.append(LABELS.get(key, key).ljust(18) + "".join(fmt(m.get(key)).rjust(width) for m in cols.values()))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    from datasets import Dataset, DatasetDict

    started = time.time()
    s = recipe.sayself
    mpath = resolve_model(recipe, recipe.model, "model")
    splits, items_path = load_splits(recipe.inputs.items, "inputs.items", recipe.inputs.splits, recipe,
                                     "inputs.splits", limit=s.limit)
    load_tokenizer(mpath)
    path = stage_dir(recipe)  # every input checked before anything is written
    clear_done(path)
    path.mkdir(parents=True, exist_ok=True)

    dtype = resolve_dtype(s.dtype)
    names = list(splits)
    everything = [item for name in names for item in splits[name]]  # one pass: batches span splits
    texts = generate(mpath, everything, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, dtype=dtype,
                     device=s.device)
    predictions, start = {}, 0
    for name in names:
        items = splits[name]
        predictions[name] = [grade(item, text) for item, text in zip(items, texts[start:start + len(items)])]
        start += len(items)
    results = {name: split_metrics(rows, s.bins) for name, rows in predictions.items()}

    with atomic_dir(path / PREDICTIONS) as tmp:
        DatasetDict({n: Dataset.from_list(rows) for n, rows in predictions.items()}).save_to_disk(str(tmp))
    reliability_diagram({n: m["reliability"] for n, m in columns(results).items() if "reliability" in m},
                        path / REPORT / "reliability.png", f"sayself-eval: {recipe.run.name}")
    report = {"stage": recipe.stage, "model": str(mpath), "items": str(items_path), "bins": s.bins,
              "decoding": {"temperature": 0.0, "max_new_tokens": s.max_new_tokens, "dtype": dtype},
              "notes": {"ece": f"{s.bins} equal-width bins over confidence/10, binary correctness; rows without a "
                               "parsable confidence are left out of ece/auroc/brier/mean_confidence/mean_abs_gap "
                               "(parse_rate counts them); accuracy is over all answerable rows",
                        "mean_abs_gap": "mean |confidence/10 - correctness| per answer, as the public SaySelf code "
                                        "computes it; NOT ECE"},
              "splits": results, "seconds": round(time.time() - started, 1)}
    save_config(path, recipe)
    write_json(path / "eval.json", report)
    mark_done(path, {"splits": names})
    print(f"sayself-eval: {mpath}\n{table(results)}\n"
          f"(ece/auroc/brier/mean_conf on rows with a parsable confidence only; mean|c-p| is the public code's "
          f"per-answer gap, not ECE)\n-> {path / 'eval.json'}")
    return report
