"""The Slurm launcher on a real one-node Slurm (Debian's slurm-wlm + munge, started for this
session by pipeline.launch.slurm_local; installed with apt-get when missing, which needs root).

generate as a 4-task array + merge equals a local run; a cancelled array task is all that runs
again when the stage is resubmitted, for generate and for annotate (counted at the stand-in); a failed stage cancels the stage chained after it and
`rlhf status` says why; reward trains on 2 ranks under srun + accelerate launch; USR1 (the
time-limit warning) makes a shard save its work and requeue itself, and it resumes there.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml
from datasets import load_from_disk
from helpers import ledger_ok_keys as _ledger_ok_keys
from helpers import (pairs, reward_recipe, stage_path, standin_model, write_completion_sets, write_prompts,
                     write_recipe)

from pipeline.cli import main as rlhf
from pipeline.launch.slurm import job_records, job_states, submissions

pytestmark = pytest.mark.slurm

SLURM = ["launch.launcher=slurm", "launch.profile=local"]
SECRET = "sk-slurmtest-0123456789abcdef"


@pytest.fixture(scope="session")
def slurm_cluster():
    from pipeline.launch import slurm_local

    reason = slurm_local.unavailable()
    if reason:
        pytest.skip(f"no local Slurm cluster: {reason}")
    cluster = slurm_local.start()
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # every sbatch/squeue of the session finds it
    yield cluster
    cluster.stop()
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved
    shutil.rmtree(cluster.folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _job_environment(monkeypatch):
    # sbatch hands the submitting environment to the job: quiet logs, one thread per rank, and a
    # secret that must reach the job but never a rendered file.
    monkeypatch.setenv("RLHF_LOG", "WARNING")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def status(root: Path, run: str = "t") -> dict:
    from pipeline.status import collect

    return collect(root, run)


def status_text(root: Path, run: str = "t") -> str:
    from pipeline.status import render

    return render(status(root, run))


def logs(stage: Path) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                   for p in sorted((stage / "slurm" / "logs").glob("*.out")))


def wait_for(condition, timeout: float, what: str, stage: Path, root: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{status_text(root)}{logs(stage)}")


def jobs_over(stage: Path) -> bool:
    """Every job of the stage's latest submission has finished (by its own record or Slurm)."""
    sub = submissions(stage)[-1]
    ids = [f"{j['id']}_{i}" for j in sub["jobs"] if j["array"] is not None for i in j["array"]]
    ids += [j["id"] for j in sub["jobs"] if j["array"] is None]
    states = job_states(ids)
    return all(i in states and states[i]["state"] not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING")
               for i in ids)


def no_secret_in(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".sbatch", ".yaml", ".json"):
            assert SECRET not in path.read_text(errors="replace"), path


def cancel_shard_2_of_4(slurm_cluster, stage: Path, root: Path, array_id: str, merge_id: str) -> None:
    """Cancel task 2 of a 4-task array once its ledger has two lines; wait until the other shards
    finish and the merge is cancelled (its dependency can no longer be met)."""
    ledger = stage / "shard-2-of-4" / "ledger.jsonl"
    wait_for(lambda: ledger.is_file() and len(ledger.read_text().splitlines()) >= 2, 60, "shard 2 to start", stage, root)
    slurm_cluster.command("scancel", f"{array_id}_2")
    wait_for(lambda: all((stage / f"shard-{i}-of-4" / "_SUCCESS").is_file() for i in (0, 1, 3)), 60,
             "shards 0, 1, 3", stage, root)
    wait_for(lambda: job_states([merge_id]).get(merge_id, {}).get("state") == "CANCELLED", 60,
             "the merge to be cancelled", stage, root)
    assert not (stage / "shard-2-of-4" / "_SUCCESS").exists() and not (stage / "dataset").exists()


