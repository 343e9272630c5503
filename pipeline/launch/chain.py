"""`rlhf all PIPELINE [key=value ...] [--launcher local|slurm] [--profile P]`: the stage recipes
of a pipeline file (`recipes/pipelines/*.yaml`), in order.

    stages:
      - recipes/demo-tiny/prompts.yaml
      - {recipe: recipes/demo-tiny/generate.yaml, overrides: [launch.num_shards=4]}
      - recipes/pipelines/demo-tiny-rtuning.yaml    # another pipeline file: its stages, in place

A step that repeats an earlier one (same recipe, same overrides; two included pipelines that
both start from the tiny models, say) runs once.

Overrides on the command line apply to every stage, after the stage's own (`run.name=try2`).
A stage already done (`_SUCCESS`) is skipped. Locally each stage runs through the normal CLI in
this process, and the first that fails stops the rest. With `--launcher slurm` every stage is
checked first (recipe, profile, launch settings; a bad one submits nothing), then each is
submitted with its first jobs waiting on the previous stage's last job (`afterok`), so a failure
cancels everything after it. Input files of a stage that follows one still to run are checked
when its job starts (an earlier stage may be what makes them).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from pipeline.config import ConfigError, Strict, format_validation_error, read_yaml
from pipeline.stages import load_recipe


class PipelineStep(Strict):
    recipe: str = Field(description="A stage recipe (YAML path)")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides for this stage")


class PipelineFile(Strict):
    """`rlhf all PIPELINE`: stage recipes in order; each later stage names its inputs by stage."""

    stages: list[PipelineStep] = Field(min_length=1)

    @field_validator("stages", mode="before")
    @classmethod
    def _plain_paths(cls, value: Any) -> Any:
        # A bare path is shorthand for {recipe: path}.
        return [{"recipe": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


def load_pipeline(path: str | Path, _including: tuple[Path, ...] = ()) -> PipelineFile:
    """The pipeline's stage recipes, with included pipeline files expanded and repeats dropped."""
    path = Path(path)
    if path.resolve() in _including:
        raise ConfigError(f"{path}: includes itself (through {' -> '.join(str(p) for p in _including)})")
    tree = read_yaml(path, "pipeline")
    if not isinstance(tree, dict) or "stages" not in tree:
        raise ConfigError(f"{path}: a pipeline is a YAML mapping with a `stages:` list of recipes")
    try:
        pipeline = PipelineFile.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(str(path), err)) from None
    steps: list[PipelineStep] = []
    for step in pipeline.stages:
        if is_pipeline_file(step.recipe):
            inner = load_pipeline(step.recipe, (*_including, path.resolve())).stages
            steps += [PipelineStep(recipe=s.recipe, overrides=[*s.overrides, *step.overrides]) for s in inner]
        else:
            steps.append(step)
    unique = [s for i, s in enumerate(steps) if s not in steps[:i]]
    return PipelineFile(stages=unique)


def is_pipeline_file(path: str | Path) -> bool:
    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(tree, dict) and "stages" in tree and "stage" not in tree


def validate(path: str | Path, check_inputs: bool = True) -> list:
    """Every stage recipe of the pipeline, loaded (`rlhf validate` accepts pipeline files too)."""
    pipeline = load_pipeline(path)
    return [load_recipe(step.recipe, step.overrides, check_inputs=check_inputs) for step in pipeline.stages]


def run(path: str, overrides: list[str], launcher: str = "local", profile: str | None = None,
        force: bool = False) -> int:
    """Run (or submit) the pipeline's stages; `force` runs done stages again (here only)."""
    return run_steps(load_pipeline(path).stages, overrides, launcher, profile, force, origin=path)


def run_steps(stages: list[PipelineStep], overrides: list[str], launcher: str = "local", profile: str | None = None,
              force: bool = False, origin: str = "pipeline") -> int:
    """`run` on a list of steps (a pipeline file's, or a few of them)."""
    from pipeline.launch import run_stage_exit_code
    from pipeline.runs import RunOptions, is_done, stage_dir

    if force and launcher != "local":
        raise ConfigError(f"{origin}: --force runs the stages here; with --launcher {launcher}, submit the "
                          "stage to redo on its own (`rlhf STAGE RECIPE --force launch.launcher=slurm`)")
    common = [*overrides, f"launch.launcher={launcher}"] + ([f"launch.profile={profile}"] if profile else [])
    steps, pending = [], False
    for step in stages:
        # Inputs are checked now only while every earlier stage is done: a later stage's inputs
        # may be what an earlier one makes.
        recipe = load_recipe(step.recipe, [*step.overrides, *common], check_inputs=not pending)
        done = is_done(stage_dir(recipe)) and not force
        steps.append((step, recipe, done))
        pending = pending or not done
    if launcher == "local":
        for step, recipe, done in steps:
            if done:
                print(f"all: {stage_dir(recipe).name} already done ({stage_dir(recipe)}); skipped")
                continue
            code = run_stage_exit_code(recipe.stage, step.recipe, [*step.overrides, *common], RunOptions(force=force))
            if code:
                print(f"all: stopped at {stage_dir(recipe).name} (exit {code})")
                return code
        return 0

    from pipeline.launch import slurm

    plans = [None if done else slurm.prepare_stage(recipe, step.recipe)
             for step, recipe, done in steps]  # every check and script before the first sbatch
    after: list[str] = []
    submitted: list[str] = []
    try:
        for (step, recipe, done), plan in zip(steps, plans):
            if plan is None:
                print(f"all: {stage_dir(recipe).name} already done ({stage_dir(recipe)}); skipped")
                continue
            record = slurm.submit_prepared(plan, after=after)
            submitted += [job["id"] for job in record["jobs"]]
            after = [record["final"]] if record["final"] else after
    except BaseException:
        for job_id in submitted:  # leave the queue as it was
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
        raise
    print(f"all: {len(submitted)} job(s) submitted; `rlhf status {steps[0][1].run.name}` shows where they are")
    return 0
