"""The Slurm launcher without a cluster: bad input is refused (exit 2, one line naming the key or
file) before anything is written or submitted; rendered scripts say what a multi-node job needs
and never hold a secret; status reads a run's files; pipeline files validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as rlhf
from pipeline.config import ConfigError
from pipeline.launch.slurm import load_profile, prepare_stage, render_stage
from pipeline.stages import load_recipe

ROOT = Path(__file__).resolve().parents[2]
SECRET = "sk-unittest-0123456789abcdef"


def generate_recipe(tmp_path: Path, **launch) -> Path:
    tree = {"stage": "generate", "run": {"name": "t", "root": str(tmp_path / "runs")},
            "inputs": {"prompts": {"stage": "prompts"}},
            "generation": {"pool": [{"name": "a", "backend": "openai", "base_url": "http://127.0.0.1:9/v1"}],
                           "models_per_prompt": 1},
            "launch": {"launcher": "slurm", "profile": "local", **launch}}
    path = tmp_path / "generate.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch/squeue/scancel on PATH that only log their calls (and sbatch refuses)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    for name in ("sbatch", "squeue", "scancel"):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\necho {name} \"$@\" >> {calls}\nexit 1\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    return calls


def one_error(capsys, code: int) -> str:
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_unknown_profile(tmp_path, capsys, fake_slurm):
    path = generate_recipe(tmp_path, profile="nope")
    line = one_error(capsys, rlhf(["generate", str(path)]))
    assert "launch.profile: no Slurm profile 'nope'" in line and "local" in line and str(path) in line
    assert not (tmp_path / "runs").exists() and not fake_slurm.exists()


def test_profile_without_a_partition(tmp_path, capsys, fake_slurm):
    profile = tmp_path / "cluster.yaml"
    profile.write_text("time: '01:00:00'\ngpus_per_node: 8\n")
    line = one_error(capsys, rlhf(["generate", str(generate_recipe(tmp_path, profile=str(profile)))]))
    assert f"{profile}: partition: required key is missing" in line
    assert not (tmp_path / "runs").exists() and not fake_slurm.exists()


@pytest.mark.parametrize("override, expected", [
    ("launch.nodes=2", "launch.nodes=2: stage 'generate' runs on one node"),
    ("launch.processes_per_node=4", "launch.processes_per_node=4: stage 'generate'"),
    ("launch.accelerate=ddp", "launch.accelerate: only training stages"),
    ("launch.time=soon", "launch.time: a Slurm time limit"),
    ("launch.time=2:00:00", "launch.time: quote the time limit"),
])
def test_launch_settings_a_data_stage_cannot_use(tmp_path, capsys, fake_slurm, override, expected):
    line = one_error(capsys, rlhf(["generate", str(generate_recipe(tmp_path)), override]))
    assert expected in line
    assert not (tmp_path / "runs").exists() and not fake_slurm.exists()


def test_no_sbatch_on_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    line = one_error(capsys, rlhf(["generate", str(generate_recipe(tmp_path))]))
    assert "sbatch" in line and "not found on PATH" in line
    assert not (tmp_path / "runs").exists()


def test_a_refused_sbatch_is_a_clear_error(tmp_path, capsys, fake_slurm):
    line = one_error(capsys, rlhf(["generate", str(generate_recipe(tmp_path))]))
    assert "sbatch refused" in line and "shards.sbatch" in line
    assert "sbatch --parsable" in fake_slurm.read_text()
    assert not (tmp_path / "runs" / "t" / "generate" / "slurm" / "jobs.json").exists()


def test_profile_env_may_not_hold_a_secret(tmp_path):
    profile = tmp_path / "cluster.yaml"
    profile.write_text(yaml.safe_dump({"partition": "gpu", "env": {"OPENAI_API_KEY": SECRET}}))
    with pytest.raises(ConfigError, match=r"cluster.yaml: env: OPENAI_API_KEY: looks like a secret"):
        load_profile(str(profile), "r.yaml")


def test_a_secret_in_a_setup_line_is_refused(tmp_path):
    profile_path = tmp_path / "cluster.yaml"
    profile_path.write_text(yaml.safe_dump({"partition": "gpu", "setup": [f"export TOKEN_X={SECRET}"]}))
    recipe = load_recipe(generate_recipe(tmp_path, profile=str(profile_path)), check_inputs=False)
    _, profile = load_profile(str(profile_path), "r.yaml")
    with pytest.raises(ConfigError, match="secret-looking value"):
        render_stage(recipe, "r.yaml", "sharded", "cluster", profile, shards=[0], num_shards=1, merge=True,
                     job_args=[])


def test_multi_node_training_script(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    recipe = load_recipe(ROOT / "recipes/demo-tiny/reward.yaml", ["launch.launcher=slurm", "launch.profile=example-gpu",
                                                            "launch.accelerate=zero3", "launch.time=0-02:00:00"],
                         check_inputs=False)
    _, profile = load_profile("example-gpu", "r.yaml")
    (job,) = render_stage(recipe, "r.yaml", "training", "example-gpu", profile, shards=[], num_shards=1,
                          merge=False, job_args=[])
    text = job["script"]
    for expected in ("#SBATCH --partition=gpu", "#SBATCH --account=my-project", "#SBATCH --qos=normal",
                     "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64",
                     "#SBATCH --mem=900G", "#SBATCH --time=0-02:00:00", "#SBATCH --requeue",
                     "#SBATCH --signal=B:USR1@600", "#SBATCH --exclusive", "module load cuda/12.4",
                     "export HF_HUB_OFFLINE=1", "export RLHF_PYTHON=python",
                     'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1',
                     "MAIN_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))", "srun --ntasks-per-node=1",
                     "recipes/accelerate/zero3.yaml", "--num_processes $(( SLURM_NNODES * 8 ))",
                     '--machine_rank "$SLURM_NODEID"', "--deepspeed_multinode_launcher standard",
                     "-m pipeline reward", "launch.launcher=local"):
        assert expected in text, expected
    assert SECRET not in text and "--multi_gpu" not in text


def test_one_process_training_needs_no_accelerate(tmp_path):
    recipe = load_recipe(ROOT / "recipes/demo-tiny/reward.yaml", ["launch.launcher=slurm", "launch.profile=local"],
                         check_inputs=False)
    _, profile = load_profile("local", "r.yaml")
    (job,) = render_stage(recipe, "r.yaml", "training", "local", profile, shards=[], num_shards=1, merge=False,
                          job_args=[])
    assert 'exec "$RLHF_PYTHON" -m pipeline reward' in job["script"]
    assert "accelerate.commands.launch" not in job["script"]


def test_resubmission_renders_only_the_missing_shards(tmp_path, fake_slurm):
    path = generate_recipe(tmp_path, num_shards=5)
    recipe = load_recipe(path, check_inputs=False)
    for i in (0, 1, 3):
        shard = tmp_path / "runs" / "t" / "generate" / f"shard-{i}-of-5"
        shard.mkdir(parents=True)
        (shard / "_SUCCESS").write_text("{}")
    plan = prepare_stage(recipe, str(path))
    shards, merge = plan["jobs"]
    assert shards["array"] == [2, 4] and "#SBATCH --array=2,4\n" in shards["script"]
    assert '--shard "$SLURM_ARRAY_TASK_ID" --num-shards 5' in shards["script"]
    assert "--merge --num-shards 5" in merge["script"]


def test_status_from_the_files_of_a_local_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm here
    stage = tmp_path / "runs" / "r" / "generate"
    (stage / "shard-0-of-2").mkdir(parents=True)
    (stage / "shard-0-of-2" / "_SUCCESS").write_text("{}")
    (stage / "shard-0-of-2" / "ledger.jsonl").write_text(
        json.dumps({"key": "a", "status": "ok", "result": {"text": "x"}}) + "\n")
    (stage / "shard-1-of-2").mkdir()
    (stage / "shard-1-of-2" / "ledger.jsonl").write_text("".join(
        json.dumps({"key": k, "status": "failed", "reason": reason}) + "\n"
        for k, reason in (("b", "HTTP 500"), ("c", "HTTP 500"), ("d", "timeout"), ("e", "HTTP 500"))))
    # a failure later cleared by a success in another shard's ledger does not count
    (stage / "shard-0-of-2" / "ledger.jsonl").write_text(
        (stage / "shard-0-of-2" / "ledger.jsonl").read_text()
        + json.dumps({"key": "e", "status": "ok", "result": {"text": "y"}}) + "\n")
    annotate = tmp_path / "runs" / "r" / "annotate"
    (annotate / "slurm").mkdir(parents=True)
    (annotate / "slurm" / "jobs.json").write_text(json.dumps({"submissions": [{
        "submitted_at": "2030-01-01T00:00:00+0000", "jobs": [{"name": "job", "id": "42", "array": None,
                                                              "after": ["41"]}]}]}))
    assert rlhf(["status", "r", "--root", str(tmp_path / "runs"), "--json"]) == 0
    report = {s["stage"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    gen = report["generate"]
    assert gen["state"] == "failed" and [s["state"] for s in gen["shards"]] == ["done", "failed"]
    assert gen["ledger"] == {"ok": 2, "failed": 3, "reasons": [[2, "HTTP 500"], [1, "timeout"]]}
    assert report["annotate"]["state"] == "missing"
    assert report["annotate"]["detail"] == "job 42 never started (it waited on job 41)"
    assert rlhf(["status", "r", "--root", str(tmp_path / "runs")]) == 0
    text = capsys.readouterr().out
    assert "shard-1-of-2   failed" in text and "2x HTTP 500; 1x timeout" in text and "[no Slurm here]" in text
    line = one_error(capsys, rlhf(["status", "nope", "--root", str(tmp_path / "runs")]))
    assert "run 'nope'" in line


def test_shipped_pipelines_and_profiles_validate(capsys):
    pipelines = sorted((ROOT / "recipes" / "pipelines").glob("*.yaml"))
    assert pipelines
    assert rlhf(["validate", "--no-inputs", *map(str, pipelines)]) == 0
    for profile in sorted((ROOT / "recipes" / "slurm").glob("*.yaml")):
        load_profile(str(profile), "test")


def test_a_pipeline_with_a_bad_stage_names_it(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stage": "generate", "run": {"name": "t"}}))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"stages": [str(ROOT / "recipes/demo-tiny/prompts.yaml"), str(bad)]}))
    capsys.readouterr()
    assert rlhf(["validate", "--no-inputs", str(pipeline)]) == 2
    assert f"{bad}: " in capsys.readouterr().err


def test_vllm_server_jobs_render_and_publish_their_urls(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLLM_API_KEY", SECRET)
    recipe = yaml.safe_load((ROOT / "recipes/slurm/serve/ultrafeedback-pool.yaml").read_text())
    recipe["url_dir"] = str(tmp_path / "servers")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert rlhf(["serve", str(path), "--dry-run"]) == 0
    scripts = {p.stem: p.read_text() for p in (tmp_path / "servers").glob("*.sbatch")}
    # one script per server: a model's name, or <name>-<i> for each of its replicas
    assert sorted(scripts) == sorted(m["name"] if m.get("replicas", 1) == 1 else f"{m['name']}-{i}"
                                     for m in recipe["models"] for i in range(m.get("replicas", 1)))
    assert "judge-70b-1" in scripts and f"URL_FILE={tmp_path / 'servers' / 'judge-70b-1.url'}" in scripts["judge-70b-1"]
    assert "--served-model-name judge-70b " in scripts["judge-70b-1"]  # every replica serves the same model id
    text = scripts["llama-2-13b-chat"]
    for expected in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=1-00:00:00",
                     "#SBATCH --nodes=1", "module load cuda/12.4",
                     "vllm serve meta-llama/Llama-2-13b-chat-hf --served-model-name llama-2-13b-chat",
                     '--host 0.0.0.0 --port "$PORT"', "--tensor-parallel-size 2 --max-model-len 4096",
                     "PORT=$(( 30000 + SLURM_JOB_ID % 20000 ))", 'SERVER="http://$(hostname):$PORT"',
                     'URL="$SERVER/v1"', '"$SERVER/health"',
                     f"URL_FILE={tmp_path / 'servers' / 'llama-2-13b-chat.url'}",
                     'mv -f "$URL_FILE.tmp" "$URL_FILE"', "trap 'rm -f \"$URL_FILE\"' EXIT"):
        assert expected in text, expected
    # the URL is published only after the readiness loop, and the key never appears
    assert text.index("until ") < text.index('echo "$URL" > "$URL_FILE.tmp"')
    assert "--tensor-parallel-size 8" in scripts["judge-70b-0"] and SECRET not in "".join(scripts.values())
    assert "not submitted" in capsys.readouterr().out

    # A pool entry naming the URL file gets the URL when its stage starts, not before.
    from pipeline.launch.serve import resolve_url_files

    recipe = load_recipe(generate_recipe(tmp_path), ["generation.pool[0].base_url=null",
                                                     f"generation.pool[0].base_url_file={tmp_path / 'servers' / 'vicuna-33b.url'}"],
                         check_inputs=False)
    with pytest.raises(ConfigError, match=r"generation.pool\[0\].base_url_file: no server URL in .*vicuna-33b.url yet"):
        resolve_url_files(recipe)
    (tmp_path / "servers" / "vicuna-33b.url").write_text("http://node7:31234/v1\n")
    resolve_url_files(recipe)
    assert recipe.generation.pool[0].base_url == "http://node7:31234/v1"


def test_all_runs_a_pipeline_locally_and_skips_what_is_done(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the demo recipes name data/samples/... relative to the checkout
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"stages": ["recipes/demo-tiny/prompts.yaml"]}))
    root = f"run.root={tmp_path / 'runs'}"
    assert rlhf(["all", str(pipeline), root, "run.name=p"]) == 0
    assert (tmp_path / "runs" / "p" / "prompts" / "_SUCCESS").is_file()
    capsys.readouterr()
    assert rlhf(["all", str(pipeline), root, "run.name=p"]) == 0
    assert "prompts already done" in capsys.readouterr().out


def test_a_url_credential_never_reaches_a_slurm_script(tmp_path, capsys, fake_slurm):
    """Issue 18 #11: the job's saved recipe would hide it, so the submission is refused instead."""
    path = generate_recipe(tmp_path)
    line = one_error(capsys, rlhf(["generate", str(path), "generation.pool[0].base_url=http://u:SECRET9@host:9/v1"]))
    assert "generation: holds a secret-looking value" in line and "SECRET9" not in line
    assert not fake_slurm.exists()
    assert not any("SECRET9" in p.read_text() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".log")
