"""Stage `pairs`: preference pairs (and critique SFT rows) from judged completion sets.

Input: `inputs.annotations`, the `annotate` stage's dataset or a `datasets` folder, JSONL or
parquet file in the public `openbmb/UltraFeedback` row shape (a missing `prompt_id` is the
sha256 of the instruction, a missing `reference` is empty). Every row is checked before anything
is written; a bad one stops the stage with `file:line` (JSONL) or `file:row N` (tables).

Scores. `pairs.score` picks `overall_score` (the critique's 1-10) or `fine-grained_score` (mean
of the non-N/A aspect ratings, 1-5). `argilla` ignores it and uses the mean of the four aspect
ratings recomputed from `annotations` (N/A left out), as Argilla's cleaned binarisation did
after the overall-score parsing bug in the public data. A completion without the chosen score is
skipped; a row left with fewer than two scored completions gives no pair. Both are counted.

Strategies (one `random.Random` per prompt, seeded by `pairs.seed` and the prompt id, so a
row's pairs do not depend on where the row sits in the input):
- `h4`: chosen = the top score (a tie at the top is broken at random), rejected = any other
  completion at random; a pair whose scores are equal says nothing and is dropped (counted).
- `argilla`: chosen = the top aspect mean (ties at random), rejected = a random completion with
  a strictly lower mean; none lower: dropped (counted).
- `all`: every ordered pair (i, j) with score_i > score_j; equal pairs are counted as ties.
`margin` = (score_chosen - score_rejected) / (top - bottom of the scale): / 9 for the overall
score, / 4 for the 1-5 scales, so it lies in (0, 1].

Output shape (`dataset/`, a DatasetDict: train_prefs, test_prefs, train_sft, test_sft,
train_gen, test_gen). The columns are those of HuggingFaceH4/ultrafeedback_binarized (`prompt`,
`prompt_id`, `chosen`, `rejected`, `messages`, `score_chosen`, `score_rejected`) plus `source`,
`chosen_model`, `rejected_model` and `margin`, with one change: `prompt` is the conversational
prompt (`[{"role": "user", ...}]`) and `chosen`/`rejected` hold only the assistant turn, i.e.
TRL's explicit-prompt conversational preference format; `messages` is the whole chosen
conversation, as in H4. Why: H4's own layout (a `prompt` string beside whole conversations in
`chosen`/`rejected`) fails in TRL 1.12 in both trainers. `RewardTrainer._prepare_dataset`
(reward_trainer.py:672-674) and `DPOTrainer._prepare_dataset` (dpo_trainer.py:1050-1065) compute
`prompt + chosen`, a str plus a list; and `is_conversational` (data_utils.py:184-196) looks at
one arbitrary key of {prompt, chosen, rejected, messages} (a set's pop, so it changes with
PYTHONHASHSEED), and when that is the string prompt both trainers take the "standard text" path
and call `chosen.endswith` on a list. With a conversational prompt every one of those keys is a
list of messages, `prompt + chosen` is the full conversation in the reward trainer and the
prompt/completion split in DPO, and both load the splits with no column edit. (The other
TRL-accepted shape, implicit prompt with no `prompt` column, would drop an H4 column.)
`RewardTrainer` keeps `margin` (its signature columns are chosen_ids, rejected_ids, margin,
reward_trainer.py:714; the collator batches it, :202-223) and subtracts it inside the loss,
-logsigmoid(r_chosen - r_rejected - margin) (:754-755). DPOTrainer drops the extra columns.
Train/test is split by prompt (a seeded hash of the prompt id against `test_fraction`), so a
prompt's pairs never straddle splits; `*_sft` and `*_gen` hold one row per prompt, its best pair
(highest chosen score, then widest margin). Rows are ordered by prompt id, so the output does
not depend on the input's row order either.

`critique/` (when `critique_export`): a DatasetDict train/test (same prompt split) with one row
per completion that has a critique and an overall score (from every row the truthful_qa filter
keeps, whether or not it gave a pair), for training a critique model
(UltraCM): the fields, and `messages` = a user turn framing instruction + completion
(CRITIQUE_REQUEST) and an assistant turn = the critique + "\\nOverall score: N".

Also `summary.json` (counts, margins, seed), `report/margins.png`, `config.yaml`, `_SUCCESS` last.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.config import ConfigError, LaunchSection, RunSection, StageRef, Strict
from pipeline.judge import rubric
from pipeline.records import prompt_id as make_prompt_id
from pipeline.records import check_rows, saved_rows
from pipeline.report import figure
from pipeline.runs import (
    DATASET,
    RunOptions,
    atomic_dir,
    clear_done,
    mark_done,
    resolve_input,
    save_config,
    stage_dir,
    write_json,
)


class PairsInputs(Strict):
    annotations: StageRef | str = Field(
        description="The annotate stage output, or a dataset folder / JSONL / parquet in the "
        "openbmb/UltraFeedback row shape"
    )


class PairsSection(Strict):
    strategy: Literal["h4", "argilla", "all"] = Field(
        "h4", description="h4: best vs a random other; argilla: best vs a random strictly lower "
        "(ties dropped); all: every pair with a score gap"
    )
    score: Literal["overall", "fine-grained"] = "overall"
    remove_truthful_qa: bool = Field(False, description="Drop prompts from TruthfulQA (it is also an eval set)")
    test_fraction: float = Field(0.05, ge=0, lt=1, description="Share of prompts held out for test_* splits")
    seed: int = 0
    critique_export: bool = Field(True, description="Also write the critique SFT data (for UltraCM)")


class Recipe(Strict):
    stage: Literal["pairs"]
    run: RunSection
    inputs: PairsInputs
    pairs: PairsSection = PairsSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return [("inputs.annotations", self.inputs.annotations)] if isinstance(self.inputs.annotations, str) else []


ASPECTS = rubric.ASPECTS  # the judge's aspects, in its order
SPLITS = ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen")
CRITIQUE = "critique"
REPORT = "report"

# Scale of each score: (lowest, highest). Margins are divided by highest - lowest.
SCALES = {"overall_score": (1.0, 10.0), "fine-grained_score": (1.0, 5.0), "aspect_mean": (1.0, 5.0)}

CRITIQUE_REQUEST = (
    "You are reviewing an answer written by an AI assistant.\n\n"
    "[Instruction]\n{instruction}\n\n"
    "[Answer]\n{completion}\n\n"
    "Give feedback on the answer: say what it does well and what it gets wrong or leaves out, "
    "judging how helpful, correct and honest it is and how closely it follows the instruction. "
    "End with one line of the form \"Overall score: N\", where N is a whole number from 1 "
    "(useless) to 10 (excellent)."
)
CRITIQUE_SCORE_LINE = "\nOverall score: {score}"


def _message_list():
    from datasets import List, Value

    return List({"role": Value("string"), "content": Value("string")})


def pair_features():
    from datasets import Features, Value

    messages = _message_list()
    return Features({
        "prompt": messages, "prompt_id": Value("string"), "chosen": messages, "rejected": messages,
        "messages": messages, "score_chosen": Value("float64"), "score_rejected": Value("float64"),
        "source": Value("string"), "chosen_model": Value("string"), "rejected_model": Value("string"),
        "margin": Value("float64"),
    })


def critique_features():
    from datasets import Features, Value

    return Features({
        "prompt_id": Value("string"), "instruction": Value("string"), "completion": Value("string"),
        "principle": Value("string"), "custom_system_prompt": Value("string"), "critique": Value("string"),
        "overall_score": Value("int64"), "source": Value("string"), "model": Value("string"),
        "messages": _message_list(),
    })


# ---------------------------------------------------------------- reading and checking input


@dataclass(frozen=True)
class Completion:
    model: str
    response: str
    overall: float | None
    fine: float | None
    aspect_mean: float | None
    critique: str
    principle: str
    system_prompt: str

    def score(self, name: str) -> float | None:
        return {"overall_score": self.overall, "fine-grained_score": self.fine, "aspect_mean": self.aspect_mean}[name]


@dataclass(frozen=True)
class Row:
    where: str
    prompt_id: str
    source: str
    instruction: str
    completions: tuple[Completion, ...]


def _number(value, key: str, where: str) -> float | None:
    """A score as float; None (or NaN, as pandas writes a missing float) means not annotated."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {key} must be a number or null, got {value!r}")
    value = float(value)
    if math.isnan(value):
        return None
    name = key.rsplit(".", 1)[-1]
    low, high = SCALES[name]
    if not low <= value <= high:
        raise ConfigError(f"{where}: {key} = {value:g} is outside its range {low:g}..{high:g}")
    return value


