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
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --- shared sections -------------------------------------------------------------------------


class RunSection(Strict):
    name: str = Field(description="Run name: outputs go to <root>/<name>/<stage>/")
    root: str = Field("data/runs", description="Folder holding all runs")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError("use letters, digits, '_', '.', '-' (it becomes a folder name)")
        return value


class StageRef(Strict):
    """An explicit input: the output of `stage` in `run` (default: this recipe's run)."""

    stage: str
    run: str | None = None
    output: str = Field("dataset", description="Which output of that stage: dataset (default), "
                        "critique (pairs), model (training stages)")


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
        return _slurm_time_limit(value)


# --- Slurm -------------------------------------------------------------------------------------
# A cluster profile is its own small YAML file (recipes/slurm/<name>.yaml), not part of a recipe:
# the same recipe runs on any cluster. A pipeline file lists stage recipes to run in order.

_SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}")
_SLURM_MEM = re.compile(r"\d+[KMGT]?")


def _slurm_time_limit(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 2:00:00 as 7200 (base 60): minutes or seconds, nobody knows.
        raise ValueError(f"quote the time limit (\"2:00:00\") or write D-HH:MM:SS (0-02:00:00); "
                         f"unquoted, YAML reads H:MM:SS as a number ({value})")
    if value is not None and (not isinstance(value, str) or not _SLURM_TIME.fullmatch(value)):
        raise ValueError("a Slurm time limit: \"minutes\", \"H:MM:SS\" or D-HH:MM:SS")
    return value


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
        return _slurm_time_limit(value)

    @field_validator("mem")
    @classmethod
    def _slurm_mem(cls, value: str | None) -> str | None:
        if value is not None and not _SLURM_MEM.fullmatch(value):
            raise ValueError("a Slurm memory size such as 64G or 16000M")
        return value

    @field_validator("env")
    @classmethod
    def _no_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if _SECRET_KEY.search(name) or name.upper().endswith("KEY"):
                raise ValueError(f"{name}: looks like a secret; export it in the submitting shell instead "
                                 "(sbatch passes the environment on; a rendered script never holds it)")
        return value


class PipelineStep(Strict):
    recipe: str = Field(description="A stage recipe (YAML path)")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides for this stage")


class PipelineFile(Strict):
    """`rlhf all PIPELINE`: stage recipes in order; each later stage names its inputs by stage."""

    stages: list[PipelineStep] = Field(min_length=1)

    @field_validator("stages", mode="before")
    @classmethod
    def _plain_paths(cls, value: Any) -> Any:
        # A bare path is shorthand for {recipe: path}.
        return [{"recipe": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


class ServedModel(Strict):
    name: str = Field(description="The name clients ask for (a pool entry's `model`, or `name`); the URL file's name")
    model: str = Field(description="What vLLM loads: a Hugging Face id or a model folder on the cluster")
    gpus: int = Field(1, ge=1, description="GPUs of one node, the tensor-parallel size")
    args: list[str] = Field(default_factory=list, description="More `vllm serve` arguments (--max-model-len, 4096)")

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
        return _slurm_time_limit(value)


class ModelSpec(Strict):
    """One model: an in-process transformers model or a model behind an OpenAI-compatible API."""

    name: str = Field(description="Name recorded in outputs (the `model` field of a completion)")
    backend: Literal["hf", "openai"]
    # hf
    path: str | None = Field(None, description="hf: local model folder")
    batch_size: int = Field(8, ge=1, description="hf: prompts per generate() call")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="hf: 'auto' (cuda when present), 'cpu', 'cuda:0'")
    system_role: Literal["auto", "system", "fold"] = Field(
        "auto",
        description="Where the principle goes: a system turn, folded into the first user turn, "
        "or auto (system when the chat template accepts one)",
    )
    # openai
    model: str | None = Field(None, description="openai: model id at the server (default: name)")
    base_url: str | None = Field(None, description="openai: server URL; None = api.openai.com")
    base_url_file: str | None = Field(None, description="openai: a file holding the server URL, read into "
                                      "base_url when the stage starts (an `rlhf serve` job writes it once its "
                                      "server answers)")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: env variable holding the key")
    max_concurrency: int = Field(8, ge=1, description="openai: requests in flight at once")
    timeout_s: float = Field(120.0, gt=0, description="openai: per-request timeout (client's own)")
    max_retries: int = Field(3, ge=0, description="openai: client's own retries (5xx, 429, timeouts)")

    @model_validator(mode="after")
    def _backend_fields(self) -> "ModelSpec":
        if self.backend == "hf" and not self.path:
            raise ValueError(f"model {self.name!r}: backend 'hf' needs `path` (a local model folder)")
        return self


# --- stage configs ---------------------------------------------------------------------------

SOURCE_FORMATS = ("evol_instruct", "false_qa", "flan", "sharegpt", "truthful_qa", "ultrachat", "generic")


class SourceSpec(Strict):
    name: str = Field(description="Source label written to each prompt's `source`")
    path: str | None = Field(None, description="Local JSONL, parquet or `datasets` folder")
    hub: str | None = Field(None, description="Hub dataset name (only when online)")
    split: str = "train"
    format: Literal[SOURCE_FORMATS] | None = Field(  # type: ignore[valid-type]
        None, description="Row shape; default: the source name when it is a known shape"
    )
    sample: int | None = Field(None, ge=1, description="Keep this many (seeded); None = all")
    max_words: int | None = Field(None, ge=1, description="Drop instructions longer than this")

    @model_validator(mode="after")
    def _one_location(self) -> "SourceSpec":
        if (self.path is None) == (self.hub is None):
            raise ValueError(f"source {self.name!r}: give exactly one of `path` or `hub`")
        if self.format is None and self.name not in SOURCE_FORMATS:
            raise ValueError(
                f"source {self.name!r}: set `format` (one of {', '.join(SOURCE_FORMATS)})"
            )
        return self

    @property
    def row_format(self) -> str:
        return self.format or self.name


class EvalSetSpec(Strict):
    path: str
    fields: list[str] = Field(default_factory=lambda: ["question"], description="Text fields to index")


class PromptsInputs(Strict):
    sources: list[SourceSpec] = Field(min_length=1)
    eval_sets: list[EvalSetSpec] = Field(default_factory=list)


class PromptsData(Strict):
    seed: int = 0
    dedupe: bool = True
    decontaminate_ngram: int = Field(13, ge=1, description="n of the n-gram overlap filter")


class PromptsRecipe(Strict):
    stage: Literal["prompts"]
    run: RunSection
    inputs: PromptsInputs
    data: PromptsData = PromptsData()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        files = [(f"inputs.sources[{i}].path", s.path) for i, s in enumerate(self.inputs.sources) if s.path]
        files += [(f"inputs.eval_sets[{i}].path", e.path) for i, e in enumerate(self.inputs.eval_sets)]
        return files


class GenerateInputs(Strict):
    prompts: StageRef | str = Field(description="The prompts stage output, or a dataset path")


class GenerationSection(Strict):
    pool: list[ModelSpec] = Field(min_length=1)
    models_per_prompt: int = Field(4, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(1024, ge=1)
    seed: int = 0
    principle_mix: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Per-source principle weights; overrides the defaults"
    )
    max_failure_fraction: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _pool_fits(self) -> "GenerationSection":
        names = [m.name for m in self.pool]
        if len(set(names)) != len(names):
            raise ValueError("pool: model names must be unique")
        if self.models_per_prompt > len(self.pool):
            raise ValueError(
                f"models_per_prompt={self.models_per_prompt} but the pool has {len(self.pool)} models"
            )
        from pipeline.methods.principles import validate_mix

        for source, mix in self.principle_mix.items():
            try:
                validate_mix(mix)
            except ValueError as err:
                raise ValueError(f"principle_mix.{source}: {err}") from None
        return self


class GenerateRecipe(Strict):
    stage: Literal["generate"]
    run: RunSection
    inputs: GenerateInputs
    generation: GenerationSection
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        files = [
            (f"generation.pool[{i}].path", m.path) for i, m in enumerate(self.generation.pool) if m.path
        ]
        if isinstance(self.inputs.prompts, str):
            files.append(("inputs.prompts", self.inputs.prompts))
        return files


class PriceSpec(Strict):
    """Dollars per million tokens, as price lists state them."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class AnnotateInputs(Strict):
    completions: StageRef | str = Field(
        description="The generate stage output, or a dataset folder / JSONL / parquet in the "
        "openbmb/UltraFeedback row shape"
    )


class AnnotationSection(Strict):
    judge: ModelSpec = Field(description="The judge: an `openai`-backend model")
    mode: Literal["faithful", "structured", "compact"] = Field(
        "faithful", description="faithful: a call per aspect (UltraFeedback); structured: the same "
        "calls answered as JSON with a schema; compact: one call for all four aspects"
    )
    critique: bool = Field(True, description="One critique call per completion (overall score 1-10)")
    temperature: float = Field(0.0, ge=0, le=2)
    aspect_max_tokens: int = Field(1024, ge=16)
    critique_max_tokens: int = Field(1024, ge=16)
    seed: int = Field(0, description="Seeds the order in which completions are shown to the judge")
    max_reasks: int = Field(2, ge=0, description="Re-asks (with a corrective message) after an unusable answer")
    max_failure_fraction: float = Field(0.05, ge=0, le=1)
    requests_per_minute: float | None = Field(None, gt=0, description="Client-side request throttle")
    tokens_per_minute: float | None = Field(None, gt=0, description="Client-side token throttle")
    budget_usd: float | None = Field(None, gt=0, description="Stop cleanly once this much is spent")
    prices: dict[str, PriceSpec] = Field(
        default_factory=dict, description="Judge model id -> price; needed for cost and budget"
    )
    allow_unknown_sources: bool = Field(False, description="Accept sources other than UltraFeedback's")
    batch_poll_s: float = Field(30.0, gt=0, description="Batch API: seconds between status checks")
    batch_max_requests: int = Field(50_000, ge=1, description="Batch API: requests per input file")
    batch_max_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="Batch API: bytes per input file")

    @model_validator(mode="after")
    def _judge_is_remote(self) -> "AnnotationSection":
        if self.judge.backend != "openai":
            raise ValueError("judge: the judge must use backend 'openai' (any OpenAI-compatible server)")
        if self.budget_usd is not None and self.price is None:
            raise ValueError(f"budget_usd is set but `prices` has no entry for judge model "
                             f"{self.judge_model!r}: the spend cannot be counted")
        return self

    @property
    def judge_model(self) -> str:
        return self.judge.model or self.judge.name

    @property
    def price(self) -> PriceSpec | None:
        return self.prices.get(self.judge_model)


class AnnotateRecipe(Strict):
    stage: Literal["annotate"]
    run: RunSection
    inputs: AnnotateInputs
    annotation: AnnotationSection
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return [("inputs.completions", self.inputs.completions)] if isinstance(self.inputs.completions, str) else []


class PairsInputs(Strict):
    annotations: StageRef | str = Field(
        description="The annotate stage output, or a dataset folder / JSONL / parquet in the "
        "openbmb/UltraFeedback row shape"
    )


class PairsSection(Strict):
    strategy: Literal["h4", "argilla", "all"] = Field(
        "h4", description="h4: best vs a random other; argilla: best vs a random strictly lower "
        "(ties dropped); all: every pair with a score gap"
    )
    score: Literal["overall", "fine-grained"] = "overall"
    remove_truthful_qa: bool = Field(False, description="Drop prompts from TruthfulQA (it is also an eval set)")
    test_fraction: float = Field(0.05, ge=0, lt=1, description="Share of prompts held out for test_* splits")
    seed: int = 0
    critique_export: bool = Field(True, description="Also write the critique SFT data (for UltraCM)")


class PairsRecipe(Strict):
    stage: Literal["pairs"]
    run: RunSection
    inputs: PairsInputs
    pairs: PairsSection = PairsSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return [("inputs.annotations", self.inputs.annotations)] if isinstance(self.inputs.annotations, str) else []


class TinyModelsRecipe(Strict):
    stage: Literal["tiny-models"]
    run: RunSection
    count: int = Field(4, ge=1, le=8, description="Models in the pool")
    seed: int = 0
    launch: LaunchSection = LaunchSection()


# --- training ----------------------------------------------------------------------------------


def _local_paths(**named) -> list[tuple[str, str]]:
    """(recipe key, path) for the inputs given as plain paths (stage refs are checked at run time)."""
    return [(key, value) for key, value in named.items() if isinstance(value, str)]


class LoraSection(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainSection(Strict):
    """What every training stage shares; the stage's own section holds the method's knobs."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="> 0: stop after this many optimizer steps (overrides epochs)")
    global_batch_size: int = Field(8, ge=1, description="Sequences (pairs) per optimizer step over all "
                                   "processes; gradient accumulation = global / (processes x per-device)")
    per_device_batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler: str = Field("cosine", description="transformers scheduler name (linear, cosine, constant, ...)")
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


class TrainInputs(Strict):
    dataset: StageRef | str = Field(description="Training data: a stage output or a `datasets` folder")
    train_split: str = "train"
    eval_split: str | None = "test"


class SftSection(Strict):
    assistant_only_loss: bool = Field(True, description="Loss on assistant tokens only (needs generation tags)")


class SftRecipe(Strict):
    stage: Literal["sft"]
    run: RunSection
    model: str = Field(description="Base model folder")
    inputs: TrainInputs
    train: TrainSection = TrainSection()
    sft: SftSection = SftSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return _local_paths(model=self.model, **{"inputs.dataset": self.inputs.dataset})


class RewardSource(Strict):
    """One preference dataset of the reward mixture."""

    name: str = Field(description="Label in the accuracy table")
    dataset: StageRef | str
    format: Literal["pairs", "anthropic_hh", "shp", "summarize"] = Field(
        "pairs", description="pairs: our `pairs` output (or any chosen/rejected conversations)")
    train_split: str = "train_prefs"
    eval_split: str | None = "test_prefs"
    train_size: int | None = Field(None, ge=1, description="Sample this many training pairs (seeded); None = all")
    eval_size: int | None = Field(None, ge=1)
    use_margin: bool = Field(True, description="Pass the margin column to the loss (0 when the source has none)")


class RewardSection(Strict):
    sources: list[RewardSource] = Field(min_length=1)


class RewardRecipe(Strict):
    stage: Literal["reward"]
    run: RunSection
    model: str = Field(description="Base model folder; a linear score head is added")
    train: TrainSection = TrainSection()
    reward: RewardSection
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return _local_paths(model=self.model, **{f"reward.sources[{i}].dataset": s.dataset
                                                 for i, s in enumerate(self.reward.sources)})


class DpoSection(Strict):
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model")
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero",
                       "apo_down", "exo_pair", "aot", "aot_unpaired", "discopop", "sigmoid_norm"] = Field(
        "sigmoid", description="TRL DPO loss type (sigmoid = the DPO paper's loss)")


def _preference_defaults(tree: Any, train_split: str | None, eval_split: str | None, model_keys: tuple) -> Any:
    """Defaults for a stage that reads our `pairs` output: its split names, and `output: model` for a
    stage ref that names a model (a bare ref otherwise means a stage's *dataset*)."""
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
    for dotted in model_keys:  # "model" or "section.key"; copies, so the caller's dict stays as it was
        section, _, key = dotted.rpartition(".")
        node = dict(tree[section]) if section and isinstance(tree.get(section), dict) else tree
        if isinstance(node.get(key), dict):
            node[key] = {"output": "model", **node[key]}
        if section and node is not tree:
            tree[section] = node
    return tree


class DpoRecipe(Strict):
    stage: Literal["dpo"]
    run: RunSection
    model: StageRef | str = Field(description="Policy to start from (usually the sft stage's model)")
    inputs: TrainInputs
    train: TrainSection = TrainSection()
    dpo: DpoSection = DpoSection()
    launch: LaunchSection = LaunchSection()

    @model_validator(mode="before")
    @classmethod
    def _pairs_defaults(cls, tree: Any) -> Any:
        # DPO reads the pairs stage's preference splits unless told otherwise.
        return _preference_defaults(tree, "train_prefs", "test_prefs", ("model",))

    def input_files(self) -> list[tuple[str, str]]:
        return _local_paths(model=self.model, **{"inputs.dataset": self.inputs.dataset})


class PpoSection(Strict):
    reward_model: StageRef | str = Field(description="The reward stage's model (its value head starts from it)")
    samples_per_iteration: int = Field(512, ge=1, description="Rollouts per PPO iteration (TRL batch_size)")
    mini_batch_size: int = Field(64, ge=1)
    iterations: int = Field(80, ge=1)
    ppo_epochs: int = Field(4, ge=1)
    kl_coef: float = Field(0.05, ge=0)
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, gt=0)
    eval_prompts: int = Field(64, ge=1, description="Held-out prompts scored before and after")


