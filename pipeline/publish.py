"""`rlhf push RUN STAGE --repo org/name`: publish a finished stage's output on the Hugging Face Hub.

What goes up, by what the stage folder holds (`--output` picks another):
- a model folder (`model/`, the training stages): its files as a model repo;
- a dataset (`dataset/`, `critique/`: a `save_to_disk` DatasetDict): one parquet file per split under
  `data/` (the layout the hub's viewer and `load_dataset("org/name")` read), as a dataset repo.

Either way with a generated card, `README.md`: what made the output (the chain of stages behind it,
read from each stage's saved `config.yaml`, `summary.json`, `eval.json` and `provenance.json`), the
models and the judge (the stand-in server labelled as what it is: a rule, not a model), the judge's
template version, counts, filters, the stage's own numbers, the licences of its inputs as far as the
run records them, and the code's git commit and library versions. The card and the parquet files are
written under `<stage>/push/<output>/` first, so `--dry-run` shows exactly what would be uploaded
without a token or a network.

The token comes from HF_TOKEN only; it is handed to huggingface_hub and never written anywhere. The
hub endpoint is huggingface_hub's (HF_ENDPOINT moves it: the tests point it at a local server).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import ConfigError, redact
from pipeline.hub import hub_origin, is_hub_id
from pipeline.runs import PROVENANCE, SUCCESS, is_done

PUSH = "push"  # <stage>/push/<output>/: the card and files as uploaded
OUTPUTS = ("model", "dataset", "critique")
MAX_NUMBERS = 40  # rows of a numbers table: a card is an overview, the files hold the rest
TINY_MANIFEST, PACKAGED_MANIFEST = "tiny_pool.json", "packaged_model.json"
# Licence names the hub's card metadata accepts, for the inputs whose licence the run knows.
_SPDX = {"apache-2.0": "apache-2.0", "apache 2.0": "apache-2.0", "mit": "mit", "cc-by-4.0": "cc-by-4.0",
         "cc-by-sa-4.0": "cc-by-sa-4.0", "cc-by-nc-4.0": "cc-by-nc-4.0", "llama3": "llama3", "gemma": "gemma"}


@dataclass
class Upload:
    """What one push sends: `files` maps a path in the repo to a local file."""

    repo_type: str  # "model" or "dataset"
    folder: Path  # <stage>/push/<output>/ (the card, and a dataset's parquet files)
    files: dict[str, Path]
    card: str


# --- reading a run ------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_config(folder: Path) -> dict:
    try:
        tree = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return tree if isinstance(tree, dict) else {}


def _stage_refs(node, found: list[tuple[str | None, str]]) -> None:
    """(run, step) of every stage reference in a saved recipe tree (`{stage:, run:, output:}`)."""
    if isinstance(node, dict):
        if isinstance(node.get("stage"), str) and "output" in node:
            found.append((node.get("run"), node["stage"]))
            return
        for value in node.values():
            _stage_refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _stage_refs(value, found)


def upstream(root: Path, run: str, step: str) -> list[tuple[str, str, Path]]:
    """(run, step, folder) of the stage and of every finished stage its recipe's inputs lead back to,
    the stage itself first, then the nearest inputs, each once."""
    order, seen, queue = [], set(), [(run, step)]
    while queue:
        run_name, name = queue.pop(0)
        if (run_name, name) in seen:
            continue
        seen.add((run_name, name))
        folder = root / run_name / name
        if not folder.is_dir():
            continue
        order.append((run_name, name, folder))
        config = _read_config(folder)
        refs: list[tuple[str | None, str]] = []
        _stage_refs({k: v for k, v in config.items() if k not in ("run", "stage")}, refs)
        queue += [(ref_run or run_name, ref_step) for ref_run, ref_step in refs]
    return order


def is_standin(name: str | None) -> bool:
    """The stand-in server answers under names that start with `standin` (pipeline/standin)."""
    return bool(name) and "standin" in str(name).lower()


def describe_model(spec: dict) -> str:
    """One line for a model a recipe names (a saved ModelSpec, or a plain path or id)."""
    if not isinstance(spec, dict):
        spec = {"name": str(spec), "backend": "hf", "path": spec}
    name = spec.get("name") or spec.get("model") or "?"
    if spec.get("backend") == "openai":
        served = spec.get("model") or name
        if is_standin(served) or is_standin(name):
            return f"`{name}`: the project's offline stand-in server (a deterministic rule, NOT a language model)"
        where = "api.openai.com" if not (spec.get("base_url") or spec.get("base_urls")) else "an OpenAI-compatible server"
        return f"`{name}`: `{served}` through {where}"
    return f"`{name}`: {describe_folder(spec.get('path'))}"


def describe_folder(path) -> str:
    """Where a local model came from: a hub snapshot, a tiny untrained model, a packaged model, a stage."""
    if path is None:
        return "no path recorded"
    origin = hub_origin(path)
    if origin:
        return f"the hub's `{origin[1]}` (revision `{origin[2][:12]}`)"
    folder = Path(str(path))
    if (folder.parent / TINY_MANIFEST).is_file():
        return "a tiny randomly initialised model built by `pipeline/tiny.py` (untrained: its text is noise)"
    manifest = _read_json(folder / PACKAGED_MANIFEST)
    if isinstance(manifest, dict):
        hub_id = manifest.get("hub_id")
        return f"`{hub_id or manifest.get('name')}`, converted from `{manifest.get('source')}`"
    if folder.name == "model" and (folder.parent / "config.yaml").is_file():
        return f"the model trained by stage `{folder.parent.name}` of run `{folder.parent.parent.name}`"
    if is_hub_id(str(path)) and not folder.exists():
        return f"the hub's `{path}`"
    return f"a local model folder (`{folder.name}`)"


def _models(config: dict) -> list[str]:
    """The models a saved recipe names: pool entries, judges, policies, base and reward models."""
    lines: list[str] = []

    def walk(node, key: str) -> None:
        if isinstance(node, dict):
            if "backend" in node and "name" in node:
                lines.append(f"{key}: {describe_model(node)}")
                return
            if key.split(".")[-1] in ("model", "reward_model") and isinstance(node.get("stage"), str):
                run = f" of run `{node['run']}`" if node.get("run") else ""
                lines.append(f"{key}: the `{node.get('output')}` output of stage `{node['stage']}`{run}")
                return
            for name, value in node.items():
                walk(value, f"{key}.{name}" if key else name)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{key}[{i}]")
        elif isinstance(node, str) and key.split(".")[-1] in ("model", "reward_model") and not key.startswith("run"):
            lines.append(f"{key}: {describe_folder(node)}")

    walk({k: v for k, v in config.items() if k not in ("run", "launch", "stage")}, "")
    return lines


def _licence_of(value: str) -> str | None:
    """What the run knows of the licence of one input file, folder or model (None: not an input)."""
    origin = hub_origin(value)
    if origin is None and is_hub_id(value) and not Path(value).exists():  # an id the stage read from the cache
        from pipeline.hub import cached

        snapshot = cached(value, "model") or cached(value, "dataset")
        origin = hub_origin(snapshot) if snapshot else None
        value = str(snapshot) if snapshot else value
    if origin:
        readme = Path(value) / "README.md"
        licence = _card_licence(readme)
        return f"`{origin[1]}` ({origin[0]} on the hub): " + (licence or "its card states no licence")
    folder = Path(value)
    if not folder.exists():
        return None
    manifest = _read_json(folder / PACKAGED_MANIFEST)
    if isinstance(manifest, dict):
        return f"`{manifest.get('hub_id') or manifest.get('name')}`: {manifest.get('licence') or 'not recorded'}"
    if (folder.parent / TINY_MANIFEST).is_file():
        return None  # built here from nothing: no upstream licence
    parts = folder.resolve().parts
    if "samples" in parts and "data" in parts:
        return f"`{'/'.join(parts[parts.index('data'):])}`: sample rows written for this project"
    if "public" in parts and "cache" in parts:
        from pipeline.formats.fetch import SOURCES

        name = parts[parts.index("public") + 1] if parts.index("public") + 1 < len(parts) else ""
        if name in SOURCES:
            return f"`{name}` ({SOURCES[name].package}=={SOURCES[name].version}): {SOURCES[name].licence}"
    return None


def _card_licence(readme: Path) -> str | None:
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:
        return None
    licence = meta.get("license") if isinstance(meta, dict) else None
    return str(licence) if licence else None


def _input_values(config: dict) -> list[str]:
    """Every plain string a saved recipe gives as an input or a model path (not stage refs)."""
    out: list[str] = []

    def walk(node, key: str) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                walk(value, name)
        elif isinstance(node, list):
            for value in node:
                walk(value, key)
        elif isinstance(node, str) and key in ("path", "dataset", "model", "reward_model", "hub", "items",
                                                "questions", "prompts", "annotations", "completions", "probe"):
            out.append(node)

    walk({k: v for k, v in config.items() if k not in ("run", "launch", "stage")}, "")
    return out


# --- the card -----------------------------------------------------------------------------------


def _scalars(tree, prefix: str = "") -> list[tuple[str, str]]:
    """Flattened (key, value) of the scalar leaves of a summary; long lists by their length."""
    if isinstance(tree, dict):
        rows: list[tuple[str, str]] = []
        for key, value in tree.items():
            if key in ("report", "input", "servers_per_model", "servers_this_run"):
                continue  # file names and server URLs: of this machine, not of the data
            rows += _scalars(value, f"{prefix}.{key}" if prefix else str(key))
        return rows
    if isinstance(tree, list):
        if len(tree) > 6 or any(isinstance(v, (dict, list)) for v in tree):
            return [(prefix, f"{len(tree)} items")]
        return [(prefix, ", ".join(_fmt(v) for v in tree))]
    return [(prefix, _fmt(tree))]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and value.startswith("/"):  # a path of this machine: its last parts only
        return ".../" + "/".join(Path(value).parts[-2:])
    return "-" if value is None else str(value)


def _table(rows: list[tuple[str, str]]) -> list[str]:
    if not rows:
        return []
    shown = rows[:MAX_NUMBERS]
    lines = ["| | |", "|---|---|"] + [f"| `{k}` | {v.replace('|', '/')} |" for k, v in shown]
    if len(rows) > len(shown):
        lines.append(f"| ... | {len(rows) - len(shown)} more in the stage's files |")
    return lines


def _stage_lines(step: str, folder: Path, counts_table: bool = True) -> list[str]:
    """What one stage of the chain did, in a few lines: its models and judge, filters, counts (the
    pushed stage's own counts are in the card's Numbers section instead)."""
    config, summary = _read_config(folder), _read_json(folder / "summary.json") or {}
    stage = config.get("stage", step)
    lines = [f"### `{step}`" + (f" (stage `{stage}`)" if stage != step else "")]
    if stage == "prompts":
        sources = (config.get("inputs") or {}).get("sources") or []
        lines.append("Sources: " + ", ".join(f"`{s.get('name')}`" for s in sources if isinstance(s, dict)) + ".")
        data = config.get("data") or {}
        evals = (config.get("inputs") or {}).get("eval_sets") or []
        lines.append(f"Filters: exact-duplicate removal {'on' if data.get('dedupe') else 'off'}; "
                     f"{len(evals)} evaluation set(s) for decontamination by {data.get('decontaminate_ngram')}-gram overlap.")
    if stage == "annotate":
        ann = config.get("annotation") or {}
        judge = summary.get("judge_model") or (ann.get("judge") or {}).get("name")
        label = (" -- the project's offline stand-in server: its ratings come from a deterministic rule on surface "
                 "features, NOT from a language model" if is_standin(judge) else "")
        lines.append(f"Judge: `{judge}`{label}; mode `{summary.get('mode', ann.get('mode'))}`, template version "
                     f"`{summary.get('template_version', '?')}`, critique {'on' if ann.get('critique') else 'off'}, "
                     f"position handling `{summary.get('position_debias', ann.get('position_debias'))}`, "
                     f"seed {summary.get('seed', ann.get('seed'))}.")
    if stage == "pairs":
        pairs = config.get("pairs") or {}
        lines.append(f"Pairing: strategy `{pairs.get('strategy')}` on `{summary.get('score_source', pairs.get('score'))}`, "
                     f"test fraction {pairs.get('test_fraction')}, TruthfulQA prompts "
                     f"{'removed' if pairs.get('remove_truthful_qa') else 'kept'}; "
                     f"{summary.get('ties_dropped', '?')} tied rows dropped.")
    if stage == "tiny-models":
        lines.append("Tiny untrained chat models built from nothing by `pipeline/tiny.py`.")
    train = config.get("train")
    if isinstance(train, dict):
        length = f"{train.get('max_steps')} steps" if (train.get("max_steps") or -1) > 0 else f"{train.get('epochs')} epoch(s)"
        lines.append(f"Training: {length}, learning rate {train.get('learning_rate')} ({train.get('lr_scheduler')}), "
                     f"global batch {train.get('global_batch_size')}, max length {train.get('max_length')}, "
                     + ("LoRA adapters" if train.get("lora") else "all weights") + f", seed {train.get('seed')}.")
    models = _models(config)
    if models and stage != "annotate":
        lines.append("Models:")
        lines += [f"- {m}" for m in models]
    elif stage == "annotate":
        lines += [f"- {m}" for m in models if not m.startswith("annotation.judge")]
    counts = [(k, v) for k, v in _scalars(summary) if not k.startswith(("tokens", "seconds", "cost"))]
    if counts and counts_table:
        lines.append("")
        lines += _table(counts[:12]) + ([f"| ... | see its summary.json |"] if len(counts) > 12 else [])
    return lines


def _uses_standin(chain: list[tuple[str, str, Path]]) -> bool:
    for _, _, folder in chain:
        if any("stand-in" in m for m in _models(_read_config(folder))):
            return True
        if is_standin((_read_json(folder / "summary.json") or {}).get("judge_model")):
            return True
    return False


def _front_matter(repo_type: str, licence: str, splits: list[str], base_models: list[str], datasets: list[str],
                  standin: bool) -> str:
    meta: dict = {"license": licence, "tags": ["rlhf", "rlhf-pipeline"] + (["synthetic"] if repo_type == "dataset" else [])}
    if standin:
        meta["tags"].append("stand-in-judge")
    if repo_type == "dataset":
        meta["configs"] = [{"config_name": "default",
                            "data_files": [{"split": s, "path": f"data/{s}-*.parquet"} for s in splits]}]
    else:
        meta["library_name"] = "transformers"
        if base_models:
            meta["base_model"] = base_models[0] if len(base_models) == 1 else base_models
    if datasets:
        meta["datasets"] = datasets
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def build_card(root: Path, run: str, step: str, output: str, repo: str, repo_type: str,
               splits: dict[str, int] | None = None) -> str:
    """The README.md for `output` of step `step` of run `run`, to be published as `repo`."""
    chain = upstream(root, run, step)
    folder = chain[0][2]
    config = _read_config(folder)
    stage = config.get("stage", step)
    summary, evaluation = _read_json(folder / "summary.json"), _read_json(folder / "eval.json")
    provenance = _read_json(folder / PROVENANCE) or {}
    standin = _uses_standin(chain)

    licences, base_models, hub_datasets = [], [], []
    for _, _, stage_folder in chain:
        stage_config = _read_config(stage_folder)
        for value in _input_values(stage_config):
            known = _licence_of(value)
            if known and known not in licences:
                licences.append(known)
            origin = hub_origin(value) or (("model" if stage_config.get("model") == value else "dataset", value, "")
                                           if is_hub_id(value) and "/" in value and not Path(value).exists() else None)
            if origin and origin[0] == "dataset" and origin[1] not in hub_datasets:
                hub_datasets.append(origin[1])
            if origin and origin[0] == "model" and stage_folder == folder and origin[1] not in base_models:
                base_models.append(origin[1])
    ids = {_SPDX.get(text.rsplit(": ", 1)[-1].strip().lower()) for text in licences}
    licence = ids.pop() if len(ids) == 1 and None not in ids else "other"

    what = "model" if repo_type == "model" else "dataset"
    lines = [_front_matter(repo_type, licence, list(splits or {}), base_models, hub_datasets, standin),
             f"# {repo.split('/')[-1]}", "",
             f"A {what} made by the `{stage}` stage of the rlhf-pipeline project (run `{run}`, output `{output}`). "
             "This card was generated from the run's own records by `rlhf push`.", ""]
    if standin:
        lines += ["> **Stand-in judge.** Some ratings, grades or completions behind this "
                  f"{what} come from the project's offline stand-in server, a deterministic rule on surface features "
                  "used for tests and demos. It is not a language model, and its labels carry no human or model "
                  "judgement: use this as a test artefact, not as preference data.", ""]
    if any(describe_folder(p).startswith("a tiny") for _, _, f in chain
           for p in _input_values(_read_config(f))):
        lines += ["> **Tiny models.** Some models in the chain are tiny and untrained (`pipeline/tiny.py`): "
                  "their text is noise that exercises the code, not content.", ""]
    if splits:
        lines += ["## Splits", "", "| split | rows |", "|---|---|"] + [f"| `{s}` | {n} |" for s, n in splits.items()] + [""]
    lines += ["## How it was made", "",
              "Each stage read only files written by the stage before it; the newest stage comes first."]
    for i, (_, chain_step, chain_folder) in enumerate(chain):
        lines += [""] + _stage_lines(chain_step, chain_folder, counts_table=i > 0)
    lines.append("")
    if summary or evaluation:
        lines += ["## Numbers", ""]
        if summary:
            lines += [f"From the `{step}` stage's `summary.json`:", ""] + _table(_scalars(summary)) + [""]
        if evaluation:
            lines += [f"The method check (`{step}`'s `eval.json`):", ""] + _table(_scalars(evaluation)) + [""]
    lines += ["## Licences of the inputs", ""]
    if licences:
        lines += [f"- {text}" for text in licences]
        lines += ["", "The licence in the metadata above is `other` unless every input states the same one; "
                  "check each input's own terms before reuse."]
    else:
        lines.append("The run records no licence for its inputs (local files or models built here); check them "
                     "before reuse.")
    lines.append("")
    git, packages = provenance.get("git") or {}, provenance.get("packages") or {}
    if git or packages:
        lines += ["## Provenance", ""]
        if git:
            dirty = {True: " (with uncommitted changes)", False: "", None: " (tree state unknown)"}[git.get("dirty")]
            lines.append(f"- code: git commit `{git.get('commit') or 'unknown'}`{dirty}")
        if packages:
            lines.append("- libraries: " + ", ".join(f"{k} {v}" for k, v in packages.items() if v))
        if provenance.get("python"):
            lines.append(f"- Python {provenance['python']}")
        lines.append("")
    lines += ["## Loading", "", "```python"]
    if repo_type == "dataset":
        lines += ["from datasets import load_dataset", "", f'data = load_dataset("{repo}")']
    else:
        archs = (_read_json(folder / output / "config.json") or {}).get("architectures") or []
        auto = ("AutoModelForSequenceClassification" if any(a.endswith("ForSequenceClassification") for a in archs)
                else "AutoModelForCausalLM")
        lines += [f"from transformers import {auto}, AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo}")', f'model = {auto}.from_pretrained("{repo}")']
    lines += ["```", ""]
    return redact("\n".join(lines))


# --- staging and uploading -------------------------------------------------------------------------


def _pick_output(folder: Path, output: str | None) -> str:
    if output is not None:
        if not (folder / output).is_dir():
            raise ConfigError(f"--output: {folder} has no {output}/ folder (it has: "
                              f"{', '.join(sorted(p.name for p in folder.iterdir() if p.is_dir())) or 'none'})")
        return output
    for name in OUTPUTS:
        if (folder / name).is_dir():
            return name
    raise ConfigError(f"{folder}: nothing to push: no model/, dataset/ or critique/ folder (stages that only "
                      "evaluate keep their numbers in eval.json and summary.json)")


def stage_upload(root: Path, run: str, step: str, repo: str, output: str | None = None) -> Upload:
    """Check the stage, write its card (and a dataset's parquet files) under <stage>/push/<output>/,
    and list what would be uploaded. Nothing leaves the machine here."""
    folder = root / run / step
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such stage folder (run {run!r}, stage {step!r})")
    if not is_done(folder):
        raise ConfigError(f"{folder}: stage {step!r} of run {run!r} has not finished (no {SUCCESS}); nothing to push")
    if not is_hub_id(repo) or "/" not in repo:
        raise ConfigError(f"--repo: {repo!r} is not a hub repo id (org/name)")
    output = _pick_output(folder, output)
    source = folder / output
    staging = folder / PUSH / output
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    files: dict[str, Path] = {}
    splits = None
    if (source / "config.json").is_file():
        repo_type = "model"
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            relative = path.relative_to(source)
            if relative.parts[0].startswith("checkpoint-") or relative.name.startswith("."):
                continue  # resume state, not the model
            files[relative.as_posix()] = path
    else:
        from datasets import Dataset, DatasetDict, load_from_disk

        repo_type = "dataset"
        try:
            data = load_from_disk(str(source))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"{source}: neither a model folder (no config.json) nor a `datasets` folder ({err})") from None
        if isinstance(data, Dataset):
            data = DatasetDict({"train": data})
        splits = {}
        for name, split in data.items():
            target = staging / "data" / f"{name}-00000-of-00001.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            split.to_parquet(str(target))
            files[f"data/{target.name}"] = target
            splits[name] = len(split)
    card = build_card(root, run, step, output, repo, repo_type, splits)
    (staging / "README.md").write_text(card, encoding="utf-8")
    files["README.md"] = staging / "README.md"
    return Upload(repo_type=repo_type, folder=staging, files=files, card=card)


def upload(plan: Upload, repo: str, token: str, private: bool, message: str) -> str:
    """Create the repo (if new) and commit every file of `plan` in one commit; the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)  # endpoint: HF_ENDPOINT, else the hub
    api.create_repo(repo, repo_type=plan.repo_type, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in plan.files.items()]
    info = api.create_commit(repo, operations=operations, commit_message=message, repo_type=plan.repo_type)
    return str(info.commit_url)


