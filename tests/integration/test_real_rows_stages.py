"""The real public rows: fetched through the package registry on first use (the BIG-bench sdist is
about 358 MB, once; later runs find the cache complete), counted, and run through the prompts,
qa-data and reward stages with the recipes in recipes/public/."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

import helpers
from pipeline.formats import fetch
from pipeline.formats.fetch import public_file
from pipeline.formats.instructions import to_prompt
from pipeline.formats.preferences import convert
from pipeline.formats.qa import load_items
from pipeline.records import saved_rows

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "public"


@pytest.fixture(scope="module")
def public(request):
    """Every public part, fetched once into the default cache (where the recipes look)."""
    mp = pytest.MonkeyPatch()
    mp.delenv(fetch.CACHE_ENV, raising=False)
    request.addfinalizer(mp.undo)
    parts = {"hhh": ("bigbench", "hhh_alignment"), "truthful_qa": ("bigbench", "truthful_qa"),
             "mt_bench": ("mtbench", "questions"), "freshqa": ("freshqa", "questions")}
    found = _Parts()
    for key, (name, part) in parts.items():
        try:
            found[key] = public_file(name, part)
        except fetch.SourceWithdrawn as err:  # only a test that reads this part is skipped
            found[key] = f"public rows unavailable: {err}"
    return found


class _Parts(dict):
    """Paths by part; reading a part whose source the registry no longer serves skips the test."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if isinstance(value, str):
            pytest.skip(value)
        return value


def _rows(path: Path) -> list[tuple[str, dict]]:
    return list(saved_rows(path))


def _tree(name: str, tmp_path: Path) -> dict:
    tree = yaml.safe_load((RECIPES / name).read_text())
    tree["run"] = {**tree["run"], "root": str(tmp_path / "runs")}
    return tree


def test_second_fetch_is_a_no_op(public, capsys):
    names = [n for n in fetch.SOURCES if fetch.is_complete(n)]  # a withdrawn source was never fetched
    assert {"mtbench", "freshqa"} <= set(names)
    for name in names:
        fetch.fetch(name)
    out = capsys.readouterr().out.splitlines()
    assert out == [f"fetch: {n}: cache complete at {fetch.source_dir(n)}, nothing to download" for n in names]


def test_hhh_has_221_pairs_over_four_subsets(public):
    pairs = [convert(row, "bigbench-hhh", where, "hhh") for where, row in _rows(public["hhh"])]
    assert len(pairs) == 221
    assert Counter(p["subset"] for p in pairs) == {"harmless": 58, "helpful": 59, "honest": 61, "other": 43}
    assert all(p["prompt"][-1]["role"] == "user" and p["chosen"] != p["rejected"] for p in pairs)
    assert sum(len(p["prompt"]) > 1 for p in pairs) == 41  # dialogues with earlier turns


def test_truthful_qa_and_mt_bench_counts(public):
    truthful = [to_prompt("bigbench-truthful_qa", "tq", row, where) for where, row in _rows(public["truthful_qa"])]
    assert len(truthful) == 299  # BIG-bench ships the 299-question subset, not all 817
    assert all(r["correct_answers"] and r["incorrect_answers"] and r["reference"] for r in truthful)
    mt = [to_prompt("mt-bench", "mt", row, where) for where, row in _rows(public["mt_bench"])]
    assert len(mt) == 80 and len({r["instruction"] for r in mt}) == 80
    # 39 questions carry references (math, reasoning, most coding, a few others); one (id 133)
    # has a reference only for its second turn, so 38 first-turn references.
    assert sum(bool(r["reference"]) for r in mt) == 38


def test_freshqa_has_600_questions(public):
    items = load_items(public["freshqa"], "freshqa")
    assert len(items) == 600
    assert Counter(i["kind"] for i in items) == {"open": 452, "unanswerable": 148}
    assert Counter(i["domain"] for i in items) == {"never-changing": 223, "slow-changing": 222, "fast-changing": 155}