def test_generate_as_a_four_task_array_then_merge_equals_a_local_run(tmp_path, slurm_cluster, standin):
    prompts = write_prompts(tmp_path / "prompts", 16)
    pool = [standin_model(standin, "standin-strong"), standin_model(standin, "standin-weak")]
    recipe = write_recipe(tmp_path, pool, prompts)
    assert rlhf(["generate", str(recipe), *SLURM, "launch.num_shards=4"]) == 0
    stage = stage_path(tmp_path)
    sub = submissions(stage)[-1]
    shards_job, merge_job = sub["jobs"]
    assert shards_job["array"] == [0, 1, 2, 3] and merge_job["after"] == [shards_job["id"]]
    assert "#SBATCH --array=0-3" in (stage / "slurm" / "shards.sbatch").read_text()

    wait_for(lambda: (stage / "_SUCCESS").is_file() and jobs_over(stage), 120, "the merge", stage, tmp_path / "runs")
    records = job_records(stage)
    tasks = [records[f"{shards_job['id']}_{i}"] for i in range(4)]
    assert all(r["state"] == "done" and r["exit_code"] == 0 for r in tasks)
    assert records[merge_job["id"]]["state"] == "done"
    assert max(r["time"] for r in tasks) <= records[merge_job["id"]]["time"]  # afterok: merge came last
    states = job_states([f"{shards_job['id']}_{i}" for i in range(4)] + [merge_job["id"]])
    assert {s["state"] for s in states.values()} == {"COMPLETED"}  # Slurm agrees
    assert standin.stats()["requests_total"] == 32  # each completion asked for once, over 4 processes
    no_secret_in(stage / "slurm")

    report = status(tmp_path / "runs")
    (gen,) = report["stages"]
    assert gen["state"] == "done" and [s["state"] for s in gen["shards"]] == ["done"] * 4

    assert rlhf(["generate", str(recipe), f"run.root={tmp_path / 'runs-local'}"]) == 0
    local = load_from_disk(str(tmp_path / "runs-local" / "t" / "generate" / "dataset")).to_list()
    assert load_from_disk(str(stage / "dataset")).to_list() == local


def test_a_cancelled_shard_is_all_that_runs_again(tmp_path, slurm_cluster, standin):
    prompts = write_prompts(tmp_path / "prompts", 16)
    pool = [standin_model(standin, "standin-strong", max_concurrency=1),
            standin_model(standin, "standin-weak", max_concurrency=1)]
    recipe = write_recipe(tmp_path, pool, prompts)
    standin.configure(latency_s=0.4)  # 8 requests one at a time: a shard takes seconds
    assert rlhf(["generate", str(recipe), *SLURM, "launch.num_shards=4"]) == 0
    stage, root = stage_path(tmp_path), tmp_path / "runs"
    first = submissions(stage)[-1]
    array_id, merge_id = first["jobs"][0]["id"], first["jobs"][1]["id"]
    cancel_shard_2_of_4(slurm_cluster, stage, root, array_id, merge_id)
    report = status(root)["stages"][0]
    assert report["state"] == "failed"
    assert [s["state"] for s in report["shards"]] == ["done", "done", "failed", "done"]
    assert report["shards"][2]["job"]["slurm_state"] == "CANCELLED"

    time.sleep(1.0)  # let a request that was in flight when the task died reach the server's count
    paid = _ledger_ok_keys(stage)
    assert 0 < len(paid) < 32
    standin.reset()
    standin.configure(latency_s=0.0)
    assert rlhf(["generate", str(recipe), *SLURM, "launch.num_shards=4"]) == 0
    again = submissions(stage)[-1]
    assert again["jobs"][0]["array"] == [2] and "#SBATCH --array=2\n" in (stage / "slurm" / "shards.sbatch").read_text()
    wait_for(lambda: (stage / "_SUCCESS").is_file(), 90, "the resubmitted stage", stage, root)

    sent = [e["request_key"] for e in standin.stats()["log"]]
    assert sent and not set(sent) & paid, "a request already in a ledger was sent again"
    assert len(sent) == len(set(sent)) == 32 - len(paid)
    data = load_from_disk(str(stage / "dataset"))
    assert len(data) == 16 and len(set(data["prompt_id"])) == 16
    assert all(len(r["completions"]) == 2 for r in data)
    ok = [json.loads(line)["key"] for p in stage.glob("shard-*/ledger.jsonl") for line in p.read_text().splitlines()
          if line.strip() and json.loads(line)["status"] == "ok"]
    assert len(ok) == len(set(ok)) == 32  # each completion recorded once over all shards


