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
every ledger of the stage; the merge (all shards done, else an error naming the others) gathers
the shards' rows in input order, sends nothing, and so writes the dataset an unsharded run
(shard 0 of 1) writes.

Memory and rebuilds. The input rows are kept on disk and read back by position (a few hundred
cached, pipeline.shardrows.SpilledRows). A row is assembled and written (Arrow parts in a hidden
folder, renamed to `shard-*/rows/` when the shard finishes) as soon as its last item is resolved,
and forgotten, so memory does not grow with the outcomes of the run; the merge copies the rows
into the dataset a chunk at a time and tallies the report's figures from those chunks, without
reading the dataset back. Each resolved item is also
kept in the shard's parse cache (`parsed.jsonl`, pipeline.judge.parsecache), so a rebuild takes
its parsed answer from there instead of rendering, keying and parsing it again, as long as the
ledger still holds the answer and the parser version is unchanged.

Outputs: `dataset/` (openbmb/UltraFeedback rows, annotated), `failures.jsonl` (every item that
failed, with its reason), `summary.json`, `report/*.png`, `_SUCCESS` last. The raw answers are
kept in the shards' `ledger.jsonl`.
"""

from __future__ import annotations

import asyncio
import hashlib
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
from pipeline.config import (
    ConfigError,
    LaunchSection,
    ModelSpec,
    PriceSpec,
    RunSection,
    StageRef,
    Strict,
    check_judge_section,
)
from pipeline.judge import rubric
from pipeline.judge.batch import batch_collect, batch_submit
from pipeline.judge.parsecache import ParseCache
from pipeline.judge.session import (
    JudgeRun,
    Requests,
    assemble_row,
    item_failure,
    item_sort_key,
    dry_run,
    extra_items,
    ledger_tokens,
    plan,
)
from pipeline.ledger import Ledger
from pipeline.llm.fleet import add_counts
from pipeline.llm.openai_backend import api_key
from pipeline.records import check_rows, prompt_id, saved_rows
from pipeline.report import figure
from pipeline.shardrows import RowWriter, SpilledRows, gather
from pipeline.runs import (
    DATASET,
    RunOptions,
    StageFailed,
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
        check_judge_section(self, "annotation")
        if self.position_debias != "permute":
            # A value other than the default would be silently ignored: say so. (Defaults pass,
            # since the saved resolved copy of every recipe spells them out.)
            for key in ("position_orders", "max_position_gap"):
                if getattr(self, key) != type(self).model_fields[key].default:
                    raise ValueError(f"{key} applies only to position_debias: permute "
                                     f"(position_debias is {self.position_debias!r})")
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
PARSED = "parsed.jsonl"  # per shard: the parse cache (pipeline.judge.parsecache)
ROWS = "rows"  # per shard: its annotated rows (pipeline.shardrows), written as its prompts finish


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


def load_rows(recipe: Recipe) -> SpilledRows:
    """The completion sets, checked, kept on disk and read back by position (pipeline.shardrows):
    a run's memory does not hold every completion's text."""
    path = resolve_input(recipe, recipe.inputs.completions, "inputs.completions")
    allow = recipe.annotation.allow_unknown_sources
    rows = SpilledRows()

    def kept(pairs):
        for where, row in pairs:
            row = check_row(row, where, allow)
            rows.append(row)
            yield where, row

    # failures.jsonl and the ledger name a set by its prompt_id: it must be one set's
    check_rows(kept(saved_rows(path)), {"prompt_id": "text"}, "inputs.completions", unique=("prompt_id",))
    if not len(rows):
        raise ConfigError(f"inputs.completions: {path} holds no completion sets")
    return rows


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


SCATTER_POINTS = 5_000


class RatingTally:
    """What the report plots, gathered chunk by chunk as the dataset is written (so it is never
    read back): rating counts per aspect, ratings per model, and the (fine-grained, overall)
    score pairs, kept as C doubles."""

    def __init__(self):
        from array import array

        self.ratings = {a: Counter() for a in rubric.ASPECTS}
        self.per_model: dict[str, dict[str, Counter]] = {}  # model -> aspect -> rating -> count
        self.overall, self.fine = array("d"), array("d")

    def add_table(self, table) -> None:
        """A chunk of written rows (pyarrow Table), tallied column-wise: turning every completion
        back into Python dicts cost more than the rest of a rebuild's merge."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        completions = pc.list_flatten(table.column("completions"))
        models = pc.struct_field(completions, "model")
        for aspect in rubric.ASPECTS:
            ratings = pc.struct_field(completions, ["annotations", aspect, "Rating"])
            counts = pa.table({"model": models, "rating": ratings}).group_by(["model", "rating"]).aggregate(
                [([], "count_all")])
            for model, rating, n in zip(*(column.to_pylist() for column in counts.columns)):
                self.ratings[aspect][rating] += n
                if rating != "N/A":
                    self.per_model.setdefault(model, {}).setdefault(aspect, Counter())[int(rating)] += n
        overall = pc.struct_field(completions, "overall_score")
        fine = pc.struct_field(completions, "fine-grained_score")
        both = pc.and_(pc.is_valid(overall), pc.is_valid(fine))
        self.overall.extend(np.asarray(pc.filter(overall, both), dtype=float))
        self.fine.extend(np.asarray(pc.filter(fine, both), dtype=float))


