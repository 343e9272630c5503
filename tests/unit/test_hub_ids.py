"""Hub ids wherever a model or dataset is named (pipeline/hub.py): with HF_HUB_OFFLINE=1 an `org/name`
is read from the Hugging Face cache. The cache here is a temporary folder this file fills itself, in
the hub cache's own layout (`models--org--name/refs/main` + `snapshots/<revision>/`), with a tiny
model built in the session and a small preference dataset written as parquet; nothing is downloaded."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import hub
from pipeline.config import ConfigError
from pipeline.runs import resolve_input, resolve_model, resolve_model_paths
from pipeline.stages import recipe_for

ROOT = Path(__file__).resolve().parents[2]
REVISION = "0123456789abcdef0123456789abcdef01234567"
MODEL_ID, DATA_ID = "tiny-org/tiny-chat", "tiny-org/tiny-prefs"


def _place(cache: Path, kind: str, repo: str, fill) -> Path:
    """A repo in the hub cache layout: refs/main names the revision whose snapshot folder holds the files."""
    storage = cache / f"{kind}s--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / REVISION
    fill(snapshot)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(REVISION)
    return snapshot


def _chats(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        prompt = f"What is {i} plus one?"
        rows.append({"prompt": prompt, "prompt_id": f"p{i}",
                     "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{i + 1}."}],
                     "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "No idea."}],
                     "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{i + 1}."}],
                     "score_chosen": 8.0, "score_rejected": 2.0})
    return rows


def _write_parquet(snapshot: Path) -> None:
    from datasets import Dataset

    (snapshot / "data").mkdir(parents=True)
    for split, rows in (("train_prefs", _chats(6)), ("test_prefs", _chats(2, 10)), ("train_sft", _chats(6)),
                        ("test_sft", _chats(2, 10))):
        Dataset.from_list(rows).to_parquet(str(snapshot / "data" / f"{split}-00000-of-00001.parquet"))


@pytest.fixture(scope="module")
def hub_cache(tiny_pool, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub-cache")
    _place(cache, "model", MODEL_ID, lambda snap: shutil.copytree(tiny_pool[0], snap))
    _place(cache, "dataset", DATA_ID, _write_parquet)
    return cache


@pytest.fixture
def offline_cache(hub_cache, tmp_path, monkeypatch):
    """The filled cache as this process's hub cache (huggingface_hub reads its constants when called)."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    return hub_cache


@pytest.mark.parametrize("name, shaped", [
    ("Qwen/Qwen2.5-0.5B-Instruct", True), ("gpt2", True), ("HuggingFaceH4/ultrafeedback_binarized", True),
    ("a/b/c", False), ("./model", False), ("/abs/model", False), ("~/model", False), ("prompts.jsonl", False),
    ("org/data.parquet", False), ("-org/name", False), ("org/na--me", False), ("org/", False), ("", False),
])
def test_what_counts_as_a_hub_id(name, shaped):
    assert hub.is_hub_id(name) is shaped


def _generate(tmp_path: Path, pool_path: str):
    tree = {"stage": "generate", "run": {"name": "r", "root": str(tmp_path)}, "inputs": {"prompts": {"stage": "prompts"}},
            "generation": {"pool": [{"name": "tiny", "backend": "hf", "path": pool_path, "device": "cpu"}],
                           "models_per_prompt": 1}}
    return recipe_for(tree, "g.yaml")


def test_a_pool_entry_naming_a_hub_id_loads_from_the_cache_offline(offline_cache, tmp_path):
    from pipeline.llm.hf import HFBackend

    recipe = _generate(tmp_path, MODEL_ID)
    resolve_model_paths(recipe)
    folder = Path(recipe.generation.pool[0].path)
    assert folder == offline_cache / "models--tiny-org--tiny-chat" / "snapshots" / REVISION
    assert hub.hub_origin(folder) == ("model", MODEL_ID, REVISION)  # what a model card names it by
    backend = HFBackend(recipe.generation.pool[0])
    backend._load()  # tokenizer, chat template and weights, all from the snapshot folder
    assert backend._tokenizer.chat_template and backend._model is not None
    backend.close()


