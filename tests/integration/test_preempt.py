"""Preemption as a Slurm job sees it, without Slurm (RLHF_PREEMPT_FLAG set as the batch script
sets it): USR1 stops a data stage with exit 75 and its ledger intact; a training stage saves a
checkpoint at the end of the step and stops; a rerun of either resumes where it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import ledger_ok_keys as _ledger_ok_keys
from helpers import reward_recipe, stage_path, standin_model, write_prompts, write_recipe

from pipeline.cli import main as rlhf
from pipeline.preempt import EXIT_CODE, FLAG_ENV

ROOT = Path(__file__).resolve().parents[2]


def test_usr1_stops_a_data_stage_which_then_resumes(tmp_path, standin):
    prompts = write_prompts(tmp_path / "prompts", 10)
    recipe = write_recipe(tmp_path, [standin_model(standin, "standin-strong", max_concurrency=1),
                                     standin_model(standin, "standin-weak", max_concurrency=1)], prompts)
    standin.configure(latency_s=0.2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RLHF_LOG": "WARNING", FLAG_ENV: str(tmp_path / "flag")}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "generate", str(recipe)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ledger = stage_path(tmp_path) / "shard-0-of-1" / "ledger.jsonl"
    deadline = time.monotonic() + 60
    while not (ledger.is_file() and len(ledger.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_CODE and "preempted:" in err, err
    assert ledger.read_text().endswith("\n")  # closed cleanly: no torn line
    paid = _ledger_ok_keys(stage_path(tmp_path))
    assert 0 < len(paid) < 20

    standin.reset()
    standin.configure(latency_s=0.0)
    assert rlhf(["generate", str(recipe)]) == 0
    sent = {e["request_key"] for e in standin.stats()["log"]}
    assert not sent & paid and len(_ledger_ok_keys(stage_path(tmp_path))) == 20


def test_a_training_stage_checkpoints_stops_and_resumes(tmp_path, tiny_pool, monkeypatch):
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"A careful answer to question {i}."}],
             "rejected": [{"role": "assistant", "content": "Whatever."}], "margin": 0.3, "source": "t"}
            for i in range(24)]
    path = reward_recipe(tmp_path, tiny_pool[0], "p", rows[:20], rows[20:], max_steps=6, global_batch_size=4)
    flag = tmp_path / "flag"
    flag.touch()  # as the batch script does on USR1, before the stage polls it
    monkeypatch.setenv(FLAG_ENV, str(flag))
    saved = signal.getsignal(signal.SIGUSR1)
    try:
        assert rlhf(["reward", str(path)]) == EXIT_CODE
    finally:
        signal.signal(signal.SIGUSR1, saved)
    stage = tmp_path / "runs" / "p" / "reward"
    assert [p.name for p in (stage / "checkpoints").glob("checkpoint-*")] == ["checkpoint-1"]
    assert not (stage / "_SUCCESS").exists() and not (stage / "model").exists()

    flag.unlink()  # the requeued job starts without it
    monkeypatch.delenv(FLAG_ENV)
    assert rlhf(["reward", str(path)]) == 0
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-1" and summary["global_step"] == 6
