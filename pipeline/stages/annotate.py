"""Stage `annotate`: the UltraFeedback judge over completion sets, paid for exactly once.

Per prompt (mode `faithful`, the default): one call per aspect rating all of its completions at
once, shown in a shuffled order (seeded by `annotation.seed` and the prompt id, written with
each ledger record) and mapped back; one critique call per completion, ending in an overall
score 1-10. `structured` asks the same calls for JSON with a schema; `compact` rates the four
aspects in one call. `fine-grained_score` is the mean of the non-N/A aspect ratings.

Position bias (`annotation.position_debias`, pipeline.judge.positions): `none` shows the
completions in their input order, `shuffle` (the default, as above) in one seeded order per
prompt, `permute` asks every rated call in `position_orders` orders (the shuffled one, its
reverse, ...) and keeps each completion's mean rating and its spread across orders. A rated
call where some completion's ratings spread more than `max_position_gap` is asked in one extra
order; a completion with still no majority of agreeing ratings keeps the mean and gets a
failures.jsonl line with status `inconsistent`. Critiques show one completion: never permuted.

Exactly once. Every request is keyed (pipeline.ledger) by the judge model, the template version,
the messages and the sampling parameters, and its answer is recorded as soon as it arrives. An
answer that does not parse is asked again with a corrective message (a new request with its own
key), at most `max_reasks` times; the whole chain replays from the ledger on a rerun, so a rerun
never sends a request that already succeeded. A request that fails after retries is recorded
with its reason; `--retry-failed` sends those again and grants unparseable items new re-asks.

Spending. A client-side throttle keeps requests and tokens per minute under the recipe's
limits and pauses everything for a 429's Retry-After. Usage from the server is priced with
`annotation.prices`; `--dry-run` prints the calls, tokens and cost still to pay; `budget_usd`
stops the stage cleanly (requests in flight finish and are kept) once spent.

Batch API: `--batch submit` writes the pending requests as JSONL files within the API's limits,
uploads them, starts batches and saves a manifest; `--batch collect` waits for them, puts their
answers (partial ones too) into the ledger, then runs the normal path, which sends only what is
still missing (failed lines, expired stragglers, re-asks).

Shards, as in generate: rows by position (`row % num_shards`), each shard in
`shard-<i>-of-<n>/` with its own ledger, failures.jsonl, batch manifest and `_SUCCESS`, reading
every ledger of the stage; the merge (all shards done, else an error naming the others) replays
the ledgers, sends nothing, and so writes the dataset an unsharded run (shard 0 of 1) writes.

Outputs: `dataset/` (openbmb/UltraFeedback rows, annotated), `failures.jsonl` (every item that
failed, with its reason), `summary.json`, `report/*.png`, `_SUCCESS` last. The raw answers are
kept in the shards' `ledger.jsonl`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field, model_validator

from pipeline import records
from pipeline.config import ConfigError, LaunchSection, ModelSpec, RunSection, StageRef, Strict
from pipeline.judge import rubric
from pipeline.judge.batch import batch_collect, batch_submit
from pipeline.judge.session import (
    JudgeRun,
    Outcome,
    assemble,
    item_failure,
    dry_run,
    extra_items,
    ledger_tokens,
    plan,
    spent_so_far,
)
from pipeline.ledger import Ledger
from pipeline.llm.fleet import add_counts
from pipeline.llm.openai_backend import api_key
from pipeline.records import check_rows, prompt_id, saved_rows
from pipeline.report import figure
from pipeline.runs import (
    DATASET,
    RunOptions,
    StageFailed,
    atomic_dir,
    atomic_write_text,
    done_shards,
    clear_done,
    mark_done,
    resolve_input,
    save_config,
    shard_dir,
    stage_dir,
    write_json,
)


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
    schema_max_chars: int | None = Field(
        None, ge=20, description="structured mode: longest rationale the schema allows (maxLength; the critique's "
        "feedback gets twice this). For a small judge under guided decoding (vLLM), which otherwise may not "
        "close a string before max_tokens; OpenAI's strict mode may refuse the keyword, so None leaves it out")
    seed: int = Field(0, description="Seeds the order in which completions are shown to the judge")
    position_debias: Literal["none", "shuffle", "permute"] = Field(
        "shuffle", description="none: completions shown in their input order; shuffle: one order per prompt, "
        "shuffled with `seed` (UltraFeedback); permute: every rated call asked in `position_orders` orders, "
        "each completion's ratings averaged (calls x position_orders)")
    position_orders: int = Field(2, ge=2, le=16, description="permute: orders per rated call (0: the shuffled "
                                 "one, 1: its reverse, then rotations and their reverses)")
    max_position_gap: float = Field(1.0, ge=0, le=4, description="permute: ratings of one completion that spread "
                                    "more than this across orders get one extra order; still no majority within "
                                    "it -> a line in failures.jsonl (status inconsistent), rating kept as the mean")
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
        if self.position_debias != "permute":
            # A value other than the default would be silently ignored: say so. (Defaults pass,
            # since the saved resolved copy of every recipe spells them out.)
            for key in ("position_orders", "max_position_gap"):
                if getattr(self, key) != type(self).model_fields[key].default:
                    raise ValueError(f"{key} applies only to position_debias: permute "
                                     f"(position_debias is {self.position_debias!r})")
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


class Recipe(Strict):
    stage: Literal["annotate"]
    run: RunSection
    inputs: AnnotateInputs
    annotation: AnnotationSection
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return [("inputs.completions", self.inputs.completions)] if isinstance(self.inputs.completions, str) else []


LEDGER = "ledger.jsonl"
FAILURES = "failures.jsonl"


# Sources of the public UltraFeedback rows and of our prompts stage; anything else is a typo
# unless the recipe allows it (the truthfulness aspect's world knowledge depends on the source).
KNOWN_SOURCES = ("evol_instruct", "false_qa", "flan", "flan_v2_cot", "flan_v2_flan2021", "flan_v2_niv2",
                 "flan_v2_p3", "sharegpt", "truthful_qa", "ultrachat")



# ---------------------------------------------------------------- input


def check_row(row: dict, where: str, allow_unknown_sources: bool) -> dict:
    """A completion set as the judge needs it, or a ConfigError naming `where`."""
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ConfigError(f"{where}: `instruction` must be a non-empty string")
    source = row.get("source")
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{where}: `source` must be a non-empty string")
    if source not in KNOWN_SOURCES and not allow_unknown_sources:
        raise ConfigError(f"{where}: unknown source {source!r} (known: {', '.join(KNOWN_SOURCES)}; "
                          "set annotation.allow_unknown_sources to accept others)")
    completions = row.get("completions")
    if not isinstance(completions, list) or not completions:
        raise ConfigError(f"{where}: `completions` must be a non-empty list")
    for i, completion in enumerate(completions):
        if not isinstance(completion, dict) or not isinstance(completion.get("response"), str):
            raise ConfigError(f"{where}: completions[{i}] has no string `response`")
        if not isinstance(completion.get("model"), str):
            raise ConfigError(f"{where}: completions[{i}] has no string `model`")
    out = dict(row)
    out["prompt_id"] = row.get("prompt_id") or prompt_id(instruction)
    for key in ("correct_answers", "incorrect_answers"):
        out[key] = list(row.get(key) or [])
    out["reference"] = row.get("reference") or ""
    out["models"] = [c["model"] for c in completions]
    return out


def load_rows(recipe: Recipe) -> list[dict]:
    path = resolve_input(recipe, recipe.inputs.completions, "inputs.completions")
    allow = recipe.annotation.allow_unknown_sources
    checked = [(where, check_row(row, where, allow)) for where, row in saved_rows(path)]
    if not checked:
        raise ConfigError(f"inputs.completions: {path} holds no completion sets")
    # failures.jsonl and the ledger name a set by its prompt_id: it must be one set's
    check_rows(checked, {"prompt_id": "text"}, "inputs.completions", unique=("prompt_id",))
    return [row for _, row in checked]


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rho (Pearson's r of average ranks); NaN when undefined. No scipy: its import
    alone costs more than a whole replayed rerun's parsing of a thousand answers."""
    import numpy as np
    import pandas as pd

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return float("nan")
    rx, ry = pd.Series(xs).rank().to_numpy(), pd.Series(ys).rank().to_numpy()
    return float(np.corrcoef(rx, ry)[0, 1])



