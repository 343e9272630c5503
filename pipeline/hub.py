"""Local path or Hugging Face Hub id: the one place that decides what a named model or dataset is.

A recipe may name a model (`model: Qwen/Qwen2.5-0.5B-Instruct`, `generation.pool.0.path=...`) or an
input dataset (`inputs.dataset: HuggingFaceH4/ultrafeedback_binarized`) either by a local path or by
a hub id. `local_folder(name, key, kind)` turns either into a local folder:

- an existing file or folder is used as it is;
- a string shaped like a hub id (`org/name` or a bare `name`, no file suffix) is fetched into the
  Hugging Face cache with `snapshot_download` when the hub may be asked, or found in that cache when
  `HF_HUB_OFFLINE=1` (the Makefile's default; tests always run so); the cache's snapshot folder is
  returned, so every loader after this reads a plain local folder;
- anything else (`./x`, `/abs/x`, `a/b/c`, `prompts.jsonl`) keeps the old error, "no such file or
  folder", naming the recipe key.

A hub id that can be neither fetched nor found says which id, which recipe key, whether the hub was
asked, and how to get it. Models are fetched without the formats transformers never reads here
(GGUF, ONNX, TF/Flax weights; `.bin` weights when safetensors exist). A dataset snapshot is read
with `datasets.load_dataset` over its data files (`open_dataset`); our own stage outputs and any
`save_to_disk` folder are read with `load_from_disk` as before.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pipeline.config import ConfigError

Kind = Literal["model", "dataset"]

# One part of a repo id: letters, digits, '-', '_', '.', not starting or ending with '-' or '.',
# no '--' or '..' (the hub's own rule), at most 96 characters.
_PART = r"(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"(?:{_PART}/)?{_PART}")
# A name ending like a file is a missing file, not a repository.
_FILE_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".yaml", ".yml", ".arrow", ".gguf",
                  ".safetensors", ".bin", ".pt", ".pth", ".gz", ".zip", ".tar", ".md", ".py"}
# Recipe keys that are read as plain files (JSONL, parquet, a saved folder) and never through the hub.
_FILE_ONLY_KEYS = re.compile(r"(^|\.)(sources|eval_sets)\[\d+\]\.path$|^mtbench\.|^truthfulqa\.")
# What a model download leaves out: weights in formats transformers does not load here.
_MODEL_IGNORE = ["*.gguf", "*.onnx", "*.onnx_data", "onnx/*", "openvino/*", "coreml/*", "*.msgpack", "*.h5",
                 "*.tflite", "*.ot", "original/*"]


def is_hub_id(name: str) -> bool:
    """Whether `name` is shaped like a hub repo id (`org/name` or `name`), whatever exists locally."""
    if not isinstance(name, str) or name.startswith(("/", ".", "~")) or "\\" in name:
        return False
    if Path(name).suffix.lower() in _FILE_SUFFIXES:
        return False
    return _HUB_ID.fullmatch(name) is not None


def accepts_hub_id(key: str) -> bool:
    """Whether the recipe key `key` is resolved through this module (models and dataset inputs) rather
    than read as a plain file (prompt sources, QA sources, MT-bench questions)."""
    return _FILE_ONLY_KEYS.search(key) is None


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _missing(name: str, key: str) -> ConfigError:
    return ConfigError(f"{key}: no such file or folder: {name}")


def _not_found(name: str, key: str, kind: Kind, why: str) -> ConfigError:
    return ConfigError(f"{key}: no such file or folder: {name}, and as a Hugging Face Hub {kind} id: {why}")


def cached(name: str, kind: Kind) -> Path | None:
    """The snapshot folder of hub id `name` in the local cache (its `main` revision), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, repo_type=kind, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None


def _model_ignore_patterns(name: str) -> list[str]:
    """What to leave out of a model download; `.bin`/`.pt` weights too when the repo has safetensors."""
    from huggingface_hub import HfApi

    try:  # (repo_info lists the files in one call; list_repo_files would retry an unreachable hub for ~20 s)
        files = [s.rfilename for s in HfApi().repo_info(name, token=os.environ.get("HF_TOKEN") or None).siblings or []]
    except Exception:  # the download below reports the reason (not found, gated, unreachable)
        return _MODEL_IGNORE
    if any(f.endswith(".safetensors") for f in files):
        return [*_MODEL_IGNORE, "*.bin", "*.pt", "*.pth"]
    return _MODEL_IGNORE


