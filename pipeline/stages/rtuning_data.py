"""Stage `rtuning-data`: refusal-aware SFT data from the probe (R-Tuning and its variants).

Input: `inputs.probe`, the rtuning-probe output (items + `correct`). `rtuning.variant`:
- `r-tuning`: [user: question, assistant: gold answer, user: PROBE_QUESTION, assistant: "I am sure"
  (D1, the base model was right) or "I am unsure" (D0)];
- `r-tuning-r`: [user: question, assistant: gold answer (D1) or a refusal (D0; one of
  `REFUSALS`, chosen per question with `rtuning.seed`)], no probe turn (as the paper's variant);
- `r-tuning-u`: labels ignored; the base model (`model`) samples `rtuning.samples` answers per
  question at `rtuning.temperature`; the entropy of the normalised answers' frequencies ranks the
  questions and the most uncertain `rtuning.unsure_fraction` get "I am unsure" (ties: earlier
  rows first), the rest "I am sure"; messages as `r-tuning`;
- `vanilla`: [user: question, assistant: gold answer] (the comparison baseline).
`rtuning.answer_format` ("{answer}" by default) wraps an open question's gold answer in every variant.
The sft stage's assistant-only loss then covers the answer and the sure/unsure words only.

Output: `dataset/` (DatasetDict, split `train`: `messages`, `qid`, `kind`, `domain`, `question`,
`variant`, `label` "sure"/"unsure"/"refuse"/"" (vanilla and D1 of -r), `correct` (probe),
`entropy` (-u only, else null)), `summary.json`, `config.yaml`, `_SUCCESS` last.
"""

from __future__ import annotations

import random
import time
from typing import Literal

from pydantic import Field, model_validator

from pipeline.config import (
    ConfigError,
    LaunchSection,
    ModelRef,
    RtuningModelSection,
    RunSection,
    StageRef,
    Strict,
    local_paths,
)
from pipeline.methods.rtuning import (
    PROBE_QUESTION,
    REFUSALS,
    SURE,
    UNSURE,
    QAModel,
    check_item,
    entropy,
    gold_answer,
    question_text,
)
from pipeline.records import QA_SCHEMA, check_rows, split_rows
from pipeline.runs import (
    DATASET,
    RunOptions,
    atomic_dir,
    clear_done,
    mark_done,
    resolve_input,
    resolve_model,
    save_config,
    stage_dir,
    write_json,
)


class RtuningDataInputs(Strict):
    probe: StageRef | str = Field(description="The rtuning-probe output (items with their probe labels)")


class RtuningDataSection(RtuningModelSection):
    variant: Literal["r-tuning", "r-tuning-r", "r-tuning-u", "vanilla"] = Field(
        "r-tuning", description="r-tuning: gold answer + sure/unsure by probe correctness; r-tuning-r: "
        "uncertain answers replaced by refusals; r-tuning-u: sure/unsure by sampled-answer entropy "
        "(no labels; needs `model`); vanilla: gold answer only")
    seed: int = 0
    samples: int = Field(10, ge=2, description="r-tuning-u: answers sampled per question")
    temperature: float = Field(0.7, gt=0, description="r-tuning-u: sampling temperature")
    unsure_fraction: float = Field(0.5, ge=0, le=1, description="r-tuning-u: share of most uncertain "
                                   "questions marked unsure")
    answer_format: str = Field("{answer}", description="The assistant's answer turn for open questions, "
                               "around the gold answer (the paper: the bare answer). A small chat model that "
                               "habitually restates the question answers better when trained on "
                               "'The answer is {answer}.' than on a bare entity")

    @model_validator(mode="after")
    def _answer_slot(self) -> "RtuningDataSection":
        if self.answer_format.count("{answer}") != 1:
            raise ValueError("rtuning.answer_format must contain '{answer}' exactly once")
        return self


class Recipe(Strict):
    stage: Literal["rtuning-data"]
    run: RunSection
    model: ModelRef | str | None = Field(None, description="r-tuning-u: the base model that samples answers "
                                         "(a folder, or a stage's model)")
    inputs: RtuningDataInputs
    rtuning: RtuningDataSection = RtuningDataSection()
    launch: LaunchSection = LaunchSection()

    @model_validator(mode="after")
    def _model_for_u(self) -> "Recipe":
        if self.rtuning.variant == "r-tuning-u" and not self.model:
            raise ValueError("rtuning.variant 'r-tuning-u' samples answers: set `model` (the base model folder)")
        return self

    def input_files(self) -> list[tuple[str, str]]:
        named = {"inputs.probe": self.inputs.probe}
        if self.model:
            named["model"] = self.model
        return local_paths(**named)


SPLIT = "train"


