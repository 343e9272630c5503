"""Stage `generate`: K completions per prompt from a pool of models, each under a principle.

The plan (which models answer which prompt, under which principle text, with which seed) is a
pure function of the prompts dataset and the recipe, so every shard, every rerun and every
launcher computes the same one:

- models: prompts are visited in a seeded order and each takes the K least-used models so far,
  ties broken at random; every model therefore gets an equal share of completions (+-1), and
  the pairs of models that meet vary;
- principles: per source, the completions are split over principles by largest remainder on the
  source's mix (recipe `generation.principle_mix`, else `pipeline.methods.principles` defaults), then
  shuffled; a principle's text variant is drawn at random;
- each completion gets its own sampling seed, derived from the recipe seed, prompt and model.

Prompts are sharded by position (`index % num_shards`). A shard sends only requests whose key is
not yet in the ledger (every shard reads all shards' ledgers), one model at a time (an `hf`
model stays loaded until its work is done; `openai` work runs concurrently), and records each
outcome as it arrives. A shard is done when every planned request has an outcome and failures
stay under `max_failure_fraction`; `--retry-failed` sends the failed ones again. The merge
builds the dataset in the `openbmb/UltraFeedback` row shape from the ledgers once every shard is
done. A completion that failed is left out of its row (never an empty response); a prompt with no
completion at all is left out and counted.

Spending: an `openai` pool model honours its spec's `requests_per_minute`, `tokens_per_minute`,
`price` and `budget_usd` (pipeline.llm.spend; the budget counts that model's spend in every shard's
ledger, all runs). A budget that would be passed stops the shard (exit 1, no `_SUCCESS`, no dataset);
a rerun with a higher budget sends only what the ledgers lack. `--dry-run` prints, per model, the
calls still to send with estimated tokens and dollars, and needs no API key. `summary.json` holds
`spend` per paid model (this run and all runs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipeline import records
from pipeline.config import ConfigError, LaunchSection, ModelSpec, RunSection, StageRef, Strict
from pipeline.ledger import Ledger, billed_tokens, outcomes, request_key
from pipeline.llm.base import GenRequest, ledgered_generate, make_backend
from pipeline.llm.fleet import add_counts
from pipeline.llm.spend import dry_run_plan, spend_summary
from pipeline.methods.principles import (
    DEFAULT_PRINCIPLE_MIX,
    FALLBACK_PRINCIPLE_MIX,
    PRINCIPLE_PROMPTS,
    PRINCIPLES_VERSION,
)
from pipeline.records import check_rows, unannotated_completion
from pipeline.runs import (
    DATASET,
    RunOptions,
    StageFailed,
    atomic_dir,
    atomic_write_text,
    done_shards,
    clear_done,
    is_done,
    mark_done,
    resolve_input,
    save_config,
    shard_dir,
    stage_dir,
    write_json,
)


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


class Recipe(Strict):
    stage: Literal["generate"]
    run: RunSection
    inputs: GenerateInputs
    generation: GenerationSection
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        files = [
            (f"generation.pool[{i}].path", m.path) for i, m in enumerate(self.generation.pool) if isinstance(m.path, str)
        ]
        if isinstance(self.inputs.prompts, str):
            files.append(("inputs.prompts", self.inputs.prompts))
        return files


log = logging.getLogger(__name__)

LEDGER = "ledger.jsonl"
FAILURES = "failures.jsonl"


@dataclass(frozen=True)
class PlannedCompletion:
    prompt_index: int
    slot: int  # position of the completion in its row
    model: str
    principle: str
    system_prompt: str
    seed: int


def _rng(*parts) -> random.Random:
    return random.Random(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest())


def assign_models(num_prompts: int, pool: list[str], k: int, seed: int) -> list[list[str]]:
    """K distinct models per prompt, every model used floor or ceil of num_prompts*K/len(pool)."""
    rng = _rng("models", seed)
    order = list(range(num_prompts))
    rng.shuffle(order)
    used = Counter({name: 0 for name in pool})
    chosen: list[list[str]] = [[] for _ in range(num_prompts)]
    for index in order:
        ranked = sorted(pool, key=lambda name: (used[name], rng.random()))
        picked = set(ranked[:k])
        chosen[index] = [name for name in pool if name in picked]  # pool order within a row
        used.update(picked)
    return chosen


def split_by_mix(count: int, mix: dict[str, float], rng: random.Random) -> list[str]:
    """`count` principle names in the proportions of `mix` (largest remainder), shuffled."""
    exact = {name: weight * count for name, weight in mix.items()}
    quota = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(mix, key=lambda name: (exact[name] - quota[name], rng.random()), reverse=True)
    for name in by_remainder[: count - sum(quota.values())]:
        quota[name] += 1
    names = [name for name in mix for _ in range(quota[name])]
    rng.shuffle(names)
    return names


def principle_mix_for(source: str, recipe: Recipe) -> dict[str, float]:
    overrides = recipe.generation.principle_mix
    return overrides.get(source) or DEFAULT_PRINCIPLE_MIX.get(source) or FALLBACK_PRINCIPLE_MIX


def make_plan(prompts: list[dict], recipe: Recipe) -> list[list[PlannedCompletion]]:
    gen = recipe.generation
    pool = [m.name for m in gen.pool]
    models = assign_models(len(prompts), pool, gen.models_per_prompt, gen.seed)
    slots_by_source: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for index, row in enumerate(prompts):
        slots_by_source[row["source"]].extend((index, slot) for slot in range(len(models[index])))
    principle_of: dict[tuple[int, int], str] = {}
    for source, slots in slots_by_source.items():
        names = split_by_mix(len(slots), principle_mix_for(source, recipe), _rng("principles", gen.seed, source))
        principle_of.update(zip(slots, names))
    plan = []
    for index, row in enumerate(prompts):
        entries = []
        for slot, model in enumerate(models[index]):
            principle = principle_of[(index, slot)]
            rng = _rng("variant", gen.seed, row["prompt_id"], model)
            entries.append(PlannedCompletion(
                prompt_index=index, slot=slot, model=model, principle=principle,
                system_prompt=rng.choice(PRINCIPLE_PROMPTS[principle]),
                seed=rng.randrange(2**31),
            ))
        plan.append(entries)
    return plan


def _request(item: PlannedCompletion, prompt: dict, recipe: Recipe, identity: dict) -> GenRequest:
    gen = recipe.generation
    messages = ({"role": "system", "content": item.system_prompt},
                {"role": "user", "content": prompt["instruction"]})
    params = {"temperature": gen.temperature, "top_p": gen.top_p, "max_new_tokens": gen.max_new_tokens,
              "seed": item.seed}
    key = request_key(identity, PRINCIPLES_VERSION, messages, params)
    return GenRequest(key=key, messages=messages, params=params)


def _load_prompts(recipe: Recipe) -> list[dict]:
    from pipeline.hub import open_dataset

    path = resolve_input(recipe, recipe.inputs.prompts, "inputs.prompts")
    try:
        dataset = open_dataset(path)
    except Exception as err:  # a folder that is not a saved dataset
        raise ConfigError(f"inputs.prompts: cannot read a dataset at {path}: {err}") from None
    missing = {"prompt_id", "source", "instruction"} - set(dataset.column_names)
    if missing:
        raise ConfigError(f"inputs.prompts: {path} lacks column(s) {sorted(missing)}")
    if len(dataset) == 0:
        raise ConfigError(f"inputs.prompts: {path} holds no prompts")
    rows = dataset.to_list()
    # before any completion is paid for: annotate refuses an empty instruction, and a repeated
    # prompt_id would make two rows' completions and failures indistinguishable
    check_rows(((f"{path}:row {i + 1}", row) for i, row in enumerate(rows)),
               {"prompt_id": "text", "source": "text", "instruction": "text"}, "inputs.prompts",
               unique=("prompt_id",))
    return rows


class _Work:
    """Everything a shard or the merge needs: prompts, plan, backends, request per completion."""

    def __init__(self, recipe: Recipe, dry_run: bool = False):
        self.recipe = recipe
        self.prompts = _load_prompts(recipe)
        self.plan = make_plan(self.prompts, recipe)
        self.backends = {}
        for i, spec in enumerate(recipe.generation.pool):
            try:
                self.backends[spec.name] = make_backend(spec, where=f"generation.pool[{i}]", dry_run=dry_run)
            except ValueError as err:  # a model path that does not exist, and such
                raise ConfigError(f"generation.pool: {err}") from None
        self.requests = {
            (item.prompt_index, item.slot): _request(item, self.prompts[item.prompt_index], recipe,
                                                     self.backends[item.model].identity())
            for row in self.plan for item in row
        }


def _open_ledger(stage_path: Path, own: Path) -> Ledger:
    others = [p for p in sorted(stage_path.glob(f"shard-*-of-*/{LEDGER}")) if p != own]
    return Ledger(own, also_read=others)


def run_shard(work: _Work, shard: int, num_shards: int, retry_failed: bool = False) -> dict:
    recipe = work.recipe
    stage_path = stage_dir(recipe)
    path = shard_dir(stage_path, shard, num_shards)
    if is_done(path) and not retry_failed:
        log.info("shard %d of %d is done; skipping", shard, num_shards)
        return json.loads((path / "_SUCCESS").read_text())
    path.mkdir(parents=True, exist_ok=True)
    clear_done(path)
    mine = [item for row in work.plan if row and row[0].prompt_index % num_shards == shard for item in row]
    with _open_ledger(stage_path, path / LEDGER) as ledger:
        for spec in recipe.generation.pool:
            todo = []
            for item in mine:
                if item.model != spec.name:
                    continue
                req = work.requests[(item.prompt_index, item.slot)]
                if ledger.is_ok(req.key) or (ledger.failure(req.key) and not retry_failed):
                    continue
                todo.append((req, item))
            if not todo:
                continue
            by_key = {req.key: item for req, item in todo}
            ledgered_generate(work.backends[spec.name], [req for req, _ in todo], ledger,
                              f"shard {shard}/{num_shards} {spec.name}", stage="generate",
                              tags=lambda req, _name=spec.name: {
                                  "model": _name, "prompt_id": work.prompts[by_key[req.key].prompt_index]["prompt_id"]})

        failures = []
        for item in mine:
            req = work.requests[(item.prompt_index, item.slot)]
            if not ledger.is_ok(req.key):
                failure = ledger.failure(req.key) or {"reason": "no outcome recorded"}
                failures.append({"key": req.key, "model": item.model,
                                 "prompt_id": work.prompts[item.prompt_index]["prompt_id"],
                                 "reason": failure.get("reason")})
    atomic_write_text(path / FAILURES, "".join(json.dumps(f) + "\n" for f in failures))
    # per openai model and server: requests sent, failed, times set aside (a fleet: base_urls)
    servers = {name: backend.fleet.counts(reset=True) for name, backend in work.backends.items()
               if hasattr(backend, "fleet")}
    info = {"shard": shard, "num_shards": num_shards, "planned": len(mine), "failed": len(failures),
            "servers": servers}
    limit = recipe.generation.max_failure_fraction
    if mine and len(failures) / len(mine) > limit:
        reasons = Counter(f["reason"] for f in failures).most_common(3)
        raise StageFailed(
            f"generate shard {shard} of {num_shards}: {len(failures)} of {len(mine)} requests failed "
            f"(more than max_failure_fraction={limit}); see {path / FAILURES}; commonest reasons: "
            + "; ".join(f"{n}x {r}" for r, n in reasons)
            + ". Fix the cause and rerun with --retry-failed."
        )
    mark_done(path, info)
    return info


def merge(work: _Work, num_shards: int) -> dict:
    from datasets import Dataset

    recipe = work.recipe
    stage_path = stage_dir(recipe)
    servers: dict[str, dict] = {}
    for info in done_shards(stage_path, num_shards, "generate"):
        for model, counts in info.get("servers", {}).items():
            servers[model] = add_counts(servers.get(model, {}), counts)
    ledger_files = sorted(stage_path.glob(f"shard-*-of-*/{LEDGER}"))  # every shard opened one
    with Ledger(ledger_files[0], also_read=ledger_files[1:]) as ledger:
        rows, failed, dropped = [], 0, 0
        per_model: Counter = Counter()
        per_principle: dict[str, Counter] = defaultdict(Counter)
        tokens = Counter()
        for index, prompt in enumerate(work.prompts):
            completions = []
            for item in work.plan[index]:
                result = ledger.result(work.requests[(index, item.slot)].key)
                if result is None:
                    failed += 1
                    continue
                completions.append(unannotated_completion(item.model, item.principle, item.system_prompt,
                                                          result["text"]))
                per_model[item.model] += 1
                per_principle[prompt["source"]][item.principle] += 1
                tokens["prompt"] += result.get("prompt_tokens", 0)
                tokens["completion"] += result.get("completion_tokens", 0)
            if not completions:
                dropped += 1
                continue
            rows.append({
                "prompt_id": prompt["prompt_id"], "source": prompt["source"],
                "instruction": prompt["instruction"], "models": [c["model"] for c in completions],
                "completions": completions,
                "correct_answers": prompt.get("correct_answers") or [],
                "incorrect_answers": prompt.get("incorrect_answers") or [],
                "reference": prompt.get("reference") or "",
            })
        spend = spend_summary(work.backends, ledger)
    if not rows:
        raise StageFailed("generate: no completion succeeded; nothing to write")
    with atomic_dir(stage_path / DATASET) as tmp:
        Dataset.from_list(rows, features=records.COMPLETION_SET_FEATURES).save_to_disk(str(tmp))
    summary = {
        "prompts": len(work.prompts), "rows": len(rows), "prompts_without_completions": dropped,
        "completions": sum(per_model.values()), "failed_completions": failed,
        "completions_per_model": dict(sorted(per_model.items())),
        "principles_per_source": {s: dict(sorted(c.items())) for s, c in sorted(per_principle.items())},
        "tokens": dict(tokens), "num_shards": num_shards,
        "servers_per_model": servers,  # each shard's latest run
        "spend": spend,  # per paid model: this process's calls, tokens, dollars; all runs' from the ledgers
    }
    write_json(stage_path / "summary.json", summary)
    mark_done(stage_path, {"rows": len(rows), "completions": summary["completions"]})
    return summary


def print_summary(summary: dict, stage_path: Path) -> None:
    print(f"generate: {summary['rows']} rows, {summary['completions']} completions "
          f"({summary['failed_completions']} failed) -> {stage_path / DATASET}")
    for model, count in summary["completions_per_model"].items():
        print(f"  {model:<24} {count:>7}")
    for source, mix in summary["principles_per_source"].items():
        print(f"  {source:<24} " + ", ".join(f"{p} {n}" for p, n in mix.items()))
    for model, spent in summary.get("spend", {}).items():
        cost = spent["cost_usd_all_runs"]
        print(f"  {model:<24} {spent['prompt_tokens_all_runs']:,} prompt + {spent['completion_tokens_all_runs']:,} "
              "completion tokens in all runs" + (f", ${cost:.4f}" if cost is not None else ""))


def dry_run(work: _Work, retry_failed: bool) -> dict:
    """The calls every shard still has to send (read from the ledgers; nothing opened for writing)."""
    files = sorted(stage_dir(work.recipe).glob(f"shard-*-of-*/{LEDGER}"))
    ok, failed = outcomes(files)
    todo: dict[str, list[GenRequest]] = {spec.name: [] for spec in work.recipe.generation.pool}
    for row in work.plan:
        for item in row:
            req = work.requests[(item.prompt_index, item.slot)]
            if req.key not in ok and (retry_failed or req.key not in failed):
                todo[item.model].append(req)
    return dry_run_plan("generate", [(spec, todo[spec.name]) for spec in work.recipe.generation.pool],
                        billed_tokens(files))


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict | None:
    """Local run: every shard then the merge; `opts.shard=i` runs one shard; `opts.merge_only` merges."""
    num_shards = opts.num_shards or recipe.launch.num_shards
    if opts.shard is not None and not 0 <= opts.shard < num_shards:
        raise ConfigError(f"--shard {opts.shard}: must be between 0 and {num_shards - 1} (--num-shards {num_shards})")
    work = _Work(recipe, dry_run=opts.dry_run)
    if opts.dry_run:
        return dry_run(work, opts.retry_failed)
    stage_path = stage_dir(recipe)
    stage_path.mkdir(parents=True, exist_ok=True)
    clear_done(stage_path)
    save_config(stage_path, recipe)
    if not opts.merge_only:
        for index in ([opts.shard] if opts.shard is not None else range(num_shards)):
            run_shard(work, index, num_shards, retry_failed=opts.retry_failed)
    if opts.shard is not None:
        return None  # array tasks: the merge is its own job, after all shards
    summary = merge(work, num_shards)
    print_summary(summary, stage_path)
    return summary
