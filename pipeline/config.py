"""Recipes: one YAML file per stage run, dotted overrides, typed and validated before any work.

A recipe names its stage (`stage: generate`), and the stage's config class (pydantic, unknown
keys forbidden) validates it. Errors are `ConfigError`s that name the file and the key; the CLI
turns them into one line and exit code 2. The resolved recipe is saved next to the stage output
with anything secret-looking redacted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """A recipe or input problem the user must fix; reported as one line, exit code 2."""


class Strict(BaseModel):
    # strict: YAML `true` or "3" where a number is meant (and 1 where a flag is) is a mistake to name,
    # not something to coerce; a float field still takes an integer.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


# --- shared sections -------------------------------------------------------------------------


def _folder_name(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
        raise ValueError("use letters, digits, '_', '.', '-' (it becomes a folder name)")
    return value


class RunSection(Strict):
    name: str = Field(description="Run name: outputs go to <root>/<name>/<step>/")
    root: str = Field("data/runs", description="Folder holding all runs")
    step: str | None = Field(None, description="This stage's folder in the run (default: the stage name); "
                             "lets one run hold two stages of one kind, e.g. `step: rtuning-sft` for an sft")

    _plain_names = field_validator("name", "step")(_folder_name)


class StageRef(Strict):
    """An explicit input: the output of the step `stage` of `run` (default: this recipe's run)."""

    stage: str = Field(description="The step's folder in the run: its stage name, or its `run.step`")
    run: str | None = None
    output: str = Field("dataset", description="Which output of that stage: dataset (default), critique "
                        "(pairs), model (training stages), tiny-a... (tiny-models)")


class ModelRef(StageRef):
    """A model input naming a stage: that stage's `model` output unless `output` says otherwise
    (`{stage: tiny-models, output: tiny-a}`)."""

    output: str = Field("model", description="Which output: model (training stages, default), tiny-a... (tiny-models)")


class LaunchSection(Strict):
    launcher: Literal["local", "slurm"] = Field(
        "local", description="local: run in this process; slurm: render sbatch scripts and submit them")
    num_shards: int = Field(1, ge=1, description="Shards of a data stage (each a separate job)")
    profile: str | None = Field(None, description="slurm: cluster profile, a name in recipes/slurm/ or a YAML path")
    nodes: int | None = Field(None, ge=1, description="slurm, training stages only: nodes (default: the profile's)")
    processes_per_node: int | None = Field(
        None, ge=1, description="training under slurm: processes per node (default: the profile's gpus_per_node, else 1)")
    accelerate: str | None = Field(
        None, description="training under slurm: accelerate config, ddp|zero2|zero3 (recipes/accelerate/) or a "
        "path; default ddp when more than one process")
    time: str | None = Field(None, description="slurm: time limit per job (default: the profile's)")

    @field_validator("time", mode="before")
    @classmethod
    def _slurm_time(cls, value: Any) -> Any:
        return slurm_time_limit(value)


# --- Slurm -------------------------------------------------------------------------------------
# A cluster profile is its own small YAML file (recipes/slurm/<name>.yaml), not part of a recipe:
# the same recipe runs on any cluster. A pipeline file lists stage recipes to run in order.

SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}")
SLURM_MEM = re.compile(r"\d+[KMGT]?")