class PpoRecipe(Strict):
    stage: Literal["ppo"]
    run: RunSection
    model: StageRef | str = Field(description="Starting policy (usually the sft stage's model)")
    inputs: TrainInputs
    train: TrainSection = TrainSection()
    ppo: PpoSection
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return _local_paths(model=self.model, **{"inputs.dataset": self.inputs.dataset,
                                                 "ppo.reward_model": self.ppo.reward_model})


class BestOfNSection(Strict):
    reward_model: StageRef | str
    n_values: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    prompts: int = Field(64, ge=1, description="Held-out prompts to sample for")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(8, ge=1, description="Sequences per generate() / reward model call")
    seed: int = 0

    @field_validator("n_values")
    @classmethod
    def _n_values(cls, value: list[int]) -> list[int]:
        if not value or any(n < 1 for n in value):
            raise ValueError("give one or more n, each at least 1")
        return sorted(set(value))


class BestOfNRecipe(Strict):
    stage: Literal["bestofn"]
    run: RunSection
    model: StageRef | str = Field(description="Policy that samples")
    inputs: TrainInputs
    bestofn: BestOfNSection
    launch: LaunchSection = LaunchSection()

    @model_validator(mode="before")
    @classmethod
    def _pairs_defaults(cls, tree: Any) -> Any:
        # Prompts come from the held-out generation split (one row per prompt) of the pairs output.
        return _preference_defaults(tree, None, "test_gen", ("model", "bestofn.reward_model"))

    def input_files(self) -> list[tuple[str, str]]:
        return _local_paths(model=self.model, **{"inputs.dataset": self.inputs.dataset,
                                                 "bestofn.reward_model": self.bestofn.reward_model})