def load_probe(recipe) -> tuple[list[dict], object]:
    from datasets import DatasetDict

    from pipeline.hub import open_dataset

    path = resolve_input(recipe, recipe.inputs.probe, "inputs.probe")
    try:
        data = open_dataset(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"inputs.probe: {path} is not a `datasets` folder ({err})") from None
    if not isinstance(data, DatasetDict) or SPLIT not in data:
        raise ConfigError(f"inputs.probe: {path} has no split {SPLIT!r} (is it an rtuning-probe output?)")
    if "correct" not in data[SPLIT].column_names:
        raise ConfigError(f"inputs.probe: split {SPLIT!r} of {path} has no `correct` column "
                          "(is it an rtuning-probe output?)")
    rows = data[SPLIT].to_list()
    if recipe.rtuning.limit:
        rows = rows[: recipe.rtuning.limit]
    if not rows:
        raise ConfigError(f"inputs.probe: split {SPLIT!r} of {path} is empty")
    check_rows(split_rows(rows, path, SPLIT), {**QA_SCHEMA, "correct": "flag"}, "inputs.probe", unique=("qid",))
    for i, row in enumerate(rows):
        check_item(row, f"inputs.probe split {SPLIT!r} row {i}")
        if row["kind"] == "unanswerable":
            raise ConfigError(f"inputs.probe split {SPLIT!r} row {i}: unanswerable item {row['qid'][:12]} has no "
                              "gold answer to train on")
    return rows, path


def probed_chat(item: dict, answer: str, sure: bool) -> list[dict]:
    return [{"role": "user", "content": question_text(item)}, {"role": "assistant", "content": answer},
            {"role": "user", "content": PROBE_QUESTION}, {"role": "assistant", "content": SURE if sure else UNSURE}]


def plain_chat(item: dict, answer: str) -> list[dict]:
    return [{"role": "user", "content": question_text(item)}, {"role": "assistant", "content": answer}]


def unsure_by_entropy(entropies: list[float], fraction: float) -> list[bool]:
    """True for the round(fraction * n) highest-entropy rows (stable: earlier rows win ties)."""
    order = sorted(range(len(entropies)), key=lambda i: -entropies[i])
    marked = set(order[: round(fraction * len(entropies))])
    return [i in marked for i in range(len(entropies))]


def build_rows(recipe, items: list[dict], entropies: list[float] | None = None) -> list[dict]:
    variant = recipe.rtuning.variant
    rng = random.Random(recipe.rtuning.seed)
    unsure = unsure_by_entropy(entropies, recipe.rtuning.unsure_fraction) if entropies is not None else None
    rows = []
    for i, item in enumerate(items):
        gold = gold_answer(item)
        if item["kind"] == "open":
            gold = recipe.rtuning.answer_format.replace("{answer}", gold)
        if variant == "r-tuning":
            label = "sure" if item["correct"] else "unsure"
            messages = probed_chat(item, gold, item["correct"])
        elif variant == "r-tuning-u":
            label = "unsure" if unsure[i] else "sure"
            messages = probed_chat(item, gold, not unsure[i])
        elif variant == "r-tuning-r":
            refusal = rng.choice(REFUSALS)  # drawn for every row, so a row's phrase does not depend on others' labels
            label = "" if item["correct"] else "refuse"
            messages = plain_chat(item, gold if item["correct"] else refusal)
        else:
            label, messages = "", plain_chat(item, gold)
        rows.append({"messages": messages, "qid": item["qid"], "kind": item["kind"], "domain": item.get("domain", ""),
                     "question": item["question"], "variant": variant, "label": label,
                     "correct": bool(item["correct"]),
                     "entropy": float(entropies[i]) if entropies is not None else None})
    return rows


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    from datasets import Dataset, DatasetDict

    started = time.time()
    items, probe_path = load_probe(recipe)
    entropies = None
    if recipe.rtuning.variant == "r-tuning-u":
        model = QAModel(resolve_model(recipe, recipe.model, "model"), recipe.rtuning)
        samples = model.sample(items, recipe.rtuning.samples, recipe.rtuning.temperature, recipe.rtuning.seed)
        entropies = [entropy(s) for s in samples]
    rows = build_rows(recipe, items, entropies)
    path = stage_dir(recipe)
    clear_done(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path / DATASET) as tmp:
        DatasetDict({SPLIT: Dataset.from_list(rows)}).save_to_disk(str(tmp))
    labels: dict[str, int] = {}
    for r in rows:
        labels[r["label"] or "none"] = labels.get(r["label"] or "none", 0) + 1
    summary = {"stage": recipe.stage, "variant": recipe.rtuning.variant, "probe": str(probe_path), "rows": len(rows),
               "labels": labels, "probe_correct": sum(r["correct"] for r in rows),
               "seconds": round(time.time() - started, 1)}
    save_config(path, recipe)
    write_json(path / "summary.json", summary)
    mark_done(path, {"rows": len(rows)})
    print(f"rtuning-data ({recipe.rtuning.variant}): {len(rows)} chats, labels {labels} -> {path / DATASET}")
    return summary