def write_report(tally: RatingTally, report_dir: Path) -> dict:
    """PNG plots of the annotated rows tallied in `tally`; returns a few figures for the summary."""
    ratings, per_model, overall, fine = tally.ratings, tally.per_model, tally.overall, tally.fine
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
            means = [sum(rating * n for rating, n in v.items()) / v.total() if (v := per_model[m].get(aspect)) else 0
                     for m in models]
            ax.bar([i + k * width for i in range(len(models))], means, width, label=aspect.replace("_", " "))
        ax.set_xticks([i + 1.5 * width for i in range(len(models))], models, rotation=20)
        ax.set_ylabel("mean rating (1-5)")
        ax.set_ylim(0, 5)
        ax.legend(fontsize=7)

    rho = spearman(overall, fine)
    with figure(report_dir / "overall_vs_fine_grained.png", dpi=110, figsize=(4.5, 4)) as (_, ax):
        jitter = random.Random(0)
        # at most SCATTER_POINTS drawn (a seeded sample): more only cost time, the cloud looks the same
        shown = sorted(jitter.sample(range(len(fine)), SCATTER_POINTS)) if len(fine) > SCATTER_POINTS \
            else range(len(fine))
        ax.scatter([fine[i] + jitter.uniform(-0.15, 0.15) for i in shown],
                   [overall[i] + jitter.uniform(-0.15, 0.15) for i in shown], s=8, alpha=0.5)
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
    requests = Requests(rows, recipe)
    ran, tokens = [], None
    if not opts.merge_only:
        for index in ([opts.shard] if opts.shard is not None else range(num_shards)):
            info, tokens = run_shard(recipe, rows, items, index, num_shards, opts, requests)
            ran.append(info)
    if opts.batch == "submit":  # no merge: the dataset comes with --batch collect
        return {key: sum(r[key] for r in ran) for key in ("submitted", "batches")}
    if opts.shard is not None:
        return None  # array tasks: the merge is its own job, after all shards
    # every shard ran here, one after another: the last one's ledger saw all the others' answers
    return merge(recipe, rows, requests, num_shards, tokens)


def rows_digest(recipe: Recipe, requests: Requests, shard: int, num_shards: int) -> str:
    """What a shard's rows were judged from: its rows' request digests and the settings that
    decide how answers become rows. Saved in the shard's `_SUCCESS`; a merge refuses a shard whose
    digest differs from what the current inputs and recipe give (its rows would be stale)."""
    ann = recipe.annotation
    digest = hashlib.sha256(json.dumps([ann.critique, ann.max_position_gap, ann.max_reasks]).encode())
    for r in range(shard, len(requests.rows), num_shards):
        digest.update(requests.context(r).encode())
    return digest.hexdigest()


def row_features(recipe: Recipe):
    return (records.PERMUTED_COMPLETION_SET_FEATURES if recipe.annotation.position_debias == "permute"
            else records.COMPLETION_SET_FEATURES)


