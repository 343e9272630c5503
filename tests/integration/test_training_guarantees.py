"""What every training stage guarantees beyond its inputs (issue 18): a non-finite loss stops the
stage (exit 1, no `_SUCCESS`, no model), two runs of one recipe are identical from the first
step (the seed covers the score head and LoRA), `training_loss` after a resume is the mean over
all steps, and a reward tie is a miss however small the float noise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import pairs, reward_recipe, stage

from pipeline.cli import main as rlhf


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def logged_losses(stage_path: Path) -> list[float]:
    states = sorted((stage_path / "checkpoints").glob("checkpoint-*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.split("-")[1]))
    return [e["loss"] for e in json.loads(states[-1].read_text())["log_history"] if "loss" in e]


def test_two_reward_runs_of_one_recipe_are_identical(tiny_pool, tmp_path):
    """Issue 18 #7: the score head was drawn before the seed was set."""
    runs = []
    for name in ("a", "b"):
        path = reward_recipe(tmp_path / name, tiny_pool[0], "t", pairs(16), pairs(4, 100), max_steps=2,
                             save_steps=2, seed=3)
        assert rlhf(["reward", str(path)]) == 0
        runs.append(tmp_path / name / "runs" / "t" / "reward")
    assert logged_losses(runs[0]) == logged_losses(runs[1])
    assert same_weights(runs[0] / "model", runs[1] / "model")


def chats(folder: Path) -> Path:
    from datasets import Dataset, DatasetDict

    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Here is answer {i}."}]} for i in range(8)]
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(folder))
    return folder


def sft_tree(model, data: Path, **train) -> dict:
    return {"model": str(model), "inputs": {"dataset": str(data), "eval_split": None},
            "train": {"max_steps": 2, "global_batch_size": 4, "per_device_batch_size": 4, "learning_rate": 1e-2,
                      "max_length": 64, "report_to": [], "logging_steps": 1, "save_steps": 2, "precision": "fp32",
                      **train}}


def test_two_lora_sft_runs_of_one_recipe_are_identical(tiny_pool, tmp_path):
    """Issue 18 #7: TRL adds the LoRA adapters before the Trainer seeds itself."""
    data = chats(tmp_path / "chats")
    lora = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "seed": 5}
    for name in ("a", "b"):
        stage(tmp_path / name, "sft", sft_tree(tiny_pool[1], data, **lora))
    a, b = (tmp_path / name / "runs" / "t" / "sft" for name in ("a", "b"))
    assert logged_losses(a) == logged_losses(b)
    assert same_weights(a / "model", b / "model")


def test_a_non_finite_loss_stops_the_stage(tiny_pool, tmp_path, capsys):
    """Issue 18 #2: transformers averaged a NaN loss away and the stage reported success."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_pool[0]))
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    model.save_pretrained(str(broken))
    AutoTokenizer.from_pretrained(str(tiny_pool[0])).save_pretrained(str(broken))
    tree = {"stage": "sft", "run": {"name": "t", "root": str(tmp_path / "runs")},
            **sft_tree(broken, chats(tmp_path / "chats"), logging_steps=10)}
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    assert rlhf(["sft", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "failed: training loss is nan at step 1 (non-finite); nothing marked done" in err
    out = tmp_path / "runs" / "t" / "sft"
    assert not (out / "_SUCCESS").exists() and not (out / "model").exists() and not (out / "summary.json").exists()


def test_training_loss_after_a_resume_is_the_mean_over_all_steps(tiny_pool, tmp_path):
    """Issue 18 #8: it was the mean of the resumed steps only."""
    path = reward_recipe(tmp_path, tiny_pool[0], "t", pairs(16), pairs(4, 100), max_steps=4, save_steps=2,
                         global_batch_size=4)
    assert rlhf(["reward", str(path)]) == 0
    out = tmp_path / "runs" / "t" / "reward"
    whole = json.loads((out / "summary.json").read_text())["training_loss"]
    # as if killed after checkpoint-2: the rerun trains steps 3 and 4 only
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    shutil.rmtree(out / "model")
    (out / "_SUCCESS").unlink()
    assert rlhf(["reward", str(path)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-2" and summary["global_step"] == 4
    losses = logged_losses(out)
    assert len(losses) == 4
    assert summary["training_loss"] == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert summary["training_loss"] == pytest.approx(whole, rel=1e-4)
    assert summary["training_loss"] != pytest.approx(sum(losses[2:]) / 2, rel=1e-6)


def test_a_tie_within_float_noise_is_a_miss():
    """Issue 18 #3: a gap of 1e-8 counted as a win."""
    from pipeline.stages.reward import accuracy_table

    rows = [{"source": "s"}] * 3
    table = accuracy_table(rows, [(0.5 + 1e-8, 0.5), (2.0, 2.0), (0.7, 0.2)], ["s"])
    assert table["s"]["accuracy"] == pytest.approx(1 / 3)