def test_prompts_stage_on_mt_bench_and_truthful_qa(public, tmp_path, monkeypatch):
    assert public["truthful_qa"].is_file()  # the recipe reads it from the default cache
    monkeypatch.chdir(REPO)
    summary = helpers.stage(tmp_path, "prompts", _tree("prompts.yaml", tmp_path))
    from datasets import load_from_disk

    data = load_from_disk(str(tmp_path / "runs" / "public" / "prompts" / "dataset"))
    assert len(data) == 379
    assert Counter(data["source"]) == {"mt_bench": 80, "truthful_qa": 299}
    assert summary is not None


def test_truthful_qa_as_the_decontamination_set(public, tmp_path, monkeypatch):
    """The same cached file as `inputs.eval_sets`: a prompt repeating one of its questions is dropped."""
    monkeypatch.chdir(REPO)
    questions = [row["Question"] for _, row in _rows(public["truthful_qa"])][:3]
    leak = tmp_path / "leak.jsonl"
    leak.write_text("".join(json.dumps({"instruction": q}) + "\n" for q in questions)
                    + json.dumps({"instruction": "Write a limerick about a patient heron waiting for fish."}) + "\n")
    tree = _tree("prompts-decontaminated.yaml", tmp_path)
    tree["inputs"]["sources"].append({"name": "leak", "path": str(leak), "format": "generic"})
    helpers.stage(tmp_path, "prompts", tree)
    summary = json.loads((tmp_path / "runs" / "public" / "prompts" / "summary.json").read_text())
    text = json.dumps(summary)
    assert "leak.jsonl:1" in text and "leak.jsonl:3" in text and "leak.jsonl:4" not in text
    from datasets import load_from_disk

    data = load_from_disk(str(tmp_path / "runs" / "public" / "prompts" / "dataset"))
    kept = Counter(data["source"])
    assert kept["leak"] == 1 and kept["mt_bench"] == 80


def test_qa_data_stage_on_freshqa(public, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    helpers.stage(tmp_path, "qa-data", _tree("qa-data.yaml", tmp_path))
    from datasets import load_from_disk

    data = load_from_disk(str(tmp_path / "runs" / "public" / "qa-data" / "dataset"))
    assert {name: len(split) for name, split in data.items()} == {
        "train": 148, "test_id": 0, "test_ood": 304, "unanswerable": 148}
    assert set(data["train"]["domain"]) == {"never-changing"}
    assert set(data["unanswerable"]["kind"]) == {"unanswerable"}


def test_reward_stage_reports_hhh_accuracy_per_subset(public, tiny_pool, tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train_prefs": Dataset.from_list(helpers.pairs(16)), "test_prefs": Dataset.from_list(helpers.pairs(4, 16))}
                ).save_to_disk(str(tmp_path / "pairs"))
    tree = {"model": str(tiny_pool[0]),
            "train": {"max_steps": 2, "global_batch_size": 4, "per_device_batch_size": 4, "learning_rate": 1e-3,
                      "max_length": 64, "precision": "fp32", "report_to": [], "logging_steps": 1, "save_steps": 100},
            "reward": {"sources": [
                {"name": "ours", "dataset": str(tmp_path / "pairs")},
                {"name": "hhh", "dataset": str(public["hhh"]), "format": "bigbench-hhh", "eval_only": True}]}}
    summary = helpers.stage(tmp_path, "reward", tree)
    assert summary["sources"]["hhh"]["train"] == 0 and summary["sources"]["hhh"]["eval"] == 221
    table = json.loads((tmp_path / "runs" / "t" / "reward" / "eval.json").read_text())["accuracy"]
    hhh = table["hhh"]
    assert hhh["pairs"] == 221 and 0.0 <= hhh["accuracy"] <= 1.0
    assert {s: r["pairs"] for s, r in hhh["subsets"].items()} == {"harmless": 58, "helpful": 59, "honest": 61,
                                                                 "other": 43}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in hhh["subsets"].values())
    assert "subsets" not in table["ours"] and table["overall"]["pairs"] == 221 + 4