class CritiqueSection(Strict):
    eval_items: int = Field(64, ge=1, description="Held-out critiques generated and scored in evaluation")
    max_new_tokens: int = Field(512, ge=1)
    batch_size: int = Field(8, ge=1, description="Prompts per generate() call in the evaluation")
    assistant_only_loss: bool = Field(True, description="Loss on the critique only (needs generation tags)")


class CritiqueRecipe(Strict):
    stage: Literal["critique"]
    run: RunSection
    model: str = Field(description="Base model folder")
    inputs: TrainInputs
    train: TrainSection = TrainSection()
    critique: CritiqueSection = CritiqueSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return _local_paths(model=self.model, **{"inputs.dataset": self.inputs.dataset})


class UnknownEvalInputs(Strict):
    items: StageRef | str = Field(description="QA items (pipeline.records.QA_FEATURES): the qa-data "
                                  "stage output, or a saved DatasetDict folder")


class UnknownEvalSection(Strict):
    models: list[ModelSpec] = Field(min_length=1, description="Models to evaluate (hf or openai backend)")
    splits: list[str] = Field(["test_id", "unanswerable"], min_length=1,
                              description="Splits of inputs.items to evaluate")
    max_items: int | None = Field(None, ge=1, description="At most this many items per split (first ones)")
    temperature: float = Field(0.0, ge=0, description="0 = greedy (the default)")
    top_p: float = Field(1.0, gt=0, le=1)
    answer_max_tokens: int = Field(256, ge=1, description="New tokens for the direct answer")
    confidence_max_tokens: int = Field(32, ge=1, description="New tokens for the 0-10 confidence rating")
    seed: int = 0
    max_failure_fraction: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _unique(self) -> "UnknownEvalSection":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("models: model names must be unique")
        if len(set(self.splits)) != len(self.splits):
            raise ValueError("splits: a split is listed twice")
        return self


