"""Stage `dpo`: Direct Preference Optimization of a policy on preference pairs (TRL's DPOTrainer).

Inputs: `model` (a model folder, or a training stage's `model` output) and `inputs.dataset`: a
`datasets` DatasetDict (splits `train_prefs`/`test_prefs` unless the recipe names others) or one
file (JSONL, parquet, a single-split `datasets` folder: all of it trains, there is no eval split).
Its rows are in `inputs.format`, a name of `pipeline.formats.preferences.CONVERTERS` (the same
registry the reward stage reads through): `pairs` (default: our `pairs` output, or H4's or TRL's
layouts), `auto` (each row's public layout detected by its shape) or one layout by name; each row
becomes the explicit-prompt pair (`prompt` = the turns before the answer, `chosen`/`rejected` =
the answer). Every row is converted and checked before anything is written. The reference model is the starting policy (TRL copies
it, or switches the LoRA adapters off when `train.lora` is set).

Outputs (see pipeline.train for the folder layout): `model/`, `eval.json` (TRL's eval metrics:
loss, rewards/accuracies, rewards/margins, ...), `summary.json`, `report/rewards.png` (the logged
implicit-reward margin and accuracy per step), `config.yaml`, `_SUCCESS` last.
A killed run resumes from its last checkpoint when started again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config import (
    ConfigError,
    LaunchSection,
    ModelRef,
    RunSection,
    Strict,
    TrainInputs,
    TrainSection,
    local_paths,
    preference_defaults,
)
from pipeline.formats.preferences import (
    PREFERENCE_FORMATS,
    convert,
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
)


class DpoSection(Strict):
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model")
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero",
                       "apo_down", "exo_pair", "aot", "aot_unpaired", "discopop", "sigmoid_norm"] = Field(
        "sigmoid", description="TRL DPO loss type (sigmoid = the DPO paper's loss)")


class DpoInputs(TrainInputs):
    format: Literal[PREFERENCE_FORMATS] = Field(  # type: ignore[valid-type]
        "pairs", description="Row layout: pairs (our `pairs` output, or H4's or TRL's layouts), auto (each "
        "row's public layout detected by its shape), or a layout by name (h4, trl-explicit, trl-implicit, "
        "anthropic_hh, shp, summarize, bigbench-hhh)")


class Recipe(Strict):
    stage: Literal["dpo"]
    run: RunSection
    model: ModelRef | str = Field(description="Policy to start from (usually the sft stage's model)")
    inputs: DpoInputs
    train: TrainSection = TrainSection()
    dpo: DpoSection = DpoSection()
    launch: LaunchSection = LaunchSection()

    @model_validator(mode="before")
    @classmethod
    def _pairs_defaults(cls, tree: Any) -> Any:
        # DPO reads the pairs stage's preference splits unless told otherwise.
        return preference_defaults(tree, "train_prefs", "test_prefs")

    def input_files(self) -> list[tuple[str, str]]:
        return local_paths(model=self.model, **{"inputs.dataset": self.inputs.dataset})


REPORT = "report"
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def load_pairs(path: Path, fmt: str, key: str, splits: dict[str, str | None]) -> dict:
    """{split key: Dataset of explicit-prompt pairs} of a DatasetDict's named splits, or of one file
    (no splits: it is the training split). Every row is converted from `fmt` and checked."""
    from datasets import Dataset

    if has_splits(path):
        raw = {split_key: read_split_rows(path, split, key, split_key)
               for split_key, split in splits.items() if split is not None}
    else:
        raw = {"inputs.train_split": read_file_rows(path, key)}
    out = {}
    for split_key, rows in raw.items():
        if not rows:
            raise ConfigError(f"{key}: {path}: no rows ({split_key})")
        pairs = [convert(row, fmt, where, key) for where, row in rows]
        # The row's own number and id columns (score_chosen, margin, prompt_id) are checked with its pair.
        shared = set.intersection(*(set(row) for _, row in rows))
        check_pair_rows([(where, {**row, **pair}) for (where, row), pair in zip(rows, pairs)], key,
                        columns=tuple(sorted(shared)))
        out[split_key] = Dataset.from_list([{name: pair[name] for name in PAIR_COLUMNS} for pair in pairs])
    return out


def plot_rewards(log_history: list[dict], out: Path) -> Path | None:
    """Margin and accuracy of the implicit reward, as TRL logged them, against the step."""
    series = {}
    for prefix, label in (("", "train"), ("eval_", "eval")):
        rows = [r for r in log_history if f"{prefix}rewards/margins" in r]
        if rows:
            series[label] = ([r["step"] for r in rows], [r[f"{prefix}rewards/margins"] for r in rows],
                             [r.get(f"{prefix}rewards/accuracies", float("nan")) for r in rows])
    if not series:
        return None
    with figure(out, ncols=2, figsize=(10, 4)) as (_, (ax_m, ax_a)):
        for label, (steps, margins, accs) in series.items():
            style = "o-" if len(steps) < 3 else "-"
            ax_m.plot(steps, margins, style, label=label)
            ax_a.plot(steps, accs, style, label=label)
        ax_m.set(title="implicit reward margin (chosen - rejected)", xlabel="step", ylabel="margin")
        ax_a.set(title="implicit reward accuracy", xlabel="step", ylabel="accuracy", ylim=(-0.05, 1.05))
        for ax in (ax_m, ax_a):
            ax.grid(alpha=0.3)
            ax.legend()
    return out


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    # Check every input before writing anything.
    model_path = resolve_model(recipe, recipe.model, "model")
    data_path = resolve_input(recipe, recipe.inputs.dataset, "inputs.dataset")
    splits = load_pairs(data_path, recipe.inputs.format, "inputs.dataset",
                        {"inputs.train_split": recipe.inputs.train_split, "inputs.eval_split": recipe.inputs.eval_split})
    train_data, eval_data = splits["inputs.train_split"], splits.get("inputs.eval_split")
    if opts.dry_run:
        plan = {"model": str(model_path), "dataset": str(data_path), "train_pairs": len(train_data),
                "eval_pairs": len(eval_data) if eval_data is not None else 0}
        print(f"dpo (dry run): {plan}")
        return plan

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if tokenizer.pad_token is None:  # only fills masked positions
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ConfigError(f"model: the tokenizer at {model_path} has no chat template (the pairs are conversations)")

    path = stage_dir(recipe)  # every input checked: from here on the stage writes
    main = is_main_process()
    if main:
        path.mkdir(parents=True, exist_ok=True)
        clear_done(path)
        save_config(path, recipe)
    seed_all(recipe.train.seed)  # LoRA adapters are initialised in DPOTrainer, before it seeds itself
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, local_files_only=True)

    train = recipe.train
    args = trl_config(DPOConfig, train, path, max_length=train.max_length, beta=recipe.dpo.beta,
                      loss_type=[recipe.dpo.loss_type])
    trainer = DPOTrainer(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                         processing_class=tokenizer, peft_config=lora_config(train, "CAUSAL_LM", model))
    started = time.time()
    resume = last_checkpoint(path)
    steps, train_loss = train_or_resume(trainer, resume)
    eval_metrics = trainer.evaluate() if eval_data is not None else {}
    save_model(trainer, tokenizer, path)

    summary = {
        "model": str(model_path), "dataset": str(data_path),
        "train_split": recipe.inputs.train_split, "eval_split": recipe.inputs.eval_split,
        "train_pairs": len(train_data), "eval_pairs": len(eval_data) if eval_data is not None else 0,
        "beta": recipe.dpo.beta, "loss_type": recipe.dpo.loss_type, "lora": train.lora is not None,
        "steps": steps, "train_loss": train_loss, "resumed_from": resume,
        "eval": {k: v for k, v in eval_metrics.items()
                 if k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")},
        "seconds": round(time.time() - started, 1),
    }
    if main:
        write_json(path / "eval.json", eval_metrics)
        plot = plot_rewards(trainer.state.log_history, path / REPORT / "rewards.png")
        summary["report"] = str(plot) if plot else None
        write_json(path / "summary.json", summary)
        mark_done(path, {"steps": steps})
        ev = summary["eval"]
        print(f"dpo: {steps} steps, train loss "
              + (f"{train_loss:.4f}" if train_loss is not None else "- (already trained)")
              + (f"; eval loss {ev.get('eval_loss', float('nan')):.4f}, reward accuracy "
                 f"{ev.get('eval_rewards/accuracies', float('nan')):.3f}, margin "
                 f"{ev.get('eval_rewards/margins', float('nan')):.4f}" if ev else "")
              + f" -> {path / 'model'}")
    return summary
