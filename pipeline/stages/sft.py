"""Stage `sft`: supervised fine-tuning of a chat model on the `messages` column (TRL SFTTrainer).

Input: a DatasetDict (usually the pairs stage's `dataset`, splits train_sft/test_sft) whose
`messages` is a chat. By default the loss covers the assistant turns only (`sft.assistant_only_loss`,
which needs `{% generation %}` tags in the chat template). Output folder (see `pipeline.train`):
`checkpoints/`, `model/`, `eval.json`, `summary.json`, `report/loss.png`, `_SUCCESS` (last).

The helpers below are shared with the `critique` stage, which is the same training on other data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.config import ConfigError, LaunchSection, RunSection, Strict, TrainInputs, TrainSection, local_paths
from pipeline.report import figure
from pipeline.runs import RunOptions, clear_done, mark_done, resolve_input, save_config, stage_dir, write_json
from pipeline.train import (
    MODEL,
    is_main_process,
    last_checkpoint,
    lora_config,
    model_folder,
    save_model,
    train_or_resume,
    trl_config,
)


class SftSection(Strict):
    assistant_only_loss: bool = Field(True, description="Loss on assistant tokens only (needs generation tags)")


class Recipe(Strict):
    stage: Literal["sft"]
    run: RunSection
    model: str = Field(description="Base model folder")
    inputs: TrainInputs
    train: TrainSection = TrainSection()
    sft: SftSection = SftSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return local_paths(model=self.model, **{"inputs.dataset": self.inputs.dataset})


REPORT = "report"


def load_chat_splits(recipe):
    """(train, eval or None, dataset folder); ConfigError naming the key when a split is unusable."""
    from datasets import Dataset, DatasetDict, load_from_disk

    data_path = resolve_input(recipe, recipe.inputs.dataset, "inputs.dataset")
    try:
        data = load_from_disk(str(data_path))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"inputs.dataset: {data_path} is not a `datasets` folder ({err})") from None
    if isinstance(data, Dataset):
        raise ConfigError(f"inputs.dataset: {data_path} is a single Dataset; a DatasetDict with named splits "
                          "is needed")
    assert isinstance(data, DatasetDict)
    splits = []
    for key, name in (("inputs.train_split", recipe.inputs.train_split),
                      ("inputs.eval_split", recipe.inputs.eval_split)):
        if name is None:
            splits.append(None)
            continue
        if name not in data:
            raise ConfigError(f"{key}: no split {name!r} in {data_path} (it has: {', '.join(data)})")
        if "messages" not in data[name].column_names:
            raise ConfigError(f"{key}: split {name!r} of {data_path} has no `messages` column "
                              f"(columns: {', '.join(data[name].column_names)})")
        if len(data[name]) == 0:
            raise ConfigError(f"{key}: split {name!r} of {data_path} is empty")
        splits.append(data[name])
    return splits[0], splits[1], data_path


def check_model(recipe) -> Path:
    return model_folder(recipe, recipe.model, "model")


def load_tokenizer(recipe, assistant_only_loss: bool):
    """The model's tokenizer; ConfigError when its chat template cannot do what the recipe asks."""
    from transformers import AutoTokenizer

    path = check_model(recipe)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    template = tokenizer.chat_template
    if not template:
        raise ConfigError(f"model: the tokenizer in {path} has no chat template (the `messages` need one)")
    if assistant_only_loss:
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers

        if not has_generation_markers(template):
            try:  # TRL swaps in a tagged copy of templates it knows; fail here, before writing, if not
                get_training_chat_template(tokenizer)
            except ValueError:
                raise ConfigError(f"{recipe.stage}.assistant_only_loss: the chat template in {path} has no "
                                  "{% generation %} tags and TRL cannot add them; add them or set it to "
                                  "false") from None
    if tokenizer.pad_token is None:  # TRL pads batches; the eos token is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(recipe, assistant_only_loss: bool = True):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(recipe, assistant_only_loss)
    model = AutoModelForCausalLM.from_pretrained(str(check_model(recipe)))
    return model, tokenizer