def _text_or_empty(value, key: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string or null, got {type(value).__name__}")
    return value


def _aspect_mean(annotations, key: str, where: str) -> float | None:
    """Mean of the aspect ratings that are given and not N/A; None when there is none."""
    if annotations is None:
        return None
    if not isinstance(annotations, dict):
        raise ConfigError(f"{where}: {key} must be an object, got {type(annotations).__name__}")
    ratings = []
    for aspect in ASPECTS:
        entry = annotations.get(aspect)
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: {key}.{aspect} must be an object, got {type(entry).__name__}")
        rating = entry.get("Rating")
        if rating is None or rating == "N/A":
            continue
        text = str(rating).strip() if isinstance(rating, (str, int)) and not isinstance(rating, bool) else None
        if text not in ("1", "2", "3", "4", "5"):
            raise ConfigError(f"{where}: {key}.{aspect}.Rating = {rating!r} is not one of '1'..'5' or 'N/A'")
        ratings.append(int(text))
    return sum(ratings) / len(ratings) if ratings else None


def check_row(raw, where: str) -> Row:
    """One input row as a Row, or a ConfigError that names `where` and the problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if "instruction" not in raw:
        raise ConfigError(f"{where}: missing field `instruction`")
    instruction = raw["instruction"]
    if not isinstance(instruction, str) or not instruction.strip():
        raise ConfigError(f"{where}: `instruction` must be a non-empty string")
    source = raw.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{where}: `source` must be a non-empty string, got {source!r}")
    if "completions" not in raw:
        raise ConfigError(f"{where}: missing field `completions`")
    completions = raw["completions"]
    if not isinstance(completions, list):
        raise ConfigError(f"{where}: `completions` must be a list, got {type(completions).__name__}")
    pid = raw.get("prompt_id")
    if pid is None or pid == "":
        pid = make_prompt_id(instruction)
    elif not isinstance(pid, str):
        raise ConfigError(f"{where}: `prompt_id` must be a string, got {type(pid).__name__}")
    out = []
    for i, c in enumerate(completions):
        key = f"completions[{i}]"
        if not isinstance(c, dict):
            raise ConfigError(f"{where}: {key} must be an object, got {type(c).__name__}")
        if not isinstance(c.get("response"), str):
            raise ConfigError(f"{where}: {key} has no string `response`")
        if not isinstance(c.get("model"), str) or not c["model"]:
            raise ConfigError(f"{where}: {key} has no string `model`")
        out.append(Completion(
            model=c["model"], response=c["response"],
            overall=_number(c.get("overall_score"), f"{key}.overall_score", where),
            fine=_number(c.get("fine-grained_score"), f"{key}.fine-grained_score", where),
            aspect_mean=_aspect_mean(c.get("annotations"), f"{key}.annotations", where),
            critique=_text_or_empty(c.get("critique"), f"{key}.critique", where),
            principle=_text_or_empty(c.get("principle"), f"{key}.principle", where),
            system_prompt=_text_or_empty(c.get("custom_system_prompt"), f"{key}.custom_system_prompt", where),
        ))
    return Row(where=where, prompt_id=pid, source=source, instruction=instruction, completions=tuple(out))


def load_rows(recipe: Recipe) -> tuple[Path, list[Row]]:
    path = resolve_input(recipe, recipe.inputs.annotations, "inputs.annotations")
    rows = [check_row(raw, where) for where, raw in saved_rows(path)]
    if not rows:
        raise ConfigError(f"inputs.annotations: {path} holds no rows")
    # pairs, their held-out split and the SFT pick are keyed by prompt_id
    check_rows(((r.where, {"prompt_id": r.prompt_id}) for r in rows), {"prompt_id": "text"}, "inputs.annotations",
               unique=("prompt_id",))
    return path, rows


# ---------------------------------------------------------------- pairing


@dataclass(frozen=True)
class Pair:
    chosen: int  # index into the row's completions
    rejected: int
    score_chosen: float
    score_rejected: float
    margin: float


@dataclass
class RowOutcome:
    pairs: list[Pair] = field(default_factory=list)
    skipped_completions: int = 0  # no score of the kind in use, or a blank answer
    ties: int = 0  # candidate pairs dropped because both scores were equal
    dropped: str | None = None  # why the row gave no pair


def score_source(strategy: str, score: str) -> str:
    return "aspect_mean" if strategy == "argilla" else ("overall_score" if score == "overall" else "fine-grained_score")


def row_rng(seed: int, pid: str) -> random.Random:
    return random.Random(f"pairs:{seed}:{pid}")


def pair_row(row: Row, strategy: str, source: str, seed: int) -> RowOutcome:
    """The pairs of one row under a strategy; pure (its randomness comes from seed + prompt id)."""
    low, high = SCALES[source]
    span = high - low
    # A blank answer teaches nothing and the training stages refuse it
    scored = [(i, c.score(source)) for i, c in enumerate(row.completions)
              if c.score(source) is not None and c.response.strip()]
    out = RowOutcome(skipped_completions=len(row.completions) - len(scored))
    text = [c.response for c in row.completions]
    if len(scored) < 2:
        out.dropped = "fewer_than_two_scored"
        return out

    def make(i: int, s_i: float, j: int, s_j: float) -> Pair:
        return Pair(chosen=i, rejected=j, score_chosen=s_i, score_rejected=s_j, margin=(s_i - s_j) / span)

    if strategy == "all":
        for i, s_i in scored:
            for j, s_j in scored:
                if s_i > s_j and text[i] != text[j]:
                    out.pairs.append(make(i, s_i, j, s_j))
                elif i < j and (s_i == s_j or text[i] == text[j]):  # the same answer twice is a tie too
                    out.ties += 1
    else:
        rng = row_rng(seed, row.prompt_id)
        top = max(s for _, s in scored)
        chosen, s_chosen = rng.choice([(i, s) for i, s in scored if s == top])
        if strategy == "h4":
            candidates = [(j, s) for j, s in scored if j != chosen and text[j] != text[chosen]]
        else:  # argilla: only strictly lower means
            candidates = [(j, s) for j, s in scored if s < s_chosen and text[j] != text[chosen]]
        if candidates:
            rejected, s_rejected = rng.choice(candidates)
            if s_rejected < s_chosen:
                out.pairs.append(make(chosen, s_chosen, rejected, s_rejected))
            else:
                out.ties += 1
        else:
            out.ties += 1
    if not out.pairs:
        out.dropped = "tied"
    return out


def is_test(pid: str, seed: int, fraction: float) -> bool:
    """Seeded hash of the prompt id, uniform in [0, 1), against the test fraction."""
    digest = hashlib.sha256(f"split:{seed}:{pid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _pair_record(row: Row, pair: Pair) -> dict:
    chosen, rejected = row.completions[pair.chosen], row.completions[pair.rejected]
    user = {"role": "user", "content": row.instruction}
    return {
        "prompt": [user], "prompt_id": row.prompt_id,
        "chosen": [{"role": "assistant", "content": chosen.response}],
        "rejected": [{"role": "assistant", "content": rejected.response}],
        "messages": [user, {"role": "assistant", "content": chosen.response}],
        "score_chosen": pair.score_chosen, "score_rejected": pair.score_rejected,
        "source": row.source, "chosen_model": chosen.model, "rejected_model": rejected.model,
        "margin": pair.margin,
    }


def _best(records: list[dict]) -> dict:
    """A prompt's best pair: highest chosen score, then widest margin, then by text (fixed order)."""
    return max(records, key=lambda r: (r["score_chosen"], r["margin"], r["chosen"][0]["content"],
                                       r["rejected"][0]["content"], r["chosen_model"], r["rejected_model"]))


def critique_records(row: Row) -> tuple[list[dict], int]:
    """Critique SFT rows of one row, and how many completions lacked a critique or a score."""
    records, skipped = [], 0
    for c in row.completions:
        text = c.critique.strip()
        if not text or c.overall is None:
            skipped += 1
            continue
        score = int(math.floor(c.overall + 0.5))
        records.append({
            "prompt_id": row.prompt_id, "instruction": row.instruction, "completion": c.response,
            "principle": c.principle, "custom_system_prompt": c.system_prompt, "critique": text,
            "overall_score": score, "source": row.source, "model": c.model,
            "messages": [
                {"role": "user", "content": CRITIQUE_REQUEST.format(instruction=row.instruction,
                                                                    completion=c.response)},
                {"role": "assistant", "content": text + CRITIQUE_SCORE_LINE.format(score=score)},
            ],
        })
    return records, skipped


def build(rows: list[Row], recipe: Recipe) -> tuple[dict[str, list[dict]], dict[str, list[dict]], dict]:
    """Every output row (pairs per split, critique rows per split) and the counts; writes nothing."""
    cfg = recipe.pairs
    source = score_source(cfg.strategy, cfg.score)
    # Sorted by prompt id (stable): the output order does not depend on the input's row order.
    rows = sorted(rows, key=lambda r: r.prompt_id)
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    critique: dict[str, list[dict]] = {"train": [], "test": []}
    dropped: Counter = Counter()
    per_source: Counter = Counter()
    by_prompt: dict[tuple[str, str], list[dict]] = {}
    counts = Counter()
    for row in rows:
        counts["completions_read"] += len(row.completions)
        if cfg.remove_truthful_qa and row.source == "truthful_qa":
            dropped["truthful_qa"] += 1
            continue
        part = "test" if is_test(row.prompt_id, cfg.seed, cfg.test_fraction) else "train"
        if cfg.critique_export:
            records, skipped = critique_records(row)
            critique[part] += records
            counts["critique_skipped"] += skipped
        outcome = pair_row(row, cfg.strategy, source, cfg.seed)
        counts["completions_without_score"] += outcome.skipped_completions
        counts["ties_dropped"] += outcome.ties
        if outcome.dropped:
            dropped[outcome.dropped] += 1
            continue
        counts["rows_with_pairs"] += 1
        records = [_pair_record(row, pair) for pair in outcome.pairs]
        splits[f"{part}_prefs"] += records
        per_source[row.source] += len(records)
        by_prompt.setdefault((part, row.prompt_id), []).extend(records)
    for (part, _), records in sorted(by_prompt.items(), key=lambda item: item[0][1]):
        best = _best(records)
        splits[f"{part}_sft"].append(best)
        splits[f"{part}_gen"].append(best)

    margins = [r["margin"] for name in ("train_prefs", "test_prefs") for r in splits[name]]
    summary = {
        "strategy": cfg.strategy,
        "score_source": source,
        "seed": cfg.seed,
        "test_fraction": cfg.test_fraction,
        "remove_truthful_qa": cfg.remove_truthful_qa,
        "rows_read": len(rows),
        "rows_with_pairs": counts["rows_with_pairs"],
        "rows_dropped": {reason: dropped[reason] for reason in ("truthful_qa", "fewer_than_two_scored", "tied")},
        "completions_read": counts["completions_read"],
        "completions_without_score": counts["completions_without_score"],
        "ties_dropped": counts["ties_dropped"],
        "pairs_train": len(splits["train_prefs"]),
        "pairs_test": len(splits["test_prefs"]),
        "splits": {name: len(splits[name]) for name in SPLITS},
        "pairs_per_source": dict(sorted(per_source.items())),
        "margin": {
            "count": len(margins),
            "min": round(min(margins), 6) if margins else None,
            "mean": round(statistics.fmean(margins), 6) if margins else None,
            "median": round(statistics.median(margins), 6) if margins else None,
            "max": round(max(margins), 6) if margins else None,
        },
        "critique": ({"train": len(critique["train"]), "test": len(critique["test"]),
                      "completions_skipped": counts["critique_skipped"]} if cfg.critique_export else None),
    }
    return splits, critique, summary


# ---------------------------------------------------------------- writing


def plot_margins(margins: list[float], path: Path, title: str) -> None:
    with figure(path, dpi=110, figsize=(5.5, 3.5)) as (_, ax):
        ax.hist(margins, bins=[k / 18 for k in range(19)], color="#4c72b0", edgecolor="white")
        ax.set_xlim(0, 1)
        ax.set_xlabel("margin = (score chosen - score rejected) / scale width")
        ax.set_ylabel("pairs")
        ax.set_title(title, fontsize=9)


def print_summary(summary: dict, path: Path) -> None:
    print(f"pairs ({summary['strategy']} on {summary['score_source']}, seed {summary['seed']}): "
          f"{summary['pairs_train'] + summary['pairs_test']} pairs from {summary['rows_with_pairs']} of "
          f"{summary['rows_read']} rows -> {path / DATASET}")
    print("  " + "  ".join(f"{name} {count}" for name, count in summary["splits"].items()))
    dropped = ", ".join(f"{reason} {n}" for reason, n in summary["rows_dropped"].items())
    print(f"  rows dropped: {dropped}; completions without a score {summary['completions_without_score']}; "
          f"ties dropped {summary['ties_dropped']}")
    print(f"  {'source':<20}{'pairs':>7}")
    for source, count in summary["pairs_per_source"].items():
        print(f"  {source:<20}{count:>7}")
    m = summary["margin"]
    if m["count"]:
        print(f"  margin: min {m['min']:.3f}  mean {m['mean']:.3f}  median {m['median']:.3f}  max {m['max']:.3f}")
    if summary["critique"] is not None:
        c = summary["critique"]
        print(f"  critique rows: train {c['train']}, test {c['test']} "
              f"({c['completions_skipped']} completions without critique or score)")


def _save(parts: dict[str, list[dict]], features, dest: Path) -> None:
    """Save splits as a DatasetDict; an empty split keeps its columns and still loads.

    (`Dataset.from_list([])` would keep no columns, and datasets 5.2 saves a 0-row split as zero
    shards that `load_from_disk` then fails on, so an empty split is built from empty columns and
    saved as one shard.)"""
    from datasets import Dataset, DatasetDict

    data = DatasetDict({
        name: (Dataset.from_list(records, features=features) if records
               else Dataset.from_dict({column: [] for column in features}, features=features))
        for name, records in parts.items()})
    data.save_to_disk(str(dest), num_shards={name: 1 for name, records in parts.items() if not records})


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    path = stage_dir(recipe)
    clear_done(path)  # from here on, a failure leaves the stage not done
    # Read, check and pair everything before writing: bad input leaves nothing behind.
    source_path, rows = load_rows(recipe)
    splits, critique, summary = build(rows, recipe)
    if not summary["pairs_train"] + summary["pairs_test"]:
        d = summary["rows_dropped"]
        raise ConfigError(
            f"inputs.annotations: {source_path}: no preference pair could be formed from {len(rows)} rows "
            f"({d['fewer_than_two_scored']} with fewer than two scored completions, {d['tied']} tied, "
            f"{d['truthful_qa']} truthful_qa removed)")
    summary["input"] = str(source_path)

    path.mkdir(parents=True, exist_ok=True)
    save_config(path, recipe)
    features = pair_features()
    with atomic_dir(path / DATASET) as tmp:
        _save({name: splits[name] for name in SPLITS}, features, tmp)
    if recipe.pairs.critique_export:
        cfeatures = critique_features()
        with atomic_dir(path / CRITIQUE) as tmp:
            _save(critique, cfeatures, tmp)
    else:
        import shutil

        shutil.rmtree(path / CRITIQUE, ignore_errors=True)  # not from an earlier run with export on
    margins = [r["margin"] for name in ("train_prefs", "test_prefs") for r in splits[name]]
    plot_margins(margins, path / REPORT / "margins.png",
                 f"{summary['strategy']} on {summary['score_source']}: {len(margins)} pairs")
    summary["report"] = ["margins.png"]
    write_json(path / "summary.json", summary)
    mark_done(path, {"pairs": len(margins), "prompts": summary["splits"]["train_sft"] + summary["splits"]["test_sft"]})
    print_summary(summary, path)
    return summary
