"""Stage `sayself-rl`: reinforcement learning of a SaySelf-SFT model with the SaySelf reward
(SaySelf step 6; TRL 1.12's GRPOTrainer).

Reads: `model` (the SaySelf-SFT model: a folder, or the sft stage's `model/`) and `inputs.items`,
QA items (`pipeline.records.QA_FEATURES`, the qa-data output), split `inputs.split`; unanswerable
items have no gold answer to grade and are skipped (counted). Each question is one conversational
prompt, the sayself-data user turn: `question_text(item)` + a blank line + `SAYSELF_INSTRUCTION`.
Prompts longer than `train.max_length - sayself.max_completion_length` tokens are dropped (counted).

Reward of a completion, `pipeline.methods.sayself.sayself_reward`: R = 1 - 2 (c - p)^2 with c the
correctness (gold substring; for a choice item the option it names, `item_correct`) and
p = confidence / 10, -1 when no confidence can be read, plus `sayself.correctness_weight` x c
(0 in the paper: its reward is proper but indifferent to being right). TRL passes the dataset's
columns (`answers`, `kind`, `choices`, `answer_index`) to the reward function as keyword arguments.

Why GRPO: the reward is a plain Python function of the text. GRPO takes such a function and needs
no value model (its baseline is the mean reward of the `sayself.num_generations` completions of
the same question); PPO in `trl.experimental.ppo` wants the reward as a reward *model* and trains
a value model beside the policy. The paper used PPO; the differences, stated: (1) the whole
completion is updated, whereas the public SaySelf code updates only the tokens from "Confidence:"
on, so here the reasoning and the answer can move too (`sayself.beta`, the KL to the starting
model, holds them); (2) a completion without a confidence gets -1 at once, with no regeneration
(the paper retried up to 3 times).

Batches: a GRPO step samples `train.global_batch_size` completions (per-device batch x processes x
gradient accumulation), `num_generations` per question, so global_batch_size / num_generations
questions per step; the recipe refuses a global batch that is not a multiple of num_generations.
Training resumes from the last complete checkpoint in `checkpoints/` (pipeline.train).

Before and after training, the first `sayself.eval_questions` questions of `inputs.eval_split`
(default: of the training split, which the RL also sees) are answered greedily through the hf
backend, as sayself-eval does: mean reward, confidence parse rate, mean confidence (1-10) and
accuracy go to `eval.json` and `summary.json`. During training the reward function also logs the
parse rate and mean confidence of the sampled completions (TRL's log: `sayself/parse_rate`,
`sayself/mean_confidence`, beside its own `reward` and `kl`).

Writes (see pipeline.train): `checkpoints/`, `model/` (LoRA merged), `eval.json`, `summary.json`,
`report/rl_curves.png`, `config.yaml`, `_SUCCESS` last.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

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
from pipeline.methods.rtuning import load_splits
from pipeline.methods.sayself import (
    generate,
    item_correct,
    load_tokenizer,
    parse_answer,
    parse_confidence,
    resolve_dtype,
    sayself_prompt,
    sayself_reward,
)
from pipeline.report import figure
from pipeline.runs import RunOptions, clear_done, mark_done, resolve_model, save_config, stage_dir, write_json
from pipeline.train import (
    MODEL,
    is_main_process,
    last_checkpoint,
    lora_config,
    precision,
    save_model,
    seed_all,
    train_or_resume,
    trl_config,
)


class SayselfRlInputs(Strict):
    items: StageRef | str = Field(description="QA items (QA_FEATURES): the qa-data output or a DatasetDict folder")
    split: str = Field("train", description="The questions the RL samples answers to (unanswerable ones skipped)")
    eval_split: str | None = Field(None, description="Questions scored before and after training; None: the "
                                   "first `sayself.eval_questions` of `split`, which the RL also trains on")


class SayselfRlSection(Strict):
    num_generations: int = Field(8, ge=2, description="Completions sampled per question (GRPO's group); "
                                 "train.global_batch_size must be a multiple of it")
    temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature of the RL completions")
    top_p: float = Field(1.0, gt=0, le=1)
    max_completion_length: int = Field(256, ge=1, description="New tokens per completion")
    beta: float = Field(0.04, ge=0, description="KL coefficient towards the starting model (0: no reference model)")
    correctness_weight: float = Field(0.0, ge=0, description="Reward += weight x correctness (the paper's reward: 0)")
    limit: int | None = Field(None, ge=1, description="Only the first N questions of `inputs.split` (smoke runs)")
    eval_questions: int = Field(64, ge=1, description="Questions answered greedily before and after training")
    eval_batch_size: int = Field(16, ge=1, description="Prompts per generate() call in the before/after scoring")


class Recipe(Strict):
    stage: Literal["sayself-rl"]
    run: RunSection
    model: ModelRef | str = Field(description="The SaySelf-SFT model: a folder, or the sft stage's model")
    inputs: SayselfRlInputs
    train: TrainSection = TrainSection()
    sayself: SayselfRlSection = SayselfRlSection()
    launch: LaunchSection = LaunchSection()

    @model_validator(mode="after")
    def _whole_groups(self) -> "Recipe":
        # GRPO samples global_batch_size completions per optimizer step (per-device batch x processes x
        # accumulation) and compares each question's num_generations completions with each other.
        if self.train.global_batch_size % self.sayself.num_generations:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"sayself.num_generations={self.sayself.num_generations}: a GRPO step samples global_batch_size "
                "completions (per_device_batch_size x processes x gradient accumulation), in whole groups of "
                "num_generations per question")
        if self.train.max_length <= self.sayself.max_completion_length:
            raise ValueError(f"train.max_length={self.train.max_length} leaves no room for a prompt before "
                             f"sayself.max_completion_length={self.sayself.max_completion_length} new tokens")
        return self

    def input_files(self) -> list[tuple[str, str]]:
        return local_paths(model=self.model, **{"inputs.items": self.inputs.items})


REPORT = "report"
REWARD_NAME = "sayself_reward"  # TRL logs the function's mean as rewards/<name>/mean
ITEM_COLUMNS = ("qid", "kind", "answers", "choices", "answer_index")


def item_reward(text: str, item: dict, correctness_weight: float = 0.0) -> float:
    """The SaySelf reward of one completion to a QA item (open: gold substring; choice: the letter)."""
    if item["kind"] == "choice":
        return sayself_reward(text, list(item["answers"] or []), correctness_weight,
                              correct=item_correct(parse_answer(text), item))
    return sayself_reward(text, list(item["answers"] or []), correctness_weight)


def completion_text(completion) -> str:
    """A TRL completion as text: a conversational one is a list of messages (the assistant's last)."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def reward_function(correctness_weight: float):
    """The reward for GRPOTrainer(reward_funcs=[...]): one float per completion, from the dataset
    columns TRL passes along; it also logs the batch's confidence parse rate and mean confidence."""

    def reward(completions, answers, kind, choices, answer_index, log_metric=None, **_) -> list[float]:
        texts = [completion_text(c) for c in completions]
        out = [item_reward(t, {"kind": k, "answers": a, "choices": c, "answer_index": i}, correctness_weight)
               for t, a, k, c, i in zip(texts, answers, kind, choices, answer_index)]
        if log_metric is not None:
            stated = [c for c in (parse_confidence(t) for t in texts) if c is not None]
            log_metric("sayself/parse_rate", len(stated) / len(texts) if texts else math.nan)
            log_metric("sayself/mean_confidence", sum(stated) / len(stated) if stated else math.nan)
        return out

    reward.__name__ = REWARD_NAME
    return reward


def score(texts: list[str], items: list[dict], correctness_weight: float = 0.0) -> dict:
    """Mean reward, confidence parse rate, mean stated confidence (1-10) and accuracy of responses."""
    stated = [c for c in (parse_confidence(t) for t in texts) if c is not None]
    rewards = [item_reward(t, item, correctness_weight) for t, item in zip(texts, items)]
    n = len(texts)
    return {"questions": n,
            "mean_reward": sum(rewards) / n if n else None,
            "parse_rate": len(stated) / n if n else None,
            "mean_confidence": sum(stated) / len(stated) if stated else None,
            "accuracy": sum(item_correct(parse_answer(t), item) for t, item in zip(texts, items)) / n if n else None}


def load_questions(recipe: Recipe, split: str, split_key: str, limit: int | None) -> tuple[list, int, Path]:
    """(answerable items of `split`, unanswerable ones skipped, the items folder)."""
    splits, path = load_splits(recipe.inputs.items, "inputs.items", [split], recipe, split_key, limit=limit)
    rows = splits[split]
    items = [r for r in rows if r["kind"] != "unanswerable"]
    if not items:
        raise ConfigError(f"{split_key}: split {split!r} of {path} has no answerable question")
    return items, len(rows) - len(items), path


def prompt_rows(items: list[dict], tokenizer, max_prompt_tokens: int) -> tuple[list[dict], int]:
    """GRPO dataset rows (conversational `prompt` + the columns the reward reads) of the questions
    whose rendered prompt fits; and how many did not."""
    rows, dropped = [], 0
    for item in items:
        prompt = list(sayself_prompt(item))
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        if len(ids) > max_prompt_tokens:
            dropped += 1
            continue
        rows.append({"prompt": prompt, **{k: item[k] for k in ITEM_COLUMNS}})
    return rows, dropped


def curves(log_history: list[dict]) -> dict[str, list]:
    """Per logged step: reward, parse rate, mean confidence and KL of the sampled completions."""
    keys = {"reward": "reward", "parse_rate": "sayself/parse_rate", "mean_confidence": "sayself/mean_confidence",
            "kl": "kl"}
    rows = [h for h in log_history if "reward" in h and "step" in h]
    out: dict[str, list] = {"step": [h["step"] for h in rows]}
    for name, key in keys.items():
        out[name] = [None if h.get(key) is None else round(float(h[key]), 4) for h in rows]
    return out


def plot_curves(curve: dict[str, list], out: Path, title: str) -> None:
    panels = [("reward", "mean reward"), ("parse_rate", "confidence parse rate"),
              ("mean_confidence", "mean stated confidence (1-10)"), ("kl", "KL to the start")]
    with figure(out, ncols=4, figsize=(14, 3.2)) as (fig, axes):
        for ax, (key, label) in zip(axes, panels):
            pts = [(s, v) for s, v in zip(curve["step"], curve[key]) if v is not None and not math.isnan(v)]
            if pts:
                ax.plot(*zip(*pts), marker=".")
            else:  # the KL is not computed with beta = 0 (no reference model)
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(label)
            ax.set_xlabel("optimizer step")
        fig.suptitle(title)


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    s, train = recipe.sayself, recipe.train
    model_dir = resolve_model(recipe, recipe.model, "model")
    items, skipped, items_path = load_questions(recipe, recipe.inputs.split, "inputs.split", s.limit)
    if recipe.inputs.eval_split is None:
        eval_items = items[: s.eval_questions]
    else:
        eval_items = load_questions(recipe, recipe.inputs.eval_split, "inputs.eval_split", None)[0][: s.eval_questions]
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_prompt = train.max_length - s.max_completion_length
    rows, too_long = prompt_rows(items, tokenizer, max_prompt)
    if not rows:
        raise ConfigError(f"inputs.split: no prompt of split {recipe.inputs.split!r} fits in {max_prompt} tokens "
                          f"(train.max_length - sayself.max_completion_length)")
    path = stage_dir(recipe)  # every input checked before anything is written
    clear_done(path)
    path.mkdir(parents=True, exist_ok=True)
    started = time.time()
    gen = {"max_new_tokens": s.max_completion_length, "batch_size": s.eval_batch_size}
    before = score(generate(model_dir, eval_items, **gen), eval_items, s.correctness_weight) if is_main_process() \
        else None

    load = {}
    if train.lora is not None and precision(train)["bf16"]:
        import torch

        load["dtype"] = torch.bfloat16  # frozen base weights in bf16 (half the memory); peft keeps adapters fp32
    seed_all(train.seed)  # LoRA adapters are initialised in GRPOTrainer, before it seeds itself
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **load)
    args = trl_config(
        GRPOConfig, train, path,
        num_generations=s.num_generations, temperature=s.temperature, top_p=s.top_p, top_k=0,
        max_completion_length=s.max_completion_length, beta=s.beta,
        eval_strategy="no",  # the before/after scoring below is the evaluation
        remove_unused_columns=False,  # the reward reads the answers columns
        log_completions=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_function(s.correctness_weight)], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=lora_config(train, "CAUSAL_LM", model))
    resume = last_checkpoint(path)
    steps, train_loss = train_or_resume(trainer, resume)
    save_model(trainer, tokenizer, path)
    if not is_main_process():
        return {}
    after = score(generate(path / MODEL, eval_items, **gen), eval_items, s.correctness_weight)
    history = trainer.state.log_history
    if not history and resume:  # a finished checkpoint was loaded, not trained from: its log holds the curves
        history = json.loads((Path(resume) / "trainer_state.json").read_text()).get("log_history", [])
    curve = curves(history)
    summary = {
        "stage": recipe.stage, "model": str(path / MODEL), "start_model": str(model_dir), "items": str(items_path),
        "questions": len(rows), "unanswerable_skipped": skipped, "prompts_too_long": too_long,
        "num_generations": s.num_generations, "completions_per_step": train.global_batch_size,
        "steps": steps, "train_loss": train_loss, "resumed_from": Path(resume).name if resume else None,
        "seconds": round(time.time() - started, 1),
        "eval_questions": len(eval_items),
        "eval_split": recipe.inputs.eval_split or f"{recipe.inputs.split} (first {len(eval_items)}, trained on)",
        "before": before, "after": after, "train_curves": curve,
    }
    save_config(path, recipe)
    write_json(path / "eval.json", {"decoding": "greedy", "before": before, "after": after,
                                    "eval_dtype": resolve_dtype("auto")})
    plot_curves(curve, path / REPORT / "rl_curves.png", f"sayself-rl: {recipe.run.name}")
    write_json(path / "summary.json", summary)
    mark_done(path, {"steps": steps, "model": summary["model"]})
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"sayself-rl: {steps} GRPO steps on {len(rows)} questions x {s.num_generations} completions in "
          f"{summary['seconds']}s{', resumed from ' + summary['resumed_from'] if resume else ''} -> {path / MODEL}\n"
          f"  greedy on {len(eval_items)} questions, before -> after: reward {fmt(before['mean_reward'])} -> "
          f"{fmt(after['mean_reward'])}, confidence parse rate {fmt(before['parse_rate'])} -> "
          f"{fmt(after['parse_rate'])}, mean confidence {fmt(before['mean_confidence'])} -> "
          f"{fmt(after['mean_confidence'])}, accuracy {fmt(before['accuracy'])} -> {fmt(after['accuracy'])}")
    return summary
