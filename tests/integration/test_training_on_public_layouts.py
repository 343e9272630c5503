"""reward and dpo read public preference layouts through the one converter registry: both train on
rows in HuggingFaceH4/ultrafeedback_binarized's own layout (a file, or a DatasetDict with its
splits), and both refuse a row of no known layout, naming file:line, before writing anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.stages.dpo import Recipe as DpoRecipe
from pipeline.stages.reward import Recipe as RewardRecipe

H4 = Path(__file__).resolve().parents[2] / "data" / "samples" / "preferences" / "h4.jsonl"
TRAIN = {"max_steps": 2, "global_batch_size": 2, "per_device_batch_size": 2, "learning_rate": 1e-3,
         "lr_scheduler": "constant", "max_length": 128, "logging_steps": 1, "save_steps": 1000, "report_to": []}


def reward_recipe(root: Path, model, dataset, fmt: str) -> RewardRecipe:
    return RewardRecipe.model_validate({
        "stage": "reward", "run": {"name": "t", "root": str(root)}, "model": str(model), "train": TRAIN,
        "reward": {"sources": [{"name": "h4", "dataset": str(dataset), "format": fmt}]}})


def dpo_recipe(root: Path, model, dataset, fmt: str | None = None) -> DpoRecipe:
    inputs = {"dataset": str(dataset), **({"format": fmt} if fmt else {})}
    return DpoRecipe.model_validate({"stage": "dpo", "run": {"name": "t", "root": str(root)}, "model": str(model),
                                     "inputs": inputs, "train": TRAIN})


def h4_rows() -> list[dict]:
    return [json.loads(line) for line in H4.read_text(encoding="utf-8").splitlines()]


def test_reward_trains_on_an_h4_layout_file(tiny_pool, tmp_path):
    from pipeline.stages import reward

    summary = reward.run(reward_recipe(tmp_path / "runs", tiny_pool[0], H4, "auto"))
    out = tmp_path / "runs" / "t" / "reward"
    assert (out / "_SUCCESS").is_file() and summary["global_step"] == 2
    assert summary["sources"]["h4"]["layouts"] == {"h4": 6}
    assert summary["train_pairs"] + summary["eval_pairs"] == 6


def test_dpo_trains_on_an_h4_layout_file_and_an_h4_datasetdict(tiny_pool, tmp_path):
    from datasets import Dataset, DatasetDict

    from pipeline.stages import dpo

    summary = dpo.run(dpo_recipe(tmp_path / "file", tiny_pool[0], H4, "auto"))
    assert (tmp_path / "file" / "t" / "dpo" / "_SUCCESS").is_file()
    assert summary["steps"] == 2 and summary["train_pairs"] == 6 and summary["eval_pairs"] == 0  # a file: no split

    # H4's published splits, read with the default format (`pairs` takes H4's layout too)
    rows = h4_rows()
    folder = tmp_path / "h4"
    DatasetDict({"train_prefs": Dataset.from_list(rows), "test_prefs": Dataset.from_list(rows[:2])}).save_to_disk(
        str(folder))
    summary = dpo.run(dpo_recipe(tmp_path / "dd", tiny_pool[0], folder))
    assert summary["train_pairs"] == 6 and summary["eval_pairs"] == 2
    assert (tmp_path / "dd" / "t" / "dpo" / "_SUCCESS").is_file()


def test_an_unknown_layout_is_refused_by_both_stages_naming_file_and_line(tiny_pool, tmp_path):
    from pipeline.stages import dpo, reward

    bad = tmp_path / "mixed.jsonl"
    lines = H4.read_text(encoding="utf-8").splitlines()[:2] + [json.dumps({"question": "Q?", "answer": "A."})]
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    expected = r"mixed\.jsonl:3: not a known preference layout .*expected one of: .*h4 .*trl-implicit"
    with pytest.raises(ConfigError, match=r"reward\.sources\[0\]: .*" + expected):
        reward.run(reward_recipe(tmp_path / "runs", tiny_pool[0], bad, "auto"))
    with pytest.raises(ConfigError, match=r"inputs\.dataset: .*" + expected):
        dpo.run(dpo_recipe(tmp_path / "runs", tiny_pool[0], bad, "auto"))
    assert not (tmp_path / "runs").exists()