def main(run: str, step: str, repo: str, root: str = "data/runs", output: str | None = None, private: bool = False,
         dry_run: bool = False) -> int:
    import datasets

    datasets.disable_progress_bars()  # one "Creating parquet" bar per split would bury the file list
    plan = stage_upload(Path(root), run, step, repo, output)
    total = sum(p.stat().st_size for p in plan.files.values())
    print(f"{'would push' if dry_run else 'pushing'} {plan.repo_type} {repo}: {len(plan.files)} file(s), "
          f"{total / 1e6:.2f} MB (card and staged files: {plan.folder})")
    for name, path in plan.files.items():
        print(f"  {name}  ({path.stat().st_size:,} bytes)")
    if dry_run:
        return 0
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise ConfigError("HF_TOKEN is not set: a push needs a hub token with write access (or use --dry-run)")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ConfigError("HF_HUB_OFFLINE=1 (the Makefile's default) forbids talking to the hub: run the push with "
                          "HF_HUB_OFFLINE=0")
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = upload(plan, repo, token, private, message=f"rlhf push {run}/{step} ({plan.repo_type})")
    except HfHubHTTPError as err:
        # (huggingface_hub's messages name the URL and the server's reason, never the token)
        raise ConfigError(f"push to {repo}: the hub refused it: {str(err).splitlines()[0]}") from None
    print(f"pushed: {url}", file=sys.stdout)
    return 0
