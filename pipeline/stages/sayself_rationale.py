"""Stage `sayself-rationale`: a first-person self-reflective rationale per question (SaySelf step 4).

Input: `inputs.clusters`, the sayself-cluster output (split `train`).

A question whose chains fall into more than one cluster is sent to the judge (`rationale.judge`,
an `openai`-backend model: any OpenAI-compatible server) with the template
`pipeline/judge/templates/sayself/rationale-v1.jinja`: the question (and its options; not its
context, since the rationale is about what the model knows), and the
representatives of its largest `rationale.max_representatives` clusters, each between marker
lines with a nonce drawn from the qid and with how often it was given. The judge writes, as the
model, which specific knowledge it is unsure about. The template version (`RATIONALE_VERSION`)
is part of every request's ledger key, with the judge model, the messages and the sampling
parameters: a rerun sends only questions the ledger lacks, and a kill loses only requests in
flight. An answer is cleaned (surrounding quotes and a leading "Self-reflection:" label dropped,
whitespace made one line, since the rationale becomes one line of the training target) and must
be non-empty, at most `MAX_CHARS` long and in the first person (I / my / me); otherwise it is
recorded as a failure with the raw answer. Failures (HTTP errors after the client's retries, and
unusable answers) go to the ledger with their reason and to `failures.jsonl`; their questions are
left out of the output and counted; `--retry-failed` sends them again; the stage fails when they
pass `rationale.max_failure_fraction`.

A question with a single cluster gets a fixed first-person sentence we wrote, without a call:
`FIXED_SURE` when at least half of its chains are correct, else `FIXED_UNSURE` (all chains agree
but mostly wrongly: the sentence sits next to a low confidence, so it must not claim certainty).

Output: `dataset/` (DatasetDict, split `train`: the cluster columns + `rationale` and
`rationale_source` "judge" or "fixed"), `ledger.jsonl`, `failures.jsonl`, `summary.json` (calls,
fixed, failed, tokens, `spend`: tokens and dollars this run and all runs, judge name), `config.yaml`,
`_SUCCESS` last.

Spending (pipeline.llm.spend): `rationale.judge.requests_per_minute`, `.tokens_per_minute`, `.price`,
`.budget_usd` (a budget that would be passed stops the stage, exit 1, with nothing but the ledger
written; a rerun with a higher one sends only what the ledger lacks). `--dry-run` prints the calls
still to send with estimated tokens and dollars; no API key, nothing written.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipeline.config import ConfigError, LaunchSection, ModelSpec, RunSection, StageRef, Strict, local_paths
from pipeline.ledger import Ledger, billed_tokens, outcomes, request_key
from pipeline.llm.base import GenRequest, ledgered_generate, make_backend
from pipeline.llm.spend import dry_run_plan, spend_summary
from pipeline.methods.sayself import SPLIT
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


class Recipe(Strict):
    stage: Literal["sayself-rationale"]
    run: RunSection
    inputs: SayselfRationaleInputs
    rationale: SayselfRationaleSection
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return local_paths(**{"inputs.clusters": self.inputs.clusters})


RATIONALE_VERSION = "sayself-rationale-v1"
TEMPLATE = Path(__file__).resolve().parents[1] / "judge" / "templates" / "sayself" / "rationale-v1.jinja"
LEDGER = "ledger.jsonl"
FAILURES = "failures.jsonl"
MAX_CHARS = 1000
FIXED_SURE = "I keep reaching the same answer, and I do not see a gap in the knowledge it rests on."
FIXED_UNSURE = "I keep reaching the same answer, but I cannot tie it to anything I reliably know, so it may be wrong."

_FIRST_PERSON = re.compile(r"\b(I|I'm|I've|I'd|my|me|myself)\b", re.IGNORECASE)
_LABEL = re.compile(r"^\s*(self-reflection|rationale)\s*:\s*", re.IGNORECASE)


@lru_cache(maxsize=1)
def _template():
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
                             lstrip_blocks=True, autoescape=False)
    return env.from_string(TEMPLATE.read_text(encoding="utf-8"))


def prompt_text(row: dict, max_representatives: int) -> str:
    """The rationale request for one question (its clusters are listed largest first)."""
    question = row["question"].strip()
    if row["kind"] == "choice":
        question += "\n" + "\n".join(f"{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(row["choices"]))
    nonce = hashlib.sha256(f"{RATIONALE_VERSION}:{row['qid']}".encode()).hexdigest()[:10]
    answers = [{"text": c["representative"].strip(), "size": c["size"]}
               for c in row["clusters"][:max_representatives]]
    return _template().render(question=question, answers=answers, total=row["total"], nonce=nonce)


def clean_rationale(text: str) -> str:
    """The rationale as one line; ValueError (the failure reason) when it is unusable."""
    quotes = "\"'“”"
    line = " ".join((text or "").split()).strip(quotes).strip()
    line = _LABEL.sub("", line).strip().strip(quotes).strip()
    if not line:
        raise ValueError("empty answer")
    if len(line) > MAX_CHARS:
        raise ValueError(f"answer longer than {MAX_CHARS} characters")
    if not _FIRST_PERSON.search(line):
        raise ValueError("answer not in the first person (no I / my / me)")
    return line


def fixed_rationale(row: dict) -> str:
    return FIXED_SURE if 2 * row["agreeing"] >= row["total"] else FIXED_UNSURE


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    from datasets import Dataset, DatasetDict

    started = time.time()
    section = recipe.rationale
    need = {*QA_COLUMNS, "clusters", "agreeing", "total", "confidence", "reasoning", "answer"}
    rows, clusters_path = load_rows(recipe, recipe.inputs.clusters, "inputs.clusters", need)
    for i, row in enumerate(rows):
        if not row["clusters"] or not row["total"]:
            raise ConfigError(f"inputs.clusters: row {i} (qid {row['qid'][:12]}) has no clusters")
    # ConfigError when the API key is missing (not with --dry-run, which builds no client)
    backend = make_backend(section.judge, where="rationale.judge", dry_run=opts.dry_run)
    identity = backend.identity()
    params = {"temperature": section.temperature, "max_new_tokens": section.max_new_tokens}
    requests: dict[int, GenRequest] = {}
    for i, row in enumerate(rows):
        if len(row["clusters"]) > 1:
            messages = ({"role": "user", "content": prompt_text(row, section.max_representatives)},)
            requests[i] = GenRequest(key=request_key(identity, RATIONALE_VERSION, messages, params),
                                     messages=messages, params=params)
    path = stage_dir(recipe)
    if opts.dry_run:
        ok, failed = outcomes([path / LEDGER])
        todo = [req for req in requests.values()
                if req.key not in ok and (opts.retry_failed or req.key not in failed)]
        return dry_run_plan("sayself-rationale", [(section.judge, todo)], billed_tokens([path / LEDGER]))
    clear_done(path)
    path.mkdir(parents=True, exist_ok=True)
    save_config(path, recipe)

    with Ledger(path / LEDGER) as ledger:
        qid_of = {req.key: rows[i]["qid"] for i, req in requests.items()}
        todo = [req for req in requests.values()
                if not ledger.is_ok(req.key) and (opts.retry_failed or not ledger.failure(req.key))]
        print(f"sayself-rationale: {len(rows)} questions, {len(requests)} with disagreeing clusters "
              f"({len(requests) - len(todo)} in the ledger, {len(todo)} to send), {len(rows) - len(requests)} "
              "with one cluster (fixed rationale, no call)")
        if todo:
            ledgered_generate(backend, todo, ledger, f"sayself-rationale {section.judge.name}",
                              tags=lambda req: {"qid": qid_of[req.key]}, check=clean_rationale,
                              stage="sayself-rationale")
        spend = spend_summary({section.judge.name: backend}, ledger)

        out, failures = [], []
        tokens = Counter()
        for i, row in enumerate(rows):
            if i not in requests:
                out.append({**row, "rationale": fixed_rationale(row), "rationale_source": "fixed"})
                continue
            req = requests[i]
            result = ledger.result(req.key)
            if result is None:
                failure = ledger.failure(req.key) or {"reason": "no outcome recorded"}
                failures.append({"key": req.key, "qid": row["qid"], "reason": failure.get("reason"),
                                 "raw": (failure.get("raw") or {}).get("text")})
                continue
            tokens.update(prompt=result.get("prompt_tokens", 0), completion=result.get("completion_tokens", 0))
            out.append({**row, "rationale": clean_rationale(result["text"]), "rationale_source": "judge"})
    atomic_write_text(path / FAILURES, "".join(json.dumps(f) + "\n" for f in failures))
    limit = section.max_failure_fraction
    if requests and len(failures) / len(requests) > limit:
        reasons = Counter(f["reason"] for f in failures).most_common(3)
        raise StageFailed(
            f"sayself-rationale: {len(failures)} of {len(requests)} requests failed (more than max_failure_fraction="
            f"{limit}); see {path / FAILURES}; commonest reasons: "
            + "; ".join(f"{n}x {r}" for r, n in reasons) + ". Fix the cause and rerun with --retry-failed.")
    if not out:
        raise StageFailed("sayself-rationale: no question has a rationale; nothing to write")
    with atomic_dir(path / DATASET) as tmp:
        DatasetDict({SPLIT: Dataset.from_list(out)}).save_to_disk(str(tmp))
    summary = {
        "stage": recipe.stage, "clusters": str(clusters_path), "judge": section.judge.name,
        "template": RATIONALE_VERSION, "questions": len(rows), "rows": len(out),
        "judge_questions": len(requests), "sent_this_run": len(todo), "fixed": len(rows) - len(requests),
        "failed": len(failures), "failure_reasons": dict(Counter(f["reason"] for f in failures)),
        "tokens": dict(tokens), "spend": spend, "seconds": round(time.time() - started, 1),
    }
    write_json(path / "summary.json", summary)
    mark_done(path, {"rows": len(out), "failed": len(failures)})
    print(f"sayself-rationale: {len(out)} rationales ({len(requests) - len(failures)} by the judge "
          f"{section.judge.name}, {summary['fixed']} fixed), {len(failures)} failed and left out -> {path / DATASET}")
    return summary
