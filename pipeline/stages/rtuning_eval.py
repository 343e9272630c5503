"""Stage `rtuning-eval`: answers, sure/unsure confidence and refusals of a (trained) model.

For each split in `inputs.splits` of `inputs.items`: the greedy answer (see
`pipeline.methods.rtuning`); answer confidence = geometric mean of the greedy tokens' probabilities
(open QA) or the max letter probability (multiple choice); then the probe question, the assistant
turn pre-filled with "I am", and p_sure = P(" sure") / (P(" sure") + P(" unsure")) over the first
sub-token of each word. confidence = w x answer confidence + (1 - w) x p_sure, w = `rtuning.weight`.

Per split, on answerable items: accuracy, AP (`average_precision_score(correct, confidence)`),
ECE (`rtuning.bins` equal-width bins), AUROC, Brier, the share answered willingly (p_sure >= 0.5)
and the accuracy on those; on unanswerable items: the refusal rate (refused = p_sure < 0.5 or the
answer contains a refusal phrase). With `rtuning.probe: false` (a vanilla model, never taught the
probe) the probe is not asked: its answer would be noise, so confidence is the answer confidence
alone and a refusal is a refusal phrase in the answer, as the R-Tuning paper scores its vanilla
baseline. Output: `predictions/` (DatasetDict, one split per evaluated
split), `eval.json`, `report/reliability.png`, `config.yaml`, `_SUCCESS` last; the table is printed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.config import LaunchSection, ModelRef, RtuningModelSection, RunSection, StageRef, Strict, local_paths
from pipeline.methods.metrics import (
    auroc,
    average_precision,
    brier,
    expected_calibration_error,
    reliability_bins,
    reliability_diagram,
)
from pipeline.methods.refusal import detect_refusal
from pipeline.methods.rtuning import QAModel, is_correct, load_splits
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


class RtuningEvalInputs(Strict):
    items: StageRef | str = Field(description="QA items (QA_FEATURES): the qa-data output or a dataset folder")
    splits: list[str] = Field(default_factory=lambda: ["test_id", "test_ood", "unanswerable"], min_length=1)


class RtuningEvalSection(RtuningModelSection):
    weight: float = Field(0.5, ge=0, le=1, description="confidence = weight x answer confidence + "
                          "(1 - weight) x p_sure")
    bins: int = Field(10, ge=1, description="Equal-width bins of ECE and the reliability diagram")
    probe: bool = Field(True, description="Ask the sure/unsure probe; false for a vanilla model (confidence = "
                        "answer confidence, refusals = refusal phrases in the answer)")


class Recipe(Strict):
    stage: Literal["rtuning-eval"]
    run: RunSection
    model: ModelRef | str = Field(description="The model to evaluate: a folder, or a training stage's model")
    inputs: RtuningEvalInputs
    rtuning: RtuningEvalSection = RtuningEvalSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return local_paths(model=self.model, **{"inputs.items": self.inputs.items})


PREDICTIONS = "predictions"


def model_path(recipe) -> Path:
    return resolve_model(recipe, recipe.model, "model")


def predict(model: QAModel, items: list[dict], weight: float, probe: bool = True) -> list[dict]:
    answers = model.answer(items)
    p_sure = model.p_sure(items, [a for a, _ in answers]) if probe else [None] * len(items)
    rows = []
    for item, (answer, conf), ps in zip(items, answers, p_sure):
        rows.append({"qid": item["qid"], "kind": item["kind"], "domain": item.get("domain", ""),
                     "question": item["question"], "answer": answer, "answer_confidence": conf, "p_sure": ps,
                     "confidence": conf if ps is None else weight * conf + (1 - weight) * ps,
                     "correct": is_correct(item, answer), "willing": ps is None or ps >= 0.5,
                     "refused": (ps is not None and ps < 0.5) or detect_refusal(answer) is not None})
    return rows


def split_metrics(rows: list[dict], bins: int) -> dict:
    answerable = [r for r in rows if r["kind"] != "unanswerable"]
    unanswerable = [r for r in rows if r["kind"] == "unanswerable"]
    out: dict = {"items": len(rows), "answerable": len(answerable), "unanswerable": len(unanswerable)}
    if answerable:
        y = [r["correct"] for r in answerable]
        c = [min(max(r["confidence"], 0.0), 1.0) for r in answerable]
        willing = [r for r in answerable if r["willing"]]
        out.update({
            "accuracy": sum(y) / len(y),
            "ap": average_precision(y, c),
            "ece": expected_calibration_error(y, c, bins),
            "auroc": auroc(y, c),
            "brier": brier(y, c),
            "mean_confidence": sum(c) / len(c),
            "mean_p_sure": (sum(r["p_sure"] for r in answerable) / len(answerable)
                            if answerable[0]["p_sure"] is not None else None),
            "willing_rate": len(willing) / len(answerable),
            "accuracy_willing": sum(r["correct"] for r in willing) / len(willing) if willing else None,
            "reliability": reliability_bins(y, c, bins),
        })
    if unanswerable:
        out["refusal_rate"] = sum(r["refused"] for r in unanswerable) / len(unanswerable)
    return out


COLUMNS = ("items", "accuracy", "ap", "ece", "auroc", "brier", "willing_rate", "accuracy_willing", "refusal_rate")


def table(results: dict[str, dict]) -> str:
    names = list(results)
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    width = max(12, *(len(n) + 2 for n in names))
    lines = ["metric".ljust(18) + "".join(n.rjust(width) for n in names)]
    for col in COLUMNS:
        lines.append(col.ljust(18) + "".join(fmt(results[n].get(col)).rjust(width) for n in names))
    return "\n".join(lines)


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    from datasets import Dataset, DatasetDict

    started = time.time()
    mpath = model_path(recipe)
    splits, items_path = load_splits(recipe.inputs.items, "inputs.items", recipe.inputs.splits, recipe,
                                     "inputs.splits", limit=recipe.rtuning.limit)
    model = QAModel(mpath, recipe.rtuning)  # every input checked before anything is written
    path = stage_dir(recipe)
    clear_done(path)
    path.mkdir(parents=True, exist_ok=True)

    predictions = {name: predict(model, items, recipe.rtuning.weight, recipe.rtuning.probe)
                   for name, items in splits.items()}
    results = {name: split_metrics(rows, recipe.rtuning.bins) for name, rows in predictions.items()}
    with atomic_dir(path / PREDICTIONS) as tmp:
        DatasetDict({n: Dataset.from_list(rows) for n, rows in predictions.items()}).save_to_disk(str(tmp))
    reliability_diagram({n: r["reliability"] for n, r in results.items() if "reliability" in r},
                        path / "report" / "reliability.png", f"rtuning-eval: {recipe.run.name}")
    report = {"stage": recipe.stage, "model": str(mpath), "items": str(items_path), "weight": recipe.rtuning.weight,
              "splits": results, "seconds": round(time.time() - started, 1)}
    save_config(path, recipe)
    write_json(path / "eval.json", report)
    mark_done(path, {"splits": list(results)})
    print(f"rtuning-eval: {mpath}\n{table(results)}\n-> {path / 'eval.json'}")
    return report
