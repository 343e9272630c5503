"""Stage `reward`: a reward model (UltraRM-style) trained on a mixture of preference datasets.

Sources (`reward.sources`, each tagged with its `name`):
- `pairs`: our `pairs` output, or any `datasets` folder or file of chosen/rejected pairs in
  HuggingFaceH4/ultrafeedback_binarized's layout or TRL's (explicit or implicit prompt; strings or
  conversations); splits `train_split` / `eval_split`.
- `auto`: any layout of `pipeline.formats.preferences.LAYOUTS`, detected per row by its shape;
  `h4`, `trl-explicit`, `trl-implicit` name one of them.
- `anthropic_hh`, `shp`, `summarize`: the public row shapes of Anthropic HH-RLHF, Stanford SHP
  and OpenAI summarize_from_feedback comparisons, read from JSONL, parquet or a `datasets`
  folder. A single file has no splits, so a seeded 10 % (at least one row) is held out.
- `bigbench-hhh`: BIG-bench's hhh_alignment pairs (`pipeline.formats.fetch`); usually
  `eval_only: true`, and its accuracy is also given per subset (harmless/helpful/honest/other).
`eval_only: true` holds a source's rows (its file, or its `eval_split`) out for accuracy alone.
Every row becomes TRL's explicit-prompt conversational shape (`prompt` = the turns before the
answer, `chosen`/`rejected` = the answer as one assistant turn), plus `margin` and `source`.
Rank-only data has margin 0 (as UltraRM did); `use_margin: false` zeroes it for a source too.
`train_size`/`eval_size` sample rows (seeded by `train.seed` and the source name).

Everything is read and checked before anything is written: a bad row is a ConfigError naming
`reward.sources[i]` and the file (line for JSONL). Training is TRL's RewardTrainer (loss
-logsigmoid(r_c - r_r - margin)); the model is `AutoModelForSequenceClassification` with one
label. Evaluation scores each held-out pair with the saved model and counts reward(chosen) >
reward(rejected) (a tie is a miss), per source and overall: `eval.json`, `summary.json`,
`report/accuracy.png`, then `_SUCCESS`.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.config import (
    ConfigError,
    LaunchSection,
    ModelRef,
    RunSection,
    StageRef,
    Strict,
    TrainSection,
    local_paths,
)
from pipeline.formats.preferences import (
    PREFERENCE_FORMATS,
    convert,
    detect,
    has_splits,
    read_file_rows,
    read_split_rows,
)
from pipeline.report import figure
from pipeline.runs import (
    RunOptions,
    clear_done,
    mark_done,
    resolve_input,
    resolve_model,
    save_config,
    stage_dir,
    write_json,
)
from pipeline.train import (
    check_pair_rows,
    is_main_process,
    last_checkpoint,
    lora_config,
    save_model,
    seed_all,
    train_or_resume,
    trl_config,
    world_size,
)


class RewardSource(Strict):
    """One preference dataset of the reward mixture."""

    name: str = Field(description="Label in the accuracy table")
    dataset: StageRef | str
    format: Literal[PREFERENCE_FORMATS] = Field(  # type: ignore[valid-type]
        "pairs", description="pairs: our `pairs` output (or any chosen/rejected pairs in H4's or TRL's layout); "
        "auto: each row's public layout detected by its shape; or a layout by name (h4, trl-explicit, "
        "trl-implicit, anthropic_hh, shp, summarize, bigbench-hhh)")
    train_split: str = "train_prefs"
    eval_split: str | None = "test_prefs"
    train_size: int | None = Field(None, ge=1, description="Sample this many training pairs (seeded); None = all")
    eval_size: int | None = Field(None, ge=1)
    use_margin: bool = Field(True, description="Pass the margin column to the loss (0 when the source has none)")
    eval_only: bool = Field(False, description="Only measure accuracy on this source (all of a file, or its "
                            "eval_split); train on none of it")


class RewardSection(Strict):
    sources: list[RewardSource] = Field(min_length=1)


class Recipe(Strict):
    stage: Literal["reward"]
    run: RunSection
    model: ModelRef | str = Field(description="Base model (a folder, or a stage's model); a linear score head is added")
    train: TrainSection = TrainSection()
    reward: RewardSection
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return local_paths(model=self.model, **{f"reward.sources[{i}].dataset": s.dataset
                                                 for i, s in enumerate(self.reward.sources)})


REPORT = "report"
HOLDOUT_FRACTION = 0.10  # public files come unsplit; this share is held out for accuracy
COLUMNS = ("prompt", "chosen", "rejected", "margin", "source")


# --- reading and converting the sources ---------------------------------------------------------


def layouts(rows: list[tuple[str, dict]], fmt: str) -> dict:
    """With `format: auto`, how many rows had each detected layout (for the summary)."""
    if fmt != "auto":
        return {}
    from collections import Counter

    return {"layouts": dict(Counter(detect(row) for _, row in rows))}


def load_source(recipe: Recipe, index: int, source: RewardSource) -> tuple[list[dict], list[dict], dict]:
    """(train rows, eval rows, counts) of one source, converted, sampled and tagged."""
    key = f"reward.sources[{index}]"
    path = resolve_input(recipe, source.dataset, f"{key}.dataset")
    rng = random.Random(f"{recipe.train.seed}:{source.name}")
    if has_splits(path) and source.eval_only:
        if not source.eval_split:
            raise ConfigError(f"{key}: eval_only needs an eval_split for the saved folder {path}")
        train_raw, eval_raw = [], read_split_rows(path, source.eval_split, key, f"{key}.eval_split")
        held_out = False
    elif source.eval_only:
        train_raw, eval_raw, held_out = [], read_file_rows(path, key), False
    elif has_splits(path):
        train_raw = read_split_rows(path, source.train_split, key, f"{key}.train_split")
        eval_raw = (read_split_rows(path, source.eval_split, key, f"{key}.eval_split")
                    if source.eval_split else [])
        held_out = False
    else:
        rows = read_file_rows(path, key)
        order = list(range(len(rows)))
        rng.shuffle(order)
        n_eval = max(1, round(HOLDOUT_FRACTION * len(rows))) if len(rows) > 1 else 0
        eval_raw = [rows[i] for i in sorted(order[:n_eval])]
        train_raw = [rows[i] for i in sorted(order[n_eval:])]
        held_out = True

    # Every row of the source is converted and checked (sampled or not, train or held out, in
    # file order so a repeat names its first occurrence), so a bad one stops the stage here.
    everything = rows if held_out else train_raw + eval_raw
    pairs = {where: convert(row, source.format, where, key) for where, row in everything}
    ids = bool(everything) and all("prompt_id" in row for _, row in everything)
    check_pair_rows([(where, {**pairs[where], **({"prompt_id": row["prompt_id"]} if ids else {})})
                     for where, row in everything], key, margin=True, columns=("prompt_id",) if ids else ())

    def take(raw: list[tuple[str, dict]], size: int | None) -> list[dict]:
        if size is not None and size < len(raw):
            raw = [raw[i] for i in sorted(rng.sample(range(len(raw)), size))]
        out = []
        for where, _ in raw:
            pair = pairs[where]
            margin = pair["margin"] if source.use_margin and pair["margin"] is not None else 0.0
            out.append({**pair, "margin": float(margin), "source": source.name})
        return out

    train, held = take(train_raw, source.train_size), take(eval_raw, source.eval_size)
    if not train and not source.eval_only:
        raise ConfigError(f"{key}: {path}: no training pairs")
    if source.eval_only and not held:
        raise ConfigError(f"{key}: {path}: no pairs to evaluate")
    counts = {"path": str(path), "format": source.format, **layouts(everything, source.format),
              "available_train": len(train_raw),
              "available_eval": len(eval_raw), "train": len(train), "eval": len(held), "held_out_from_file": held_out}
    return train, held, counts


# --- scoring ------------------------------------------------------------------------------------


def score_pairs(model, tokenizer, rows: list[dict], max_length: int, batch_size: int = 16) -> list[tuple[float, float]]:
    """(reward chosen, reward rejected) per row, tokenised as RewardTrainer does (prompt + answer
    through the chat template), right-truncated to max_length, batched, no grad."""
    import torch
    from trl.data_utils import _tokenize

    device = next(model.parameters()).device
    texts = []
    for row in rows:
        for side in ("chosen", "rejected"):
            ids = _tokenize(tokenizer, row["prompt"] + row[side])["input_ids"]
            texts.append(ids[:max_length])
    pad = tokenizer.pad_token_id
    scores = [0.0] * len(texts)
    # Batches of similar length (then put back in order): padding is most of the work otherwise.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = [texts[i] for i in chunk]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch], device=device)
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], device=device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, 0]
            for i, value in zip(chunk, logits.float().cpu().tolist()):
                scores[i] = value
    model.train(was_training)
    return list(zip(scores[0::2], scores[1::2]))


# Two scores this close are a tie (a miss): the same text scored in two padded batches can differ
# in the last float bits, and such a "gap" says nothing about the preference.
TIE_TOLERANCE = 1e-4


def wins(chosen: float, rejected: float) -> bool:
    return chosen - rejected > TIE_TOLERANCE * max(1.0, abs(chosen), abs(rejected))


def _accuracy(scores: list[tuple[float, float]], idx: list[int]) -> dict:
    gaps = [scores[i][0] - scores[i][1] for i in idx]
    won = [wins(*scores[i]) for i in idx]
    return {"pairs": len(idx), "accuracy": (sum(won) / len(idx)) if idx else None,
            "mean_reward_gap": (sum(gaps) / len(idx)) if idx else None}


def accuracy_table(rows: list[dict], scores: list[tuple[float, float]], names: list[str],
                   subsets: list[str] | None = None) -> dict:
    """Pairwise accuracy (a tie is a miss) and mean reward gap per source and overall; with
    `subsets` (one label per row, "" = none), a source whose rows have labels also gets
    `subsets`: the same figures per label."""
    table = {}
    groups = {name: [i for i, r in enumerate(rows) if r["source"] == name] for name in names}
    groups["overall"] = list(range(len(rows)))
    for name, idx in groups.items():
        table[name] = _accuracy(scores, idx)
        labels = sorted({subsets[i] for i in idx if subsets[i]}) if subsets and name != "overall" else []
        if labels:
            table[name]["subsets"] = {label: _accuracy(scores, [i for i in idx if subsets[i] == label])
                                      for label in labels}
    return table


def plot_accuracy(table: dict, path: Path, title: str) -> None:
    names = [n for n, r in table.items() if r["accuracy"] is not None]
    with figure(path, dpi=110, figsize=(1.2 * len(names) + 2.5, 3.5)) as (_, ax):
        bars = ax.bar(names, [table[n]["accuracy"] for n in names],
                      color=["#4c72b0" if n != "overall" else "#55a868" for n in names])
        for bar, name in zip(bars, names):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, f"n={table[name]['pairs']}",
                    ha="center", fontsize=7)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)  # chance
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("pairwise accuracy")
        ax.set_title(title, fontsize=9)


def print_table(table: dict) -> None:
    print(f"  {'source':<20}{'pairs':>7}{'accuracy':>10}{'gap':>9}")
    rows = []
    for name, r in table.items():
        rows += [(name, r)] + [(f"  {name}/{label}", sub) for label, sub in r.get("subsets", {}).items()]
    for name, r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        gap = "-" if r["mean_reward_gap"] is None else f"{r['mean_reward_gap']:.3f}"
        print(f"  {name:<20}{r['pairs']:>7}{acc:>10}{gap:>9}")


# --- the stage ----------------------------------------------------------------------------------


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    path = stage_dir(recipe)
    clear_done(path)  # from here on, a failure leaves the stage not done
    # All checks before any write: inputs, model folder, batch arithmetic (inside trl_config).
    train_rows, eval_rows, per_source = [], [], {}
    for i, source in enumerate(recipe.reward.sources):
        train, held, counts = load_source(recipe, i, source)
        train_rows += train
        eval_rows += held
        per_source[source.name] = counts
    if not train_rows:
        raise ConfigError("reward.sources: every source is eval_only; at least one must give training pairs")
    # Subset labels (bigbench-hhh) go to the accuracy table, not into the datasets' columns.
    for row in train_rows:
        row.pop("subset", None)
    eval_subsets = [row.pop("subset", "") for row in eval_rows]
    names = [s.name for s in recipe.reward.sources]
    if len(set(names)) != len(names) or "overall" in names:
        raise ConfigError("reward.sources: names must be unique and not 'overall' (they label the accuracy table)")
    model_path = resolve_model(recipe, recipe.model, "model")
    args = trl_config(RewardConfig, recipe.train, path, max_length=recipe.train.max_length)
    random.Random(recipe.train.seed).shuffle(train_rows)

    resume = last_checkpoint(path)
    if is_main_process():
        path.mkdir(parents=True, exist_ok=True)
        save_config(path, recipe)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token is None:  # many base models ship without one; the score head needs it
        tokenizer.pad_token = tokenizer.eos_token
    seed_all(recipe.train.seed)  # the score head is initialised here, LoRA in RewardTrainer
    model = AutoModelForSequenceClassification.from_pretrained(str(model_path), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    train_set = Dataset.from_list(train_rows)
    eval_set = Dataset.from_list(eval_rows) if eval_rows and recipe.train.eval_steps else None
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                            processing_class=tokenizer, peft_config=lora_config(recipe.train, "SEQ_CLS", model))
    dropped = len(train_rows) - len(trainer.train_dataset)  # TRL drops pairs longer than max_length
    started = time.perf_counter()
    global_step, training_loss = train_or_resume(trainer, resume)
    train_seconds = time.perf_counter() - started
    final = save_model(trainer, tokenizer, path)

    summary = {"model": str(model_path), "output": str(final), "resumed_from": resume and Path(resume).name,
               "global_step": global_step, "training_loss": training_loss,
               "train_seconds": round(train_seconds, 2), "train_pairs": len(train_rows),
               "train_pairs_dropped_too_long": dropped, "eval_pairs": len(eval_rows), "sources": per_source,
               "seed": recipe.train.seed, "processes": world_size()}
    if not is_main_process():
        return summary
    # Score with the saved weights: what later stages load is what gets measured.
    scorer = AutoModelForSequenceClassification.from_pretrained(str(final), num_labels=1)
    scorer.config.pad_token_id = tokenizer.pad_token_id
    if torch.cuda.is_available():
        scorer.to("cuda")
    scores = score_pairs(scorer, tokenizer, eval_rows, recipe.train.max_length,
                         batch_size=max(1, recipe.train.per_device_batch_size))
    table = accuracy_table(eval_rows, scores, names, eval_subsets)
    write_json(path / "eval.json", {"accuracy": table, "tie_counts_as_miss": True,
                                    "max_length": recipe.train.max_length})
    plot_accuracy(table, path / REPORT / "accuracy.png",
                  f"held-out pair accuracy ({len(eval_rows)} pairs, step {global_step})")
    summary["accuracy"] = {name: r["accuracy"] for name, r in table.items()}
    summary["report"] = ["accuracy.png"]
    write_json(path / "summary.json", summary)
    mark_done(path, {"global_step": global_step, "accuracy": table["overall"]["accuracy"]})
    resumed = f" (resumed from {summary['resumed_from']})" if resume else ""
    print(f"reward: {len(train_rows)} training pairs, {global_step} steps{resumed} -> {final}")
    print_table(table)
    return summary
