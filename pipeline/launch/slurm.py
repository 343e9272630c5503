"""The Slurm launcher: sbatch scripts rendered from a template and a cluster profile, submitted as
array jobs, merge jobs and `afterok` chains, their ids recorded for `rlhf status`.

In the stage folder (`data/runs/<run>/<stage>/slurm/`):

    recipe.yaml        the resolved recipe every job of the stage loads (never holds a secret)
    <name>.sbatch      the rendered scripts: shards (array) + merge, job (a data stage), train
    logs/              job output, appended across requeues
    state/<job>.json   a record each job (array task) writes: running, done, failed, requeued, killed
    jobs.json          every submission: job ids, shards, what each job waits on

What is submitted (`launch.launcher: slurm`, a profile from `recipes/slurm/<profile>.yaml`):
- a sharded data stage (generate): one array job over the shards not done yet, then a merge job
  that starts only when every task succeeded (`--dependency=afterok`); resubmitting the stage runs
  only the shards still missing, and the ledger skips the requests any shard already recorded;
- any other data stage: one job on one node;
- a training stage: one job of `launch.nodes` nodes; `srun` starts one `accelerate launch` per
  node with `processes_per_node` processes, the main address being the allocation's first host
  and the port derived from the job id.
Every job runs `python -m pipeline <stage> slurm/recipe.yaml launch.launcher=local ...`: the
stage is imported by name, nothing is pickled. A later job waits on an earlier one with
`--dependency=afterok:<id> --kill-on-invalid-dep=yes`, so a failure cancels what depends on it
(state CANCELLED, reason DependencyNeverSatisfied) instead of leaving it queued for ever.
Preemption: see pipeline/preempt.py and the template (pipeline/launch/templates/slurm/job.sh.jinja).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from pipeline.config import (
    SLURM_MEM,
    ConfigError,
    Strict,
    dump_recipe,
    format_validation_error,
    read_yaml,
    redact,
    secret_key,
    slurm_time_limit,
)
from pipeline.preempt import EXIT_CODE as PREEMPTED_CODE
from pipeline.runs import atomic_write_text, is_done, shard_dir, stage_dir, write_json
from pipeline.stages import STAGES


class SlurmProfile(Strict):
    """Where and with what the jobs of a stage run (sbatch options and the job's shell set-up)."""

    partition: str = Field(description="sbatch --partition")
    account: str | None = Field(None, description="sbatch --account")
    qos: str | None = Field(None, description="sbatch --qos")
    time: str = Field("04:00:00", description="Time limit per job: minutes, H:MM:SS or D-HH:MM:SS")
    nodes: int = Field(1, ge=1, description="Nodes per training job (data-stage jobs take one node each)")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node; also the default processes per node")
    cpus_per_task: int = Field(1, ge=1, description="CPUs per job (per node for training jobs)")
    mem: str | None = Field(None, description="Memory per node as sbatch --mem takes it (64G); None: the default")
    setup: list[str] = Field(default_factory=list,
                             description="Shell lines run before the stage (module load ..., source .venv/bin/activate)")
    env: dict[str, str] = Field(default_factory=dict, description="Variables exported in the job (never secrets: "
                                "API keys travel in the submitting environment, which sbatch passes on)")
    python: str | None = Field(None, description="Interpreter on the nodes; default: the one that submits")
    requeue: bool = Field(True, description="sbatch --requeue: a preempted or signalled job goes back to the queue")
    signal_seconds: int = Field(300, ge=10, description="USR1 this long before the time limit: the stage saves "
                                "its work (ledger / checkpoint) and the job requeues itself")
    max_parallel_shards: int | None = Field(None, ge=1, description="Array throttle: shards running at once")
    sbatch: list[str] = Field(default_factory=list, description="More sbatch options, one per item (--constraint=a100)")

    @field_validator("time", mode="before")
    @classmethod
    def _slurm_time(cls, value: Any) -> Any:
        return slurm_time_limit(value)

    @field_validator("mem")
    @classmethod
    def _slurm_mem(cls, value: str | None) -> str | None:
        if value is not None and not SLURM_MEM.fullmatch(value):
            raise ValueError("a Slurm memory size such as 64G or 16000M")
        return value

    @field_validator("env")
    @classmethod
    def _no_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if secret_key(name) or name.upper().endswith("KEY"):
                raise ValueError(f"{name}: looks like a secret; export it in the submitting shell instead "
                                 "(sbatch passes the environment on; a rendered script never holds it)")
        return value


SLURM_DIR = "slurm"
JOBS = "jobs.json"
STATE = "state"
REPO = Path(__file__).resolve().parents[2]
TEMPLATES = Path(__file__).resolve().parent / "templates" / "slurm"
# Squeue states in which a job may still run; anything else is over.
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}
NEVER_SATISFIED = "DependencyNeverSatisfied"


