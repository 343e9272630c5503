"""Plain helpers that the training stages share (no base class): TRL config arguments from a
recipe's `train` section, the global-batch arithmetic, precision, LoRA, resuming and saving.

Layout of a training stage's folder (`data/runs/<run>/<stage>/`): `checkpoints/` (TRL's
output_dir: `checkpoint-N/` and the TensorBoard logs), `model/` (the
final weights and tokenizer, written last under a temporary name and renamed), `eval.json`,
`summary.json`, `report/*.png`, `_SUCCESS`.

Run with several processes (`accelerate launch`, `torchrun`), every process runs the stage; only
the main process writes the files other stages read.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from pipeline.config import ConfigError, TrainSection
from pipeline.report import figure
from pipeline.runs import (
    StageFailed,
    clear_done,
    mark_done,
    resolve_input,
    resolve_model,
    save_config,
    stage_dir,
    write_json,
)

CHECKPOINTS = "checkpoints"
MODEL = "model"


# --- input rows: checked against the stage's schema before anything is written ---------------------


def check_pair_rows(rows, key: str, *, margin: bool = False, columns=()) -> None:
    """Preference pairs (where, row): prompt, chosen and rejected are text or conversations with
    non-empty turns, chosen differs from rejected; `margin` and the pairs stage's score columns
    (where present) are finite numbers. With a `prompt_id` column, one prompt's pair of answers
    may appear once (several pairs per prompt are fine: the all-pairs strategy makes them)."""
    from pipeline.records import check_rows

    schema = {"prompt": "chat", "chosen": "chat", "rejected": "chat"}
    if margin:
        schema["margin"] = "number?"
    for name in ("score_chosen", "score_rejected", "margin"):
        if name in columns:
            schema[name] = "number?"
    unique = ()
    if "prompt_id" in columns:
        schema["prompt_id"] = "text"
        unique = ("prompt_id", "chosen", "rejected")
    check_rows(rows, schema, key, unique=unique, distinct=("chosen", "rejected"))


def check_split(dataset, path: Path, split: str, key: str, schema: dict[str, str], **kwargs) -> None:
    """`check_rows` over a `datasets` split, each row named `folder/split:row N`."""
    from pipeline.records import check_rows, split_rows

    check_rows(split_rows(dataset, path, split), schema, key, **kwargs)


def check_chat_split(dataset, path: Path, split: str, key: str) -> None:
    """SFT chats: `messages` with an assistant turn to learn from; a score column (critique data)
    finite; an id column (prompt_id, qid) does not repeat within the split."""
    columns = dataset.column_names
    schema = {"messages": "messages"}
    for name in ("overall_score", "score"):
        if name in columns:
            schema[name] = "number?"
    ids: tuple[str, ...] = tuple(c for c in ("qid", "prompt_id") if c in columns)[:1]
    if ids:
        schema[ids[0]] = "text"
        # critique data has one row per completion of a prompt: the row is (prompt, model, completion)
        ids += tuple(c for c in ("model", "completion") if c in columns)
    check_split(dataset, path, split, key, schema, unique=ids)
    for i, row in enumerate(dataset.select_columns(["messages"])):
        if not any(turn["role"] == "assistant" for turn in row["messages"]):
            raise ConfigError(f"{key}: {path}/{split}:row {i + 1}: `messages` has no assistant turn to train on")


def load_reward_model(path: Path, key: str, **load):
    """The one-label score model in `path`, or a ConfigError naming `key`: a folder that is not a
    sequence classifier, or whose score head loading had to create (a causal LM would get a random
    head, whose rewards rank nothing), is refused."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    archs = config.architectures or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"{key}: {path} is not a reward model ({', '.join(archs)}; expected a "
                          "*ForSequenceClassification with a trained score head, e.g. the reward stage's model)")
    if archs and config.num_labels != 1:  # (a config without architectures says 2 by default)
        raise ConfigError(f"{key}: {path} has {config.num_labels} labels; a reward model has one")
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, local_files_only=True, output_loading_info=True, **load)
    fresh = [k for k in info.get("missing_keys", []) if k.split(".")[0] in ("score", "classifier")]
    if fresh:
        raise ConfigError(f"{key}: {path} has no trained score head (newly initialised: {', '.join(sorted(fresh))})")
    return model