def slurm_time_limit(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 2:00:00 as 7200 (base 60): minutes or seconds, nobody knows.
        raise ValueError(f"quote the time limit (\"2:00:00\") or write D-HH:MM:SS (0-02:00:00); "
                         f"unquoted, YAML reads H:MM:SS as a number ({value})")
    if value is not None and (not isinstance(value, str) or not SLURM_TIME.fullmatch(value)):
        raise ValueError("a Slurm time limit: \"minutes\", \"H:MM:SS\" or D-HH:MM:SS")
    return value


class PriceSpec(Strict):
    """Dollars per million tokens, as price lists state them."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class ModelSpec(Strict):
    """One model: an in-process transformers model or a model behind an OpenAI-compatible API."""

    name: str = Field(description="Name recorded in outputs (the `model` field of a completion)")
    backend: Literal["hf", "openai"]
    # hf
    path: ModelRef | str | None = Field(None, description="hf: a local model folder, a Hugging Face Hub id "
                                        "(org/name: from the hub cache, downloaded unless HF_HUB_OFFLINE=1), "
                                        "or a stage's model ({stage: sft, output: model}; resolved when the "
                                        "stage starts)")
    batch_size: int = Field(8, ge=1, description="hf: prompts per generate() call")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="hf: 'auto' (cuda when present), 'cpu', 'cuda:0'")
    system_role: Literal["auto", "system", "fold"] = Field(
        "auto",
        description="Where the principle goes: a system turn, folded into the first user turn, "
        "or auto (system when the chat template accepts one)",
    )
    # openai
    model: ModelRef | str | None = Field(
        None, description="openai: model id at the server (default: name); a stage reference names a model "
        "folder, sent as its absolute path (what `transformers serve` loads a model by)")
    base_url: str | None = Field(None, description="openai: server URL; None = api.openai.com")
    base_urls: list[str] | None = Field(
        None, min_length=1, description="openai: several servers of the same model (a fleet, instead of "
        "base_url): each request goes to the healthy one with the fewest in flight (pipeline.llm.fleet)")
    base_url_file: str | list[str] | None = Field(
        None, description="openai: a file holding the server URL, read into base_url when the stage starts "
        "(an `rlhf serve` job writes it once its server answers); a list of files makes a fleet, read into "
        "base_urls")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: env variable holding the key")
    max_concurrency: int = Field(8, ge=1, description="openai: requests in flight at once")
    timeout_s: float = Field(120.0, gt=0, description="openai: per-request timeout (client's own)")
    max_retries: int = Field(3, ge=0, description="openai: client's own retries (5xx, 429, timeouts)")
    set_aside_after: int = Field(3, ge=1, description="openai, several servers: a server whose requests fail "
                                 "this many times in a row (connection error, timeout, 5xx) is set aside")
    set_aside_s: float = Field(30.0, gt=0, description="openai, several servers: how long a server set aside "
                               "gets no requests before it is tried again")
    # openai spending controls (pipeline.llm.spend): the same in every stage that sends paid calls
    requests_per_minute: float | None = Field(None, gt=0, description="openai: client-side request throttle")
    tokens_per_minute: float | None = Field(None, gt=0, description="openai: client-side token throttle "
                                            "(prompt estimate + max_new_tokens per request)")
    price: PriceSpec | None = Field(None, description="openai: dollars per million prompt / completion tokens; "
                                    "needed for cost and budget_usd")
    budget_usd: float | None = Field(None, gt=0, description="openai: stop cleanly before this model's spend in "
                                     "this stage (all runs, from its ledger) would pass this many dollars")

    @model_validator(mode="after")
    def _backend_fields(self) -> "ModelSpec":
        if self.backend == "hf":
            paid = [k for k in ("requests_per_minute", "tokens_per_minute", "price", "budget_usd")
                    if getattr(self, k) is not None]
            if paid:
                raise ValueError(f"model {self.name!r}: {', '.join(paid)}: spending controls apply to backend "
                                 "'openai' only (an hf model runs here, unpaid)")
        if self.budget_usd is not None and self.price is None:
            raise ValueError(f"model {self.name!r}: budget_usd is set but price is not (give price.input_per_mtok "
                             "and price.output_per_mtok)")
        if self.backend == "hf" and not self.path:
            raise ValueError(f"model {self.name!r}: backend 'hf' needs `path` (a local model folder or a hub id)")
        if self.base_urls is not None and self.base_url is not None:
            raise ValueError(f"model {self.name!r}: base_urls: give one server as base_url or several as "
                             "base_urls, not both")
        if isinstance(self.base_url_file, list) and self.base_url is not None:
            raise ValueError(f"model {self.name!r}: base_url_file: a list of URL files makes a fleet (read into "
                             "base_urls), so base_url must be left out")
        if isinstance(self.base_url_file, str) and self.base_urls is not None:
            raise ValueError(f"model {self.name!r}: base_url_file: one URL file names one server (read into "
                             "base_url), so base_urls must be left out; list several files instead")
        if isinstance(self.base_url_file, list) and not self.base_url_file:
            raise ValueError(f"model {self.name!r}: base_url_file: the list of URL files is empty")
        return self

    @property
    def servers(self) -> list[str | None]:
        """The server URLs requests may go to (None: api.openai.com)."""
        return list(self.base_urls) if self.base_urls else [self.base_url]


def check_judge_section(section, where: str) -> None:
    """The checks every judge section (annotate's `annotation`, evaluate's grading judge) shares:
    an openai-backend judge, spending controls set on the section and not on the judge's spec (the
    judge session reads the section's; the spec's would be silently ignored), and a price for the
    judge model when a budget is set. `section` has `judge`, `budget_usd` and `price`."""
    if section.judge.backend != "openai":
        raise ValueError("judge: the judge must use backend 'openai' (any OpenAI-compatible server)")
    for key in ("requests_per_minute", "tokens_per_minute", "price", "budget_usd"):
        if getattr(section.judge, key) is not None:
            raise ValueError(f"judge.{key}: set the judge's spending controls on {where} "
                             "(requests_per_minute, tokens_per_minute, prices, budget_usd)")
    if section.budget_usd is not None and section.price is None:
        raise ValueError(f"budget_usd is set but `prices` has no entry for judge model "
                         f"{section.judge.model or section.judge.name!r}: the spend cannot be counted")


# --- stage configs ---------------------------------------------------------------------------


# --- training ----------------------------------------------------------------------------------


def local_paths(**named) -> list[tuple[str, str]]:
    """(recipe key, path) for the inputs given as plain paths (stage refs are checked at run time)."""
    return [(key, value) for key, value in named.items() if isinstance(value, str)]


class LoraSection(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    top_layers: int | None = Field(None, ge=1, description="Adapters only on the last N transformer layers "
                                   "(PEFT layers_to_transform): backpropagation then stops below them, which is "
                                   "most of a small model's training time on a CPU; None = every layer")


# transformers' SchedulerType values (kept here so `rlhf validate` needs no transformers import;
# tests/unit/test_config.py checks they match)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay", "greedy")


class TrainSection(Strict):
    """What every training stage shares; the stage's own section holds the method's knobs."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="> 0: stop after this many optimizer steps (overrides epochs); "
                           "-1: train for `epochs`")
    global_batch_size: int = Field(8, ge=1, description="Sequences (pairs) per optimizer step over all "
                                   "processes; gradient accumulation = global / (processes x per-device)")
    per_device_batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler: Literal[LR_SCHEDULERS] = Field(  # type: ignore[valid-type]
        "cosine", description="transformers scheduler name (linear, cosine, constant, ...)")
    min_learning_rate: float | None = Field(None, ge=0, description="cosine decays to this (cosine_with_min_lr)")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(1024, ge=8,
                            description="Tokens per sequence; TRL truncates (SFT, DPO) or drops (reward) longer ones")
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, else fp32")
    gradient_checkpointing: bool = False
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(200, ge=1, description="Checkpoint every N steps (a killed run resumes from the last)")
    save_total_limit: int = Field(2, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps; None = at the end only")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"], description="wandb needs WANDB_API_KEY in the environment")
    lora: LoraSection | None = Field(None, description="Train LoRA adapters instead of all weights")
    deepspeed: str | None = Field(None, description="DeepSpeed JSON config (usually set by the accelerate config)")
    trl: dict[str, Any] = Field(
        default_factory=dict, description="Any other field of the stage's TRL config class (SFTConfig, DPOConfig, "
        "...), handed over as is after the fields derived above; `rlhf validate` checks names and values")

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, value: int) -> int:
        # transformers reads 0 as "no limit" and then still takes a step; say what was meant instead
        if value == 0 or value < -1:
            raise ValueError("use a number of steps above 0, or -1 to train for `epochs`")
        return value