# --- profiles and accelerate configs -------------------------------------------------------


def _locate(value: str, folder: str) -> Path | None:
    """A name in recipes/<folder>/ (from the working folder, then this checkout), or a path."""
    if "/" in value or value.endswith((".yaml", ".yml")):
        candidates = [Path(value)]
    else:
        candidates = [Path("recipes") / folder / f"{value}.yaml", REPO / "recipes" / folder / f"{value}.yaml"]
    return next((c.resolve() for c in candidates if c.is_file()), None)


def known_profiles() -> list[str]:
    names = {p.stem for base in (Path("recipes/slurm"), REPO / "recipes" / "slurm") for p in base.glob("*.yaml")}
    return sorted(names)


def load_profile(name: str | None, origin: str) -> tuple[Path, SlurmProfile]:
    known = ", ".join(known_profiles()) or "none"
    if not name:
        raise ConfigError(f"{origin}: launch.profile: required with launch.launcher=slurm "
                          f"(a profile in recipes/slurm/: {known}; or a YAML path)")
    path = _locate(name, "slurm")
    if path is None:
        raise ConfigError(f"{origin}: launch.profile: no Slurm profile {name!r} "
                          f"(looked for recipes/slurm/{name}.yaml; profiles: {known})")
    tree = read_yaml(path, "Slurm profile")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a Slurm profile is a YAML mapping (partition: ..., time: ...)")
    try:
        return path, SlurmProfile.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(str(path), err)) from None


def _accelerate_config(name: str, origin: str) -> tuple[Path, dict]:
    path = _locate(name, "accelerate")
    if path is None:
        raise ConfigError(f"{origin}: launch.accelerate: no accelerate config {name!r} "
                          f"(ddp, zero2, zero3 in recipes/accelerate/, or a YAML path)")
    return path, yaml.safe_load(path.read_text(encoding="utf-8")) or {}


# --- checks --------------------------------------------------------------------------------


def check_launch(recipe, origin: str) -> None:
    """Launch settings a stage cannot use, refused before anything runs or is submitted."""
    launch = recipe.launch
    kind = STAGES[recipe.stage].launch_kind
    training_stages = [stage.name for stage in STAGES.values() if stage.kind == "train"]
    if kind != "training":
        for key, value in (("nodes", launch.nodes), ("processes_per_node", launch.processes_per_node)):
            if value is not None and value > 1:
                raise ConfigError(f"{origin}: launch.{key}={value}: stage {recipe.stage!r} runs on one node in one "
                                  f"process; only training stages ({', '.join(sorted(training_stages))}) use more")
        if launch.accelerate:
            raise ConfigError(f"{origin}: launch.accelerate: only training stages run under accelerate")
    if kind != "sharded" and launch.num_shards > 1 and launch.launcher == "slurm":
        raise ConfigError(f"{origin}: launch.num_shards={launch.num_shards}: stage {recipe.stage!r} is not sharded")
    if launch.launcher == "local" and kind == "training" and (launch.nodes or 1) > 1:
        raise ConfigError(f"{origin}: launch.nodes={launch.nodes} needs launch.launcher=slurm")


def need_slurm_commands() -> None:
    missing = [c for c in ("sbatch", "squeue", "scancel") if shutil.which(c) is None]
    if missing:
        raise ConfigError(f"launch.launcher=slurm: {', '.join(missing)} not found on PATH (run on a Slurm "
                          "login node, or use launch.launcher=local)")


# --- what Slurm says about jobs ------------------------------------------------------------