def load_scorer(path: Path, key: str):
    """(model, tokenizer) of a reward model folder for scoring conversations as text (bestofn,
    evaluate), refusing anything without a trained score head or a chat template to render with."""
    import torch
    from transformers import AutoTokenizer

    model = load_reward_model(path, key, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tokenizer.chat_template:
        raise ConfigError(f"{key}: the tokenizer at {path} has no chat template, so the conversations cannot "
                          "be rendered as the reward model saw them in training")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    model.eval()
    return model, tokenizer


def reward_scores(model, tokenizer, conversations: list[list[dict]], batch_size: int) -> list[float]:
    """The reward of each conversation (its last turn the answer scored), rendered with the reward
    model's own chat template: text is what a policy and a reward model of another family share."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    flat = [(i, tokenizer.apply_chat_template(c, tokenize=False)) for i, c in enumerate(conversations)]
    limit = getattr(model.config, "max_position_embeddings", None)
    rewards = [0.0] * len(conversations)
    flat.sort(key=lambda item: len(item[1]))  # similar lengths per batch: little padding
    for start in range(0, len(flat), batch_size):
        batch = flat[start : start + batch_size]
        enc = tokenizer([text for _, text in batch], add_special_tokens=False, padding=True,
                        truncation=limit is not None, max_length=limit, return_tensors="pt").to(device)
        with torch.inference_mode():
            values = model(**enc).logits[:, 0].float().tolist()
        for (i, _), value in zip(batch, values):
            rewards[i] = value
    return rewards


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (every device). Call it before a model is loaded: a fresh score
    or value head, and LoRA adapters (which TRL adds before the Trainer seeds itself), draw their
    initial weights from these generators."""
    from transformers import set_seed

    set_seed(seed)


def _finite(value) -> bool:
    import math

    return not isinstance(value, (int, float)) or math.isfinite(value)


def guard_finite_loss(trainer) -> None:
    """Stop training (StageFailed, exit 1, no `_SUCCESS`) at the first non-finite loss or gradient norm.

    Each micro-batch's loss is checked as it is computed: transformers would otherwise replace a NaN
    by the mean of earlier losses in what it logs (and report a loss of 0 at the end) while the NaN
    gradients wreck the weights. Logged losses and gradient norms are checked too (PPO logs its
    losses without going through `training_step`)."""
    import torch
    from transformers import TrainerCallback

    step = trainer.training_step

    def checked_step(*args, **kwargs):
        loss = step(*args, **kwargs)
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss).all():
            raise StageFailed(f"training loss is {loss.float().mean().item()} at step {trainer.state.global_step + 1}"
                              " (non-finite); nothing marked done. Check the data, the learning rate and precision")
        return loss

    trainer.training_step = checked_step

    class FiniteLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            bad = {k: v for k, v in (logs or {}).items()
                   if ("loss" in k or k == "grad_norm") and not _finite(v)}
            if bad:
                shown = ", ".join(f"{k} = {v}" for k, v in bad.items())
                raise StageFailed(f"{shown} at step {state.global_step} (non-finite); nothing marked done. "
                                  "Check the data, the learning rate and precision")

    trainer.add_callback(FiniteLogs())