class UnknownEvalRecipe(Strict):
    stage: Literal["unknown-eval"]
    run: RunSection
    inputs: UnknownEvalInputs
    evaluation: UnknownEvalSection
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        files = [(f"evaluation.models[{i}].path", m.path) for i, m in enumerate(self.evaluation.models) if m.path]
        if isinstance(self.inputs.items, str):
            files.append(("inputs.items", self.inputs.items))
        return files


# --- R-Tuning ----------------------------------------------------------------------------------


class RtuningModelSection(Strict):
    """How the R-Tuning stages run a local model (in-process transformers, greedy unless said)."""

    batch_size: int = Field(8, ge=1, description="Questions per forward / generate() call")
    max_new_tokens: int = Field(15, ge=1, description="Open QA answer length (cut at the first period)")
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu', 'cuda:0'")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    limit: int | None = Field(None, ge=1, description="Use only the first N items of each split (smoke runs)")


class RtuningProbeInputs(Strict):
    items: StageRef | str = Field(description="QA items (QA_FEATURES): the qa-data output or a dataset folder")
    split: str = Field("train", description="The training questions to probe")


class RtuningProbeRecipe(Strict):
    stage: Literal["rtuning-probe"]
    run: RunSection
    model: str = Field(description="The base model folder whose knowledge is probed")
    inputs: RtuningProbeInputs
    rtuning: RtuningModelSection = RtuningModelSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return _local_paths(model=self.model, **{"inputs.items": self.inputs.items})


