"""Model inputs name stages (`{stage: tiny-models, output: tiny-a}`) or folders; `run.step` gives a
stage its own folder; pipeline files include pipeline files. Together they let the demo recipes
build a second run (`run.name=try2`) with no path patched."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, ModelRef
from pipeline.launch import chain
from pipeline.launch.serve import resolve_url_files
from pipeline.runs import SUCCESS, resolve_model, resolve_model_paths, stage_dir
from pipeline.stages import load_recipe, recipe_for

ROOT = Path(__file__).resolve().parents[2]


def _finished_model(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder.parent / SUCCESS).write_text("")


def _generate(tmp_path: Path, pool_path) -> object:
    tree = {"stage": "generate", "run": {"name": "try2", "root": str(tmp_path)},
            "inputs": {"prompts": {"stage": "prompts"}},
            "generation": {"pool": [{"name": "tiny-a", "backend": "hf", "path": pool_path}], "models_per_prompt": 1}}
    return recipe_for(tree, "g.yaml")


def test_a_pool_entry_naming_a_stage_resolves_to_that_runs_output(tmp_path):
    recipe = _generate(tmp_path, {"stage": "tiny-models", "output": "tiny-a"})
    assert recipe.generation.pool[0].path == ModelRef(stage="tiny-models", output="tiny-a")
    _finished_model(tmp_path / "try2" / "tiny-models" / "tiny-a")
    resolve_model_paths(recipe)
    assert recipe.generation.pool[0].path == str(tmp_path / "try2" / "tiny-models" / "tiny-a")


def test_a_model_ref_to_an_unfinished_stage_is_an_error_naming_the_key(tmp_path):
    recipe = _generate(tmp_path, {"stage": "tiny-models", "output": "tiny-a"})
    with pytest.raises(ConfigError, match=r"generation\.pool\[0\]\.path: stage 'tiny-models' of run 'try2' "
                                          r"has not finished"):
        resolve_model_paths(recipe)


def test_a_model_ref_means_the_model_output_and_may_name_another_run(tmp_path):
    tree = {"stage": "sft", "run": {"name": "b", "root": str(tmp_path)}, "model": {"stage": "sft", "run": "a"},
            "inputs": {"dataset": {"stage": "pairs"}}}
    recipe = recipe_for(tree, "s.yaml")
    with pytest.raises(ConfigError, match=r"^model: stage 'sft' of run 'a' has not finished"):
        resolve_model(recipe, recipe.model, "model")
    (tmp_path / "a" / "sft").mkdir(parents=True)
    (tmp_path / "a" / "sft" / SUCCESS).write_text("")
    with pytest.raises(ConfigError, match=r"model: .*a/sft/model is not a model folder \(no config\.json\)"):
        resolve_model(recipe, recipe.model, "model")
    (tmp_path / "a" / "sft" / "model").mkdir()
    (tmp_path / "a" / "sft" / "model" / "config.json").write_text("{}")
    assert resolve_model(recipe, recipe.model, "model") == tmp_path / "a" / "sft" / "model"


def test_run_step_gives_a_stage_its_own_folder_that_refs_can_name(tmp_path):
    base = {"stage": "sft", "model": "m", "inputs": {"dataset": {"stage": "rtuning-data"}}}
    plain = recipe_for({**base, "run": {"name": "r", "root": str(tmp_path)}}, "a.yaml")
    stepped = recipe_for({**base, "run": {"name": "r", "root": str(tmp_path), "step": "rtuning-sft"}}, "b.yaml")
    assert stage_dir(plain) == tmp_path / "r" / "sft"
    assert stage_dir(stepped) == tmp_path / "r" / "rtuning-sft"
    evaluator = recipe_for({"stage": "rtuning-eval", "run": {"name": "r", "root": str(tmp_path)},
                            "model": {"stage": "rtuning-sft"}, "inputs": {"items": {"stage": "qa-data"}}}, "c.yaml")
    _finished_model(tmp_path / "r" / "rtuning-sft" / "model")
    assert resolve_model(evaluator, evaluator.model, "model") == tmp_path / "r" / "rtuning-sft" / "model"
    with pytest.raises(ConfigError, match=r"run\.step"):
        recipe_for({**base, "run": {"name": "r", "step": "../elsewhere"}}, "d.yaml")


def _model_inputs(node, key=""):
    """(key, value) of every model input of a validated recipe: ModelSpec paths, model fields."""
    from pydantic import BaseModel

    from pipeline.config import ModelSpec

    if isinstance(node, ModelSpec):
        if node.path is not None:
            yield f"{key}.path", node.path
        if isinstance(node.model, ModelRef):  # a served model named by its folder
            yield f"{key}.model", node.model
    elif isinstance(node, BaseModel):
        for name in type(node).model_fields:
            value = getattr(node, name)
            dotted = f"{key}.{name}" if key else name
            if name in ("model", "reward_model") and isinstance(value, (str, ModelRef)):
                yield dotted, value
            else:
                yield from _model_inputs(value, dotted)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _model_inputs(item, f"{key}[{i}]")


# (pipeline, model inputs in its recipes, recipes of its folder that it does not run)
DEMOS = [
    # tiny: 4 pool entries; base models of sft, reward, critique, rtuning-probe and the two step
    # sfts; dpo, ppo and bestofn policies and reward models; what rtuning-eval, unknown-eval,
    # sayself-rl and sayself-eval read; evaluate's 4 policies and its best-of-n reward model
    ("demo-tiny", 24, set()),
    # SmolLM2: the pool holds 3 (in-process and served SmolLM2, tiny-a) and unknown-eval 2 (in-process
    # and served); evaluate has SmolLM2 itself as a fifth policy; the rest as above
    ("demo", 25, {"annotate-smollm2.yaml"}),  # the real-judge switch, run on its own
]


@pytest.mark.parametrize("demo, model_inputs, extra", DEMOS)
def test_every_demo_recipe_moves_with_the_run_name(demo, model_inputs, extra):
    """`run.name=try2` on any demo recipe moves every input and model with it: no path into its run."""
    found = 0
    for step in chain.load_pipeline(ROOT / f"recipes/pipelines/{demo}.yaml").stages:
        recipe = load_recipe(ROOT / step.recipe, [*step.overrides, "run.name=try2"], check_inputs=False)
        assert f"data/runs/{demo}/" not in json.dumps(recipe.model_dump(mode="json")), step.recipe
        for key, value in _model_inputs(recipe):
            assert isinstance(value, ModelRef), f"{step.recipe}: {key} is a plain path ({value}); name the stage"
            found += 1
    assert found == model_inputs


@pytest.mark.parametrize("demo, model_inputs, extra", DEMOS)
def test_the_demo_pipeline_covers_every_demo_recipe_once(demo, model_inputs, extra):
    steps = chain.load_pipeline(ROOT / f"recipes/pipelines/{demo}.yaml").stages
    recipes = [Path(s.recipe).name for s in steps]
    assert len(recipes) == len(set(recipes))  # tiny-models and qa-data are named twice, run once
    assert set(recipes) | extra == {p.name for p in (ROOT / "recipes" / demo).glob("*.yaml")}
    assert all(Path(s.recipe).parent.name == demo for s in steps)
    folders = [stage_dir(load_recipe(ROOT / s.recipe, s.overrides, check_inputs=False)).name for s in steps]
    assert len(folders) == len(set(folders))  # the three sft recipes get three folders
    assert {"sft", "rtuning-sft", "sayself-sft"} <= set(folders)


def test_a_pipeline_that_includes_itself_is_an_error(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump({"stages": [str(second)]}))
    second.write_text(yaml.safe_dump({"stages": [str(ROOT / "recipes/demo-tiny/prompts.yaml"), str(first)]}))
    with pytest.raises(ConfigError, match="a.yaml: includes itself"):
        chain.load_pipeline(first)


def test_an_included_pipeline_takes_the_including_steps_overrides(tmp_path):
    inner = tmp_path / "inner.yaml"
    inner.write_text(yaml.safe_dump({"stages": [{"recipe": "recipes/demo-tiny/prompts.yaml", "overrides": ["a=1"]}]}))
    outer = tmp_path / "outer.yaml"
    outer.write_text(yaml.safe_dump({"stages": [{"recipe": str(inner), "overrides": ["b=2"]},
                                                "recipes/demo-tiny/tiny-models.yaml"]}))
    steps = chain.load_pipeline(outer).stages
    assert [(s.recipe, s.overrides) for s in steps] == [("recipes/demo-tiny/prompts.yaml", ["a=1", "b=2"]),
                                                        ("recipes/demo-tiny/tiny-models.yaml", [])]


def test_the_standin_writes_its_url_for_base_url_file_and_removes_it(tmp_path):
    from pipeline.standin import start_standin

    url_file = tmp_path / "urls" / "standin.url"
    with start_standin(tmp_path, url_file=url_file) as server:
        assert url_file.read_text().strip() == server.base_url
        recipe = load_recipe(ROOT / "recipes/demo-tiny/annotate.yaml", [f"annotation.judge.base_url_file={url_file}"],
                             check_inputs=False)
        resolve_url_files(recipe)
        assert recipe.annotation.judge.base_url == server.base_url
    assert not url_file.exists()