# ---------------------------------------------------------------- report


def write_report(rows: list[dict], report_dir: Path) -> dict:
    """PNG plots of the annotated rows; returns a few figures for the summary."""
    ratings = {a: Counter() for a in rubric.ASPECTS}
    per_model: dict[str, dict[str, list[int]]] = {}
    overall, fine = [], []
    for row in rows:
        for c in row["completions"]:
            for aspect in rubric.ASPECTS:
                value = c["annotations"][aspect]["Rating"]
                ratings[aspect][value] += 1
                if value != "N/A":
                    per_model.setdefault(c["model"], {}).setdefault(aspect, []).append(int(value))
            if c["overall_score"] is not None and c["fine-grained_score"] is not None:
                overall.append(c["overall_score"])
                fine.append(c["fine-grained_score"])

    labels = ["1", "2", "3", "4", "5", "N/A"]
    with figure(report_dir / "ratings_per_aspect.png", dpi=110, ncols=4, figsize=(14, 3.2), sharey=True) as (_, axes):
        for ax, aspect in zip(axes, rubric.ASPECTS):
            ax.bar(labels, [ratings[aspect][v] for v in labels], color="#4c72b0")
            ax.set_title(aspect.replace("_", " "))
            ax.set_xlabel("rating")
        axes[0].set_ylabel("completions")

    models = sorted(per_model)
    with figure(report_dir / "ratings_per_model.png", dpi=110, figsize=(max(6, 1.4 * len(models)), 3.5)) as (_, ax):
        width = 0.8 / len(rubric.ASPECTS)
        for k, aspect in enumerate(rubric.ASPECTS):
            means = [sum(v) / len(v) if (v := per_model[m].get(aspect)) else 0 for m in models]
            ax.bar([i + k * width for i in range(len(models))], means, width, label=aspect.replace("_", " "))
        ax.set_xticks([i + 1.5 * width for i in range(len(models))], models, rotation=20)
        ax.set_ylabel("mean rating (1-5)")
        ax.set_ylim(0, 5)
        ax.legend(fontsize=7)

    rho = spearman(overall, fine)
    with figure(report_dir / "overall_vs_fine_grained.png", dpi=110, figsize=(4.5, 4)) as (_, ax):
        jitter = random.Random(0)
        ax.scatter([x + jitter.uniform(-0.15, 0.15) for x in fine],
                   [y + jitter.uniform(-0.15, 0.15) for y in overall], s=8, alpha=0.5)
        ax.set_xlabel("fine-grained score (mean aspect rating)")
        ax.set_ylabel("overall score (critique)")
        ax.set_title(f"agreement: Spearman {rho:.2f} (n={len(overall)})")
    return {"spearman_overall_vs_fine_grained": None if math.isnan(rho) else round(rho, 4),
            "rating_counts": {a: dict(sorted(c.items())) for a, c in ratings.items()},
            "plots": sorted(p.name for p in report_dir.glob("*.png"))}