def _slurm(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def job_states(ids) -> dict[str, dict]:
    """{job id: {state, reason, exit_code}} for jobs Slurm still knows ("123" or array task
    "123_4"); empty without Slurm. squeue first (live jobs and reasons), then sacct, which
    only answers on clusters that keep accounting."""
    ids = sorted({str(i) for i in ids})
    if not ids or shutil.which("squeue") is None:
        return {}
    bases = sorted({i.split("_")[0] for i in ids})
    found: dict[str, dict] = {}
    out = _slurm(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(bases), "-o", "%i|%T|%r"]) or ""
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            found[parts[0]] = {"state": parts[1], "reason": parts[2] if parts[2] not in ("None", "") else None}
    if shutil.which("sacct") and any(i not in found for i in ids):
        out = _slurm(["sacct", "-n", "-P", "-X", "-j", ",".join(bases), "-o", "JobID,State,ExitCode,Reason"]) or ""
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 3 and parts[0] not in found:
                reason = parts[3] if len(parts) > 3 and parts[3] not in ("None", "") else None
                found[parts[0]] = {"state": parts[1].split()[0], "reason": reason, "exit_code": parts[2]}
    return found


def job_records(path: Path) -> dict[str, dict]:
    """The records the jobs of a stage wrote themselves (slurm/state/<job>.json)."""
    records = {}
    for file in sorted((path / SLURM_DIR / STATE).glob("*.json")):
        try:
            rec = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and "job" in rec:
            records[str(rec["job"])] = rec
    return records


def submissions(path: Path) -> list[dict]:
    file = path / SLURM_DIR / JOBS
    try:
        return json.loads(file.read_text())["submissions"] if file.is_file() else []
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _task_ids(job: dict) -> list[str]:
    return [f"{job['id']}_{i}" for i in job["array"]] if job.get("array") is not None else [str(job["id"])]


def live_jobs(path: Path) -> list[str]:
    """Ids of this stage's jobs that may still run."""
    ids = [t for sub in submissions(path) for job in sub["jobs"] for t in _task_ids(job)]
    states = job_states(ids)
    return [i for i in ids if i in states and states[i]["state"] in ACTIVE_STATES
            and states[i]["reason"] != NEVER_SATISFIED]


# --- rendering -----------------------------------------------------------------------------


def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env


def _stage_args(stage: str, recipe_file: Path, args: list[str]) -> str:
    """What follows `python -m pipeline` in a job: the stage by name and the saved recipe."""
    return " ".join([stage, shlex.quote(str(recipe_file)), "launch.launcher=local", *args])


def _training_command(recipe, origin: str, profile: SlurmProfile, recipe_file: Path,
                      args: list[str]) -> tuple[str, int, int]:
    """The command each node runs (expanded there), nodes, processes per node."""
    launch = recipe.launch
    nodes = launch.nodes or profile.nodes
    per_node = launch.processes_per_node or profile.gpus_per_node or 1
    stage = _stage_args(recipe.stage, recipe_file, args)
    name = launch.accelerate or ("ddp" if nodes * per_node > 1 else None)
    if name is None:  # one process in all: no launcher needed
        return f'exec "$RLHF_PYTHON" -m pipeline {stage}', nodes, per_node
    config_path, config = _accelerate_config(name, origin)
    extra = ""
    if config.get("distributed_type") == "MULTI_GPU" and nodes * per_node > 1:
        extra += " --multi_gpu"  # as `make ACCELERATE=ddp NPROC>1`: gloo on CPU, nccl on GPUs
    if config.get("distributed_type") == "DEEPSPEED" and nodes > 1:
        extra += " --deepspeed_multinode_launcher standard"  # each node starts its own ranks
    command = (f'exec "$RLHF_PYTHON" -m accelerate.commands.launch --config_file {shlex.quote(str(config_path))}'
               f' --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID"'
               f' --num_processes $(( SLURM_NNODES * {per_node} )){extra}'
               f' --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT"'
               f' -m pipeline {stage}')
    return command, nodes, per_node


