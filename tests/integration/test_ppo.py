"""Stage `ppo` on tiny models: our PPO loop end to end (policy, before/after evaluation, curves,
the paper's batch: ppo_epochs x samples / mini-batch optimizer steps per iteration); a killed
run (SIGKILL) and a preempted one continue from their last checkpoint and log every iteration
once, with the same per-iteration rewards as an uninterrupted run; a reward model without a score
head or with another vocabulary is refused before anything is trained; RLOO (TRL's trainer) runs
as the same stage. The method check at the end: on a reward model whose score one response token
decides, the held-out reward rises under PPO and under RLOO, and a larger KL coefficient keeps
the PPO policy closer to the start."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict

from pipeline.config import ConfigError
from pipeline.preempt import EXIT_CODE, FLAG_ENV
from pipeline.runs import is_done
from pipeline.stages import ppo
from pipeline.stages.ppo import Recipe as PpoRecipe

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tiny_pool, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tmp = tmp_path_factory.mktemp("ppo")
    reward = tmp / "reward-model"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_pool[0], num_labels=1)
    model.save_pretrained(reward)
    AutoTokenizer.from_pretrained(tiny_pool[0]).save_pretrained(reward)
    rows = [{"prompt": [{"role": "user", "content": f"Say something kind about item {i}."}]} for i in range(24)]
    DatasetDict({"train_gen": Dataset.from_list(rows[:16]), "test_gen": Dataset.from_list(rows[16:])}
                ).save_to_disk(str(tmp / "prompts"))
    return tmp, tiny_pool[0], reward


def recipe(tmp, policy, reward, **ppo_fields) -> PpoRecipe:
    return PpoRecipe.model_validate({
        "stage": "ppo", "run": {"name": "t", "root": str(tmp / "runs")}, "model": str(policy),
        "inputs": {"dataset": str(tmp / "prompts"), "train_split": "train_gen", "eval_split": "test_gen"},
        "train": {"learning_rate": 1e-3, "per_device_batch_size": 4, "max_length": 64, "report_to": [],
                  "logging_steps": 1, "seed": 0},
        "ppo": {"reward_model": str(reward), "samples_per_iteration": 8, "mini_batch_size": 4, "iterations": 2,
                "ppo_epochs": 1, "max_new_tokens": 8, "eval_prompts": 8, **ppo_fields},
    })


def test_ppo_runs_and_writes_policy_eval_and_curves(setup):
    tmp, policy, reward = setup
    summary = ppo.run(recipe(tmp, policy, reward))
    out = tmp / "runs" / "t" / "ppo"
    assert is_done(out)
    assert (out / "model" / "config.json").is_file() and (out / "report" / "ppo_curves.png").stat().st_size > 1000
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["before"]["n"] == evaluation["after"]["n"] == 8
    assert summary["episodes"] == 16
    # The paper's batch: each iteration samples 8, then takes one optimizer step per mini-batch of 4.
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2] and summary["log"] == lines
    assert [line["optimizer_steps"] for line in lines] == [2, 2] and summary["optimizer_steps"] == 4
    # The exact KL to the starting policy is positive once the policy moved (and never negative);
    # entropy is per token, so it is bounded by log(vocabulary size).
    assert summary["kl_per_token_after"] > 0
    assert evaluation["before"]["kl_per_token"] == 0 and evaluation["before"]["kl_per_response"] == 0
    vocab = json.loads((policy / "config.json").read_text())["vocab_size"]
    for key in ("entropy_per_token_before", "entropy_per_token_after"):
        assert 0 < summary[key] <= math.log(vocab), summary


def test_a_causal_lm_is_not_a_reward_model(setup):
    tmp, policy, _ = setup
    with pytest.raises(ConfigError, match="is not a reward model"):
        ppo.run(recipe(tmp, policy, policy))


def test_batch_arithmetic_is_checked_before_training(setup):
    tmp, policy, reward = setup
    with pytest.raises(ConfigError, match=r"ppo.mini_batch_size=6 is not divisible by processes \(1\) x "
                                          r"train.per_device_batch_size \(4\)"):
        ppo.run(recipe(tmp, policy, reward, mini_batch_size=6, samples_per_iteration=12))
    with pytest.raises(ConfigError, match="samples_per_iteration=12 is not divisible by ppo.mini_batch_size=8"):
        ppo.run(recipe(tmp, policy, reward, mini_batch_size=8, samples_per_iteration=12))


def test_optimizer_steps_per_iteration_follow_the_recipe(setup):
    tmp, policy, reward = setup
    r = recipe(tmp, policy, reward, samples_per_iteration=16, mini_batch_size=4, ppo_epochs=3, iterations=1)
    r.run.name = "steps"
    summary = ppo.run(r)
    # 16 samples in mini-batches of 4 (one micro-batch each) for 3 epochs: 12 optimizer steps
    assert summary["log"][0]["optimizer_steps"] == 12 == summary["optimizer_steps"]
    r = recipe(tmp, policy, reward, samples_per_iteration=16, mini_batch_size=8, ppo_epochs=1, iterations=1)
    r.run.name = "steps-accumulated"
    # mini-batch 8 over micro-batches of 4: two micro-batches accumulate into each of 2 steps
    assert ppo.run(r)["log"][0]["optimizer_steps"] == 2


def write_recipe(tmp, name: str, policy, reward, **ppo_fields) -> Path:
    r = recipe(tmp, policy, reward, **ppo_fields).model_dump(mode="json", exclude_defaults=True)
    r["run"]["name"] = name
    r["train"]["save_steps"] = 2
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def stage_command(path: Path) -> tuple[list[str], dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "RLHF_LOG": "WARNING"}
    env.pop(FLAG_ENV, None)
    return [sys.executable, "-m", "pipeline", "ppo", str(path)], env


def test_a_killed_run_continues_from_its_last_checkpoint_as_if_never_stopped(setup, record_property):
    tmp, policy, reward = setup
    fields = dict(iterations=12, samples_per_iteration=16, mini_batch_size=8, max_new_tokens=12)
    whole, env = stage_command(write_recipe(tmp, "whole", policy, reward, **fields))
    killed, _ = stage_command(write_recipe(tmp, "killed", policy, reward, **fields))
    assert subprocess.run(whole, env=env, cwd=ROOT, capture_output=True, timeout=900).returncode == 0

    checkpoints = tmp / "runs" / "killed" / "ppo" / "checkpoints"
    proc = subprocess.Popen(killed, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:  # kill once the first checkpoint is whole
        if (checkpoints / "iteration-000002" / "progress.json").is_file():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp / "runs" / "killed" / "ppo" / "_SUCCESS").exists()

    done = subprocess.run(killed, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((tmp / "runs" / "killed" / "ppo" / "summary.json").read_text())
    reference = json.loads((tmp / "runs" / "whole" / "ppo" / "summary.json").read_text())
    assert resumed["resumed_from"].startswith("iteration-") and reference["resumed_from"] is None
    # every iteration logged once, up to the same final one
    assert [line["iteration"] for line in resumed["log"]] == list(range(1, 13))
    log = [json.loads(line) for line in (tmp / "runs" / "killed" / "ppo" / "log.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in log] == list(range(1, 13))
    gap = max(abs(a - b) for a, b in zip(resumed["train_scores"], reference["train_scores"]))
    record_property("table", f"\nPPO killed (SIGKILL) after its first checkpoint, rerun: resumed from "
                    f"{resumed['resumed_from']}, iterations logged {len(log)} of 12, optimizer steps "
                    f"{resumed['optimizer_steps']} (uninterrupted {reference['optimizer_steps']}), largest "
                    f"per-iteration reward difference {gap:.2e}, held-out reward {resumed['reward_after']:.4f} "
                    f"(uninterrupted {reference['reward_after']:.4f})")
    # fixed seed: the resumed run sampled and scored what the uninterrupted one did
    assert resumed["train_scores"] == pytest.approx(reference["train_scores"], abs=1e-4)
    assert resumed["reward_after"] == pytest.approx(reference["reward_after"], abs=1e-4)
    assert sorted(p.name for p in checkpoints.glob("iteration-*")) == ["iteration-000010", "iteration-000012"]
    assert not list(checkpoints.glob(".iteration-*"))


def test_a_preempted_run_checkpoints_stops_and_resumes(setup, tmp_path):
    tmp, policy, reward = setup
    command, env = stage_command(write_recipe(tmp, "preempted", policy, reward, iterations=4))
    flag = tmp_path / "flag"
    flag.touch()  # as the Slurm batch script does on USR1
    stopped = subprocess.run(command, env={**env, FLAG_ENV: str(flag)}, cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert stopped.returncode == EXIT_CODE and "preempted:" in stopped.stderr, stopped.stderr[-2000:]
    stage = tmp / "runs" / "preempted" / "ppo"
    assert [p.name for p in (stage / "checkpoints").glob("iteration-*")] == ["iteration-000001"]
    assert not (stage / "_SUCCESS").exists() and not (stage / "model").exists()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["resumed_from"] == "iteration-000001"
    assert [line["iteration"] for line in summary["log"]] == [1, 2, 3, 4]


def test_ppo_on_two_processes_keeps_the_global_mini_batch(setup):
    tmp, policy, reward = setup
    command, env = stage_command(write_recipe(tmp, "ddp", policy, reward, samples_per_iteration=16, mini_batch_size=8))
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(ROOT / "recipes/accelerate/ddp.yaml"),
               "--num_processes", "2", "--multi_gpu", *command[1:]]
    done = subprocess.run(command, env={**env, "OMP_NUM_THREADS": "1"}, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp / "runs" / "ddp" / "ppo"
    summary = json.loads((out / "summary.json").read_text())
    # each process samples 8 of the 16 and steps on 4 of each global mini-batch of 8: 2 steps per iteration
    assert summary["processes"] == 2 and [line["optimizer_steps"] for line in summary["log"]] == [2, 2]
    assert [line["episodes"] for line in summary["log"]] == [16, 32]
    assert (out / "_SUCCESS").is_file() and (out / "model" / "config.json").is_file()


def test_rloo_runs_as_the_same_stage(setup):
    tmp, policy, reward = setup
    r = recipe(tmp, policy, reward, algorithm="rloo", rloo_k=2)
    r.run.name = "rloo"
    summary = ppo.run(r)
    out = tmp / "runs" / "rloo" / "ppo"
    assert is_done(out) and (out / "model" / "config.json").is_file()
    assert summary["algorithm"] == "rloo" and summary["optimizer_steps"] == 4  # 2 iterations x 8 / 4
    assert summary["kl_per_token_after"] > 0 and len(summary["train_scores"]) >= 2
    with pytest.raises(ConfigError, match="ppo.rloo_k=3 must divide"):
        ppo.run(recipe(tmp, policy, reward, algorithm="rloo", rloo_k=3))


# --- method check --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_reward(tiny_pool, tmp_path_factory):
    """A reward model whose score is the base model's logit for " the" after the response: which
    one-token response a policy picks decides the reward, so there is something to learn. Its
    chat template ends an answer with the answer's text (no end-of-turn after it), so the score is
    read at the response's own token, by our PPO loop and by TRL's RLOO alike."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("token-reward") / "model"
    tokenizer = AutoTokenizer.from_pretrained(tiny_pool[0])
    head = AutoModelForCausalLM.from_pretrained(tiny_pool[0]).lm_head.weight
    model = AutoModelForSequenceClassification.from_pretrained(tiny_pool[0], num_labels=1)
    target = tokenizer.encode(" the", add_special_tokens=False)[0]
    with torch.no_grad():
        model.score.weight.copy_(head[target][None] * 20.0)
    model.save_pretrained(folder)
    tokenizer.chat_template = ("{%- for message in messages -%}{%- if message['role'] == 'assistant' -%}"
                               "{{ '<|im_start|>assistant\n' + message['content'] }}{%- else -%}"
                               "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
                               "{%- endif -%}{%- endfor -%}")
    tokenizer.save_pretrained(folder)
    return folder