# ---------------------------------------------------------------- the stage


def shard_items(items: list, shard: int, num_shards: int) -> list:
    """The items of the rows of one shard (rows by position, `row % num_shards`): a row's items
    stay together, so its extra orders (permute) are decided within one shard."""
    return [item for item in items if item.row % num_shards == shard]


def ledger_files(stage_path: Path) -> list[Path]:
    """Every ledger of the stage: all shards' (of any shard count) and the stage folder's own,
    where runs from before annotate had shards wrote. Each run reads them all, so a stage
    re-sharded between runs, or a shard resumed, never pays for an answer twice."""
    return [p for p in [stage_path / LEDGER, *sorted(stage_path.glob(f"shard-*-of-*/{LEDGER}"))] if p.is_file()]


def open_ledger(stage_path: Path, own: Path) -> Ledger:
    return Ledger(own, also_read=[p for p in ledger_files(stage_path) if p != own])


@contextmanager
def reading_ledgers(stage_path: Path) -> Iterator[Ledger]:
    """All of the stage's ledgers, for a dry run or the merge, which write nothing: the ledger's
    own file is a throwaway one, so no shard folder appears that never ran."""
    with tempfile.TemporaryDirectory(prefix="annotate-read-") as tmp:
        with Ledger(Path(tmp) / LEDGER, also_read=ledger_files(stage_path)) as ledger:
            yield ledger


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict | None:
    """Local run: every shard then the merge; `opts.shard=i` runs one shard (an array task);
    `opts.merge_only` merges finished shards; `--batch submit` submits and stops before merging."""
    num_shards = opts.num_shards or recipe.launch.num_shards
    if opts.shard is not None and not 0 <= opts.shard < num_shards:
        raise ConfigError(f"--shard {opts.shard}: must be between 0 and {num_shards - 1} (--num-shards {num_shards})")
    rows = load_rows(recipe)
    items = plan(rows, recipe)
    stage_path = stage_dir(recipe)
    api_key(recipe.annotation.judge, "annotation.judge")  # a missing key is a config error before anything else
    if opts.dry_run:
        mine = items if opts.shard is None else shard_items(items, opts.shard, num_shards)
        with reading_ledgers(stage_path) as ledger:
            return dry_run(JudgeRun(recipe, rows, ledger, opts.retry_failed), mine)
    stage_path.mkdir(parents=True, exist_ok=True)
    clear_done(stage_path)
    save_config(stage_path, recipe)
    ran, known = [], {}
    if not opts.merge_only:
        for index in ([opts.shard] if opts.shard is not None else range(num_shards)):
            info, outcomes = run_shard(recipe, rows, items, index, num_shards, opts)
            ran.append(info)
            known.update(outcomes)
    if opts.batch == "submit":  # no merge: the dataset comes with --batch collect
        return {key: sum(r[key] for r in ran) for key in ("submitted", "batches")}
    if opts.shard is not None:
        return None  # array tasks: the merge is its own job, after all shards
    return merge(recipe, rows, items, num_shards, opts.retry_failed, known)


