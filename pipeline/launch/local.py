"""The local launcher: the stage runs in this process (or in each process of `accelerate launch`)."""

from __future__ import annotations

from pipeline.runs import RunOptions
from pipeline.stages import Stage


def launch(stage: Stage, recipe, origin: str, opts: RunOptions) -> None:
    import datasets

    from pipeline import preempt
    from pipeline.launch.serve import resolve_url_files
    from pipeline.runs import resolve_model_paths

    preempt.install(training=stage.kind == "train")
    resolve_url_files(recipe)  # base_url_file -> base_url, now that the stage starts
    resolve_model_paths(recipe)  # {stage: ..., output: ...} -> that stage's model folder
    datasets.disable_progress_bars()  # "Saving the dataset" bars would bury the stage's own output
    failed = True
    try:
        stage.load().run(recipe, opts)
        failed = False
    finally:
        if stage.kind == "train":
            from pipeline.train import wandb_finish

            wandb_finish(failed)