def test_ppo_and_rloo_raise_held_out_reward_and_the_kl_coefficient_bounds_the_drift(setup, token_reward,
                                                                                    record_property):
    tmp, policy, _ = setup
    results = {}
    for algorithm, kl_coef in (("ppo", 0.05), ("ppo", 1.0), ("rloo", 0.05)):
        r = recipe(tmp, policy, token_reward, iterations=24, samples_per_iteration=16, mini_batch_size=8,
                   ppo_epochs=2, kl_coef=kl_coef, max_new_tokens=1, eval_prompts=8, algorithm=algorithm, rloo_k=4)
        r.train.learning_rate = 3e-3
        r.train.per_device_batch_size = 8
        r.train.lr_scheduler = "constant"
        r.run.name = f"{algorithm}-kl-{kl_coef}"
        results[algorithm, kl_coef] = ppo.run(r)
    record_property("table", "\nPPO vs RLOO on a one-token reward (tiny model, 24 iterations x 16 samples, held-out "
                    "reward before -> after, exact KL nats/response):\n" + "\n".join(
                        f"  {a} kl_coef {k}: {s['reward_before']:.3f} -> {s['reward_after']:.3f}, KL "
                        f"{s['kl_per_response_after']:.3f}, {s['optimizer_steps']} optimizer steps, {s['seconds']} s"
                        for (a, k), s in results.items()))
    for (algorithm, kl_coef), summary in results.items():
        # held-out prompts, fixed sampling seed: the reward model's mean score goes up
        assert summary["reward_after"] > summary["reward_before"] + 1.0, (algorithm, kl_coef, summary)
        assert 0 < summary["kl_per_response_after"] < 10, (algorithm, kl_coef, summary)
    # a stronger KL penalty keeps the policy closer to where it started
    assert results["ppo", 1.0]["kl_per_response_after"] < results["ppo", 0.05]["kl_per_response_after"]