def run_shard(recipe: Recipe, rows: list[dict], items: list, shard: int, num_shards: int,
              opts: RunOptions) -> tuple[dict, dict]:
    """Judge one shard's items: send what the ledgers do not answer yet, check the failure
    fraction, write the shard's failures.jsonl and its `_SUCCESS` (with this run's tally).
    Returns that tally and the items' outcomes (--batch submit: what it submitted, no outcomes).
    A shard already done is judged again all the same: that only replays its ledger (nothing
    is sent) and gives this run's figures."""
    stage_path = stage_dir(recipe)
    path = shard_dir(stage_path, shard, num_shards)
    path.mkdir(parents=True, exist_ok=True)
    clear_done(path)
    where = f"annotate shard {shard} of {num_shards}"
    mine = shard_items(items, shard, num_shards)
    with open_ledger(stage_path, path / LEDGER) as ledger:
        judge = JudgeRun(recipe, rows, ledger, opts.retry_failed)
        if opts.batch == "submit":
            return batch_submit(judge, mine, path), {}
        if opts.batch == "collect":
            batch_collect(judge, path, recipe.annotation.batch_poll_s)
        # the budget covers every run and every shard: what the ledgers show spent when this one starts
        judge.spent_before = spent_so_far(ledger, judge.price) - judge.tally.cost_usd
        started = time.monotonic()
        outcomes = settle(judge, mine)
        # permute: questions whose orders disagree get one extra order, decided from the answers
        # (so a resumed run derives the same ones and replays what it already bought).
        extras = extra_items(judge.requests, mine, outcomes)
        if extras:
            outcomes.update(settle(judge, extras))
            mine = mine + extras
        elapsed = time.monotonic() - started

    tally = judge.tally
    stopped = [i for i in mine if outcomes[i].status == "stopped"]
    failed = [i for i in mine if outcomes[i].status == "failed"]
    if stopped:
        raise StageFailed(
            f"{where}: budget_usd={recipe.annotation.budget_usd} reached (${judge.spent_before + tally.cost_usd:.4f} "
            f"spent in all runs); {len(mine) - len(stopped)} of {len(mine)} items done and kept in the ledger. "
            "Raise annotation.budget_usd and rerun to continue.")
    failures = [item_failure(rows, item, outcomes[item]) for item in failed]
    atomic_write_text(path / FAILURES, "".join(json.dumps(f) + "\n" for f in failures))
    limit = recipe.annotation.max_failure_fraction
    if mine and len(failed) / len(mine) > limit:
        reasons = Counter(outcomes[i].reason.split(":")[0] for i in failed).most_common(3)
        raise StageFailed(
            f"{where}: {len(failed)} of {len(mine)} judge items failed (more than "
            f"max_failure_fraction={limit}); see {path / FAILURES}; commonest: "
            + "; ".join(f"{n}x {r}" for r, n in reasons) + ". Fix the cause and rerun with --retry-failed.")
    info = {"shard": shard, "num_shards": num_shards, "items": len(mine), "items_failed": len(failed),
            "extra_orders": len(extras), "requests_sent": tally.sent, "requests_replayed": tally.replayed,
            "failed_requests": tally.failed_requests, "reasks": tally.reasks,
            "parse_failures": dict(tally.parse_failures), "servers": judge.fleet.counts(),
            "seconds": round(elapsed, 2)}
    mark_done(path, info)
    return info, outcomes


