"""Stage `tiny-models`: a pool of tiny untrained chat models for offline demos and tests.

Writes `<run>/tiny-models/tiny-a`, `tiny-b`, ... (see `pipeline.tiny`); recipes of later stages
name them as `{stage: tiny-models, output: tiny-a}`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.config import LaunchSection, RunSection, Strict
from pipeline.runs import RunOptions, clear_done, mark_done, save_config, stage_dir
from pipeline.tiny import build_tiny_pool


class Recipe(Strict):
    stage: Literal["tiny-models"]
    run: RunSection
    count: int = Field(4, ge=1, le=8, description="Models in the pool")
    seed: int = 0
    launch: LaunchSection = LaunchSection()


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> list:
    path = stage_dir(recipe)
    path.mkdir(parents=True, exist_ok=True)
    clear_done(path)
    save_config(path, recipe)
    models = build_tiny_pool(path, count=recipe.count, seed=recipe.seed)
    mark_done(path, {"models": [p.name for p in models]})
    print("tiny-models: " + ", ".join(str(p) for p in models) + "  (untrained: their text is noise)")
    return models
