"""The reward stage under `accelerate launch` with two CPU processes (gloo, --multi_gpu), the way
`make reward ACCELERATE=ddp NPROC=2` runs it: both processes train, gradient accumulation is
derived from the global batch, and the main process alone writes the outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import pairs, reward_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_reward_trains_on_two_processes_with_accelerate(tmp_path, tiny_pool):
    path = reward_recipe(tmp_path, tiny_pool[0], "ddp", pairs(32), pairs(8, 100))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "RLHF_LOG": "WARNING"}
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "recipes/accelerate/ddp.yaml"),
           "--num_processes", "2", "--multi_gpu", "-m", "pipeline", "reward", str(path)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "runs" / "ddp" / "reward"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_step"] == 3
    assert (out / "_SUCCESS").is_file() and (out / "model" / "config.json").is_file()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["global_batch_size"] == 8
    state = json.loads(max((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                       .joinpath("trainer_state.json").read_text())
    # 8 pairs per step = 2 processes x 4 per device x accumulation 1
    assert state["train_batch_size"] == 4 and state["global_step"] == 3