def merge(recipe: Recipe, rows: list[dict], items: list, num_shards: int, retry_failed: bool = False,
          known: dict | None = None) -> dict:
    """The dataset from the ledgers, once every shard is done: every item replayed (nothing is
    sent), so it is the same dataset whatever the number of shards. `known`: outcomes of the
    shards this process has just run, which a replay would only repeat (for a large stage, the
    replay's parsing is most of a rerun's time)."""
    from datasets import Dataset

    stage_path = stage_dir(recipe)
    shards = done_shards(stage_path, num_shards, "annotate")
    with reading_ledgers(stage_path) as ledger:
        # retry_failed as the shards had it: it decides how a chain of re-asks replays
        judge = JudgeRun(recipe, rows, ledger, retry_failed)
        known = known or {}
        outcomes = {**known, **replayed(judge, [i for i in items if i not in known])}
        extras = extra_items(judge.requests, items, outcomes)
        outcomes.update(replayed(judge, [i for i in extras if i not in outcomes]))
        items = items + extras
        tokens = ledger_tokens(ledger)
        spent_total = spent_so_far(ledger, judge.price)

    failed = [i for i in items if outcomes[i].status == "failed"]
    out_rows, failures, incomplete = assemble(rows, items, outcomes, judge.requests, recipe.annotation.critique)
    atomic_write_text(stage_path / FAILURES, "".join(json.dumps(f) + "\n" for f in failures))
    if not out_rows:
        raise StageFailed(f"annotate: no completion set was fully annotated ({len(failed)} of {len(items)} judge "
                          f"items failed); see {stage_path / FAILURES}")
    with atomic_dir(stage_path / DATASET) as tmp:
        features = (records.PERMUTED_COMPLETION_SET_FEATURES if recipe.annotation.position_debias == "permute"
                    else records.COMPLETION_SET_FEATURES)
        Dataset.from_list(out_rows, features=features).save_to_disk(str(tmp))
    report = write_report(out_rows, stage_path / "report")
    annotated = sum(len(r["completions"]) for r in out_rows)
    total = lambda key: sum(s[key] for s in shards)  # noqa: E731
    parse_failures, servers = Counter(), {}
    for s in shards:
        parse_failures.update(s["parse_failures"])
        servers = add_counts(servers, s.get("servers", {}))
    summary = {
        "mode": recipe.annotation.mode, "judge_model": recipe.annotation.judge_model,
        "template_version": judge.requests.version, "seed": recipe.annotation.seed,
        "position_debias": recipe.annotation.position_debias, **position_summary(recipe, extras, failures),
        "rows_in": len(rows), "rows_out": len(out_rows), "completions_annotated": annotated,
        "completions_incomplete": incomplete, "items": len(items), "items_failed": len(failed),
        # "this run": each shard's latest run (its _SUCCESS), summed
        "requests_sent_this_run": total("requests_sent"), "requests_replayed": total("requests_replayed"),
        "failed_requests_this_run": total("failed_requests"),
        "reasks_this_run": total("reasks"), "parse_failures_this_run": dict(parse_failures),
        # per judge server: requests sent (they add up to requests_sent_this_run), failed, set aside
        "servers_this_run": servers,
        "tokens": tokens,
        "cost_usd_all_runs": round(spent_total, 6) if judge.price is not None else None,
        "seconds": round(max(s["seconds"] for s in shards), 2),  # the slowest shard
        "num_shards": num_shards,
        "report": report,
    }
    summary["tokens_per_prompt"] = round(summary["tokens"]["total"] / max(len(rows), 1), 1)
    write_json(stage_path / "summary.json", summary)
    mark_done(stage_path, {"rows": len(out_rows), "completions": annotated})
    print_summary(summary, stage_path)
    return summary


