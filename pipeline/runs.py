"""The run layout: the only place where paths of stage outputs are built.

    <root>/<run>/<stage>/config.yaml          resolved recipe (secrets redacted)
    <root>/<run>/<stage>/provenance.json      what produced it: git commit and dirty flag, library versions, host
    <root>/<run>/<stage>/shard-<i>-of-<n>/    per-shard work and its own _SUCCESS
    <root>/<run>/<stage>/dataset/             final artifact (written under a temporary name, renamed)
    <root>/<run>/<stage>/_SUCCESS             written last; a stage with it is skipped unless forced

Inputs are named explicitly (a run and stage, or a path); nothing looks for "the latest".
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.config import ConfigError, StageRef, dump_recipe
from pipeline.hub import Kind, local_folder, open_dataset

SUCCESS = "_SUCCESS"
DATASET = "dataset"
# The stage names (filled in by pipeline.stages, which every stage module is imported through; this
# layer cannot import that table): an input naming none of them and no step of its run is a typo.
STAGE_NAMES: set[str] = set()


@dataclass(frozen=True)
class RunOptions:
    """The command-line options of a stage run; each stage reads the ones its table line offers."""

    force: bool = False  # run even when done (the ledger still serves paid results)
    retry_failed: bool = False  # send again the requests the ledger records as failed
    shard: int | None = None  # sharded stages: run only this shard, no merge
    num_shards: int | None = None  # sharded stages: default launch.num_shards
    merge_only: bool = False  # sharded stages: only merge finished shards
    dry_run: bool = False  # check inputs, print the plan; send, train and write nothing
    batch: str | None = None  # annotate: "submit" or "collect" (OpenAI Batch API)


class StageFailed(Exception):
    """The stage ran but its result is not good enough to mark done (CLI exit code 1)."""


def stage_dir(recipe, stage: str | None = None, run: str | None = None) -> Path:
    """The folder of step `stage` of `run` (default: this recipe's own step and run)."""
    return Path(recipe.run.root) / (run or recipe.run.name) / (stage or recipe.run.step or recipe.stage)


def shard_dir(stage_path: Path, shard: int, num_shards: int) -> Path:
    return stage_path / f"shard-{shard}-of-{num_shards}"


def is_done(path: Path) -> bool:
    return (path / SUCCESS).is_file()


def done_shards(stage_path: Path, num_shards: int, stage: str) -> list[dict]:
    """Each shard's `_SUCCESS` record (its tally), for a merge; StageFailed unless every shard has
    one, naming each shard that never ran and each that ran without finishing (failed, killed or
    still running)."""
    never, unfinished = [], []
    for i in range(num_shards):
        folder = shard_dir(stage_path, i, num_shards)
        if not is_done(folder):
            (unfinished if folder.is_dir() else never).append(i)
    if never or unfinished:
        parts = ([f"shard(s) {never} never ran"] if never else []) + (
            [f"shard(s) {unfinished} ran but did not finish (see their failures.jsonl, or `rlhf status`)"]
            if unfinished else [])
        raise StageFailed(f"{stage}: cannot merge {num_shards} shards: " + "; ".join(parts)
                          + f". Run them (--shard i --num-shards {num_shards}), then --merge again.")
    return [json.loads((shard_dir(stage_path, i, num_shards) / SUCCESS).read_text()) for i in range(num_shards)]


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (read in 1 MiB blocks: model weights and archives are large)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def mark_done(path: Path, info: dict | None = None) -> None:
    """Write the completion marker; call it only after every output of `path` is in place."""
    write_json(path / SUCCESS, {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(info or {})})


def clear_done(path: Path) -> None:
    (path / SUCCESS).unlink(missing_ok=True)


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created if missing) across processes on this machine:
    two runs that fill the same cache (parallel test workers, two jobs on one node) take turns."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_config(path: Path, recipe) -> None:
    """The resolved recipe and the provenance of the code that runs it: every stage calls this
    once it starts writing, so every stage folder gets both from this one place."""
    atomic_write_text(path / "config.yaml", dump_recipe(recipe))
    write_json(path / PROVENANCE, provenance())


PROVENANCE = "provenance.json"
# The libraries whose versions decide what a stage computes (read from package metadata: importing
# torch or transformers only to ask would cost seconds in a data stage that never needs them).
PROVENANCE_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "openai")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _git(root: Path, *args: str) -> tuple[bool, str]:
    """(succeeded, stdout or else git's first error line) of a git command in `root`."""
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return False, f"git not found or not runnable ({type(err).__name__})"
    if done.returncode == 0:
        return True, done.stdout
    return False, (done.stderr.strip().splitlines() or [f"git exited with {done.returncode}"])[0]