class TrainInputs(Strict):
    dataset: StageRef | str = Field(description="Training data: a stage output, a `datasets` folder, or a "
                                    "Hugging Face Hub dataset id (org/name)")
    train_split: str = "train"
    eval_split: str | None = "test"


def preference_defaults(tree: Any, train_split: str | None, eval_split: str | None) -> Any:
    """Split-name defaults for a stage that reads our `pairs` output."""
    if not isinstance(tree, dict):
        return tree
    tree = dict(tree)
    inputs = tree.get("inputs")
    if isinstance(inputs, dict):
        inputs = dict(inputs)
        if train_split is not None:
            inputs.setdefault("train_split", train_split)
        inputs.setdefault("eval_split", eval_split)
        tree["inputs"] = inputs
    return tree


# --- R-Tuning ----------------------------------------------------------------------------------


class RtuningModelSection(Strict):
    """How the R-Tuning stages run a local model (in-process transformers, greedy unless said)."""

    batch_size: int = Field(8, ge=1, description="Questions per forward / generate() call")
    max_new_tokens: int = Field(15, ge=1, description="Open QA answer length (cut at the first period)")
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu', 'cuda:0'")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    limit: int | None = Field(None, ge=1, description="Use only the first N items of each split (smoke runs)")


# --- QA data (R-Tuning, UnknownBench, SaySelf) ----------------------------------------------