def replayed(judge: JudgeRun, items: list) -> dict:
    """Every item's outcome from the ledgers alone. With retry_failed a recorded failure (or an
    unusable answer whose next re-ask was never sent) replays as still to send: once every shard
    is done, that is a failure."""
    outcomes = dict(zip(items, judge.replay_all(items)))
    for item, outcome in outcomes.items():
        if outcome.status == "pending":
            failure = judge.ledger.failure(judge.requests.key(*outcome.value)) or {}
            outcomes[item] = Outcome("failed", reason=failure.get("reason", "unusable answer; no further re-ask "
                                                                  "was sent"), reasks=outcome.reasks)
    return outcomes


def settle(judge: JudgeRun, items: list) -> dict:
    """Every item's outcome, in one pass: each item's request is rendered once, answered from
    the ledger where it can be and sent otherwise. A rerun of a finished run sends nothing, so
    it never opens a connection (the clients connect on their first request)."""
    from tqdm import tqdm

    judge.keep_pending = False
    judge.count_replays = True
    bar = tqdm(total=len(items), desc="annotate", unit="item", dynamic_ncols=True, mininterval=0.5)
    try:
        return asyncio.run(judge.run_all(items, bar))
    finally:
        bar.close()


def position_summary(recipe: Recipe, extras: list, failures: list[dict]) -> dict:
    ann = recipe.annotation
    if ann.position_debias != "permute":
        return {}
    return {"position_orders": ann.position_orders, "max_position_gap": ann.max_position_gap,
            "extra_orders": len(extras),
            "inconsistent_ratings": sum(f["status"] == "inconsistent" for f in failures)}


def print_summary(summary: dict, stage_path: Path) -> None:
    cost_text = (f", ${summary['cost_usd_all_runs']:.4f} spent in all runs"
                 if summary["cost_usd_all_runs"] is not None else "")
    debias = summary["position_debias"]
    if debias == "permute":
        debias += (f" x{summary['position_orders']}, {summary['extra_orders']} extra order(s), "
                   f"{summary['inconsistent_ratings']} inconsistent rating(s)")
    print(f"annotate ({summary['mode']}, {debias}): {summary['rows_out']} rows, {summary['completions_annotated']} "
          f"completions annotated ({summary['items_failed']} items failed) -> {stage_path / DATASET}")
    print(f"  requests: {summary['requests_sent_this_run']} sent now, {summary['requests_replayed']} from the "
          f"ledger, {summary['reasks_this_run']} re-asks; tokens {summary['tokens']['total']:,} "
          f"({summary['tokens_per_prompt']:,} per prompt){cost_text}")
    if len(summary["servers_this_run"]) > 1:
        print("  servers: " + "; ".join(f"{name} {c['requests']} sent, {c['failed']} failed, set aside {c['set_aside']}x"
                                        for name, c in summary["servers_this_run"].items()))
    print(f"  report: {stage_path / 'report'}")