def world_size() -> int:
    """Processes taking part (set by accelerate launch / torchrun; 1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def gradient_accumulation(train: TrainSection, processes: int | None = None) -> int:
    """Steps to accumulate so that one optimizer step sees `global_batch_size` sequences."""
    processes = processes or world_size()
    per_pass = processes * train.per_device_batch_size
    if train.global_batch_size % per_pass:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by processes ({processes}) x "
            f"train.per_device_batch_size ({train.per_device_batch_size}) = {per_pass}")
    return train.global_batch_size // per_pass


def precision(train: TrainSection) -> dict:
    """bf16/fp16/use_cpu flags: TRL defaults to bf16, which a CPU run must turn off."""
    import torch

    cuda = torch.cuda.is_available()
    if train.precision in ("bf16", "fp16") and not cuda:
        raise ConfigError(f"train.precision={train.precision} needs a GPU; use auto or fp32 on CPU")
    if train.precision == "auto":
        bf16 = cuda and torch.cuda.is_bf16_supported()
        return {"bf16": bf16, "fp16": False, "use_cpu": not cuda}
    return {"bf16": train.precision == "bf16", "fp16": train.precision == "fp16", "use_cpu": not cuda}


# WANDB_DIR as this module last set it (None: never): a value the user set is left alone, ours moves
# to each stage's folder, so stages run one after another in one process (`rlhf all`) log apart.
_WANDB_DIR: str | None = None


def wandb_setup(stage_path: Path) -> None:
    """`train.report_to: [wandb]`: the package and a key (or an offline/disabled mode) must be there,
    and the run's files go under the stage's folder (`<stage>/wandb/`, offline runs included)
    unless WANDB_DIR says otherwise. ConfigError before anything is trained."""
    import importlib.util

    global _WANDB_DIR
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.report_to has wandb but the wandb package is not installed "
                          "(pip install '.[wandb]')")
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        raise ConfigError("train.report_to has wandb but WANDB_API_KEY (or WANDB_MODE=offline) is not set")
    if os.environ.get("WANDB_DIR") in (None, "", _WANDB_DIR):
        _WANDB_DIR = os.environ["WANDB_DIR"] = str(stage_path.resolve())


def wandb_finish(failed: bool) -> None:
    """Close the W&B run a stage opened (transformers leaves it open after training, so that the
    evaluation logs to it): its files are complete when the stage ends, and the next stage in the
    same process starts a run of its own instead of logging into this one."""
    import sys

    wandb = sys.modules.get("wandb")  # never imported: nothing to close
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)
        # wandb reads its environment (WANDB_DIR) once per session: end the session, so the next
        # stage's run starts a new one that sees its own folder.
        wandb.teardown()


def trl_config(config_cls, train: TrainSection, stage_path: Path, **extra):
    """A TRL `*Config` (a TrainingArguments subclass) from the recipe; `extra` (the stage's own fields)
    wins over the derived ones; then `train.trl` as is (a key we derive or the stage sets is an error)."""
    kwargs = dict(
        output_dir=str(stage_path / CHECKPOINTS),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_batch_size,
        per_device_eval_batch_size=train.per_device_batch_size,
        gradient_accumulation_steps=gradient_accumulation(train),
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # transformers 5: a value below 1 is a fraction of all steps
        weight_decay=train.weight_decay,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        eval_strategy="steps" if train.eval_steps else "no",
        eval_steps=train.eval_steps,
        report_to=list(train.report_to),
        # a NaN loss must reach guard_finite_loss, not be averaged away in the logs
        logging_nan_inf_filter=False,
        deepspeed=train.deepspeed,
        **precision(train),
    )
    # transformers 5's name for gradient checkpointing, set either way: TRL configs default the old
    # name to True, which would turn it on (slower) for a recipe that says false.
    kwargs["activation_checkpointing"] = train.gradient_checkpointing
    if train.min_learning_rate is not None:
        if train.lr_scheduler != "cosine":
            raise ConfigError("train.min_learning_rate needs train.lr_scheduler: cosine")
        kwargs["lr_scheduler_type"] = "cosine_with_min_lr"
        kwargs["lr_scheduler_kwargs"] = {"min_lr": train.min_learning_rate}
    if "wandb" in train.report_to:
        wandb_setup(stage_path)
    for key in train.trl:
        if key in kwargs:
            raise ConfigError(f"train.trl.{key}: {key} is derived from {DERIVED.get(key, 'the train section')}; "
                              "set that instead")
        if key in extra:
            raise ConfigError(f"train.trl.{key}: {key} is set by the {config_cls.__name__} stage from its own "
                              "section; set it there")
    kwargs.update(extra)
    unknown_trl_fields(config_cls, train.trl)
    try:
        return config_cls(**kwargs, **train.trl)
    except (ValueError, TypeError) as err:
        if not train.trl:
            raise
        bad_trl_value(config_cls, train.trl, err, dict(kwargs))


# TRL config field -> the recipe key we derive it from (a `train.trl` key naming one of these is an error)
DERIVED = {
    "output_dir": "the stage folder", "num_train_epochs": "train.epochs", "max_steps": "train.max_steps",
    "per_device_train_batch_size": "train.per_device_batch_size",
    "per_device_eval_batch_size": "train.per_device_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size", "learning_rate": "train.learning_rate",
    "lr_scheduler_type": "train.lr_scheduler", "lr_scheduler_kwargs": "train.min_learning_rate",
    "warmup_steps": "train.warmup_ratio", "weight_decay": "train.weight_decay", "seed": "train.seed",
    "data_seed": "train.seed", "logging_steps": "train.logging_steps", "save_strategy": "train.save_steps",
    "save_steps": "train.save_steps", "save_total_limit": "train.save_total_limit",
    "eval_strategy": "train.eval_steps", "eval_steps": "train.eval_steps", "report_to": "train.report_to",
    "deepspeed": "train.deepspeed", "logging_nan_inf_filter": "the stage (a non-finite loss stops it)",
    "bf16": "train.precision", "fp16": "train.precision",
    "use_cpu": "train.precision", "activation_checkpointing": "train.gradient_checkpointing",
    "gradient_checkpointing": "train.gradient_checkpointing",
}


def unknown_trl_fields(config_cls, trl: dict) -> None:
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for key in trl:
        if key not in names:
            raise ConfigError(f"train.trl.{key}: {config_cls.__name__} has no field {key!r}")


def bad_trl_value(config_cls, trl: dict, err: Exception, base: dict):
    """Raise a ConfigError naming the first `train.trl` key whose value the config class refuses."""
    for key, value in trl.items():
        try:
            config_cls(**base, **{key: value})
        except (ValueError, TypeError) as one:
            raise ConfigError(f"train.trl.{key}: {config_cls.__name__} refuses {value!r} ({one})") from None
    raise ConfigError(f"train.trl: {config_cls.__name__} refuses these fields together ({err})") from None


# The TRL config class each training stage builds (module, class): what `rlhf validate` checks train.trl against.
TRL_CONFIGS = {
    "sft": ("trl", "SFTConfig"), "critique": ("trl", "SFTConfig"), "reward": ("trl", "RewardConfig"),
    "dpo": ("trl", "DPOConfig"), "ppo": ("trl", "RLOOConfig"),  # ppo: only ppo.algorithm rloo takes train.trl
    "sayself-rl": ("trl", "GRPOConfig"),
}


def check_trl(recipe) -> None:
    """`train.trl` against the stage's TRL config class: unknown fields, derived fields and refused
    values are ConfigErrors naming `train.trl.<field>`. Imports TRL only when `train.trl` is set, and
    builds the config on CPU in fp32 so a GPU recipe validates anywhere."""
    train = getattr(recipe, "train", None)
    if not isinstance(train, TrainSection) or not train.trl or recipe.stage not in TRL_CONFIGS:
        return
    import importlib
    import tempfile

    module, name = TRL_CONFIGS[recipe.stage]
    config_cls = getattr(importlib.import_module(module), name)
    for key in train.trl:
        if key in DERIVED:
            raise ConfigError(f"train.trl.{key}: {key} is derived from {DERIVED[key]}; set that instead")
    unknown_trl_fields(config_cls, train.trl)
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(output_dir=tmp, use_cpu=True, bf16=False, fp16=False, report_to=[])
        try:
            config_cls(**base, **train.trl)
        except (ValueError, TypeError) as err:
            bad_trl_value(config_cls, train.trl, err, base)


def lora_config(train: TrainSection, task_type: str, model):
    """A peft LoraConfig for `model` when the recipe asks for LoRA, else None (full fine-tuning)."""
    if train.lora is None:
        return None
    from peft import LoraConfig

    lora = train.lora
    layers, targets = None, lora.target_modules
    if lora.top_layers is not None:
        total = getattr(model.config, "num_hidden_layers", None)
        if not isinstance(total, int) or lora.top_layers > total:
            raise ConfigError(f"train.lora.top_layers={lora.top_layers}: the model has {total} layers")
        layers = list(range(total - lora.top_layers, total))
        if targets == "all-linear":  # PEFT takes layers_to_transform only with named modules
            import torch

            targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                              if isinstance(module, torch.nn.Linear) and ".layers." in name})
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=targets, task_type=task_type, layers_to_transform=layers)


def last_checkpoint(stage_path: Path) -> str | None:
    """The newest complete `checkpoint-N` of an earlier, interrupted run (to resume from).

    The Trainer writes trainer_state.json last, so a folder without it, or with it only partly
    written, was cut off mid-save by a kill and is passed over (transformers'
    get_last_checkpoint would pick it and then fail)."""
    folder = stage_path / CHECKPOINTS
    if not folder.is_dir():
        return None
    complete = [p for p in folder.glob("checkpoint-*")
                if p.name.split("-")[-1].isdigit() and checkpoint_complete(p)]
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None


def checkpoint_complete(checkpoint: Path) -> bool:
    """Whether the checkpoint's trainer state (the last file the Trainer saves) is whole JSON."""
    import json

    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def train_or_resume(trainer, resume: str | None) -> tuple[int, float | None]:
    """Train, continuing from checkpoint `resume` when given; (global step, training loss), the
    loss None when the checkpoint had already finished (nothing was trained in this call).

    transformers 5.23 takes one step too many when resuming from a checkpoint that already
    reached max_steps (a run killed between its last save and `_SUCCESS`), so such a checkpoint
    is loaded instead of trained from.

    Inside a Slurm job a preemption request (pipeline.preempt) saves a checkpoint, stops
    training and raises `Preempted`, so the stage is not marked done and the job requeues.
    """
    import json

    if resume and trainer.args.max_steps > 0:
        state = json.loads((Path(resume) / "trainer_state.json").read_text())
        if state.get("max_steps") == trainer.args.max_steps and state.get("global_step", 0) >= trainer.args.max_steps:
            trainer._load_from_checkpoint(resume)
            trainer.state.global_step = state["global_step"]
            return state["global_step"], None
    from pipeline import preempt

    resumed_step = int(Path(resume).name.rsplit("-", 1)[-1]) if resume else 0
    stopper = preempt.trainer_callback() if preempt.active() else None  # inside a Slurm job
    if stopper is not None:
        trainer.add_callback(stopper)
    guard_finite_loss(trainer)
    result = trainer.train(resume_from_checkpoint=resume)
    if stopper is not None and stopper.stopped and result.global_step < trainer.state.max_steps:
        raise preempt.Preempted(f"checkpoint-{result.global_step} saved; the requeued job resumes from it")
    if not _finite(result.training_loss):
        raise StageFailed(f"training loss is {result.training_loss} (non-finite); nothing marked done")
    # A resumed run with no step left reports a loss of 0, which would mislead.
    if result.global_step <= resumed_step:
        return result.global_step, None
    return result.global_step, mean_loss(trainer.state.log_history, resumed_step, result.global_step,
                                         result.training_loss)


def mean_loss(log_history: list[dict], resumed_step: int, global_step: int, loss_this_run: float) -> float:
    """The mean training loss over all `global_step` steps: transformers reports the mean over the
    steps of this call only, so after a resume the steps before `resumed_step` come from the logged
    losses of the checkpoint's history (each line the mean since the line before). Steps the history
    does not cover (a checkpoint saved between two log lines) count at the logged mean."""
    if resumed_step <= 0:
        return loss_this_run
    total, covered, last = 0.0, 0, 0
    for entry in log_history:
        step = entry.get("step", 0)
        if "loss" in entry and last < step <= resumed_step:
            total += entry["loss"] * (step - last)
            covered += step - last
            last = step
    if not covered:
        return loss_this_run
    before = total + (resumed_step - covered) * (total / covered)
    return (before + loss_this_run * (global_step - resumed_step)) / global_step


def save_model(trainer, tokenizer, stage_path: Path) -> Path:
    """Write the final model (LoRA adapters merged in) to `model/`, renamed into place last."""
    final = stage_path / MODEL
    tmp = stage_path / f".{MODEL}.tmp"
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # a peft model: later stages load plain weights
        model = model.merge_and_unload()
        if trainer.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp))
    else:
        trainer.save_model(str(tmp))  # every process takes part (DeepSpeed gathers shards)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(tmp))
        old = stage_path / f".{MODEL}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return final


# --- SFT on chats: the sft and critique stages (TRL SFTTrainer) ------------------------------------

REPORT = "report"

def load_chat_splits(recipe):
    """(train, eval or None, dataset folder); ConfigError naming the key when a split is unusable."""
    from datasets import Dataset, DatasetDict

    from pipeline.hub import open_dataset

    data_path = resolve_input(recipe, recipe.inputs.dataset, "inputs.dataset")
    try:
        data = open_dataset(data_path)
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
        check_chat_split(data[name], data_path, name, "inputs.dataset")
        splits.append(data[name])
    return splits[0], splits[1], data_path

def check_model(recipe) -> Path:
    return resolve_model(recipe, recipe.model, "model")

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
                      processing_class=tokenizer, peft_config=lora_config(recipe.train, "CAUSAL_LM", model))

def loss_plot(log_history: list[dict], out: Path, title: str) -> None:
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    reason = ("No loss was logged: the run took fewer optimizer steps than train.logging_steps, "
              "and eval_steps was not reached.")
    with figure(out, figsize=(6, 4), empty_reason=reason) as (_, ax):
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
    seed_all(recipe.train.seed)
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