def render_template(template: str, origin: str, **values) -> str:
    """A script from pipeline/launch/templates/slurm/; one holding anything secret-looking is refused."""
    text = _environment().get_template(template).render(**values)
    if redact(text) != text:
        raise ConfigError(f"{origin}: a rendered Slurm script would hold a secret-looking value (check the "
                          "profile's setup and env); keys belong in the submitting environment")
    return text


def render_stage(recipe, origin: str, kind: str, profile_name: str, profile: SlurmProfile, *, shards: list[int],
                 num_shards: int, merge: bool, job_args: list[str]) -> list[dict]:
    """[{name, script text, array}] in submission order; each job after the one before it."""
    path = stage_dir(recipe).resolve()
    folder = path / SLURM_DIR
    recipe_file = folder / "recipe.yaml"
    python = profile.python or sys.executable
    title = f"{path.name} of run {recipe.run.name}"
    common = dict(profile=profile, profile_name=profile_name, time=recipe.launch.time or profile.time,
                  workdir=Path.cwd(), python=python, state_dir=folder / STATE,
                  preempted_code=PREEMPTED_CODE, gpus_per_node=profile.gpus_per_node)
    base = f"rlhf-{recipe.run.name}-{path.name}"  # the step: two sft steps of a run get two names
    run_stage = '"$RLHF_PYTHON" -m pipeline '
    jobs = []
    if kind == "sharded":
        if shards:
            throttle = f"%{profile.max_parallel_shards}" if profile.max_parallel_shards else ""
            args = ['--shard "$SLURM_ARRAY_TASK_ID"', f"--num-shards {num_shards}", *job_args]
            jobs.append({"name": "shards", "array": shards, "script": render_template(
                "job.sh.jinja", origin, **common, title=f"{title}: shards {_ranges(shards)} of {num_shards}",
                job_name=base, name="shards", nodes=1, array=_ranges(shards) + throttle,
                log=folder / "logs" / "shard-%a-%A.out", training=False, signal_child=True,
                command=run_stage + _stage_args(recipe.stage, recipe_file, args))})
        if merge:
            args = ["--merge", f"--num-shards {num_shards}", *job_args]
            jobs.append({"name": "merge", "array": None, "script": render_template(
                "job.sh.jinja", origin, **common, title=f"{title}: merge of {num_shards} shards", job_name=f"{base}-merge",
                name="merge", nodes=1, array=None, log=folder / "logs" / "merge-%j.out", training=False,
                signal_child=True, command=run_stage + _stage_args(recipe.stage, recipe_file, args))})
    elif kind == "training":
        command, nodes, per_node = _training_command(recipe, origin, profile, recipe_file, job_args)
        jobs.append({"name": "train", "array": None, "script": render_template(
            "job.sh.jinja", origin, **common, title=f"{title}: {nodes} node(s) x {per_node} process(es)",
            job_name=base, name="train", nodes=nodes, array=None, log=folder / "logs" / "train-%j.out",
            training=True, signal_child=False, command=command)})
    else:
        jobs.append({"name": "job", "array": None, "script": render_template(
            "job.sh.jinja", origin, **common, title=title, job_name=base, name="job", nodes=1, array=None,
            log=folder / "logs" / "job-%j.out", training=False, signal_child=True,
            command=run_stage + _stage_args(recipe.stage, recipe_file, job_args))})
    return jobs


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (sbatch --array syntax)."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(out)


# --- submitting ----------------------------------------------------------------------------


def _check_saved_copy(recipe, origin: str) -> str:
    """The text of the copy every job loads; it must load back to the very same config (a
    secret-looking value would be redacted in it: such values belong in the environment)."""
    text = dump_recipe(recipe)
    again = type(recipe).model_validate(yaml.safe_load(text)).model_dump()
    if again != recipe.model_dump():
        changed = sorted(k for k, v in recipe.model_dump().items() if again.get(k) != v)
        raise ConfigError(f"{origin}: {', '.join(changed)}: holds a secret-looking value, which a saved recipe "
                          "never keeps; pass it through the environment (e.g. api_key_env)")
    return text


