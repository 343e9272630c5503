"""Stage `sayself-data`: SaySelf SFT chats for the `sft` stage (SaySelf step 5).

Input: `inputs.dataset`, the sayself-rationale output (split `train`: QA columns, `reasoning`,
`answer`, `confidence`, `rationale`); the sayself-cluster output is enough for the variants
without a self-reflection. A confidence that is not an integer in 1-10 is a ConfigError naming
the row and its qid, before anything is written.

Each question becomes one chat: [user: `question_text(item)` + a blank line +
`pipeline.methods.sayself.SAYSELF_INSTRUCTION`, assistant: `pipeline.methods.sayself.format_response(...)`].
The user turn is the same in every variant, so the ablations differ only in the target.
`sayself.variant`:
- `full`: Reasoning, Answer, Self-reflection (the rationale), Confidence (the agreement target);
- `no-rationale`: Reasoning, Answer, Confidence;
- `no-confidence`: Reasoning, Answer, Self-reflection;
- `constant`: SFT with a constant confidence target: Reasoning, Answer, and Confidence =
  `sayself.constant_confidence` for every question (default: the rounded mean of the targets), no
  Self-reflection.
With the sft stage's assistant-only loss (the default) the loss covers the assistant turn only.

Output: `dataset/` (DatasetDict: split `train`, plus `test` when `sayself.test_fraction` > 0, a
seeded share of the questions chosen by qid): `messages`, `qid`, `kind`, `domain`, `question`,
`answers` (gold strings), `variant`, `confidence` (the one the target states; null for
no-confidence), `target_confidence` (the agreement target), `target_source`; `summary.json`,
`config.yaml`, `_SUCCESS` last.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from typing import Literal

from pydantic import Field

from pipeline.config import ConfigError, LaunchSection, RunSection, StageRef, Strict, local_paths
from pipeline.methods.rtuning import question_text
from pipeline.methods.sayself import CONFIDENCE_RANGE, SAYSELF_INSTRUCTION, SPLIT, format_response
from pipeline.records import QA_COLUMNS
from pipeline.runs import (
    DATASET,
    RunOptions,
    atomic_dir,
    clear_done,
    load_rows,
    mark_done,
    save_config,
    stage_dir,
    write_json,
)


class SayselfDataInputs(Strict):
    dataset: StageRef | str = Field(description="The sayself-rationale output (sayself-cluster's is enough for "
                                    "the variants without a self-reflection)")


class SayselfDataSection(Strict):
    variant: Literal["full", "no-rationale", "no-confidence", "constant"] = Field(
        "full", description="full: reasoning, answer, self-reflection, confidence; no-rationale: without the "
        "self-reflection; no-confidence: without the confidence; constant: reasoning, answer and the same "
        "confidence for every question (`constant_confidence`), no self-reflection")
    constant_confidence: int | None = Field(None, ge=1, le=10, description="constant: the confidence written; "
                                            "None = the rounded mean of the questions' targets")
    test_fraction: float = Field(0.0, ge=0, lt=1, description="Share of questions held out as split `test` "
                                 "(seeded, by qid); 0 = train only")
    seed: int = 0


class Recipe(Strict):
    stage: Literal["sayself-data"]
    run: RunSection
    inputs: SayselfDataInputs
    sayself: SayselfDataSection = SayselfDataSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return local_paths(**{"inputs.dataset": self.inputs.dataset})


TEST_SPLIT = "test"


def check_confidence(value, where: str) -> int:
    low, high = CONFIDENCE_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where}: confidence must be an integer in {low}-{high}, got {value!r}")
    return value


def held_out(qid: str, seed: int, fraction: float) -> bool:
    """Whether a question goes to `test`: a uniform number from (seed, qid) below `fraction`."""
    h = int(hashlib.sha256(f"sayself-data:{seed}:{qid}".encode()).hexdigest()[:16], 16)
    return h / 16**16 < fraction


def build_rows(recipe: Recipe, rows: list[dict]) -> list[dict]:
    s = recipe.sayself
    targets = [check_confidence(r["confidence"], f"inputs.dataset split {SPLIT!r} row {i} (qid {r['qid'][:12]})")
               for i, r in enumerate(rows)]
    constant = s.constant_confidence
    if s.variant == "constant" and constant is None:
        constant = max(CONFIDENCE_RANGE[0], min(CONFIDENCE_RANGE[1], round(sum(targets) / len(targets))))
    out = []
    for i, (row, target) in enumerate(zip(rows, targets)):
        if not str(row["reasoning"] or "").strip() or not str(row["answer"] or "").strip():
            raise ConfigError(f"inputs.dataset split {SPLIT!r} row {i} (qid {row['qid'][:12]}): empty reasoning or "
                              "answer")
        reflection = row["rationale"] if s.variant in ("full", "no-confidence") else None
        if reflection is not None and not str(reflection).strip():
            raise ConfigError(f"inputs.dataset split {SPLIT!r} row {i} (qid {row['qid'][:12]}): empty rationale")
        confidence = {"full": target, "no-rationale": target, "no-confidence": None, "constant": constant}[s.variant]
        response = format_response(row["reasoning"], row["answer"], reflection, confidence)
        out.append({"messages": [{"role": "user", "content": f"{question_text(row)}\n\n{SAYSELF_INSTRUCTION}"},
                                 {"role": "assistant", "content": response}],
                    "qid": row["qid"], "kind": row["kind"], "domain": row.get("domain") or "",
                    "question": row["question"], "answers": list(row["answers"] or []), "variant": s.variant,
                    "confidence": confidence, "target_confidence": target,
                    "target_source": row.get("target_source") or ""})
    return out


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    from datasets import Dataset, DatasetDict

    started = time.time()
    need = {*QA_COLUMNS, "reasoning", "answer", "confidence"}
    if recipe.sayself.variant in ("full", "no-confidence"):
        need.add("rationale")
    rows, input_path = load_rows(recipe, recipe.inputs.dataset, "inputs.dataset", need)
    out = build_rows(recipe, rows)
    s = recipe.sayself
    held = [s.test_fraction > 0 and held_out(r["qid"], s.seed, s.test_fraction) for r in out]
    test = [r for r, h in zip(out, held) if h]
    train = [r for r, h in zip(out, held) if not h]
    if not train:
        raise ConfigError(f"sayself.test_fraction={s.test_fraction} leaves no training question")
    path = stage_dir(recipe)
    clear_done(path)
    path.mkdir(parents=True, exist_ok=True)
    splits = {SPLIT: Dataset.from_list(train)}
    if s.test_fraction:
        splits[TEST_SPLIT] = Dataset.from_list(test, features=splits[SPLIT].features)
    with atomic_dir(path / DATASET) as tmp:
        DatasetDict(splits).save_to_disk(str(tmp))
    written = Counter(r["confidence"] for r in out)
    summary = {"stage": recipe.stage, "variant": s.variant, "input": str(input_path), "train": len(train),
               "test": len(test), "constant_confidence": out[0]["confidence"] if s.variant == "constant" else None,
               "confidence_written": {str(k): written[k] for k in sorted(written, key=lambda c: (c is None, c or 0))},
               "mean_target_confidence": round(sum(r["target_confidence"] for r in out) / len(out), 3),
               "seconds": round(time.time() - started, 1)}
    save_config(path, recipe)
    write_json(path / "summary.json", summary)
    mark_done(path, {"train": len(train), "test": len(test)})
    print(f"sayself-data ({s.variant}): {len(train)} training chats" + (f", {len(test)} held out" if test else "")
          + f" -> {path / DATASET}")
    return summary