# --- SaySelf -----------------------------------------------------------------------------------


# --- loading ---------------------------------------------------------------------------------


def set_dotted(tree: dict, dotted: str, value: Any, origin: str) -> None:
    # `sources[0].path` (the form error messages print) and `sources.0.path` are the same key
    parts = re.sub(r"\[(\d+)\]", r".\1", dotted).split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{origin}: `{dotted}`: {'.'.join(parts[:i]) or 'recipe'} is a list; "
                                  f"use an index below {len(node)}")
            part = int(part)  # type: ignore[assignment]
        elif not isinstance(node, dict):
            raise ConfigError(f"{origin}: `{dotted}`: {'.'.join(parts[:i])} is not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. generation.temperature=0.7)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.load(raw, Loader=RecipeLoader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _error_location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "StageRef", "function-after[_one_location(), SourceSpec]"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "recipe"


def format_validation_error(origin: str, err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        loc = _error_location(item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
        elif item["type"] == "missing":
            lines.append(f"{loc}: required key is missing")
        else:
            msg = item["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg} (got {item.get('input')!r})" if "input" in item and not isinstance(item.get("input"), dict) else f"{loc}: {msg}")
    # pydantic reports each union branch separately; keep each message once, in order
    unique = list(dict.fromkeys(lines))
    return f"{origin}: " + "; ".join(unique)


class RecipeLoader(yaml.SafeLoader):
    """safe_load, except that `1e-5` is a float as in YAML 1.2 (PyYAML's YAML 1.1 wants `1.0e-5`
    and would hand the strict recipe classes a string)."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"),
    list("-+0123456789."))


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document in `path`; a missing file or bad YAML is a ConfigError naming the file
    (and the line, where the parser knows it)."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); "
                          "save the file as UTF-8") from None
    try:
        return yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None


def read_recipe_tree(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A recipe file as a mapping with the dotted overrides applied (validated by its stage's class:
    `pipeline.stages.load_recipe`)."""
    path = Path(path)
    tree = read_yaml(path, "recipe")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping with a `stage:` key")
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value, str(path))
    return tree


# --- saving ----------------------------------------------------------------------------------

# A key is secret when one of the words of its name says so (`api_key`, `hf_token`, `db-password`,
# `clientSecret`); `max_new_tokens` or `tokenizer` are not (the words are `tokens`, `tokenizer`).
_SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "authorization", "credential",
                 "credentials"}
# Keys that *name* where a secret lives are not secrets themselves.
_SECRET_NAME_KEY = re.compile(r"_env$", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_-]{8,}|hf_[A-Za-z0-9]{8,})")
# user:password@ (or a lone token@) in a URL: scheme://<userinfo>@host
_URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
# ?api_key=... / &token=... in a query string
_URL_QUERY_SECRET = re.compile(r"([?&][^=&#\s]*(?:key|token|secret|password)[^=&#\s]*=)[^&#\s]+", re.IGNORECASE)


def secret_key(name: str) -> bool:
    if _SECRET_NAME_KEY.search(name):
        return False
    words = re.split(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])", name)
    return any(word.lower() in _SECRET_WORDS for word in words)


def redact(tree: Any) -> Any:
    """`tree` (a mapping, list or string) with secrets replaced by <redacted>: the value of every key
    whose name says key/token/secret/password, credentials inside URLs, and API-key-shaped strings.
    config.yaml, log lines, Slurm scripts and the run report all pass through it."""
    if isinstance(tree, dict):
        return {k: ("<redacted>" if secret_key(str(k)) and v not in (None, "") else redact(v))
                for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact(v) for v in tree]
    if isinstance(tree, str):
        text = _SECRET_VALUE.sub("<redacted>", tree)
        return _URL_QUERY_SECRET.sub(r"\1<redacted>", _URL_USERINFO.sub(r"\1<redacted>@", text))
    return tree


def dump_recipe(recipe: BaseModel) -> str:
    return yaml.safe_dump(redact(recipe.model_dump(mode="json")), sort_keys=False)