class RowStream:
    """One shard's outcomes, row by row. When the last item of a row is resolved the row is
    assembled, handed to the writer and its outcomes dropped (permute: unless its orders
    disagree, when its extra orders are asked first), so what is held is the rows in progress,
    not the run. Kept whole: the failed items (few; the failure fraction bounds them) and the
    failure records of the rows written."""

    def __init__(self, judge: JudgeRun, items: list, writer: RowWriter):
        self.judge, self.writer = judge, writer
        self.left = Counter(item.row for item in items)  # items of each row not resolved yet
        self.outcomes: dict[int, dict] = {}
        self.asked_extras: set[int] = set()
        self.items = len(items)
        self.extras = self.stopped = 0
        self.failed: list[tuple] = []  # (item, outcome)
        self.failures: list[tuple[int, dict]] = []  # (row, record): lost items and inconsistent ratings
        self.rows_out = self.annotated = self.incomplete = 0

    def add(self, item, outcome) -> list:
        """Record one outcome; returns the items to ask next (a row's extra orders)."""
        r = item.row
        outcomes = self.outcomes.setdefault(r, {})
        outcomes[item] = outcome
        if outcome.status == "failed":
            self.failed.append((item, outcome))
        elif outcome.status == "stopped":
            self.stopped += 1
        self.left[r] -= 1
        if self.left[r]:
            return []
        if r not in self.asked_extras:
            # permute: decided from this row's answers alone, so a resumed run asks the same ones
            extras = extra_items(self.judge.requests, list(outcomes), outcomes)
            if extras:
                self.asked_extras.add(r)
                self.left[r] += len(extras)
                self.items += len(extras)
                self.extras += len(extras)
                return extras
        self.asked_extras.discard(r)
        del self.left[r]
        self._write(r, self.outcomes.pop(r))
        return []

    def _write(self, r: int, outcomes: dict) -> None:
        if any(o.status == "stopped" for o in outcomes.values()):
            return  # the budget stopped the shard: nothing of it is written
        judge = self.judge
        items = sorted(outcomes, key=item_sort_key)
        row, failures, incomplete = assemble_row(r, judge.rows[r], items, outcomes, judge.requests,
                                                 judge.ann.critique)
        self.failures += [(r, f) for f in failures]
        self.incomplete += incomplete
        if row is not None:
            self.writer.write(r, row)
            self.rows_out += 1
            self.annotated += len(row["completions"])


def settle(judge: JudgeRun, items: list, stream: RowStream) -> None:
    """Every item's outcome into `stream`, in one pass: each item's request is rendered once (or
    not at all when the parse cache answers it), answered from the ledger where it can be and sent
    otherwise. A rerun of a finished run sends nothing, so it never opens a connection (the
    clients connect on their first request)."""
    from tqdm import tqdm

    judge.keep_pending = False
    judge.count_replays = True
    bar = tqdm(total=stream.items, desc="annotate", unit="item", dynamic_ncols=True, mininterval=0.5)

    def on_outcome(item, outcome) -> list:
        follow = stream.add(item, outcome)
        if follow:
            bar.total += len(follow)
        return follow

    try:
        with quiet_collector():
            asyncio.run(judge.run_all(items, bar, len(stream.failed), on_outcome))
    finally:
        bar.close()


