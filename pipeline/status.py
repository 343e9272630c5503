"""`rlhf status RUN`: every stage folder of `<root>/RUN` (and every shard of a sharded stage) as
done, running, failed or missing, with the Slurm job behind it and why it failed.

- done: `_SUCCESS` is there.
- running: a Slurm job of the stage is queued or running.
- failed: a job of it failed or was cancelled, or (a local run) its ledgers hold failures.
- missing: not done and nothing says why; a job that never started because the job it waited
  on did not succeed (Slurm: DependencyNeverSatisfied) is reported as such.

Where the state comes from: the files of the run (`_SUCCESS`, `slurm/jobs.json`, the records the
jobs write in `slurm/state/`, the ledgers), and Slurm (squeue, then sacct where the cluster keeps
accounting) for jobs it still knows. Off Slurm the Slurm column is empty.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

from pipeline.launch import slurm
from pipeline.ledger import outcomes
from pipeline.runs import SUCCESS, is_done

FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                 "PREEMPTED"}
LEDGER = "ledger.jsonl"
TOP_REASONS = 3


def _ledger_failures(files: list[Path], succeeded: set[str] = frozenset()) -> dict | None:
    """Counts and commonest failure reasons; `succeeded`: keys another shard's ledger has done."""
    if not files:
        return None
    ok, failed = outcomes(files)
    failed = {k: rec for k, rec in failed.items() if k not in succeeded}
    reasons = Counter(str(rec.get("reason", "no reason recorded"))[:160] for rec in failed.values())
    return {"ok": len(ok), "failed": len(failed), "reasons": [[n, r] for r, n in reasons.most_common(TOP_REASONS)]}


def _last_error(log: Path) -> str | None:
    """The last line of a job's log the CLI wrote about a failure."""
    if not log.is_file():
        return None
    with open(log, "rb") as handle:
        handle.seek(max(0, log.stat().st_size - 16384))
        lines = handle.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith(("failed:", "error:", "preempted:")) or "Error:" in line:
            return line.strip()[:300]
    return None


def _job(job_id: str, name: str, log: Path, states: dict, records: dict, slurm_here: bool) -> dict:
    """One job (or array task): what Slurm and the job's own record say, and what it means."""
    seen = states.get(job_id, {})
    rec = records.get(job_id, {})
    view = {"id": job_id, "name": name, "slurm_state": seen.get("state"), "slurm_reason": seen.get("reason"),
            "record": rec.get("state"), "exit_code": rec.get("exit_code", seen.get("exit_code")),
            "restarts": rec.get("restarts"), "log": str(log)}
    state, reason = seen.get("state"), seen.get("reason")
    if reason == slurm.NEVER_SATISFIED:
        view["outcome"] = "never-ran"
    elif state in slurm.ACTIVE_STATES:
        view["outcome"] = "active"
    elif state in FAILED_STATES or (state is None and rec.get("state") in ("failed", "killed")):
        view["outcome"] = "failed"
    elif state == "COMPLETED" or (state is None and rec.get("state") == "done"):
        view["outcome"] = "done"
    elif state is None and rec.get("state") in ("running", "requeued"):
        # Slurm reachable but the job unknown: it ended without writing its record (killed -9,
        # node lost). Without Slurm here, trust the record.
        view["outcome"] = "failed" if slurm_here else "active"
    else:
        view["outcome"] = "unknown"
    if view["outcome"] == "failed":
        view["error"] = _last_error(log)
    return view


def _stage(path: Path, states: dict, owners: dict, slurm_here: bool) -> dict:
    subs = slurm.submissions(path)
    records = slurm.job_records(path)
    logs = path / slurm.SLURM_DIR / "logs"
    shard_jobs: dict[int, dict] = {}
    num_shards = None
    for sub in subs:
        num_shards = sub.get("num_shards") or num_shards
        for job in sub["jobs"]:
            for i in job.get("array") or []:
                task = f"{job['id']}_{i}"
                shard_jobs[i] = _job(task, f"shard {i}", logs / f"shard-{i}-{job['id']}.out", states, records,
                                     slurm_here) | {"after": job.get("after", [])}
    stage_jobs = [_job(str(j["id"]), j["name"], logs / f"{j['name']}-{j['id']}.out", states, records, slurm_here)
                  | {"after": j.get("after", [])}
                  for j in (subs[-1]["jobs"] if subs else []) if j.get("array") is None]
    if num_shards is None:
        counts = [int(p.name.rsplit("-", 1)[1]) for p in path.glob("shard-*-of-*") if p.name.rsplit("-", 1)[1].isdigit()]
        num_shards = max(counts) if counts else None
    ledgers = sorted(p for p in path.rglob(LEDGER) if slurm.SLURM_DIR not in p.relative_to(path).parts)
    succeeded = outcomes(ledgers)[0] if num_shards else set()
    shards = []
    for i in range(num_shards or 0):
        folder = path / f"shard-{i}-of-{num_shards}"
        job = shard_jobs.get(i)
        ledger = _ledger_failures([folder / LEDGER] if (folder / LEDGER).is_file() else [], succeeded)
        if is_done(folder):
            state = "done"
        elif job and job["outcome"] == "active":
            state = "running"
        elif (job and job["outcome"] == "failed") or (ledger and ledger["failed"]):
            state = "failed"
        else:
            state = "missing"
        shards.append({"shard": folder.name, "state": state, "job": job, "ledger": ledger})

    failures = _ledger_failures(ledgers)
    report = {"stage": path.name, "path": str(path), "jobs": stage_jobs, "shards": shards, "ledger": failures,
              "detail": None}
    jobs = stage_jobs + [s["job"] for s in shards if s["job"]]
    if is_done(path):
        report["state"] = "done"
        report["finished_at"] = _marker_time(path)
    elif any(j["outcome"] == "active" for j in jobs):
        report["state"] = "running"
    elif any(j["outcome"] == "failed" for j in jobs) or any(s["state"] == "failed" for s in shards) \
            or (not jobs and failures and failures["failed"]):
        report["state"] = "failed"
        failed = [j for j in stage_jobs if j["outcome"] == "failed"]
        bad_shards = [s["shard"] for s in shards if s["state"] == "failed"]
        if failed:
            report["detail"] = failed[0].get("error") or f"job {failed[0]['id']} failed; see {failed[0]['log']}"
        elif bad_shards:
            report["detail"] = f"failed shard(s): {', '.join(bad_shards)}"
    else:
        report["state"] = "missing"
        # the shards' array first: it is the job that waited on an earlier stage (the merge
        # waited on the array)
        blocked = [j for j in [s["job"] for s in shards if s["job"]] + stage_jobs if j["outcome"] == "never-ran"]
        unknown = [j for j in stage_jobs if j["outcome"] == "unknown" and not j["record"]]
        if blocked:
            waited = ", ".join(f"job {a}" + (f" ({owners[a]})" if a in owners else "") for a in blocked[0]["after"])
            report["detail"] = f"never ran: job {blocked[0]['id']} waited on {waited or 'a job'}, which did not succeed"
        elif unknown:  # Slurm has forgotten the job (or is not here) and the job never wrote a record
            waited = ", ".join(f"job {a}" + (f" ({owners[a]})" if a in owners else "") for a in unknown[0]["after"])
            report["detail"] = f"job {unknown[0]['id']} never started" + (f" (it waited on {waited})" if waited else "")
        missing = [s["shard"] for s in shards if s["state"] == "missing"]
        if missing and not blocked:
            report["detail"] = f"shard(s) not run: {', '.join(missing)}"
    return report


