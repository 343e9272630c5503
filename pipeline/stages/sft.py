"""Stage `sft`: supervised fine-tuning of a chat model on the `messages` column (TRL SFTTrainer).

Input: a DatasetDict (usually the pairs stage's `dataset`, splits train_sft/test_sft) whose
`messages` is a chat. By default the loss covers the assistant turns only (`sft.assistant_only_loss`,
which needs `{% generation %}` tags in the chat template). Output folder (see `pipeline.train`):
`checkpoints/`, `model/`, `eval.json`, `summary.json`, `report/loss.png`, `_SUCCESS` (last).

The training helpers live in `pipeline.train` (SFT on chats), shared with the `critique` stage, which is
the same training on other data.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.config import LaunchSection, ModelRef, RunSection, Strict, TrainInputs, TrainSection, local_paths
from pipeline.runs import RunOptions
from pipeline.train import MODEL, check_inputs, finish, is_main_process, train_stage


class SftSection(Strict):
    assistant_only_loss: bool = Field(True, description="Loss on assistant tokens only (needs generation tags)")


class Recipe(Strict):
    stage: Literal["sft"]
    run: RunSection
    model: ModelRef | str = Field(description="Base model: a folder, or a stage's model ({stage: tiny-models, output: tiny-a})")
    inputs: TrainInputs
    train: TrainSection = TrainSection()
    sft: SftSection = SftSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return local_paths(model=self.model, **{"inputs.dataset": self.inputs.dataset})


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