def test_a_failed_stage_cancels_the_next_and_status_says_why(tmp_path, slurm_cluster, standin):
    prompts = write_prompts(tmp_path / "prompts", 6)
    recipe = write_recipe(tmp_path, [standin_model(standin, "standin-strong"), standin_model(standin, "standin-weak")],
                          prompts)
    annotate = tmp_path / "annotate.yaml"
    annotate.write_text(yaml.safe_dump({
        "stage": "annotate", "run": {"name": "t", "root": str(tmp_path / "runs")},
        "inputs": {"completions": {"stage": "generate"}},
        "annotation": {"judge": {"name": "standin-judge", "backend": "openai", "base_url": standin.base_url}}}))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"stages": [str(recipe), str(annotate)]}))
    standin.configure(fail_5xx=1.0)  # every generation request fails: generate fails loudly

    assert rlhf(["all", str(pipeline), "--launcher", "slurm", "--profile", "local"]) == 0
    root, gen, ann = tmp_path / "runs", stage_path(tmp_path), tmp_path / "runs" / "t" / "annotate"
    ann_shards, ann_merge = submissions(ann)[-1]["jobs"]  # annotate is sharded too: an array, then its merge
    assert ann_shards["after"] == [submissions(gen)[-1]["final"]] and ann_merge["after"] == [ann_shards["id"]]
    ann_ids = [f"{ann_shards['id']}_0", ann_merge["id"]]
    wait_for(lambda: all(job_states(ann_ids).get(i, {}).get("state") == "CANCELLED" for i in ann_ids), 90,
             "the annotate jobs to be cancelled", ann, root)

    assert {s["reason"] for s in job_states(ann_ids).values()} == {"DependencyNeverSatisfied"}
    assert not job_records(ann) and not (ann / "config.yaml").exists()  # it never started
    report = {s["stage"]: s for s in status(root)["stages"]}
    assert list(report) == ["generate", "annotate"]
    assert report["generate"]["state"] == "failed"
    assert report["generate"]["ledger"]["failed"] == 12
    assert report["generate"]["ledger"]["reasons"][0][0] == 12 and "500" in report["generate"]["ledger"]["reasons"][0][1]
    assert report["annotate"]["state"] == "missing"
    assert "never ran" in report["annotate"]["detail"] and "generate merge" in report["annotate"]["detail"]

    text = status_text(root)
    assert "DependencyNeverSatisfied" in text and "12x InternalServerError (HTTP 500)" in text, text
    assert "failed: generate shard 0 of 1: 12 of 12 requests failed" in text, text  # the job's own error line
    assert rlhf(["status", "t", "--root", str(root)]) == 0