def build_trainer(recipe, path: Path, train_ds, eval_ds, model, tokenizer, assistant_only_loss: bool):
    from trl import SFTConfig, SFTTrainer

    # Only the chat goes in: other columns (scores, ids) would confuse TRL's format detection.
    keep = lambda ds: ds.select_columns(["messages"]) if ds is not None else None  # noqa: E731
    args = trl_config(SFTConfig, recipe.train, path, max_length=recipe.train.max_length,
                      assistant_only_loss=assistant_only_loss)
    return SFTTrainer(model=model, args=args, train_dataset=keep(train_ds), eval_dataset=keep(eval_ds),
                      processing_class=tokenizer, peft_config=lora_config(recipe.train, "CAUSAL_LM"))


def loss_plot(log_history: list[dict], out: Path, title: str) -> None:
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    with figure(out, figsize=(6, 4)) as (_, ax):
        if train:
            ax.plot(*zip(*train), label="train loss")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (mean token NLL)")
        ax.set_title(title)
        if train or evals:
            ax.legend()


def check_inputs(recipe, assistant_only_loss: bool) -> dict:
    """Every input check, nothing written; the plan a dry run prints."""
    train_ds, eval_ds, data_path = load_chat_splits(recipe)
    load_tokenizer(recipe, assistant_only_loss)
    return {"model": str(check_model(recipe)), "dataset": str(data_path), "train_rows": len(train_ds),
            "eval_rows": len(eval_ds) if eval_ds is not None else 0}


def train_stage(recipe, assistant_only_loss: bool):
    """Check inputs, train (resuming), evaluate, save the model. Returns (path, trainer, tokenizer,
    eval split, summary dict, eval metrics). Writes only after every input check passed."""
    train_ds, eval_ds, data_path = load_chat_splits(recipe)
    load_tokenizer(recipe, assistant_only_loss)  # every input checked before anything is written
    path = stage_dir(recipe)
    clear_done(path)
    path.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model, tokenizer = load_model(recipe, assistant_only_loss)
    trainer = build_trainer(recipe, path, train_ds, eval_ds, model, tokenizer, assistant_only_loss)
    resume = last_checkpoint(path)
    steps, train_loss = train_or_resume(trainer, resume)
    metrics = trainer.evaluate() if eval_ds is not None else {}
    save_model(trainer, tokenizer, path)
    summary = {
        "stage": recipe.stage,
        "dataset": str(data_path),
        "train_rows": len(train_ds),
        "eval_rows": len(eval_ds) if eval_ds is not None else 0,
        "steps": steps,
        "train_loss": train_loss,
        "eval_loss": metrics.get("eval_loss"),
        "seconds": round(time.time() - started, 1),
        "resumed_from": Path(resume).name if resume else None,
        "assistant_only_loss": assistant_only_loss,
        "model": str(path / MODEL),
    }
    return path, trainer, tokenizer, eval_ds, summary, metrics


def finish(recipe, path: Path, trainer, summary: dict, metrics: dict) -> None:
    """Main process only: config, eval.json, loss curve, summary.json, then _SUCCESS last."""
    save_config(path, recipe)
    write_json(path / "eval.json", metrics)
    loss_plot(trainer.state.log_history, path / REPORT / "loss.png", f"{recipe.stage}: {recipe.run.name}")
    write_json(path / "summary.json", summary)
    mark_done(path, {"steps": summary["steps"], "model": summary["model"]})


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    if opts.dry_run:
        plan = check_inputs(recipe, recipe.sft.assistant_only_loss)
        print(f"sft (dry run): {plan}")
        return plan
    path, trainer, _, _, summary, metrics = train_stage(recipe, recipe.sft.assistant_only_loss)
    if is_main_process():
        finish(recipe, path, trainer, summary, metrics)
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"sft: {summary['steps']} steps, train loss {fmt(summary['train_loss'])}, eval loss "
              f"{fmt(summary['eval_loss'])}, {summary['seconds']}s"
              f"{', resumed from ' + summary['resumed_from'] if summary['resumed_from'] else ''} -> {path / MODEL}")
    return summary