@contextmanager
def quiet_collector() -> Iterator[None]:
    """The cyclic garbage collector, made cheap for the sending loop: what is alive when the loop
    starts (modules, recipe, plan, ledger index) lives as long as it does, so it is frozen and no
    longer re-scanned, and the youngest generation is collected every 10,000 allocations instead
    of 700. Measured in-process at concurrency 256 (10,000 requests, 4 runs each way): the
    collector's time fell from 0.85 s to 0.39 s and the loop's median from 5.5 s to 5.1 s."""
    import gc

    threshold = gc.get_threshold()
    gc.collect()  # what is garbage now would otherwise stay frozen with the rest
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def run_shard(recipe: Recipe, rows: SpilledRows, items: list, shard: int, num_shards: int,
              opts: RunOptions, requests: Requests) -> tuple[dict, dict | None]:
    """Judge one shard's items: send what the ledgers do not answer yet, writing each row to
    `shard-*/rows/` as its items finish; check the failure fraction, write the shard's
    failures.jsonl and its `_SUCCESS` (with this run's tally). Returns that tally and the token
    sums of every ledger of the stage (--batch submit: what it submitted, no tokens).
    A shard already done is judged again all the same: that only replays (nothing is sent) and
    gives this run's figures."""
    stage_path = stage_dir(recipe)
    path = shard_dir(stage_path, shard, num_shards)
    path.mkdir(parents=True, exist_ok=True)
    clear_done(path)
    where = f"annotate shard {shard} of {num_shards}"
    mine = shard_items(items, shard, num_shards)
    cache_files = [p for p in sorted(stage_path.glob(f"shard-*-of-*/{PARSED}")) if p != path / PARSED]
    with open_ledger(stage_path, path / LEDGER) as ledger, ParseCache(path / PARSED, cache_files) as cache:
        judge = JudgeRun(recipe, rows, ledger, opts.retry_failed, cache=cache, requests=requests)
        if opts.batch == "submit":
            return batch_submit(judge, mine, path), None
        if opts.batch == "collect":
            batch_collect(judge, path, recipe.annotation.batch_poll_s)
        # the budget covers every run and every shard: what the ledgers show spent when this one starts
        judge.spent_before = spent_from(ledger_tokens(ledger), judge.price) - judge.tally.cost_usd
        started = time.monotonic()
        writer = RowWriter(path / ROWS, row_features(recipe))
        stream = RowStream(judge, mine, writer)
        try:
            settle(judge, mine, stream)
        except BaseException:
            writer.discard()
            raise
        elapsed = time.monotonic() - started
        tokens = ledger_tokens(ledger)

    tally = judge.tally
    failed = sorted(stream.failed, key=lambda pair: (pair[0].row, item_sort_key(pair[0])))
    total = stream.items
    if stream.stopped:
        writer.discard()
        raise StageFailed(
            f"{where}: budget_usd={recipe.annotation.budget_usd} reached (${judge.spent_before + tally.cost_usd:.4f} "
            f"spent in all runs); {total - stream.stopped} of {total} items done and kept in the ledger. "
            "Raise annotation.budget_usd and rerun to continue.")
    failures = [item_failure(rows, item, outcome) for item, outcome in failed]
    atomic_write_text(path / FAILURES, "".join(json.dumps(f) + "\n" for f in failures))
    limit = recipe.annotation.max_failure_fraction
    if total and len(failed) / total > limit:
        writer.discard()
        reasons = Counter(outcome.reason.split(":")[0] for _, outcome in failed).most_common(3)
        raise StageFailed(
            f"{where}: {len(failed)} of {total} judge items failed (more than "
            f"max_failure_fraction={limit}); see {path / FAILURES}; commonest: "
            + "; ".join(f"{n}x {r}" for r, n in reasons) + ". Fix the cause and rerun with --retry-failed.")
    # the rows' failure records go with the rows, for the merge's failures.jsonl
    (writer.tmp / FAILURES).write_text("".join(json.dumps([r, f]) + "\n" for r, f in stream.failures))
    writer.commit()
    info = {"shard": shard, "num_shards": num_shards, "items": total, "items_failed": len(failed),
            "extra_orders": stream.extras, "requests_sent": tally.sent, "requests_replayed": tally.replayed,
            "failed_requests": tally.failed_requests, "reasks": tally.reasks,
            "parse_failures": dict(tally.parse_failures), "servers": judge.fleet.counts(),
            "rows_out": stream.rows_out, "completions_annotated": stream.annotated,
            "completions_incomplete": stream.incomplete, "parse_cache_hits": cache.hits,
            "rows_digest": rows_digest(recipe, requests, shard, num_shards), "seconds": round(elapsed, 2)}
    mark_done(path, info)
    return info, tokens