def test_reward_on_one_node_with_two_ranks_under_srun_and_accelerate(tmp_path, slurm_cluster, tiny_pool):
    path = reward_recipe(tmp_path, tiny_pool[0], "t", pairs(32), pairs(8, 100),
                         launch={"launcher": "slurm", "profile": "local", "processes_per_node": 2,
                                 "accelerate": "ddp"})
    assert rlhf(["reward", str(path)]) == 0
    stage, root = tmp_path / "runs" / "t" / "reward", tmp_path / "runs"
    script = (stage / "slurm" / "train.sbatch").read_text()
    assert "srun " in script and "accelerate.commands.launch" in script and "--multi_gpu" in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    (job,) = submissions(stage)[-1]["jobs"]
    wait_for(lambda: job_records(stage).get(job["id"], {}).get("state") in ("done", "failed"), 240,
             "the training job", stage, root)
    assert job_records(stage)[job["id"]]["state"] == "done", logs(stage)
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_step"] == 3  # two ranks really trained
    state = json.loads((stage / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 4  # 8 pairs per step = 2 ranks x 4, no accumulation
    assert (stage / "_SUCCESS").is_file()


def test_usr1_saves_the_shard_and_the_job_requeues_and_resumes(tmp_path, slurm_cluster, standin):
    prompts = write_prompts(tmp_path / "prompts", 10)
    pool = [standin_model(standin, "standin-strong", max_concurrency=1),
            standin_model(standin, "standin-weak", max_concurrency=1)]
    recipe = write_recipe(tmp_path, pool, prompts)
    standin.configure(latency_s=0.3)
    assert rlhf(["generate", str(recipe), *SLURM]) == 0
    stage, root = stage_path(tmp_path), tmp_path / "runs"
    task = f"{submissions(stage)[-1]['jobs'][0]['id']}_0"
    ledger = stage / "shard-0-of-1" / "ledger.jsonl"
    wait_for(lambda: ledger.is_file() and len(ledger.read_text().splitlines()) >= 3, 60, "the shard to start",
             stage, root)
    # What Slurm sends before the time limit (--signal=B:USR1@...), sent now to the batch shell.
    slurm_cluster.command("scancel", "--batch", "--signal=USR1", task)
    wait_for(lambda: job_records(stage).get(task, {}).get("state") == "requeued", 30, "the job to requeue",
             stage, root)
    paid = _ledger_ok_keys(stage)
    assert 0 < len(paid) < 20 and not (stage / "shard-0-of-1" / "_SUCCESS").exists()
    standin.reset()
    # Slurm holds a requeued job back for cred_expire + 1 seconds (11 on the local cluster).
    wait_for(lambda: (stage / "_SUCCESS").is_file(), 90, "the requeued job", stage, root)

    record = job_records(stage)[task]
    assert record["restarts"] == 1
    log = next((stage / "slurm" / "logs").glob("shard-0-*.out")).read_text()
    assert "USR1" in log and "requeueing" in log and "preempted:" in log
    sent = [e["request_key"] for e in standin.stats()["log"]]
    assert not set(sent) & paid, "the resumed job asked again for a completion already recorded"
    assert len(load_from_disk(str(stage / "dataset"))) == 10


def test_annotate_as_an_array_a_cancelled_shard_is_all_that_runs_again(tmp_path, slurm_cluster, standin):
    sets = write_completion_sets(tmp_path / "sets.jsonl", 8)  # 8 rows x (4 aspects + 2 critiques) = 48 requests
    judge = {"name": "standin-judge", "backend": "openai", "base_url": standin.base_url, "max_concurrency": 1,
             "max_retries": 0, "timeout_s": 10}
    recipe = tmp_path / "annotate.yaml"
    recipe.write_text(yaml.safe_dump({"stage": "annotate", "run": {"name": "t", "root": str(tmp_path / "runs")},
                                      "inputs": {"completions": str(sets)}, "annotation": {"judge": judge}}))
    standin.configure(latency_s=0.4)  # 12 requests one at a time: a shard takes seconds
    assert rlhf(["annotate", str(recipe), *SLURM, "launch.num_shards=4"]) == 0
    root, stage = tmp_path / "runs", tmp_path / "runs" / "t" / "annotate"
    first = submissions(stage)[-1]
    (array_id, array), (merge_id, _) = [(j["id"], j["array"]) for j in first["jobs"]]
    assert array == [0, 1, 2, 3] and "#SBATCH --array=0-3" in (stage / "slurm" / "shards.sbatch").read_text()
    cancel_shard_2_of_4(slurm_cluster, stage, root, array_id, merge_id)
    assert [s["state"] for s in status(root)["stages"][0]["shards"]] == ["done", "done", "failed", "done"]

    time.sleep(1.0)  # let a request that was in flight when the task died reach the server's count
    paid = _ledger_ok_keys(stage)
    received_first = standin.stats()["requests_total"]
    assert 0 < len(paid) < 48 and received_first <= len(paid) + 1  # at most the one in flight was lost
    standin.reset()
    standin.configure(latency_s=0.0)
    assert rlhf(["annotate", str(recipe), *SLURM, "launch.num_shards=4"]) == 0
    again = submissions(stage)[-1]
    assert again["jobs"][0]["array"] == [2] and "#SBATCH --array=2\n" in (stage / "slurm" / "shards.sbatch").read_text()
    wait_for(lambda: (stage / "_SUCCESS").is_file(), 90, "the resubmitted stage", stage, root)

    sent = [e["request_key"] for e in standin.stats()["log"]]
    assert sent and not set(sent) & paid, "a request already in a ledger was sent again"
    assert len(sent) == len(set(sent)) == 48 - len(paid)  # only shard 2's missing answers
    assert received_first + len(sent) <= 48 + 1  # counted at the stand-in: nothing paid twice but the one in flight
    ok = [json.loads(line)["key"] for p in stage.glob("shard-*/ledger.jsonl") for line in p.read_text().splitlines()
          if line.strip() and json.loads(line)["status"] == "ok"]
    assert len(ok) == len(set(ok)) == 48
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["num_shards"] == 4 and summary["completions_annotated"] == 16 and summary["items_failed"] == 0

    standin.reset()
    assert rlhf(["annotate", str(recipe), f"run.root={tmp_path / 'runs-local'}"]) == 0
    local = load_from_disk(str(tmp_path / "runs-local" / "t" / "annotate" / "dataset")).to_list()
    assert load_from_disk(str(stage / "dataset")).to_list() == local
