"""Stage `sayself-sample`: N reasoning chains per training question (SaySelf step 1).

Input: `inputs.items`, QA items (`pipeline.records.QA_FEATURES`, the qa-data output), split
`inputs.split`. Open and choice items are asked; unanswerable items have no gold answer to agree
with, so they are skipped and counted. `model` is any ModelSpec: a local `hf` model or a model
behind an OpenAI-compatible API (`openai`).

Each question is asked `sayself.samples` times, as one user turn: `question_text(item)` (context,
question, lettered options for choice items) + a blank line + `pipeline.methods.sayself.CHAIN_INSTRUCTION`,
at `sayself.temperature`. Every chain is its own ledgered request: chain j of a question gets the
sampling seed `base + j` (base drawn from `sayself.seed` and the qid), so the N chains have N
distinct keys and a rerun (or a kill and rerun) sends only the chains the ledger lacks. Failed
requests go to the ledger with their reason; `--retry-failed` sends them again; the stage fails
when they pass `sayself.max_failure_fraction`.

The final answer of a chain is `pipeline.methods.sayself.parse_answer`; for a choice item an option
letter or the option's text both count (`item_answer`: stored as the letter). A chain without a
parsable answer is counted (per question and in total) and left out, never kept as an empty
answer (`sayself.unlabelled: answer` reads a reply without an `Answer:` line as an answer: its first
line). `correct` is `pipeline.methods.sayself.item_correct` (gold substring; the right letter).

Output (`data/runs/<run>/sayself-sample/`): `dataset/` (DatasetDict, split `train`: the item's QA
columns + `chains` [{text, answer, correct}] + `asked`, `unparsable`, `failed` (counts of this
question's chains)), `ledger.jsonl`, `failures.jsonl`, `summary.json` (with `spend`: tokens and dollars of an
openai model, this run and all runs), `config.yaml`, `_SUCCESS` last.

Spending (an openai model, pipeline.llm.spend): `model.requests_per_minute`, `model.tokens_per_minute`,
`model.price`, `model.budget_usd` (a budget that would be passed stops the stage, exit 1, with nothing
but the ledger written; a rerun with a higher one sends only the chains the ledger lacks). `--dry-run`
prints the chains still to send, their estimated tokens and dollars; no API key, nothing written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.config import ConfigError, LaunchSection, ModelSpec, RunSection, StageRef, Strict, local_paths
from pipeline.ledger import Ledger, billed_tokens, outcomes, request_key
from pipeline.llm.base import GenRequest, ledgered_generate, make_backend
from pipeline.llm.spend import dry_run_plan, spend_summary
from pipeline.methods.rtuning import check_item, question_text
from pipeline.methods.sayself import CHAIN_INSTRUCTION, SPLIT, item_answer, item_correct, parse_answer
from pipeline.records import QA_COLUMNS
from pipeline.runs import (
    DATASET,
    RunOptions,
    StageFailed,
    atomic_dir,
    atomic_write_text,
    clear_done,
    load_rows,
    mark_done,
    save_config,
    stage_dir,
    write_json,
)


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
    unlabelled: Literal["drop", "answer"] = Field(
        "drop", description="A chain without an `Answer:` line: drop it, or read its first line as the answer "
        "(for small chat models that answer in plain prose whatever format they are asked for)")


class Recipe(Strict):
    stage: Literal["sayself-sample"]
    run: RunSection
    model: ModelSpec = Field(description="The model whose chains are sampled (hf or openai backend)")
    inputs: SayselfSampleInputs
    sayself: SayselfSampleSection = SayselfSampleSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        named = {"inputs.items": self.inputs.items}
        named["model.path"] = self.model.path  # (local_paths keeps plain paths only)
        return local_paths(**named)


log = logging.getLogger(__name__)

# Part of every chain's ledger key: bump it when the prompt shape changes.
SAMPLE_VERSION = "sayself-sample-v1"
LEDGER = "ledger.jsonl"
FAILURES = "failures.jsonl"


def chain_prompt(item: dict) -> tuple[dict, ...]:
    return ({"role": "user", "content": f"{question_text(item)}\n\n{CHAIN_INSTRUCTION}"},)


def chain_seeds(seed: int, qid: str, samples: int) -> list[int]:
    """Distinct sampling seeds of a question's chains (31-bit, as every backend accepts)."""
    base = int(hashlib.sha256(f"sayself-sample:{seed}:{qid}".encode()).hexdigest(), 16) % 2**31
    return [(base + j) % 2**31 for j in range(samples)]


def plan_requests(items: list[dict], recipe: Recipe, identity: dict) -> list[list[GenRequest]]:
    """Per question, its chains' requests (the same plan on every run: keys never move)."""
    s = recipe.sayself
    plan = []
    for item in items:
        messages = chain_prompt(item)
        row = []
        for seed in chain_seeds(s.seed, item["qid"], s.samples):
            params = {"temperature": s.temperature, "top_p": s.top_p, "max_new_tokens": s.max_new_tokens,
                      "seed": seed}
            row.append(GenRequest(key=request_key(identity, SAMPLE_VERSION, messages, params),
                                  messages=messages, params=params))
        plan.append(row)
    return plan


def read_chain(item: dict, text: str, unlabelled: str = "drop") -> dict | None:
    """{text, answer, correct} of one sampled chain, or None when it has no parsable answer
    (with `unlabelled="answer"`, a reply without an `Answer:` line answers with its first line)."""
    parsed = parse_answer(text)
    if parsed is None and unlabelled == "answer":
        parsed = next((line.strip() for line in text.splitlines() if line.strip()), None)
    answer = item_answer(parsed, item)
    if answer is None:
        return None
    return {"text": text, "answer": answer, "correct": item_correct(answer, item)}