class RtuningDataInputs(Strict):
    probe: StageRef | str = Field(description="The rtuning-probe output (items with their probe labels)")


class RtuningDataSection(RtuningModelSection):
    variant: Literal["r-tuning", "r-tuning-r", "r-tuning-u", "vanilla"] = Field(
        "r-tuning", description="r-tuning: gold answer + sure/unsure by probe correctness; r-tuning-r: "
        "uncertain answers replaced by refusals; r-tuning-u: sure/unsure by sampled-answer entropy "
        "(no labels; needs `model`); vanilla: gold answer only")
    seed: int = 0
    samples: int = Field(10, ge=2, description="r-tuning-u: answers sampled per question")
    temperature: float = Field(0.7, gt=0, description="r-tuning-u: sampling temperature")
    unsure_fraction: float = Field(0.5, ge=0, le=1, description="r-tuning-u: share of most uncertain "
                                   "questions marked unsure")


class RtuningDataRecipe(Strict):
    stage: Literal["rtuning-data"]
    run: RunSection
    model: str | None = Field(None, description="r-tuning-u: the base model that samples answers")
    inputs: RtuningDataInputs
    rtuning: RtuningDataSection = RtuningDataSection()
    launch: LaunchSection = LaunchSection()

    @model_validator(mode="after")
    def _model_for_u(self) -> "RtuningDataRecipe":
        if self.rtuning.variant == "r-tuning-u" and not self.model:
            raise ValueError("rtuning.variant 'r-tuning-u' samples answers: set `model` (the base model folder)")
        return self

    def input_files(self) -> list[tuple[str, str]]:
        named = {"inputs.probe": self.inputs.probe}
        if self.model:
            named["model"] = self.model
        return _local_paths(**named)


class RtuningEvalInputs(Strict):
    items: StageRef | str = Field(description="QA items (QA_FEATURES): the qa-data output or a dataset folder")
    splits: list[str] = Field(default_factory=lambda: ["test_id", "test_ood", "unanswerable"], min_length=1)


class RtuningEvalSection(RtuningModelSection):
    weight: float = Field(0.5, ge=0, le=1, description="confidence = weight x answer confidence + "
                          "(1 - weight) x p_sure")
    bins: int = Field(10, ge=1, description="Equal-width bins of ECE and the reliability diagram")
    probe: bool = Field(True, description="Ask the sure/unsure probe; false for a vanilla model (confidence = "
                        "answer confidence, refusals = refusal phrases in the answer)")


class RtuningEvalRecipe(Strict):
    stage: Literal["rtuning-eval"]
    run: RunSection
    model: StageRef | str = Field(description="The model to evaluate: a folder, or a training stage's model")
    inputs: RtuningEvalInputs
    rtuning: RtuningEvalSection = RtuningEvalSection()
    launch: LaunchSection = LaunchSection()

    @model_validator(mode="before")
    @classmethod
    def _model_output(cls, tree: Any) -> Any:
        # A stage ref for `model` means that stage's model folder, not its dataset.
        if isinstance(tree, dict) and isinstance(tree.get("model"), dict):
            tree = {**tree, "model": {"output": "model", **tree["model"]}}
        return tree

    def input_files(self) -> list[tuple[str, str]]:
        return _local_paths(model=self.model, **{"inputs.items": self.inputs.items})


# --- QA data (R-Tuning, UnknownBench, SaySelf) ----------------------------------------------

