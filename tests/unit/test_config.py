"""Recipes: every shipped YAML validates; bad keys, types, files and overrides are named; secrets
never reach a saved config."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, dump_recipe, parse_override, redact
from pipeline.stages import STAGES, load_recipe
from pipeline.stages.generate import Recipe as GenerateRecipe
from pipeline.stages.prompts import Recipe as PromptsRecipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
# Not stage recipes: accelerate launch configs, Slurm profiles and pipeline files (lists of
# stage recipes, validated in tests/unit/test_slurm_launch.py) have their own formats.
NOT_STAGE_RECIPES = {"accelerate", "slurm", "pipelines"}

SECRET_LIKE = re.compile(r"sk-[A-Za-z0-9_-]{8,}")


def shipped_recipes() -> list[Path]:
    found = []
    for path in sorted(RECIPES.rglob("*")):
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            continue
        if path.relative_to(RECIPES).parts[0] in NOT_STAGE_RECIPES:
            continue
        found.append(path)
    return found


def test_recipe_discovery_finds_the_demo_recipes():
    names = {p.relative_to(RECIPES).as_posix() for p in shipped_recipes()}
    assert {"demo-tiny/tiny-models.yaml", "demo-tiny/prompts.yaml", "demo-tiny/generate.yaml"} <= names
    assert not any(n.split("/")[0] in NOT_STAGE_RECIPES for n in names)


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.relative_to(RECIPES).as_posix())
def test_every_shipped_recipe_loads(path, tmp_path):
    recipe = load_recipe(path, check_inputs=False)
    assert recipe.stage in STAGES
    assert isinstance(recipe, STAGES[recipe.stage].recipe_class)
    # The saved (resolved) copy is itself a valid recipe that loads back to the same config.
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_recipe(recipe))
    assert load_recipe(saved, check_inputs=False).model_dump() == recipe.model_dump()


# --- helpers ---------------------------------------------------------------------------------


def generate_tree(**generation) -> dict:
    return {
        "stage": "generate",
        "run": {"name": "t"},
        "inputs": {"prompts": {"stage": "prompts"}},
        "generation": {
            "pool": [
                {"name": "a", "backend": "openai", "base_url": "http://127.0.0.1:1/v1"},
                {"name": "b", "backend": "openai", "base_url": "http://127.0.0.1:2/v1"},
                {"name": "c", "backend": "hf", "path": "models/c", "batch_size": 16},
            ],
            "models_per_prompt": 2,
            **generation,
        },
    }


def write(tmp_path: Path, tree, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(tree if isinstance(tree, str) else yaml.safe_dump(tree, sort_keys=False))
    return path


def error_of(path: Path, overrides=(), **kwargs) -> str:
    kwargs.setdefault("check_inputs", False)
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides, **kwargs)
    return str(info.value)


# --- unknown keys, wrong types, bad structure ------------------------------------------------


def test_a_valid_tree_loads(tmp_path):
    recipe = load_recipe(write(tmp_path, generate_tree()), check_inputs=False)
    assert isinstance(recipe, GenerateRecipe)
    assert [m.name for m in recipe.generation.pool] == ["a", "b", "c"]
    assert recipe.generation.pool[2].batch_size == 16


@pytest.mark.parametrize("section,key,dotted", [
    (None, "genration", "genration"),
    ("generation", "temprature", "generation.temprature"),
    ("run", "nmae", "run.nmae"),
    ("launch", "num_shard", "launch.num_shard"),
])
def test_typo_key_is_named(tmp_path, section, key, dotted):
    tree = generate_tree()
    (tree if section is None else tree.setdefault(section, {}))[key] = 1
    message = error_of(write(tmp_path, tree))
    assert dotted in message
    assert "unknown key" in message
    assert str(tmp_path / "recipe.yaml") in message  # the file is named too


def test_typo_key_in_a_pool_entry_names_its_index(tmp_path):
    tree = generate_tree()
    tree["generation"]["pool"][1]["batch_sze"] = 4
    message = error_of(write(tmp_path, tree))
    assert "generation.pool[1].batch_sze" in message


@pytest.mark.parametrize("key,value", [
    ("temperature", "hot"),
    ("models_per_prompt", 0),
    ("models_per_prompt", "two"),
    ("top_p", 1.5),
    ("max_new_tokens", -1),
])
def test_wrong_type_or_range_names_the_key(tmp_path, key, value):
    message = error_of(write(tmp_path, generate_tree(**{key: value})))
    assert f"generation.{key}" in message
    assert repr(value) in message  # and shows what it got


def test_missing_required_key(tmp_path):
    tree = generate_tree()
    del tree["run"]["name"]
    assert "run.name: required key is missing" in error_of(write(tmp_path, tree))


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "stage: generate\nrun:\n  name: t\ngeneration: {pool: [\n  oops: : :\n")
    message = error_of(path)
    assert re.search(re.escape(str(path)) + r":\d+", message), message
    assert "not valid YAML" in message

    path = write(tmp_path, "stage: generate\nrun:\n  name: t\n bad: 1\n", "indent.yaml")
    assert f"{path}:4" in error_of(path)


def test_not_a_mapping(tmp_path):
    assert "mapping" in error_of(write(tmp_path, "- just\n- a list\n"))


def test_missing_recipe_file(tmp_path):
    message = error_of(tmp_path / "nope.yaml")
    assert "recipe not found" in message and "nope.yaml" in message


def test_unknown_stage(tmp_path):
    tree = generate_tree()
    tree["stage"] = "genrate"
    message = error_of(write(tmp_path, tree))
    assert "'genrate'" in message and "is not a stage" in message


def test_stage_mismatch_with_the_command(tmp_path):
    message = error_of(write(tmp_path, generate_tree()), stage="prompts")
    assert "'generate'" in message and "'prompts'" in message


def test_models_per_prompt_above_pool_size(tmp_path):
    message = error_of(write(tmp_path, generate_tree(models_per_prompt=4)))
    assert "models_per_prompt=4" in message and "3 models" in message


def test_duplicate_pool_names(tmp_path):
    tree = generate_tree()
    tree["generation"]["pool"][1]["name"] = "a"
    message = error_of(write(tmp_path, tree))
    assert "generation" in message and "unique" in message


def test_hf_model_without_path(tmp_path):
    tree = generate_tree()
    del tree["generation"]["pool"][2]["path"]
    message = error_of(write(tmp_path, tree))
    assert "generation.pool[2]" in message and "'c'" in message and "path" in message


def test_unknown_backend(tmp_path):
    tree = generate_tree()
    tree["generation"]["pool"][0]["backend"] = "vllm"
    assert "generation.pool[0].backend" in error_of(write(tmp_path, tree))


def test_principle_mix_unknown_principle(tmp_path):
    mix = {"flan": {"helpfulness": 0.5, "bravery": 0.5}}
    message = error_of(write(tmp_path, generate_tree(principle_mix=mix)))
    assert "principle_mix.flan" in message and "bravery" in message


def test_principle_mix_weights_must_sum_to_one(tmp_path):
    mix = {"sharegpt": {"helpfulness": 0.5, "honesty": 0.4}}
    message = error_of(write(tmp_path, generate_tree(principle_mix=mix)))
    assert "principle_mix.sharegpt" in message and "sum to 1" in message


def test_principle_mix_valid(tmp_path):
    mix = {"flan": {"helpfulness": 0.25, "honesty": 0.75}}
    recipe = load_recipe(write(tmp_path, generate_tree(principle_mix=mix)), check_inputs=False)
    assert recipe.generation.principle_mix == mix


def test_bad_run_name(tmp_path):
    tree = generate_tree()
    tree["run"]["name"] = "../escape"
    assert "run.name" in error_of(write(tmp_path, tree))


# --- input files -----------------------------------------------------------------------------


def test_missing_model_path_names_key_and_path(tmp_path):
    path = write(tmp_path, generate_tree())
    load_recipe(path, check_inputs=False)  # fine without the check
    message = error_of(path, check_inputs=True)
    assert "generation.pool[2].path" in message and "models/c" in message


def test_missing_prompts_path_names_key_and_path(tmp_path):
    tree = generate_tree()
    tree["generation"]["pool"] = tree["generation"]["pool"][:2]
    tree["inputs"]["prompts"] = str(tmp_path / "no-prompts-here")
    message = error_of(write(tmp_path, tree), check_inputs=True)
    assert "inputs.prompts" in message and str(tmp_path / "no-prompts-here") in message


def test_missing_source_and_eval_files(tmp_path):
    sample = ROOT / "data/samples/instructions/flan.jsonl"
    tree = {"stage": "prompts", "run": {"name": "t"},
            "inputs": {"sources": [{"name": "flan", "path": str(sample)},
                                   {"name": "sharegpt", "path": "nowhere/sharegpt.jsonl"}]}}
    message = error_of(write(tmp_path, tree), check_inputs=True)
    assert "inputs.sources[1].path" in message and "nowhere/sharegpt.jsonl" in message

    tree["inputs"]["sources"].pop()
    tree["inputs"]["eval_sets"] = [{"path": "nowhere/eval.jsonl"}]
    message = error_of(write(tmp_path, tree), check_inputs=True)
    assert "inputs.eval_sets[0].path" in message and "nowhere/eval.jsonl" in message

    tree["inputs"]["eval_sets"] = []
    assert isinstance(load_recipe(write(tmp_path, tree), check_inputs=True), PromptsRecipe)


# --- dotted overrides ------------------------------------------------------------------------


@pytest.mark.parametrize("text,key,value", [
    ("generation.temperature=0.25", "generation.temperature", 0.25),
    ("generation.seed=7", "generation.seed", 7),
    ("data.dedupe=false", "data.dedupe", False),
    ("run.name=try2", "run.name", "try2"),
    ("generation.pool.0.base_url=http://h:1/v1?a=b", "generation.pool.0.base_url", "http://h:1/v1?a=b"),
    ("x.y=", "x.y", ""),
    (" run.name = spaced", "run.name", "spaced"),
])
def test_parse_override_reads_values_as_yaml(text, key, value):
    got_key, got_value = parse_override(text)
    assert got_key == key
    assert got_value == value and type(got_value) is type(value)


@pytest.mark.parametrize("text", ["generation.temperature", "=3"])
def test_parse_override_rejects_malformed(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_overrides_scalar_nested_and_list_index(tmp_path):
    path = write(tmp_path, generate_tree())
    recipe = load_recipe(path, ["generation.temperature=0.5", "run.name=try2", "run.root=/tmp/x",
                                "generation.pool.2.batch_size=4", "generation.pool.0.max_concurrency=3",
                                "launch.num_shards=3"], check_inputs=False)
    assert recipe.generation.temperature == 0.5
    assert recipe.run.name == "try2" and recipe.run.root == "/tmp/x"
    assert recipe.generation.pool[2].batch_size == 4
    assert recipe.generation.pool[0].max_concurrency == 3
    assert recipe.generation.pool[1].max_concurrency == 8  # the others keep their values
    assert recipe.launch.num_shards == 3
    assert yaml.safe_load(path.read_text()) == generate_tree()  # the file itself is untouched


def test_override_creates_a_missing_section(tmp_path):
    tree = {"stage": "prompts", "run": {"name": "t"},
            "inputs": {"sources": [{"name": "flan", "path": "x.jsonl"}]}}
    recipe = load_recipe(write(tmp_path, tree), ["data.seed=5", "data.dedupe=false"], check_inputs=False)
    assert recipe.data.seed == 5 and recipe.data.dedupe is False


def test_override_types_are_validated(tmp_path):
    path = write(tmp_path, generate_tree())
    recipe = load_recipe(path, ["generation.models_per_prompt=3"], check_inputs=False)
    assert recipe.generation.models_per_prompt == 3
    assert "generation.temperature" in error_of(path, ["generation.temperature=hot"])
    assert "generation.models_per_prompt" in error_of(path, ["generation.models_per_prompt=0"])


@pytest.mark.parametrize("override", ["generation.pool.3.batch_size=4", "generation.pool.x.batch_size=4",
                                      "generation.pool.-1.batch_size=4"])
def test_override_bad_list_index(tmp_path, override):
    message = error_of(write(tmp_path, generate_tree()), [override])
    assert "generation.pool" in message and "index below 3" in message


def test_override_into_a_scalar(tmp_path):
    assert "run.name is not a section" in error_of(write(tmp_path, generate_tree()), ["run.name.x=1"])


@pytest.mark.parametrize("override,dotted", [
    ("generation.temprature=0.5", "generation.temprature"),
    ("generation.pool.1.batch_sze=2", "generation.pool[1].batch_sze"),
    ("runn.name=x", "runn"),
])
def test_override_that_creates_a_typo_key(tmp_path, override, dotted):
    message = error_of(write(tmp_path, generate_tree()), [override])
    assert dotted in message and "unknown key" in message


# --- redaction -------------------------------------------------------------------------------


def test_redact_secret_keys_but_keep_names_of_variables():
    tree = {
        "api_key": "abc123",
        "token": "tok",
        "hf_token": "whatever",
        "client_secret": "s",
        "password": "p",
        "api_key_env": "OPENAI_API_KEY",
        "token_env": "HF_TOKEN",
        "empty_token": None,
        "max_new_tokens": 12,
        "nested": [{"Authorization": "Bearer xyz"}, {"note": "key sk-abcdefgh12345678 in text"}],
    }
    out = redact(tree)
    for key in ("api_key", "token", "hf_token", "client_secret", "password"):
        assert out[key] == "<redacted>", key
    assert out["nested"][0]["Authorization"] == "<redacted>"
    assert out["api_key_env"] == "OPENAI_API_KEY"
    assert out["token_env"] == "HF_TOKEN"
    assert out["empty_token"] is None  # nothing to hide
    assert out["max_new_tokens"] == 12
    assert out["nested"][1]["note"] == "key <redacted> in text"
    assert tree["api_key"] == "abc123"  # the input is not modified


def test_redact_secret_looking_values():
    assert redact("hf_abcdefghijklmnop") == "<redacted>"
    assert redact("Bearer sk-proj-AbCdEf_123456789") == "Bearer <redacted>"
    assert redact("plain text, sk-short") == "plain text, sk-short"  # too short to be a key


def test_dump_recipe_never_contains_a_key_looking_value(tmp_path):
    tree = generate_tree()
    pool = tree["generation"]["pool"]
    pool[0]["base_url"] = "http://127.0.0.1:1/v1?api_key=sk-live0123456789abcdef"
    pool[1]["api_key_env"] = "sk-pasted0123456789abcdef"  # a key pasted where its variable's name goes
    pool[1]["model"] = "sk-modelfield0123456789"
    recipe = load_recipe(write(tmp_path, tree), check_inputs=False)
    dumped = dump_recipe(recipe)
    assert not SECRET_LIKE.search(dumped), dumped
    assert "<redacted>" in dumped
    assert yaml.safe_load(dumped)["generation"]["pool"][0]["api_key_env"] == "OPENAI_API_KEY"


def test_dump_recipe_keeps_api_key_env(tmp_path):
    tree = generate_tree()
    tree["generation"]["pool"][0]["api_key_env"] = "MY_SERVER_KEY"
    dumped = yaml.safe_load(dump_recipe(load_recipe(write(tmp_path, tree), check_inputs=False)))
    assert dumped["generation"]["pool"][0]["api_key_env"] == "MY_SERVER_KEY"
    assert dumped["generation"]["pool"][1]["api_key_env"] == "OPENAI_API_KEY"


def test_key_from_the_environment_never_reaches_the_saved_config(tmp_path, monkeypatch):
    from pipeline.llm.base import make_backend
    from pipeline.runs import save_config

    fake = "sk-test-FAKE0123456789abcdefXYZ"
    monkeypatch.setenv("TEST_FAKE_API_KEY", fake)
    monkeypatch.setenv("OPENAI_API_KEY", fake)
    tree = generate_tree()
    tree["generation"]["pool"][0]["api_key_env"] = "TEST_FAKE_API_KEY"
    tree["generation"]["pool"][1]["base_url"] = None  # the real API: the key is read from the env
    path = write(tmp_path, tree)
    # Even a key pasted on the command line (from the variable) is hidden in the saved copy.
    recipe = load_recipe(path, [f"generation.pool.0.base_url=http://127.0.0.1:1/v1?key={fake}"],
                         check_inputs=False)
    for spec in recipe.generation.pool[:2]:
        backend = make_backend(spec)  # reads the key from the environment
        assert fake not in repr(backend.identity())
    save_config(tmp_path / "stage", recipe)
    saved = (tmp_path / "stage" / "config.yaml").read_text()
    assert fake not in saved and "FAKE0123456789" not in saved
    assert "TEST_FAKE_API_KEY" in saved
    assert fake not in dump_recipe(recipe)


def test_every_stage_recipe_has_a_launch_section():
    # The CLI reads `recipe.launch` for every stage (local or slurm); a recipe class without one
    # crashed `rlhf tiny-models` once.
    missing = [name for name, stage in STAGES.items() if "launch" not in stage.recipe_class.model_fields]
    assert not missing, missing


# --- issue 18: the recipe layer on bad input -----------------------------------------------------


def sft_tree(**train) -> dict:
    return {"stage": "sft", "run": {"name": "t"}, "model": "m", "inputs": {"dataset": "d"},
            "train": {"report_to": [], **train}}


def test_a_misspelt_scheduler_is_refused_by_validate(tmp_path):
    message = error_of(write(tmp_path, sft_tree(lr_scheduler="cosin")))
    assert "train.lr_scheduler" in message and "'cosin'" in message and "'cosine'" in message


def test_scheduler_names_match_transformers():
    from transformers import SchedulerType

    from pipeline.config import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}


def test_a_recipe_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("stage: sft\nrun: {name: t}\n# caf\xe9\n".encode("latin-1"))
    message = error_of(path)
    assert f"{path}:3: not UTF-8" in message


@pytest.mark.parametrize("value, expected", [
    (0, "use a number of steps above 0, or -1"),
    (-5, "use a number of steps above 0, or -1"),
    (True, "valid integer"),
    ("3", "valid integer"),
    (2.5, "valid integer"),
])
def test_max_steps_takes_only_a_real_step_count(tmp_path, value, expected):
    message = error_of(write(tmp_path, sft_tree(max_steps=value)))
    assert "train.max_steps" in message and expected in message


@pytest.mark.parametrize("key, value", [("gradient_checkpointing", 1), ("gradient_checkpointing", "yes"),
                                        ("seed", "0"), ("learning_rate", "fast")])
def test_no_silent_coercion_of_flags_and_numbers(tmp_path, key, value):
    assert f"train.{key}" in error_of(write(tmp_path, sft_tree(**{key: value})))


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads `2e-5` as a string; with strict types that would be refused
    recipe = load_recipe(write(tmp_path, "stage: sft\nrun: {name: t}\nmodel: m\ninputs: {dataset: d}\n"
                                         "train: {learning_rate: 2e-5}\n"), ["train.weight_decay=1e-2"],
                         check_inputs=False)
    assert recipe.train.learning_rate == 2e-5 and recipe.train.weight_decay == 0.01


def test_a_misspelt_input_stage_says_no_such_stage(tmp_path):
    from pipeline.runs import resolve_input
    from pipeline.config import StageRef

    recipe = load_recipe(write(tmp_path, sft_tree()), check_inputs=False)
    recipe.run.root = str(tmp_path / "runs")
    (tmp_path / "runs" / "t" / "prompts").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"inputs.dataset.stage: no such stage 'promtps'.*steps of the run: prompts"):
        resolve_input(recipe, StageRef(stage="promtps"), "inputs.dataset")
    with pytest.raises(ConfigError, match="stage 'pairs' of run 't' has not finished"):  # a real stage, not run yet
        resolve_input(recipe, StageRef(stage="pairs"), "inputs.dataset")


def test_credentials_in_urls_and_secret_keys_are_redacted():
    tree = {"base_url": "http://user:SECRET@host:8000/v1", "other": "https://tok3n@example.org/x",
            "q": "http://h/v1?api_key=SECRET2&x=1", "db_password": "SECRET3", "hfToken": "SECRET4",
            "sort_key": "SECRET5", "max_new_tokens": 12, "tokenizer": "gpt2", "api_key_env": "MY_KEY"}
    out = redact(tree)
    text = repr(out)
    assert "SECRET" not in text and "tok3n" not in text, text
    assert out["base_url"] == "http://<redacted>@host:8000/v1"
    assert out["q"] == "http://h/v1?api_key=<redacted>&x=1"
    assert out["max_new_tokens"] == 12 and out["tokenizer"] == "gpt2" and out["api_key_env"] == "MY_KEY"


def test_a_url_credential_never_reaches_config_yaml_or_logs(tmp_path, capsys):
    import logging

    from pipeline.launch import setup_logging
    from pipeline.runs import save_config

    tree = generate_tree()
    tree["generation"]["pool"][0]["base_url"] = "http://user:SECRET@127.0.0.1:1/v1"
    recipe = load_recipe(write(tmp_path, tree), check_inputs=False)
    save_config(tmp_path / "stage", recipe)
    assert "SECRET" not in (tmp_path / "stage" / "config.yaml").read_text()
    setup_logging()
    handler = logging.StreamHandler()
    logging.getLogger().addHandler(handler)
    try:
        setup_logging()  # attaches the redacting filter to every root handler
        logging.getLogger("pipeline.test").warning("connecting to %s", "http://user:SECRET@host/v1")
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    assert "connecting to http://<redacted>@host/v1" in err and "SECRET" not in err


def test_spending_controls_belong_to_openai_models_and_a_budget_needs_a_price():
    from pydantic import ValidationError

    from pipeline.config import ModelSpec

    with pytest.raises(ValidationError, match="budget_usd.*apply to backend 'openai' only"):
        ModelSpec(name="m", backend="hf", path="x", budget_usd=1.0)
    with pytest.raises(ValidationError, match="budget_usd is set but price is not"):
        ModelSpec(name="m", backend="openai", budget_usd=1.0)
    spec = ModelSpec(name="m", backend="openai", requests_per_minute=60,
                     price={"input_per_mtok": 1, "output_per_mtok": 2}, budget_usd=1.0)
    assert spec.price.output_per_mtok == 2


def test_the_annotate_judge_spec_refuses_spending_fields_it_would_ignore():
    from pydantic import ValidationError

    from pipeline.stages.annotate import AnnotationSection

    judge = {"name": "j", "backend": "openai", "base_url": "http://127.0.0.1:1", "requests_per_minute": 5}
    with pytest.raises(ValidationError, match="judge.requests_per_minute: set the judge's spending controls"):
        AnnotationSection.model_validate({"judge": judge})