def spent_from(tokens: dict, price) -> float:
    if price is None:
        return 0.0
    return (tokens["prompt"] * price.input_per_mtok + tokens["completion"] * price.output_per_mtok) / 1e6


def merge(recipe: Recipe, rows: SpilledRows, requests: Requests, num_shards: int, tokens: dict | None = None) -> dict:
    """The dataset from the shards' rows, once every shard is done: their rows in input order
    (so it is the same dataset whatever the number of shards), and nothing sent. `tokens`: the
    stage's ledger totals when the shards have just run in this process (else read here)."""
    stage_path = stage_dir(recipe)
    shards = done_shards(stage_path, num_shards, "annotate")
    folders = []
    for i, info in enumerate(shards):
        folder = shard_dir(stage_path, i, num_shards) / ROWS
        if not folder.is_dir() or info.get("rows_digest") != rows_digest(recipe, requests, i, num_shards):
            raise StageFailed(
                f"annotate: cannot merge: shard {i} of {num_shards} was judged from other inputs or settings than "
                f"these (or by an older version of annotate, without {ROWS}/). Run it again (--shard {i} "
                f"--num-shards {num_shards}; nothing already answered is paid again), then --merge.")
        folders.append(folder)
    if tokens is None:
        with reading_ledgers(stage_path) as ledger:
            tokens = ledger_tokens(ledger)

    keyed = [json.loads(line) for folder in folders for line in (folder / FAILURES).read_text().splitlines() if line]
    failures = [f for _, f in sorted(keyed, key=lambda pair: pair[0])]  # by row; within a row as assembled
    atomic_write_text(stage_path / FAILURES, "".join(json.dumps(f) + "\n" for f in failures))
    total = lambda key: sum(s.get(key, 0) for s in shards)  # noqa: E731
    if not total("rows_out"):
        raise StageFailed(f"annotate: no completion set was fully annotated ({total('items_failed')} of "
                          f"{total('items')} judge items failed); see {stage_path / FAILURES}")
    tally = RatingTally()
    rows_out = gather(folders, stage_path / DATASET, row_features(recipe), on_chunk=tally.add_table)
    report = write_report(tally, stage_path / "report")
    annotated = total("completions_annotated")
    parse_failures, servers = Counter(), {}
    for s in shards:
        parse_failures.update(s["parse_failures"])
        servers = add_counts(servers, s.get("servers", {}))
    price = recipe.annotation.price
    summary = {
        "mode": recipe.annotation.mode, "judge_model": recipe.annotation.judge_model,
        "template_version": requests.version, "seed": recipe.annotation.seed,
        "position_debias": recipe.annotation.position_debias,
        **position_summary(recipe, total("extra_orders"), failures),
        "rows_in": len(rows), "rows_out": rows_out, "completions_annotated": annotated,
        "completions_incomplete": total("completions_incomplete"), "items": total("items"),
        "items_failed": total("items_failed"),
        # "this run": each shard's latest run (its _SUCCESS), summed
        "requests_sent_this_run": total("requests_sent"), "requests_replayed": total("requests_replayed"),
        "failed_requests_this_run": total("failed_requests"),
        "reasks_this_run": total("reasks"), "parse_failures_this_run": dict(parse_failures),
        # per judge server: requests sent (they add up to requests_sent_this_run), failed, set aside
        "servers_this_run": servers,
        "tokens": tokens,
        "cost_usd_all_runs": round(spent_from(tokens, price), 6) if price is not None else None,
        "seconds": round(max(s["seconds"] for s in shards), 2),  # the slowest shard
        "num_shards": num_shards,
        "report": report,
    }
    summary["tokens_per_prompt"] = round(summary["tokens"]["total"] / max(len(rows), 1), 1)
    write_json(stage_path / "summary.json", summary)
    mark_done(stage_path, {"rows": rows_out, "completions": annotated})
    print_summary(summary, stage_path)
    return summary


def position_summary(recipe: Recipe, extras: int, failures: list[dict]) -> dict:
    ann = recipe.annotation
    if ann.position_debias != "permute":
        return {}
    return {"position_orders": ann.position_orders, "max_position_gap": ann.max_position_gap,
            "extra_orders": extras,
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
