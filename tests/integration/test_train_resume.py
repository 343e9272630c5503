"""A training stage killed with SIGKILL mid-run continues from its last checkpoint when the same
command runs again, and ends at the step count it was asked for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import reward_recipe

from pipeline.train import checkpoint_complete

ROOT = Path(__file__).resolve().parents[2]


def test_reward_killed_mid_run_resumes_from_its_last_checkpoint(tmp_path, tiny_pool):
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"A careful answer to question {i}."}],
             "rejected": [{"role": "assistant", "content": "Whatever."}], "margin": 0.3, "source": "t"}
            for i in range(40)]
    path = reward_recipe(tmp_path, tiny_pool[0], "kill", rows[:32], rows[32:], max_steps=40, global_batch_size=4,
                         save_steps=2, save_total_limit=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "RLHF_LOG": "WARNING"}
    cmd = [sys.executable, "-m", "pipeline", "reward", str(path)]
    checkpoints = tmp_path / "runs" / "kill" / "reward" / "checkpoints"

    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    # Kill once a checkpoint is completely written (its trainer state is the last file saved).
    while proc.poll() is None and time.monotonic() < deadline:
        if any(checkpoint_complete(c) and int(c.name.split("-")[1]) >= 4 for c in checkpoints.glob("checkpoint-*")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(int(c.name.split("-")[1]) for c in checkpoints.glob("checkpoint-*") if checkpoint_complete(c))
    assert killed_at < 40

    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "kill" / "reward" / "summary.json").read_text())
    resumed = int(summary["resumed_from"].split("-")[1])
    assert resumed >= killed_at and summary["global_step"] == 40
    state = json.loads((checkpoints / "checkpoint-40" / "trainer_state.json").read_text())
    logged_steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    # The history carries on from the checkpoint: every step logged once, none skipped.
    assert logged_steps == list(range(1, 41))