def test_model_and_dataset_fields_take_hub_ids(offline_cache, tmp_path):
    from pipeline.train import load_chat_splits

    tree = {"stage": "sft", "run": {"name": "r", "root": str(tmp_path)}, "model": MODEL_ID,
            "inputs": {"dataset": DATA_ID, "train_split": "train_sft", "eval_split": "test_sft"}}
    recipe = recipe_for(tree, "s.yaml")
    assert resolve_model(recipe, recipe.model, "model").name == REVISION
    train, test, folder = load_chat_splits(recipe)  # parquet files: split names from the file names
    assert (len(train), len(test)) == (6, 2) and hub.hub_origin(folder) == ("dataset", DATA_ID, REVISION)


def test_dpo_reads_a_hub_preference_dataset_in_its_own_layout(offline_cache, tmp_path):
    from pipeline.stages.dpo import load_pairs

    recipe = _generate(tmp_path, "x")
    folder = resolve_input(recipe, DATA_ID, "inputs.dataset")
    splits = load_pairs(folder, "auto", "inputs.dataset", {"inputs.train_split": "train_prefs",
                                                           "inputs.eval_split": "test_prefs"})
    train = splits["inputs.train_split"]
    assert len(train) == 6 and train[0]["prompt"][0]["content"] == "What is 0 plus one?"  # H4 rows, converted


def test_an_unknown_hub_id_offline_names_the_id_the_key_and_the_way_out(offline_cache, tmp_path):
    recipe = _generate(tmp_path, "nobody/no-such-model")
    with pytest.raises(ConfigError) as err:
        resolve_model_paths(recipe)
    text = str(err.value)
    assert text.startswith("generation.pool[0].path: no such file or folder: nobody/no-such-model, and as a "
                           "Hugging Face Hub model id: not in the local cache")
    assert str(offline_cache) in text and "HF_HUB_OFFLINE=1" in text and "HF_HUB_OFFLINE=0" in text


@pytest.mark.parametrize("name", ["a/b/c", "./not-here", "missing.jsonl", "/no/such/model"])
def test_a_missing_path_that_is_no_hub_id_keeps_the_plain_error(offline_cache, tmp_path, name):
    recipe = _generate(tmp_path, "x")
    with pytest.raises(ConfigError) as err:
        resolve_input(recipe, name, "inputs.dataset")
    assert str(err.value) == f"inputs.dataset: no such file or folder: {name}"


def test_keys_read_as_plain_files_never_go_to_the_hub(offline_cache):
    with pytest.raises(ConfigError, match=r"^inputs\.sources\[0\]\.path: no such file or folder: tiny-org/tiny-prefs$"):
        hub.check_named(DATA_ID, "inputs.sources[0].path")
    hub.check_named(DATA_ID, "inputs.dataset")  # the same id where a dataset input is meant: in the cache


def test_online_with_the_hub_unreachable_falls_back_to_the_cache(offline_cache, monkeypatch):
    """HF_HUB_OFFLINE=0 but nothing answers at the endpoint: a cached id still loads; an uncached one
    says the hub could not be reached."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as probe:  # a port nothing listens on: connections are refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    assert hub.local_folder(MODEL_ID, "model", "model").name == REVISION
    with pytest.raises(ConfigError, match=r"^model: no such file or folder: nobody/nothing, and as a Hugging Face "
                                          r"Hub model id: the hub could not be reached"):
        hub.local_folder("nobody/nothing", "model", "model")


def test_rlhf_validate_checks_hub_ids_against_the_cache(hub_cache, tmp_path):
    """The command line, as a user runs it: HF_HUB_CACHE names the cache, HF_HUB_OFFLINE=1."""
    base = yaml.safe_load((ROOT / "recipes/demo-tiny/sft.yaml").read_text())
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump({**base, "model": MODEL_ID, "inputs": {**base["inputs"], "dataset": DATA_ID}}))
    bad.write_text(yaml.safe_dump({**base, "model": "nobody/no-such-model"}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(good), str(bad)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert f"ok     {good}" in done.stdout
    assert (f"error: {bad}: model: no such file or folder: nobody/no-such-model, and as a Hugging Face Hub model "
            "or dataset id: not in the local cache") in done.stderr
