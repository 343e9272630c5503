"""`train.report_to: [wandb]` in offline mode (no network, no account): a short sft on a tiny model,
run through the CLI in a subprocess, writes a W&B run under the stage's folder whose logged
metrics are the trainer's own (the losses of trainer_state.json, the eval loss of eval.json).
Two stages in one process (`rlhf all`) get a run each, in their own folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict

from pipeline import train
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of records, each with a 7-byte header


def wandb_records(path: Path):
    """The protobuf records of an offline run's `run-<id>.wandb` file (wandb 0.31 has no Python reader)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    pos, buf = 7, b""  # file header: ":W&B", a 2-byte magic, a version byte
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def logged(run_dir: Path) -> list[dict]:
    """Every history row (metric -> value) the run logged, in order."""
    (log,) = run_dir.glob("run-*.wandb")
    rows = []
    for record in wandb_records(log):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    chats = [[{"role": "user", "content": f"What is {i} plus one?"},
              {"role": "assistant", "content": f"{i} plus one is {i + 1}."}] for i in range(8)]
    data = tmp_path / "chats"
    DatasetDict({"train": Dataset.from_list([{"messages": c} for c in chats]),
                 "test": Dataset.from_list([{"messages": c} for c in chats[:2]])}).save_to_disk(str(data))
    return data, tmp_path / "runs"


def sft_recipe(tmp_path: Path, model: Path) -> Path:
    data, runs = write_inputs(tmp_path)
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "sft", "run": {"name": "t", "root": str(runs)}, "model": str(model),
        "inputs": {"dataset": str(data)},
        "train": {"max_steps": 4, "global_batch_size": 4, "per_device_batch_size": 4, "learning_rate": 1e-3,
                  "lr_scheduler": "constant", "max_length": 64, "logging_steps": 1, "save_steps": 4,
                  "precision": "fp32", "report_to": ["wandb"]}}))
    return recipe


def offline_env(tmp_path: Path) -> dict:
    """Offline W&B with every folder of its own under tmp_path: nothing goes to the real $HOME, and
    WANDB_DIR is left unset (the stage puts the run in its own folder)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", HOME=str(home), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
               WANDB_ERROR_REPORTING="false", WANDB_SILENT="true", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def rlhf(args: list[str], env: dict) -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True,
                          timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


def test_training_stages_log_their_metrics_to_offline_wandb_runs_in_their_folders(tiny_pool, tmp_path):
    recipe = sft_recipe(tmp_path, tiny_pool[0])
    env = offline_env(tmp_path)
    # Two sft steps in one process (`rlhf all`): each must get a run of its own, in its own folder.
    pipeline = tmp_path / "two.yaml"
    pipeline.write_text(yaml.safe_dump({"stages": [
        {"recipe": str(recipe), "overrides": ["run.step=sft-a"]},
        {"recipe": str(recipe), "overrides": ["run.step=sft-b", "train.max_steps=2", "train.save_steps=2"]}]}))
    rlhf(["all", str(pipeline)], env)

    for step, steps in (("sft-a", 4), ("sft-b", 2)):
        stage = tmp_path / "runs" / "t" / step
        (run_dir,) = (stage / "wandb").glob("offline-run-*")
        rows = logged(run_dir)
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        state = json.loads((stage / "checkpoints" / f"checkpoint-{steps}" / "trainer_state.json").read_text())
        assert losses == pytest.approx([h["loss"] for h in state["log_history"] if "loss" in h], rel=1e-6), step
        assert len(losses) == steps, step  # logging_steps 1
        evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
        assert evals == pytest.approx([json.loads((stage / "eval.json").read_text())["eval_loss"]]), step
        assert (stage / "_SUCCESS").is_file()
    # nothing of W&B's under $HOME
    assert not [p for p in Path(env["HOME"]).rglob("*") if "wandb" in p.name.lower()]


def test_wandb_without_the_package_or_a_key_is_a_config_error(tmp_path, monkeypatch):
    import importlib.util

    for name in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_DIR", "")  # restored (to unset) after the test, like the module's memory
    monkeypatch.setattr(train, "_WANDB_DIR", None)
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        train.wandb_setup(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"wandb package is not installed.*\[wandb\]"):
        train.wandb_setup(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", real)
    # a WANDB_DIR the user set is theirs; ours follows the stage
    train.wandb_setup(tmp_path / "a")
    assert os.environ["WANDB_DIR"] == str((tmp_path / "a").resolve())
    train.wandb_setup(tmp_path / "b")
    assert os.environ["WANDB_DIR"] == str((tmp_path / "b").resolve())
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mine"))
    train.wandb_setup(tmp_path / "c")
    assert os.environ["WANDB_DIR"] == str(tmp_path / "mine")
