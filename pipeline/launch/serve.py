"""`rlhf serve RECIPE [--dry-run]`: model servers on a Slurm cluster for the generation pool or
the judge (a ServeRecipe, e.g. recipes/slurm/serve/ultrafeedback-pool.yaml).

One job per model (per replica: `replicas`) runs `vllm serve` on one GPU node (tensor parallel
over `gpus`); once the server answers, the job writes its URL to `<url_dir>/<name>.url`
(`<name>-<i>.url` for replica i of several) and removes it when it ends. A pool entry or a judge
with `base_url_file: <url_dir>/<name>.url` reads it when its stage starts (a list of the
replicas' files: a fleet, pipeline.llm.fleet). The
scripts (`<url_dir>/<name>.sbatch`), logs and `jobs.json` (name -> job id) sit beside the URLs.
`--dry-run` renders the scripts and submits nothing.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from pipeline.config import ConfigError, Strict, format_validation_error, read_yaml, slurm_time_limit
from pipeline.runs import atomic_write_text, write_json

log = logging.getLogger(__name__)


class ServedModel(Strict):
    name: str = Field(description="The name clients ask for (a pool entry's `model`, or `name`); the URL file's name")
    model: str = Field(description="What vLLM loads: a Hugging Face id or a model folder on the cluster")
    gpus: int = Field(1, ge=1, description="GPUs of one node, the tensor-parallel size")
    args: list[str] = Field(default_factory=list, description="More `vllm serve` arguments (--max-model-len, 4096)")
    replicas: int = Field(1, ge=1, description="Servers of this model, one job each; with more than one they write "
                          "`<name>-<i>.url` (i from 0), which a judge or pool entry lists as `base_url_file`: a fleet")

    @field_validator("name")
    @classmethod
    def _file_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError("use letters, digits, '_', '.', '-' (it names the URL file)")
        return value


class ServeRecipe(Strict):
    """`rlhf serve RECIPE`: one Slurm job per model running `vllm serve` on a GPU node; once the
    server answers, the job writes its URL to `<url_dir>/<name>.url`, which a pool entry or a
    judge names as `base_url_file`."""

    profile: str = Field(description="Slurm profile (recipes/slurm/<name>.yaml) of the GPU nodes")
    url_dir: str = Field("data/servers", description="Where the URL files, scripts and logs go")
    time: str | None = Field(None, description="How long the servers run (default: the profile's time)")
    vllm: str = Field("vllm", description="The vllm command on the nodes (after the profile's setup lines)")
    models: list[ServedModel] = Field(min_length=1)

    @field_validator("time", mode="before")
    @classmethod
    def _slurm_time(cls, value: Any) -> Any:
        return slurm_time_limit(value)


def load(path: str | Path) -> ServeRecipe:
    path = Path(path)
    tree = read_yaml(path, "serve recipe")
    try:
        return ServeRecipe.model_validate(tree if isinstance(tree, dict) else {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(str(path), err)) from None


def render(recipe: ServeRecipe, origin: str) -> dict[str, str]:
    """{server name: sbatch script}: a model's name, or `<name>-<i>` for each of its replicas."""
    from pipeline.launch import slurm

    profile_path, profile = slurm.load_profile(recipe.profile, origin)
    servers = [(m, m.name if m.replicas == 1 else f"{m.name}-{i}") for m in recipe.models for i in range(m.replicas)]
    names = [name for _, name in servers]
    if len(set(names)) != len(names):
        raise ConfigError(f"{origin}: models: names (and <name>-<i> of replicas) must be unique: each names a URL file")
    url_dir = Path(recipe.url_dir).resolve()
    scripts = {}
    for served, name in servers:
        scripts[name] = slurm.render_template(
            "serve.sh.jinja", origin, served=served, profile=profile, profile_name=profile_path.stem,
            time=recipe.time or profile.time, workdir=Path.cwd(), log=url_dir / "logs" / f"{name}-%j.out",
            url_file=url_dir / f"{name}.url", vllm=recipe.vllm, python=profile.python or sys.executable)
    return scripts


def resolve_url_files(recipe) -> None:
    """Read each `base_url_file` into its model's `base_url` (when the stage starts, so that a
    server started after the stage was submitted is found)."""
    from pipeline.runs import model_specs

    for key, spec in model_specs(recipe):
        if not spec.base_url_file:
            continue
        if isinstance(spec.base_url_file, str):
            spec.base_url = _read_url(Path(spec.base_url_file), f"{key}.base_url_file")
            continue
        # A fleet runs on the servers that are up; one that is not is named, not waited for.
        urls, missing = [], []
        for i, file in enumerate(spec.base_url_file):
            try:
                urls.append(_read_url(Path(file), f"{key}.base_url_file[{i}]"))
            except ConfigError as err:
                missing.append(str(err))
        if not urls:
            raise ConfigError(f"{key}.base_url_file: no server of the fleet is up: " + "; ".join(missing))
        for message in missing:
            log.warning("%s; the fleet starts without it", message)
        spec.base_urls = urls


def _read_url(path: Path, key: str) -> str:
    url = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
    if not url:
        raise ConfigError(f"{key}: no server URL in {path} yet (the server writes it once it answers: is its "
                          "`rlhf serve` job up? for the stand-in: `make standin` or `make demo`)")
    return url


def main(path: str, dry_run: bool = False) -> int:
    from pipeline.launch import slurm

    recipe = load(path)
    scripts = render(recipe, path)
    if not dry_run:
        slurm.need_slurm_commands()
    url_dir = Path(recipe.url_dir)
    (url_dir / "logs").mkdir(parents=True, exist_ok=True)
    jobs = {}
    for name, text in scripts.items():
        script = url_dir / f"{name}.sbatch"
        atomic_write_text(script, text)
        if dry_run:
            print(f"serve: {name}: {script} (not submitted)")
            continue
        jobs[name] = slurm.sbatch(script, [])
        print(f"serve: {name}: job {jobs[name]}; its URL will be in {url_dir / (name + '.url')}")
    if jobs:
        write_json(url_dir / "jobs.json", {"submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "jobs": jobs})
    return 0