QA_FORMATS = ("pararel", "mmlu", "hotpotqa", "fever", "wice", "falseqa", "nec", "selfaware", "qa")
QA_ROLES = ("train", "test_id", "test_ood", "unanswerable")


class QaSourceSpec(Strict):
    path: str = Field(description="Local JSONL, parquet or `datasets` folder")
    format: Literal[QA_FORMATS]  # type: ignore[valid-type]
    role: Literal[QA_ROLES] = Field(description="The split its items go to")  # type: ignore[valid-type]
    name: str | None = Field(None, description="Label written to each item's `dataset` (default: format)")
    domains: list[str] | None = Field(None, description="Keep only these domains (e.g. ParaRel ID relations)")
    exclude_domains: list[str] = Field(default_factory=list, description="Drop these domains")
    kinds: list[Literal["open", "choice", "unanswerable"]] | None = Field(
        None, description="Keep only these kinds (e.g. only the unanswerable half of SelfAware)")
    sample: int | None = Field(None, ge=1, description="Keep this many (seeded); None = all")
    seed: int = 0
    with_context: bool = Field(True, description="hotpotqa: keep the paragraphs as context")


class QaDataInputs(Strict):
    sources: list[QaSourceSpec] = Field(default_factory=list)


class FactWorldSection(Strict):
    seed: int = 0
    entities: int = Field(40, ge=2, description="Invented people with facts")
    known_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Share whose facts go to teach/")
    nonexistent: int = Field(10, ge=0, description="Names in no fact: unanswerable questions")
    test_fraction: float = Field(0.25, ge=0.0, lt=1.0, description="Share held out for test_id (of the "
                                 "entities, or of each entity's questions; see `holdout`)")
    holdout: Literal["entities", "questions"] = Field(
        "entities", description="test_id holds out whole entities (new people) or some questions of every "
        "entity (new questions about people the tuning saw)")
    ood_attributes: list[str] = Field(default_factory=lambda: ["favourite_colour"],
                                      description="Attributes asked only in test_ood")
    kinds: list[Literal["open", "choice"]] = Field(default_factory=lambda: ["open"], min_length=1)
    n_choices: int = Field(4, ge=2, le=8)


class QaDataRecipe(Strict):
    stage: Literal["qa-data"]
    run: RunSection
    inputs: QaDataInputs = QaDataInputs()
    factworld: FactWorldSection | None = None
    launch: LaunchSection = LaunchSection()

    @model_validator(mode="after")
    def _something(self) -> "QaDataRecipe":
        if not self.inputs.sources and self.factworld is None:
            raise ValueError("give `inputs.sources`, a `factworld` section, or both")
        return self

    def input_files(self) -> list[tuple[str, str]]:
        return [(f"inputs.sources[{i}].path", s.path) for i, s in enumerate(self.inputs.sources)]


# --- SaySelf -----------------------------------------------------------------------------------


class SayselfSampleInputs(Strict):
    items: StageRef | str = Field(description="QA items (QA_FEATURES): the qa-data output or a DatasetDict folder")
    split: str = Field("train", description="The training questions to sample chains for")