def git_state(root: Path) -> dict:
    """{commit, dirty, note}: the checked-out commit of `root` and whether the tree differs from it;
    without git or outside a repository both are None and `note` says why (git's own words).
    Untracked files that git does not ignore count as dirty: a new module changes what runs just as an
    edit does (run outputs under data/ are ignored, so they never do)."""
    inside, why = _git(root, "rev-parse", "--is-inside-work-tree")
    if not inside:
        return {"commit": None, "dirty": None, "note": f"{root}: {why}"}
    has_commit, commit = _git(root, "rev-parse", "HEAD")
    clean_read, status = _git(root, "status", "--porcelain")
    return {"commit": commit.strip() if has_commit else None,
            "dirty": bool(status.strip()) if clean_read else None,
            "note": None if has_commit and clean_read else (commit if not has_commit else status)}


def provenance(root: Path | None = None) -> dict:
    """What produced a stage's outputs: the project's git state, library versions (None = not
    installed), Python and the host name. Nothing from the environment or the recipe goes in."""
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"git": git_state(root or PROJECT_ROOT), "packages": {name: version(name) for name in PROVENANCE_PACKAGES},
            "python": platform.python_version(), "host": socket.gethostname(),
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def resolve_input(recipe, ref: StageRef | str, key: str, kind: Kind = "dataset") -> Path:
    """The dataset folder (or file) an input names: a stage's output (the stage must have finished), a
    local path, or a hub id's snapshot folder (pipeline.hub decides which a string is)."""
    if isinstance(ref, str):
        return local_folder(ref, key, kind)
    path = stage_dir(recipe, ref.stage, ref.run)
    if not path.exists() and STAGE_NAMES and ref.stage not in STAGE_NAMES:
        steps = sorted(p.name for p in path.parent.iterdir() if p.is_dir()) if path.parent.is_dir() else []
        raise ConfigError(
            f"{key}.stage: no such stage {ref.stage!r}, and run {ref.run or recipe.run.name!r} has no step of "
            f"that name (stages: {', '.join(sorted(STAGE_NAMES))}; steps of the run: {', '.join(steps) or 'none'})")
    if not is_done(path):
        raise ConfigError(
            f"{key}: stage {ref.stage!r} of run {ref.run or recipe.run.name!r} has not finished "
            f"(no {path / SUCCESS}); run it first"
        )
    return path / ref.output


def resolve_model(recipe, ref: StageRef | str, key: str) -> Path:
    """A model input (a folder path, a hub id, or a stage's model output) that must hold a transformers model."""
    path = resolve_input(recipe, ref, key, kind="model")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: {path} is not a model folder (no config.json)")
    return path


def model_specs(node, key: str = ""):
    """(recipe key, ModelSpec) of every model a recipe names (pool entries, judges, samplers)."""
    from pydantic import BaseModel

    from pipeline.config import ModelSpec

    if isinstance(node, ModelSpec):
        yield key, node
    elif isinstance(node, BaseModel):
        for name in type(node).model_fields:
            yield from model_specs(getattr(node, name), f"{key}.{name}" if key else name)
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            yield from model_specs(item, f"{key}[{i}]")
    elif isinstance(node, dict):
        for name, item in node.items():
            yield from model_specs(item, f"{key}.{name}")


def resolve_model_paths(recipe) -> None:
    """Turn every ModelSpec `path` that names a stage into that stage's model folder (when the
    stage starts: the named stage must have finished by then), and one that names a hub id into its
    snapshot folder in the Hugging Face cache (downloaded first when the hub may be asked)."""
    for key, spec in model_specs(recipe):
        if isinstance(spec.path, StageRef):
            spec.path = str(resolve_model(recipe, spec.path, f"{key}.path"))
        elif isinstance(spec.path, str) and spec.backend == "hf" and not Path(spec.path).exists():
            spec.path = str(resolve_model(recipe, spec.path, f"{key}.path"))
        if isinstance(spec.model, StageRef):  # a server that loads models by folder path
            spec.model = str(resolve_model(recipe, spec.model, f"{key}.model").resolve())


def load_rows(recipe, ref, key: str, need: set[str], split: str = "train") -> tuple[list[dict], Path]:
    """Rows of `split` of a DatasetDict input; ConfigError naming `key` when it is unusable."""
    from datasets import DatasetDict

    path = resolve_input(recipe, ref, key)
    try:
        data = open_dataset(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}: {path} is not a `datasets` folder ({err})") from None
    if not isinstance(data, DatasetDict) or split not in data:
        raise ConfigError(f"{key}: {path} has no split {split!r}")
    missing = need - set(data[split].column_names)
    if missing:
        raise ConfigError(f"{key}: split {split!r} of {path} lacks column(s) {', '.join(sorted(missing))}")
    rows = data[split].to_list()
    if not rows:
        raise ConfigError(f"{key}: split {split!r} of {path} is empty")
    if "qid" in need:  # QA items (and what later stages add to them): checked before any work
        from pipeline.records import QA_SCHEMA, check_qa_rows, split_rows

        check_qa_rows(split_rows(rows, path, split), key, columns=need & set(QA_SCHEMA))
    return rows, path