def _marker_time(path: Path) -> str | None:
    try:
        return json.loads((path / SUCCESS).read_text()).get("finished_at")
    except (OSError, ValueError, AttributeError):
        return None


def _order(path: Path) -> tuple:
    """Stages in the order they were started: first submission (then job id), else saved config."""
    subs = slurm.submissions(path)
    if subs:
        try:
            first = int(str(subs[0]["jobs"][0]["id"]).split("_")[0])
            return time.mktime(time.strptime(subs[0]["submitted_at"][:19], "%Y-%m-%dT%H:%M:%S")), first
        except (KeyError, IndexError, ValueError):
            pass
    config = path / "config.yaml"
    return (config if config.exists() else path).stat().st_mtime, 0


def collect(root: Path, run: str) -> dict:
    run_dir = Path(root) / run
    stages = sorted((p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_order)
    owners, ids = {}, []
    for path in stages:
        for sub in slurm.submissions(path):
            for job in sub["jobs"]:
                owners[str(job["id"])] = f"{path.name} {job['name']}"
                ids += [f"{job['id']}_{i}" for i in job["array"]] if job.get("array") is not None else [str(job["id"])]
    slurm_here = shutil.which("squeue") is not None
    states = slurm.job_states(ids) if ids else {}
    return {"run": run, "path": str(run_dir), "slurm": slurm_here,
            "stages": [_stage(p, states, owners, slurm_here) for p in stages]}


def _job_text(job: dict | None) -> str:
    if not job:
        return ""
    parts = [f"job {job['id']}"]
    if job["slurm_state"]:
        parts.append(job["slurm_state"] + (f" ({job['slurm_reason']})" if job["slurm_reason"] else ""))
    elif job["record"]:
        parts.append(f"{job['record']} (job record)")
    if job.get("exit_code") not in (None, 0, "0:0"):
        parts.append(f"exit {job['exit_code']}")
    if job.get("restarts"):
        parts.append(f"restarts {job['restarts']}")
    return " ".join(parts)


def _ledger_text(ledger: dict | None) -> str:
    if not ledger:
        return ""
    text = f"ledger: {ledger['ok']} ok, {ledger['failed']} failed"
    if ledger["reasons"]:
        text += " (" + "; ".join(f"{n}x {r}" for n, r in ledger["reasons"]) + ")"
    return text


def render(report: dict) -> str:
    lines = [f"run {report['run']} ({report['path']})" + ("" if report["slurm"] else "  [no Slurm here]")]
    if not report["stages"]:
        lines.append("  no stage folders yet")
    for stage in report["stages"]:
        jobs = "; ".join((f"{j['name']}: " if j["name"] != "job" else "") + _job_text(j) for j in stage["jobs"])
        lines.append(f"  {stage['stage']:<16} {stage['state']:<8} {jobs}".rstrip())
        if stage["detail"]:
            lines.append(f"  {'':<16} {'':<8} {stage['detail']}")
        if stage["ledger"] and stage["ledger"]["failed"] and not stage["shards"]:
            lines.append(f"  {'':<16} {'':<8} {_ledger_text(stage['ledger'])}")
        for shard in stage["shards"]:
            extra = "  ".join(t for t in (_job_text(shard["job"]), _ledger_text(shard["ledger"])) if t)
            lines.append(f"    {shard['shard']:<14} {shard['state']:<8} {extra}".rstrip())
            if shard["state"] == "failed" and shard["job"] and shard["job"].get("error"):
                lines.append(f"    {'':<14} {'':<8} {shard['job']['error']}")
    return "\n".join(lines)


def main(run: str, root: str, as_json: bool = False) -> int:
    from pipeline.config import ConfigError

    if not (Path(root) / run).is_dir():
        raise ConfigError(f"run {run!r}: no folder {Path(root) / run}")
    report = collect(Path(root), run)
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0