class SayselfSampleSection(Strict):
    samples: int = Field(10, ge=1, description="Reasoning chains sampled per question (the paper: 100)")
    temperature: float = Field(1.2, gt=0, le=2, description="Sampling temperature (the paper: about 1.2)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1, description="New tokens per chain")
    seed: int = Field(0, description="Seeds every chain's own sampling seed (part of its ledger key)")
    limit: int | None = Field(None, ge=1, description="Only the first N questions of the split (smoke runs)")
    max_failure_fraction: float = Field(0.05, ge=0, le=1, description="Fail the stage when more requests fail")


class SayselfSampleRecipe(Strict):
    stage: Literal["sayself-sample"]
    run: RunSection
    model: ModelSpec = Field(description="The model whose chains are sampled (hf or openai backend)")
    inputs: SayselfSampleInputs
    sayself: SayselfSampleSection = SayselfSampleSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        named = {"inputs.items": self.inputs.items}
        if self.model.path:
            named["model.path"] = self.model.path
        return _local_paths(**named)


class SayselfClusterInputs(Strict):
    samples: StageRef | str = Field(description="The sayself-sample output (or its dataset folder)")


class SayselfClusterSection(Strict):
    method: Literal["answer", "embedding"] = Field(
        "answer", description="answer: chains with the same normalised final answer; embedding: greedy "
        "grouping by cosine similarity of the chains' sentence embeddings (needs the `embed` extra)")
    threshold: float = Field(0.9, gt=0, le=1, description="embedding: a chain joins the first cluster whose "
                             "representative it matches at least this well")
    batch_size: int = Field(64, ge=1, description="embedding: chains per forward pass")
    device: str = Field("auto", description="embedding: 'auto' (cuda when present), 'cpu', 'cuda:0'")
    when_none_correct: Literal["own", "gold"] = Field(
        "own", description="The pair to train on when no chain is correct: own = the largest cluster's "
        "representative (the model's own best guess); gold = the gold answer with a fixed reasoning sentence")


class SayselfClusterRecipe(Strict):
    stage: Literal["sayself-cluster"]
    run: RunSection
    inputs: SayselfClusterInputs
    cluster: SayselfClusterSection = SayselfClusterSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return _local_paths(**{"inputs.samples": self.inputs.samples})


class SayselfRationaleInputs(Strict):
    clusters: StageRef | str = Field(description="The sayself-cluster output (or its dataset folder)")


class SayselfRationaleSection(Strict):
    judge: ModelSpec = Field(description="The model that writes the rationales: an `openai`-backend model")
    temperature: float = Field(0.0, ge=0, le=2)
    max_new_tokens: int = Field(256, ge=16)
    max_representatives: int = Field(6, ge=2, description="Show the judge at most this many clusters "
                                     "(the largest) per question")
    max_failure_fraction: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _judge_is_remote(self) -> "SayselfRationaleSection":
        if self.judge.backend != "openai":
            raise ValueError("judge: the rationale writer must use backend 'openai' (any OpenAI-compatible server)")
        return self


class SayselfRationaleRecipe(Strict):
    stage: Literal["sayself-rationale"]
    run: RunSection
    inputs: SayselfRationaleInputs
    rationale: SayselfRationaleSection
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return _local_paths(**{"inputs.clusters": self.inputs.clusters})


class SayselfDataInputs(Strict):
    dataset: StageRef | str = Field(description="The sayself-rationale output (sayself-cluster's is enough for "
                                    "the variants without a self-reflection)")


class SayselfDataSection(Strict):
    variant: Literal["full", "no-rationale", "no-confidence", "constant"] = Field(
        "full", description="full: reasoning, answer, self-reflection, confidence; no-rationale: without the "
        "self-reflection; no-confidence: without the confidence; constant: reasoning, answer and the same "
        "confidence for every question (`constant_confidence`), no self-reflection")
    constant_confidence: int | None = Field(None, ge=1, le=10, description="constant: the confidence written; "
                                            "None = the rounded mean of the questions' targets")
    test_fraction: float = Field(0.0, ge=0, lt=1, description="Share of questions held out as split `test` "
                                 "(seeded, by qid); 0 = train only")
    seed: int = 0


class SayselfDataRecipe(Strict):
    stage: Literal["sayself-data"]
    run: RunSection
    inputs: SayselfDataInputs
    sayself: SayselfDataSection = SayselfDataSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return _local_paths(**{"inputs.dataset": self.inputs.dataset})


def _model_ref_is_a_model(tree: Any) -> Any:
    # A stage ref for `model` means that stage's model folder, not its dataset.
    if isinstance(tree, dict) and isinstance(tree.get("model"), dict):
        tree = {**tree, "model": {"output": "model", **tree["model"]}}
    return tree


class SayselfRlInputs(Strict):
    items: StageRef | str = Field(description="QA items (QA_FEATURES): the qa-data output or a DatasetDict folder")
    split: str = Field("train", description="The questions the RL samples answers to (unanswerable ones skipped)")
    eval_split: str | None = Field(None, description="Questions scored before and after training; None: the "
                                   "first `sayself.eval_questions` of `split`, which the RL also trains on")


class SayselfRlSection(Strict):
    num_generations: int = Field(8, ge=2, description="Completions sampled per question (GRPO's group); "
                                 "train.global_batch_size must be a multiple of it")
    temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature of the RL completions")
    top_p: float = Field(1.0, gt=0, le=1)
    max_completion_length: int = Field(256, ge=1, description="New tokens per completion")
    beta: float = Field(0.04, ge=0, description="KL coefficient towards the starting model (0: no reference model)")
    correctness_weight: float = Field(0.0, ge=0, description="Reward += weight x correctness (the paper's reward: 0)")
    limit: int | None = Field(None, ge=1, description="Only the first N questions of `inputs.split` (smoke runs)")
    eval_questions: int = Field(64, ge=1, description="Questions answered greedily before and after training")
    eval_batch_size: int = Field(16, ge=1, description="Prompts per generate() call in the before/after scoring")


class SayselfRlRecipe(Strict):
    stage: Literal["sayself-rl"]
    run: RunSection
    model: StageRef | str = Field(description="The SaySelf-SFT model: a folder, or the sft stage's model")
    inputs: SayselfRlInputs
    train: TrainSection = TrainSection()
    sayself: SayselfRlSection = SayselfRlSection()
    launch: LaunchSection = LaunchSection()

    @model_validator(mode="before")
    @classmethod
    def _model_output(cls, tree: Any) -> Any:
        return _model_ref_is_a_model(tree)

    @model_validator(mode="after")
    def _whole_groups(self) -> "SayselfRlRecipe":
        # GRPO samples global_batch_size completions per optimizer step (per-device batch x processes x
        # accumulation) and compares each question's num_generations completions with each other.
        if self.train.global_batch_size % self.sayself.num_generations:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"sayself.num_generations={self.sayself.num_generations}: a GRPO step samples global_batch_size "
                "completions (per_device_batch_size x processes x gradient accumulation), in whole groups of "
                "num_generations per question")
        if self.train.max_length <= self.sayself.max_completion_length:
            raise ValueError(f"train.max_length={self.train.max_length} leaves no room for a prompt before "
                             f"sayself.max_completion_length={self.sayself.max_completion_length} new tokens")
        return self

    def input_files(self) -> list[tuple[str, str]]:
        return _local_paths(model=self.model, **{"inputs.items": self.inputs.items})


