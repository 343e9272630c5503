"""Where a stage runs. `run_stage` checks and starts one stage run; the recipe's `launch.launcher`
names the module here that runs it: `local` (this process) or `slurm` (sbatch jobs, each of which
runs the stage again with launcher=local). A new place to run (Ray, say) is one new module with
`launch(stage, recipe, origin, opts)` and its name in `LaunchSection.launcher`.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
from typing import Callable

from pipeline.config import ConfigError, redact
from pipeline.runs import RunOptions, StageFailed, clear_done, is_done, stage_dir
from pipeline.stages import STAGES, load_recipe


def run_stage(stage_name: str, recipe_path: str, overrides: list[str] = (), opts: RunOptions = RunOptions()) -> None:
    """Load the recipe, honour done markers and --force, check the launch settings, then hand the
    stage to its launcher. Raises ConfigError (bad input) and StageFailed (the stage failed)."""
    stage = STAGES[stage_name]
    recipe = load_recipe(recipe_path, overrides, stage=stage.name)
    path = stage_dir(recipe)
    if opts.num_shards is not None and opts.num_shards < 1:
        raise ConfigError("--num-shards must be at least 1")
    if opts.dry_run:
        stage.load().run(recipe, opts)
        return
    if is_done(path) and not opts.force and not opts.retry_failed and not opts.batch:
        print(f"{path.name}: already done ({path}/_SUCCESS); use --force to run it again")
        return
    if opts.force:
        clear_done(path)
        for shard in path.glob("shard-*-of-*"):
            clear_done(shard)
        if stage.kind == "train" and int(os.environ.get("RANK", "0")) == 0:
            from pipeline.train import CHECKPOINTS

            shutil.rmtree(path / CHECKPOINTS, ignore_errors=True)
    from pipeline.launch import slurm

    slurm.check_launch(recipe, recipe_path)
    importlib.import_module(f"pipeline.launch.{recipe.launch.launcher}").launch(stage, recipe, recipe_path, opts)


def exit_code(command: Callable[[], int | None]) -> int:
    """Run a command; its exit code (0 when it returns None), or the one its error maps to, with the
    error on one stderr line: 2 bad input, 1 the stage failed, 130 interrupted, preempt.EXIT_CODE
    stopped inside a Slurm job to be requeued. The CLI, `rlhf all` and the demo all use it."""
    from pipeline.preempt import EXIT_CODE, Preempted

    try:
        return command() or 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StageFailed as err:
        print(f"failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        return 130
    except Preempted as err:  # inside a Slurm job: the work is saved, the job requeues itself
        print(f"preempted: {err}", file=sys.stderr)
        return EXIT_CODE


def run_stage_exit_code(stage_name: str, recipe_path: str, overrides: list[str] = (),
                        opts: RunOptions = RunOptions()) -> int:
    """`run_stage`, as an exit code (see `exit_code`)."""
    return exit_code(lambda: run_stage(stage_name, recipe_path, overrides, opts))


class _Redacting(logging.Filter):
    """Every log line through `config.redact` (a URL with a password, a key printed by a library)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("RLHF_LOG", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _Redacting) for f in handler.filters):
            handler.addFilter(_Redacting())
    for noisy in ("httpx", "httpx2", "openai"):  # one INFO line per request drowns the progress bar
        logging.getLogger(noisy).setLevel(logging.WARNING)
