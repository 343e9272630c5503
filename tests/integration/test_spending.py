"""Spending controls on every stage that sends paid calls through the openai backend (generate,
sayself-sample, sayself-rationale, unknown-eval), against the stand-in (real HTTP, real `usage`):
`--dry-run` plans without an API key and sends nothing; `budget_usd` stops a stage before its
model's spend would pass it, and a rerun with a higher budget completes without paying twice;
`requests_per_minute` is honoured (counted by the throttle on a clock of the test's own, not by
waiting out real minutes); summary.json records tokens and dollars."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict
from helpers import standin_model, write_items, write_prompts

from pipeline.cli import main as rlhf
from pipeline.ledger import billed_tokens
from pipeline.llm import spend as spend_module
from pipeline.llm.throttle import Throttle
from pipeline.records import QA_FEATURES, qa_item
from pipeline.runs import RunOptions
from pipeline.stages import STAGES, load_recipe

PRICE = {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}  # large, so a few calls cost cents

QUESTIONS = [qa_item("t", q, "choice", choices=c, answer_index=i) for q, c, i in (
    ("Which instrument does Fio play?", ["lute", "cello", "marimba"], 1),
    ("Which colour does Brae like?", ["teal", "amber", "olive", "coral"], 3),
    ("Where was Kel Drou born?", ["Ostrelby", "Bravonne"], 0),
    ("Which fruit does Ama grow?", ["fig", "quince"], 1))]


def _recipe(tmp_path: Path, tree: dict) -> Path:
    tree = {**tree, "run": {"name": "t", "root": str(tmp_path / "runs")}}
    path = tmp_path / f"{tree['stage']}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _model(base_url: str | None, name: str, spend: dict) -> dict:
    model = {"name": name, "backend": "openai", "max_concurrency": 1, "max_retries": 0, "timeout_s": 10, **spend}
    if base_url is not None:
        model["base_url"] = base_url
    return model


def _generate(tmp_path, base_url, spend):
    prompts = tmp_path / "prompts"
    if not prompts.exists():
        write_prompts(prompts, 6)
    pool = [_model(base_url, "standin-medium", spend)]
    tree = {"stage": "generate", "inputs": {"prompts": str(prompts)},
            "generation": {"pool": pool, "models_per_prompt": 1, "max_new_tokens": 12}}
    return _recipe(tmp_path, tree), "generation.pool[0]", "standin-medium"


def _save(folder: Path, rows: list[dict], features=None) -> str:
    if not folder.exists():
        DatasetDict({"train": Dataset.from_list(rows, features=features)}).save_to_disk(str(folder))
    return str(folder)


def _sayself_sample(tmp_path, base_url, spend):
    items = _save(tmp_path / "items", QUESTIONS, QA_FEATURES)
    tree = {"stage": "sayself-sample", "model": _model(base_url, "standin-medium", spend), "inputs": {"items": items},
            "sayself": {"samples": 2, "max_new_tokens": 24}}
    return _recipe(tmp_path, tree), "model", "standin-medium"


def _sayself_rationale(tmp_path, base_url, spend):
    from pipeline.stages.sayself_cluster import by_answer, summarise

    def chain(answer, correct):
        return {"text": f"I went through what I know.\nAnswer: {answer}", "answer": answer, "correct": correct}

    rows = [summarise({**item, "chains": [chain("A", item["answer_index"] == 0), chain("B", item["answer_index"] == 1)]},
                      by_answer([chain("A", item["answer_index"] == 0), chain("B", item["answer_index"] == 1)]))
            for item in QUESTIONS]
    clusters = _save(tmp_path / "clusters", rows)
    tree = {"stage": "sayself-rationale", "inputs": {"clusters": clusters},
            "rationale": {"judge": _model(base_url, "standin-judge", spend), "max_new_tokens": 48}}
    return _recipe(tmp_path, tree), "rationale.judge", "standin-judge"


def _unknown_eval(tmp_path, base_url, spend):
    items = tmp_path / "items"
    if not items.exists():
        write_items(items)
    tree = {"stage": "unknown-eval", "inputs": {"items": str(items)},
            "evaluation": {"models": [_model(base_url, "standin-medium", spend)], "splits": ["test_id"],
                           "answer_max_tokens": 16, "confidence_max_tokens": 6}}
    return _recipe(tmp_path, tree), "evaluation.models[0]", "standin-medium"


CASES = {"generate": _generate, "sayself-sample": _sayself_sample, "sayself-rationale": _sayself_rationale,
         "unknown-eval": _unknown_eval}


def _plan(name: str, recipe: Path) -> dict:
    return STAGES[name].load().run(load_recipe(recipe, stage=name), RunOptions(dry_run=True))


def _billed(tmp_path: Path, name: str, model: str) -> dict:
    files = sorted((tmp_path / "runs" / "t" / name).glob("**/ledger.jsonl"))
    return billed_tokens(files).get(model) or {"calls": 0, "prompt": 0, "completion": 0}


def _dollars(billed: dict) -> float:
    return (billed["prompt"] * PRICE["input_per_mtok"] + billed["completion"] * PRICE["output_per_mtok"]) / 1e6


@pytest.mark.parametrize("name", CASES)
def test_dry_run_needs_no_api_key_and_writes_nothing(name, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    recipe, where, model = CASES[name](tmp_path, None, {"price": PRICE})  # api.openai.com: a key is required
    assert rlhf([name, str(recipe)]) == 2
    assert "no API key" in capsys.readouterr().err
    assert rlhf([name, str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    plan = _plan(name, recipe)
    assert plan["calls"] > 0 and plan["cost_usd_at_most"] > 0
    assert f"{name} --dry-run: {model}: {plan['calls']} call(s) to send" in out
    assert f"{plan['calls']} call(s) in all, at most $" in out
    assert not (tmp_path / "runs" / "t" / name).exists()


@pytest.mark.parametrize("name", CASES)
def test_budget_stops_before_passing_and_a_higher_one_finishes_without_paying_twice(name, tmp_path, standin,
                                                                                       capsys):
    recipe, where, model = CASES[name](tmp_path, standin.base_url, {"price": PRICE})
    plan = _plan(name, recipe)
    total, worst = plan["calls"], plan["cost_usd_at_most"]
    assert total >= 4
    budget = round(worst * 0.5, 6)
    recipe, _, _ = CASES[name](tmp_path, standin.base_url, {"price": PRICE, "budget_usd": budget})
    assert rlhf([name, str(recipe)]) == 1
    err = capsys.readouterr().err
    assert f"{where}.budget_usd={budget} would be passed" in err and f"Raise {where}.budget_usd" in err
    stage = tmp_path / "runs" / "t" / name
    assert not (stage / "_SUCCESS").exists() and not (stage / "summary.json").exists()
    assert not (stage / "dataset").exists()
    paid = standin.stats()["requests_total"]
    first_keys = {e["request_key"] for e in standin.stats()["log"]}
    assert 0 < paid < total
    billed = _billed(tmp_path, name, model)
    assert billed["calls"] == paid and 0 < _dollars(billed) <= budget

    # the plan now counts only what is left, and sends nothing
    assert _plan(name, recipe)["calls"] == total - paid
    assert standin.stats()["requests_total"] == paid

    standin.reset()
    higher = round(worst * 2, 6)
    recipe, _, _ = CASES[name](tmp_path, standin.base_url, {"price": PRICE, "budget_usd": higher})
    assert rlhf([name, str(recipe)]) == 0
    second_keys = [e["request_key"] for e in standin.stats()["log"]]
    assert len(second_keys) == total - paid and not first_keys & set(second_keys)
    spent = json.loads((stage / "summary.json").read_text())["spend"][model]
    billed = _billed(tmp_path, name, model)
    assert spent["calls_all_runs"] == total == billed["calls"]
    assert spent["prompt_tokens_all_runs"] == billed["prompt"] > 0
    assert spent["completion_tokens_all_runs"] == billed["completion"] > 0
    assert spent["cost_usd_all_runs"] == pytest.approx(_dollars(billed), abs=1e-6)
    assert 0 < spent["cost_usd_all_runs"] <= higher
    if name != "generate":  # generate's merge reports this process's meter over every shard
        assert spent["requests_sent"] == total - paid


@pytest.mark.parametrize("name", CASES)
def test_requests_per_minute_is_honoured(name, tmp_path, standin, monkeypatch):
    now = [0.0]

    async def sleep(seconds):  # time passes only when the throttle waits
        now[0] += max(seconds, 0.0)
        await asyncio.sleep(0)

    made: list[Throttle] = []

    class Counted(Throttle):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(Throttle, "clock", staticmethod(lambda: now[0]))
    monkeypatch.setattr(Throttle, "sleep", staticmethod(sleep))
    monkeypatch.setattr(spend_module, "Throttle", Counted)
    rpm = 12.0  # a burst of rpm/6 = 2 requests, then one every 5 s
    recipe, _, model = CASES[name](tmp_path, standin.base_url, {"requests_per_minute": rpm, "max_concurrency": 2})
    assert rlhf([name, str(recipe)]) == 0
    throttles = [t for t in made if t.rpm == rpm]
    sent = standin.stats()["requests_total"]
    assert sum(t.granted for t in throttles) == sent >= 4
    grants = sorted(g for t in throttles for g in t.grants)
    for i in range(2, len(grants)):
        assert grants[i] - grants[0] >= (i - 1) * 60 / rpm - 1e-9
    # (two workers share one clock here, so one's wait can cover the other's: count waits loosely)
    assert sum(t.waits for t in throttles) > 0
    summary = json.loads((tmp_path / "runs" / "t" / name / "summary.json").read_text())
    assert summary["spend"][model]["throttled_waits"] > 0
    assert summary["spend"][model]["cost_usd"] is None  # no price: tokens counted, dollars unknown
    assert summary["spend"][model]["prompt_tokens_all_runs"] > 0
