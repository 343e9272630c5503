"""The generate stage: balanced plan, principle mix, both backends, shards, failures, kill -9."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from datasets import load_from_disk
from helpers import SOURCES, stage_path, standin_model, write_prompts, write_recipe
from helpers import ledger_ok_keys as _ledger_ok_keys

from pipeline.cli import main as rlhf
from pipeline.methods.principles import DEFAULT_PRINCIPLE_MIX, PRINCIPLE_PROMPTS
from pipeline.records import COMPLETION_SET_FEATURES, prompt_id
from pipeline.stages.generate import Recipe as GenerateRecipe
from pipeline.stages.generate import assign_models, make_plan, split_by_mix

ROOT = Path(__file__).resolve().parents[2]


# --- the plan -------------------------------------------------------------------------------


@pytest.mark.parametrize("prompts,models,k", [(10, 4, 4), (37, 5, 4), (101, 7, 3), (13, 3, 1), (50, 17, 4)])
def test_every_model_gets_an_equal_share(prompts, models, k):
    pool = [f"m{i}" for i in range(models)]
    chosen = assign_models(prompts, pool, k, seed=3)
    assert all(len(row) == len(set(row)) == k for row in chosen)
    counts = Counter(name for row in chosen for name in row)
    assert set(counts) <= set(pool)
    assert max(counts.get(m, 0) for m in pool) - min(counts.get(m, 0) for m in pool) <= 1
    assert assign_models(prompts, pool, k, seed=3) == chosen  # deterministic
    if models > k:
        assert assign_models(prompts, pool, k, seed=4) != chosen  # and really seeded
        pairs = Counter(tuple(row) for row in chosen)
        assert len(pairs) > 1  # not always the same group of models


def test_principle_split_follows_the_mix():
    rng = random.Random(0)
    mix = DEFAULT_PRINCIPLE_MIX["sharegpt"]
    for count in (1, 7, 50, 333, 1000):
        names = split_by_mix(count, mix, rng)
        assert len(names) == count
        got = Counter(names)
        for principle, weight in mix.items():
            assert abs(got[principle] - weight * count) < 1, (count, principle)


def test_plan_mix_per_source_and_variants(tmp_path):
    prompts = [{"prompt_id": prompt_id(f"p{i}"), "source": SOURCES[i % 3], "instruction": f"p{i}"}
               for i in range(300)]
    recipe = GenerateRecipe.model_validate({
        "stage": "generate", "run": {"name": "x"}, "inputs": {"prompts": "unused"},
        "generation": {"pool": [{"name": n, "backend": "openai", "base_url": "http://x"} for n in "abcd"],
                       "principle_mix": {"flan": {"honesty": 0.5, "helpfulness": 0.5}}},
    })
    plan = make_plan(prompts, recipe)
    by_source: dict[str, Counter] = {}
    variants: dict[str, set] = {}
    for row in plan:
        assert len(row) == 4 and len({c.model for c in row}) == 4
        source = prompts[row[0].prompt_index]["source"]
        for c in row:
            by_source.setdefault(source, Counter())[c.principle] += 1
            assert c.system_prompt in PRINCIPLE_PROMPTS[c.principle]
            variants.setdefault(c.principle, set()).add(c.system_prompt)
    expected = {"sharegpt": DEFAULT_PRINCIPLE_MIX["sharegpt"], "flan": {"honesty": 0.5, "helpfulness": 0.5},
                "truthful_qa": DEFAULT_PRINCIPLE_MIX["truthful_qa"]}
    for source, mix in expected.items():
        total = sum(by_source[source].values())
        for principle, weight in mix.items():
            assert abs(by_source[source][principle] - weight * total) < 1
        assert set(by_source[source]) == {p for p, w in mix.items() if w * total >= 1}
    assert len(variants["helpfulness"]) >= 5  # the variants really are drawn, not always the first
    assert len({c.seed for row in plan for c in row}) == 1200


# --- end to end -----------------------------------------------------------------------------


def test_both_backends_end_to_end(tmp_path, tiny_pool, standin):
    prompts = write_prompts(tmp_path / "prompts", 18)
    pool = [{"name": p.name, "backend": "hf", "path": str(p), "batch_size": 4} for p in tiny_pool]
    pool.append(standin_model(standin))
    recipe = write_recipe(tmp_path, pool, prompts, models_per_prompt=4)
    assert rlhf(["generate", str(recipe)]) == 0

    out = stage_path(tmp_path)
    assert (out / "_SUCCESS").is_file()
    data = load_from_disk(str(out / "dataset"))
    assert data.features == COMPLETION_SET_FEATURES
    assert len(data) == 18 and len(set(data["prompt_id"])) == 18
    per_model = Counter()
    for row in data:
        assert len(row["completions"]) == 4 and row["models"] == [c["model"] for c in row["completions"]]
        for c in row["completions"]:
            per_model[c["model"]] += 1
            assert c["response"].strip(), "a completion must never be an empty row"
            assert c["custom_system_prompt"] in PRINCIPLE_PROMPTS[c["principle"]]
            assert c["overall_score"] is None and c["annotations"]["honesty"]["Rating"] is None
    assert sorted(per_model) == sorted(p["name"] for p in pool)
    assert max(per_model.values()) - min(per_model.values()) <= 1  # 72 completions over 5 models
    # The stand-in answered exactly its share, over real HTTP.
    assert standin.stats()["requests_by_status"] == {"200": per_model["standin-medium"]}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completions"] == 72 and summary["failed_completions"] == 0
    assert (out / "config.yaml").is_file()

    # Done means skipped; --force rebuilds from the ledger without a single new request.
    standin.reset()
    assert rlhf(["generate", str(recipe)]) == 0
    assert rlhf(["generate", str(recipe), "--force"]) == 0
    assert standin.stats()["requests_total"] == 0
    again = load_from_disk(str(out / "dataset"))
    assert again.to_list() == data.to_list()


def test_shards_run_separately_then_merge_equal_one_local_run(tmp_path, standin):
    prompts = write_prompts(tmp_path / "prompts", 20)
    pool = [standin_model(standin, "standin-strong"), standin_model(standin, "standin-weak"),
            standin_model(standin, "standin-medium")]
    recipe = write_recipe(tmp_path, pool, prompts)
    for shard in (2, 0, 1):
        assert rlhf(["generate", str(recipe), "--shard", str(shard), "--num-shards", "3"]) == 0
        assert not (stage_path(tmp_path) / "_SUCCESS").exists()
    assert rlhf(["generate", str(recipe), "--merge", "--num-shards", "3"]) == 0
    sharded = load_from_disk(str(stage_path(tmp_path) / "dataset")).to_list()
    assert standin.stats()["requests_total"] == 40

    local = write_recipe(tmp_path, pool, prompts)
    other_root = ["run.root=" + str(tmp_path / "runs-local")]
    assert rlhf(["generate", str(local), *other_root]) == 0
    single = load_from_disk(str(tmp_path / "runs-local" / "t" / "generate" / "dataset")).to_list()
    assert sharded == single  # the plan and the stand-in's answers do not depend on sharding


def test_merge_refuses_missing_shards(tmp_path, standin):
    prompts = write_prompts(tmp_path / "prompts", 6)
    recipe = write_recipe(tmp_path, [standin_model(standin, "standin-strong"), standin_model(standin, "standin-weak")],
                          prompts)
    assert rlhf(["generate", str(recipe), "--shard", "0", "--num-shards", "2"]) == 0
    assert rlhf(["generate", str(recipe), "--merge", "--num-shards", "2"]) == 1
    assert not (stage_path(tmp_path) / "dataset").exists()


def test_failures_are_recorded_then_retried_only_with_retry_failed(tmp_path, standin):
    prompts = write_prompts(tmp_path / "prompts", 30)
    pool = [standin_model(standin, "standin-strong"), standin_model(standin, "standin-weak")]
    recipe = write_recipe(tmp_path, pool, prompts, max_failure_fraction=0.02)
    standin.configure(fail_5xx=0.3, seed=5)
    assert rlhf(["generate", str(recipe)]) == 1  # too many failures: stage fails loudly
    shard = stage_path(tmp_path) / "shard-0-of-1"
    failures = [json.loads(line) for line in (shard / "failures.jsonl").read_text().splitlines()]
    statuses = standin.stats()["requests_by_status"]
    assert len(failures) == statuses["500"] > 0
    assert all("HTTP 500" in f["reason"] for f in failures)
    assert not (shard / "_SUCCESS").exists() and not (stage_path(tmp_path) / "_SUCCESS").exists()

    # A plain rerun neither pays again for successes nor silently retries failures.
    standin.configure(fail_5xx=0.0)
    standin.reset()
    assert rlhf(["generate", str(recipe)]) == 1
    assert standin.stats()["requests_total"] == 0

    # --retry-failed sends exactly the failed requests again, and nothing else.
    assert rlhf(["generate", str(recipe), "--retry-failed"]) == 0
    log = standin.stats()["log"]
    assert sorted(e["request_key"] for e in log) == sorted(f["key"] for f in failures)
    data = load_from_disk(str(stage_path(tmp_path) / "dataset"))
    assert sum(len(r["completions"]) for r in data) == 60


def test_a_few_failures_under_the_limit_leave_the_completion_out(tmp_path, standin):
    prompts = write_prompts(tmp_path / "prompts", 30)
    pool = [standin_model(standin, "standin-strong"), standin_model(standin, "standin-weak")]
    recipe = write_recipe(tmp_path, pool, prompts, max_failure_fraction=0.5)
    standin.configure(fail_5xx=0.1, seed=2)
    assert rlhf(["generate", str(recipe)]) == 0
    failed = standin.stats()["requests_by_status"].get("500", 0)
    assert failed > 0
    data = load_from_disk(str(stage_path(tmp_path) / "dataset"))
    completions = [c for r in data for c in r["completions"]]
    assert len(completions) == 60 - failed
    assert all(c["response"] for c in completions)
    assert json.loads((stage_path(tmp_path) / "summary.json").read_text())["failed_completions"] == failed


def test_kill_minus_9_never_pays_twice(tmp_path, standin):
    """Kill the generating process at random points; every rerun sends only unrecorded requests."""
    prompts = write_prompts(tmp_path / "prompts", 60)
    pool = [standin_model(standin, "standin-strong", max_concurrency=3),
            standin_model(standin, "standin-weak", max_concurrency=3)]
    recipe = write_recipe(tmp_path, pool, prompts)
    standin.configure(latency_s=0.03, latency_jitter_s=0.03)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RLHF_LOG": "WARNING"}
    cmd = [sys.executable, "-m", "pipeline", "generate", str(recipe)]
    rng = random.Random(11)
    kills, partial = 0, 0
    for attempt in range(8):
        paid_before = _ledger_ok_keys(stage_path(tmp_path))
        standin.reset()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt < 4:
            # Into the requests, whatever the machine's load: wait for this run's first new
            # ledger record (not a fixed sleep, which a slow start-up outlasts), then a bit more.
            deadline = time.monotonic() + 120
            while (proc.poll() is None and time.monotonic() < deadline
                   and len(_ledger_ok_keys(stage_path(tmp_path))) <= len(paid_before)):
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
        code = proc.wait(timeout=120)
        partial += 0 < len(_ledger_ok_keys(stage_path(tmp_path))) < 120 and code != 0
        sent = [e["request_key"] for e in standin.stats()["log"]]
        assert not paid_before & set(sent), "a request already in the ledger was sent again"
        assert len(sent) == len(set(sent)), "a request was sent twice within one run"
        if attempt >= 4:
            assert code == 0
            break
    assert kills >= 2 and partial >= 2, "the kills missed the requests (too early or too late)"
    data = load_from_disk(str(stage_path(tmp_path) / "dataset"))
    assert len(data) == 60 and len(set(data["prompt_id"])) == 60
    assert all(len(r["completions"]) == 2 for r in data)
    ok_records = [json.loads(l) for p in stage_path(tmp_path).glob("shard-*/ledger.jsonl")
                  for l in p.read_text().splitlines() if l.strip()]
    ok_keys = [r["key"] for r in ok_records if r["status"] == "ok"]
    assert len(ok_keys) == len(set(ok_keys)) == 120  # each completion recorded exactly once


@pytest.mark.parametrize("change, message", [
    ("empty", r"prompts:row 3: field 'instruction' is empty"),
    ("blank", r"prompts:row 3: field 'instruction' is empty"),
    ("duplicate", r"prompts:row 3: duplicate prompt_id .*\(first at .*prompts:row 1\)"),
])
def test_empty_instructions_and_repeated_prompt_ids_are_refused_before_any_request(tmp_path, standin, capsys,
                                                                                   change, message):
    """Issue 18 #10: nothing is paid for a prompt annotate would refuse, or one two rows share."""
    import re

    from datasets import Dataset

    from pipeline.records import PROMPT_FEATURES

    rows = load_from_disk(str(write_prompts(tmp_path / "good", 4))).to_list()
    rows[2] = {**rows[2], "instruction": "", "prompt_id": prompt_id("")} if change == "empty" else \
        {**rows[2], "instruction": "  \n\t "} if change == "blank" else {**rows[2], "prompt_id": rows[0]["prompt_id"]}
    Dataset.from_list(rows, features=PROMPT_FEATURES).save_to_disk(str(tmp_path / "prompts"))
    recipe = write_recipe(tmp_path, [standin_model(standin, "standin-strong"), standin_model(standin, "standin-weak")],
                          tmp_path / "prompts")
    assert rlhf(["generate", str(recipe)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert standin.stats()["requests_total"] == 0
    assert not stage_path(tmp_path).exists() or not any(stage_path(tmp_path).rglob("_SUCCESS"))