def load_items(recipe: Recipe) -> tuple[list[dict], int, Path]:
    """(answerable items, unanswerable ones skipped, input folder)."""
    rows, path = load_rows(recipe, recipe.inputs.items, "inputs.items", set(QA_COLUMNS), recipe.inputs.split)
    if recipe.sayself.limit:
        rows = rows[: recipe.sayself.limit]
    for i, row in enumerate(rows):
        check_item(row, f"inputs.items split {recipe.inputs.split!r} row {i}")
    items = [{k: row[k] for k in QA_COLUMNS} for row in rows if row["kind"] != "unanswerable"]
    if not items:
        raise ConfigError(f"inputs.items: split {recipe.inputs.split!r} of {path} has no answerable question")
    return items, len(rows) - len(items), path


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    from datasets import Dataset, DatasetDict

    started = time.time()
    items, skipped, items_path = load_items(recipe)
    try:
        backend = make_backend(recipe.model, where="model", dry_run=opts.dry_run)
    except ValueError as err:  # a model folder that is not one
        raise ConfigError(f"model: {err}") from None
    plan = plan_requests(items, recipe, backend.identity())
    path = stage_dir(recipe)
    if opts.dry_run:
        ok, failed = outcomes([path / LEDGER])
        todo = [req for row in plan for req in row
                if req.key not in ok and (opts.retry_failed or req.key not in failed)]
        return dry_run_plan("sayself-sample", [(recipe.model, todo)], billed_tokens([path / LEDGER]))
    clear_done(path)
    path.mkdir(parents=True, exist_ok=True)
    save_config(path, recipe)

    with Ledger(path / LEDGER) as ledger:
        qid_of = {req.key: item["qid"] for item, row in zip(items, plan) for req in row}
        todo = [req for row in plan for req in row
                if not ledger.is_ok(req.key) and (opts.retry_failed or not ledger.failure(req.key))]
        planned = sum(len(row) for row in plan)
        print(f"sayself-sample: {len(items)} questions x {recipe.sayself.samples} chains = {planned}; "
              f"{planned - len(todo)} in the ledger, {len(todo)} to send")
        if todo:
            ledgered_generate(backend, todo, ledger, f"sayself-sample {recipe.model.name}", unit="chain",
                              tags=lambda req: {"qid": qid_of[req.key]}, stage="sayself-sample")
        spend = spend_summary({recipe.model.name: backend}, ledger)

        rows, failures = [], []
        totals = Counter()
        by_kind: dict[str, Counter] = {}
        for item, row in zip(items, plan):
            chains, unparsable, failed = [], 0, 0
            for req in row:
                result = ledger.result(req.key)
                if result is None:
                    failed += 1
                    failure = ledger.failure(req.key) or {"reason": "no outcome recorded"}
                    failures.append({"key": req.key, "qid": item["qid"], "reason": failure.get("reason")})
                    continue
                chain = read_chain(item, result["text"], recipe.sayself.unlabelled)
                if chain is None:
                    unparsable += 1
                else:
                    chains.append(chain)
            rows.append({**item, "chains": chains, "asked": len(row), "unparsable": unparsable, "failed": failed})
            counts = by_kind.setdefault(item["kind"], Counter())
            counts.update(questions=1, chains=len(chains), correct=sum(c["correct"] for c in chains),
                          unparsable=unparsable, failed=failed)
            totals.update(chains=len(chains), unparsable=unparsable, failed=failed,
                          correct=sum(c["correct"] for c in chains),
                          no_parsable_chain=int(not chains))
    atomic_write_text(path / FAILURES, "".join(json.dumps(f) + "\n" for f in failures))
    limit = recipe.sayself.max_failure_fraction
    if failures and len(failures) / planned > limit:
        reasons = Counter(f["reason"] for f in failures).most_common(3)
        raise StageFailed(
            f"sayself-sample: {len(failures)} of {planned} requests failed (more than max_failure_fraction="
            f"{limit}); see {path / FAILURES}; commonest reasons: "
            + "; ".join(f"{n}x {r}" for r, n in reasons) + ". Fix the cause and rerun with --retry-failed.")

    with atomic_dir(path / DATASET) as tmp:
        DatasetDict({SPLIT: Dataset.from_list(rows)}).save_to_disk(str(tmp))
    parsed = totals["chains"] + totals["unparsable"]
    summary = {
        "stage": recipe.stage, "model": recipe.model.name, "items": str(items_path), "split": recipe.inputs.split,
        "questions": len(rows), "unanswerable_skipped": skipped, "samples_per_question": recipe.sayself.samples,
        "chains_planned": planned, "chains_kept": totals["chains"], "chains_unparsable": totals["unparsable"],
        "chains_failed": totals["failed"], "chains_correct": totals["correct"],
        "unparsable_fraction": round(totals["unparsable"] / parsed, 4) if parsed else None,
        "questions_without_parsable_chain": totals["no_parsable_chain"],
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "spend": spend,
        "seconds": round(time.time() - started, 1),
    }
    write_json(path / "summary.json", summary)
    mark_done(path, {"questions": len(rows), "chains": totals["chains"]})
    print(f"sayself-sample: {len(rows)} questions ({skipped} unanswerable skipped), {totals['chains']} chains kept "
          f"({totals['correct']} correct); {totals['unparsable']} chains without a parsable answer left out, "
          f"{totals['failed']} failed; {totals['no_parsable_chain']} questions without any parsable chain "
          f"-> {path / DATASET}")
    return summary