def sbatch(script: Path, after: list[str]) -> str:
    cmd = ["sbatch", "--parsable"]
    if after:
        cmd += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
    done = subprocess.run([*cmd, str(script)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise ConfigError(f"sbatch refused {script}: {message[-1] if message else f'exit {done.returncode}'}")
    return done.stdout.strip().split(";")[0]


def prepare_stage(recipe, origin: str, *, job_args: list[str] = (),
                  shard: int | None = None, num_shards: int | None = None, merge_only: bool = False,
                  retry: bool = False) -> dict:
    """Every check, and the rendered scripts, of one stage's submission; writes nothing."""
    check_launch(recipe, origin)
    kind = STAGES[recipe.stage].launch_kind
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would submit the same jobs
        raise ConfigError(f"{origin}: launch.launcher=slurm: submit from one plain process, not under accelerate "
                          "launch or torchrun (the job starts those itself: launch.processes_per_node, "
                          "launch.accelerate)")
    profile_path, profile = load_profile(recipe.launch.profile, origin)
    need_slurm_commands()
    path = stage_dir(recipe)
    num_shards = num_shards or recipe.launch.num_shards
    if shard is not None:
        shards, merge = [shard], False
    elif merge_only:
        shards, merge = [], True
    else:
        shards = [i for i in range(num_shards) if retry or not is_done(shard_dir(path, i, num_shards))]
        merge = True
    live = live_jobs(path)
    if live:
        raise ConfigError(f"{origin}: stage {path.name!r} of run {recipe.run.name!r} still has jobs queued or "
                          f"running ({', '.join(live)}); wait for them or scancel them first")
    jobs = render_stage(recipe, origin, kind, profile_path.stem, profile, shards=shards, num_shards=num_shards,
                        merge=merge, job_args=list(job_args))
    return {"recipe": recipe, "recipe_text": _check_saved_copy(recipe, origin), "jobs": jobs, "kind": kind,
            "num_shards": num_shards, "profile": str(profile_path)}


def submit_prepared(plan: dict, after: list[str] = ()) -> dict:
    """Write the scripts and the recipe copy, sbatch each job after the one before (the first
    after `after`); returns the submission record ("final": the id a later stage waits on). A
    submission that sbatch refuses half way is cancelled again."""
    recipe = plan["recipe"]
    path = stage_dir(recipe)
    folder = path / SLURM_DIR
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    (folder / STATE).mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "recipe.yaml", plan["recipe_text"])
    submitted: list[dict] = []
    wait_on = [str(a) for a in after]
    try:
        for job in plan["jobs"]:
            script = folder / f"{job['name']}.sbatch"
            atomic_write_text(script, job["script"])
            job_id = sbatch(script, wait_on)
            submitted.append({"name": job["name"], "id": job_id, "array": job["array"], "after": wait_on,
                              "script": str(script)})
            wait_on = [job_id]
    except BaseException:
        for job in submitted:
            subprocess.run(["scancel", job["id"]], capture_output=True, timeout=30)
        raise
    num_shards = plan["num_shards"]
    record = {"submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "profile": plan["profile"],
              "num_shards": num_shards if plan["kind"] == "sharded" else None, "jobs": submitted,
              "final": submitted[-1]["id"] if submitted else None}
    write_json(folder / JOBS, {"submissions": [*submissions(path), record]})
    for job in submitted:
        what = f"array {_ranges(job['array'])} of {num_shards} shards" if job["array"] is not None else job["name"]
        waits = f" after {','.join(job['after'])}" if job["after"] else ""
        print(f"{path.name}: submitted job {job['id']} ({what}){waits}; script {job['script']}")
    return record


def submit_stage(recipe, origin: str, *, after: list[str] = (), **options) -> dict:
    """Check, render and submit the jobs of one stage (options: see prepare_stage)."""
    return submit_prepared(prepare_stage(recipe, origin, **options), after)


def launch(stage, recipe, origin: str, opts) -> None:
    """Submit the stage's jobs; each job runs it again with launch.launcher=local."""
    job_args = (["--retry-failed"] if opts.retry_failed else []) + ([f"--batch {opts.batch}"] if opts.batch else [])
    submit_stage(recipe, origin, job_args=job_args, shard=opts.shard, num_shards=opts.num_shards,
                 merge_only=opts.merge_only, retry=opts.retry_failed)