class SayselfEvalInputs(Strict):
    items: StageRef | str = Field(description="QA items (QA_FEATURES): the qa-data output or a DatasetDict folder")
    splits: list[str] = Field(default_factory=lambda: ["test_id", "test_ood", "unanswerable"], min_length=1,
                              description="Splits evaluated; each also reported per `dataset` of its items")

    @field_validator("splits")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a split is listed twice")
        return value


class SayselfEvalSection(Strict):
    max_new_tokens: int = Field(256, ge=1, description="New tokens per greedy answer")
    batch_size: int = Field(16, ge=1, description="Prompts per generate() call (left padded)")
    bins: int = Field(10, ge=1, description="Equal-width bins of ECE and the reliability diagram")
    limit: int | None = Field(None, ge=1, description="Only the first N items of each split (smoke runs)")
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu', 'cuda:0'")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that has it, else float32")


class SayselfEvalRecipe(Strict):
    stage: Literal["sayself-eval"]
    run: RunSection
    model: StageRef | str = Field(description="The model to evaluate: a folder, or a training stage's model")
    inputs: SayselfEvalInputs
    sayself: SayselfEvalSection = SayselfEvalSection()
    launch: LaunchSection = LaunchSection()

    @model_validator(mode="before")
    @classmethod
    def _model_output(cls, tree: Any) -> Any:
        return _model_ref_is_a_model(tree)

    def input_files(self) -> list[tuple[str, str]]:
        return _local_paths(model=self.model, **{"inputs.items": self.inputs.items})


STAGE_RECIPES: dict[str, type[Strict]] = {
    "prompts": PromptsRecipe,
    "generate": GenerateRecipe,
    "annotate": AnnotateRecipe,
    "pairs": PairsRecipe,
    "tiny-models": TinyModelsRecipe,
    "sft": SftRecipe,
    "reward": RewardRecipe,
    "dpo": DpoRecipe,
    "ppo": PpoRecipe,
    "bestofn": BestOfNRecipe,
    "critique": CritiqueRecipe,
    "qa-data": QaDataRecipe,
    "rtuning-probe": RtuningProbeRecipe,
    "rtuning-data": RtuningDataRecipe,
    "rtuning-eval": RtuningEvalRecipe,
    "unknown-eval": UnknownEvalRecipe,
    "sayself-sample": SayselfSampleRecipe,
    "sayself-cluster": SayselfClusterRecipe,
    "sayself-rationale": SayselfRationaleRecipe,
    "sayself-data": SayselfDataRecipe,
    "sayself-rl": SayselfRlRecipe,
    "sayself-eval": SayselfEvalRecipe,
}


# --- loading ---------------------------------------------------------------------------------


def _set_dotted(tree: dict, dotted: str, value: Any, origin: str) -> None:
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
        value = yaml.safe_load(raw) if raw.strip() else ""
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


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document in `path`; a missing file or bad YAML is a ConfigError naming the file
    (and the line, where the parser knows it)."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), stage: str | None = None,
                check_inputs: bool = True):
    """Read, override, validate. `check_inputs=False` skips the input-files check (used to
    validate every shipped recipe, whose inputs may be produced by earlier stages)."""
    path = Path(path)
    tree = read_yaml(path, "recipe")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping with a `stage:` key")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value, str(path))
    recipe_stage = tree.get("stage")
    if stage is not None and recipe_stage is not None and recipe_stage != stage:
        raise ConfigError(f"{path}: this recipe is for stage {recipe_stage!r}, not {stage!r}")
    recipe_stage = recipe_stage or stage
    if recipe_stage not in STAGE_RECIPES:
        raise ConfigError(
            f"{path}: stage: {recipe_stage!r} is not a stage (one of {', '.join(STAGE_RECIPES)})"
        )
    tree["stage"] = recipe_stage
    try:
        recipe = STAGE_RECIPES[recipe_stage].model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(str(path), err)) from None
    if check_inputs:
        for key, file in getattr(recipe, "input_files", lambda: [])():
            if not Path(file).exists():
                raise ConfigError(f"{path}: {key}: no such file or folder: {file}")
    return recipe


# --- saving ----------------------------------------------------------------------------------

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|authorization)$", re.IGNORECASE)
# Keys that *name* where a secret lives are not secrets themselves.
_SECRET_NAME_KEY = re.compile(r"_env$", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_-]{8,}|hf_[A-Za-z0-9]{8,})")


def redact(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {
            k: ("<redacted>" if _SECRET_KEY.search(str(k)) and not _SECRET_NAME_KEY.search(str(k)) and v
                else redact(v))
            for k, v in tree.items()
        }
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    if isinstance(tree, str):
        return _SECRET_VALUE.sub("<redacted>", tree)
    return tree


def dump_recipe(recipe: BaseModel) -> str:
    return yaml.safe_dump(redact(recipe.model_dump(mode="json")), sort_keys=False)
