"""Stage `rtuning-probe`: which training questions does the base model already know?

The base model (`model`, a local folder) answers every question of `inputs.items` split
`inputs.split` once, greedily (see `pipeline.methods.rtuning` for the prompt shapes): open QA by
generation (up to `rtuning.max_new_tokens`, cut at the first period; correct when a gold answer
is a case-insensitive substring), multiple choice by the argmax of the choice-letter
probabilities. Correct items form the certain set D1, wrong ones the uncertain set D0.

Output (`data/runs/<run>/rtuning-probe/`): `dataset/` (DatasetDict, split `train`: the items'
QA columns plus `model_answer`, `answer_confidence`, `correct`, `certain`, `probe_set` "D1"/"D0"),
`summary.json` (counts), `config.yaml`, `_SUCCESS` last.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field

from pipeline.config import LaunchSection, ModelRef, RtuningModelSection, RunSection, StageRef, Strict, local_paths
from pipeline.methods.rtuning import QAModel, is_correct, load_splits
from pipeline.runs import (
    DATASET,
    RunOptions,
    atomic_dir,
    clear_done,
    mark_done,
    resolve_model,
    save_config,
    stage_dir,
    write_json,
)


class RtuningProbeInputs(Strict):
    items: StageRef | str = Field(description="QA items (QA_FEATURES): the qa-data output or a dataset folder")
    split: str = Field("train", description="The training questions to probe")


class Recipe(Strict):
    stage: Literal["rtuning-probe"]
    run: RunSection
    model: ModelRef | str = Field(description="The base model whose knowledge is probed: a folder, or a stage's model")
    inputs: RtuningProbeInputs
    rtuning: RtuningModelSection = RtuningModelSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return local_paths(model=self.model, **{"inputs.items": self.inputs.items})


PROBE_SPLIT = "train"


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    from datasets import Dataset, DatasetDict

    started = time.time()
    model_path = resolve_model(recipe, recipe.model, "model")
    splits, items_path = load_splits(recipe.inputs.items, "inputs.items", [recipe.inputs.split], recipe,
                                     "inputs.split", limit=recipe.rtuning.limit, answerable_only=True)
    items = splits[recipe.inputs.split]
    model = QAModel(model_path, recipe.rtuning)  # every input checked before anything is written
    path = stage_dir(recipe)
    clear_done(path)
    path.mkdir(parents=True, exist_ok=True)

    rows = []
    for item, (answer, confidence) in zip(items, model.answer(items)):
        correct = is_correct(item, answer)
        rows.append({**item, "model_answer": answer, "answer_confidence": confidence, "correct": correct,
                     "certain": correct, "probe_set": "D1" if correct else "D0"})
    with atomic_dir(path / DATASET) as tmp:
        DatasetDict({PROBE_SPLIT: Dataset.from_list(rows)}).save_to_disk(str(tmp))

    by_kind: dict[str, dict[str, int]] = {}
    for r in rows:
        counts = by_kind.setdefault(r["kind"], {"items": 0, "D1": 0, "D0": 0})
        counts["items"] += 1
        counts[r["probe_set"]] += 1
    by_domain: dict[str, dict] = {}
    for r in rows:  # the base model's knowledge per relation (ParaRel relation, fact kind, ...)
        counts = by_domain.setdefault(r["domain"] or "(none)", {"items": 0, "D1": 0})
        counts["items"] += 1
        counts["D1"] += r["certain"]
    for counts in by_domain.values():
        counts["accuracy"] = round(counts["D1"] / counts["items"], 4)
    d1 = sum(r["certain"] for r in rows)
    summary = {"stage": recipe.stage, "model": str(model_path), "items": str(items_path), "split": recipe.inputs.split,
               "count": len(rows), "D1": d1, "D0": len(rows) - d1,
               "accuracy": d1 / len(rows), "by_kind": by_kind, "by_domain": by_domain, "seconds": round(time.time() - started, 1)}
    save_config(path, recipe)
    write_json(path / "summary.json", summary)
    mark_done(path, {"count": len(rows), "D1": d1})
    print(f"rtuning-probe: {len(rows)} questions, {d1} answered right (D1, certain), {len(rows) - d1} wrong "
          f"(D0, uncertain) -> {path / DATASET}")
    return summary