def fetch(name: str, key: str, kind: Kind) -> Path:
    """The local snapshot folder of hub id `name`: downloaded (or refreshed) when the hub may be asked,
    else from the cache; ConfigError naming `name` and `key` when neither gives it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if offline():
        found = cached(name, kind)
        if found is None:
            raise _not_found(name, key, kind, f"not in the local cache ({cache_dir()}), and HF_HUB_OFFLINE=1 keeps "
                             "the hub from being asked (run with HF_HUB_OFFLINE=0 to download it, e.g. "
                             "`make ... HF_HUB_OFFLINE=0`, or fetch it first with `hf download`)")
        return found
    try:
        return Path(snapshot_download(name, repo_type=kind, token=os.environ.get("HF_TOKEN") or None,
                                      ignore_patterns=_model_ignore_patterns(name) if kind == "model" else None))
    except GatedRepoError:
        why = "the repository is gated; accept its terms on the hub and set HF_TOKEN"
    except RepositoryNotFoundError:
        why = "the hub has no such repository (or it is private and HF_TOKEN does not grant access)"
    except LocalEntryNotFoundError as err:  # the hub could not be reached and the cache lacks it
        why = f"the hub could not be reached and it is not in the local cache ({cache_dir()}): " \
              f"{str(err).splitlines()[0]}"
    except HfHubHTTPError as err:
        why = f"the hub refused it: {str(err).splitlines()[0]}"
    raise _not_found(name, key, kind, why)


def local_folder(name: str, key: str, kind: Kind) -> Path:
    """The local file or folder that the recipe value `name` (at recipe key `key`) names: the path itself
    when it exists, else the hub id's snapshot folder; ConfigError naming `key` otherwise."""
    path = Path(name)
    if path.exists():
        return path
    if not is_hub_id(name) or not accepts_hub_id(key):
        raise _missing(name, key)
    return fetch(name, key, kind)


def check_named(name: str, key: str) -> None:
    """`rlhf validate`'s check of a plain-string input (no download): an existing path; or a hub id
    that is in the cache (as a model or a dataset) or, when the hub may be asked, will be fetched when
    the stage starts. ConfigError naming `key` otherwise."""
    if Path(name).exists():
        return
    if not is_hub_id(name) or not accepts_hub_id(key):
        raise _missing(name, key)
    if offline() and cached(name, "model") is None and cached(name, "dataset") is None:
        raise _not_found(name, key, "model or dataset", f"not in the local cache ({cache_dir()}), and "
                         "HF_HUB_OFFLINE=1 keeps the hub from being asked (run with HF_HUB_OFFLINE=0 to "
                         "download it, or fetch it first with `hf download`)")


def hub_origin(path: Path | str) -> tuple[str, str, str] | None:
    """(kind, repo id, revision) when `path` is a snapshot folder of the hub cache, else None: how a
    model card names a hub input after it was resolved to a folder."""
    parts = Path(path).parts
    for i in range(len(parts) - 2):
        if parts[i + 1] == "snapshots" and "--" in parts[i]:
            kind, _, repo = parts[i].partition("--")
            if kind in ("models", "datasets"):
                return kind[:-1], repo.replace("--", "/"), parts[i + 2]
    return None


def is_hub_dataset_snapshot(path: Path) -> bool:
    """A hub dataset's snapshot folder (data files with split names), not a `save_to_disk` folder."""
    origin = hub_origin(path)
    return origin is not None and origin[0] == "dataset" and not (path / "dataset_dict.json").is_file() \
        and not (path / "state.json").is_file()


def open_dataset(path: Path | str):
    """A `datasets` folder (what `save_to_disk` wrote: our stage outputs) or a hub dataset's snapshot
    (its parquet / JSON files, split names from the file names): a DatasetDict or Dataset.
    Raises what `load_from_disk` raises (FileNotFoundError, ValueError) for anything else."""
    from datasets import load_from_disk

    path = Path(path)
    if not is_hub_dataset_snapshot(path):
        return load_from_disk(str(path))
    from datasets import load_dataset

    try:
        return load_dataset(str(path))
    except Exception as err:  # the files are there but are not a table datasets can read
        raise ValueError(f"the hub dataset's files cannot be read as a table "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
