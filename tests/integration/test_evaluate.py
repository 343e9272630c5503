"""The `evaluate` stage on tiny models and the stand-in judge (real HTTP), as a method check:

- a tiny model taught (by the sft stage) the true answers of the sample TruthfulQA questions, and
  long answers that use the sample MT-bench questions' words, must score a higher MC1 than the
  untrained model it started from, and a higher MT-bench mean;
- the stage's MT-bench means must be the stand-in rule applied to each policy's own answers (so
  a grade mapped to the wrong policy, turn or question fails), and the policies must rank the same
  by both;
- a rerun with --force asks the judge nothing (the ledger answers), and a best-of-n entry picks
  each answer from n ledgered samples and has no MC1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from pipeline.config import ConfigError
from pipeline.runs import RunOptions
from pipeline.stages import evaluate, sft
from pipeline.stages.evaluate import Recipe, load_mc_items, load_questions
from pipeline.stages.sft import Recipe as SftRecipe
from pipeline.standin.rating import rate

ROOT = Path(__file__).resolve().parents[2]
MT = ROOT / "data/samples/eval/mt_bench.jsonl"
TQ = ROOT / "data/samples/eval/truthfulqa_mc.jsonl"


def good_answer(question: str) -> str:
    """An answer the stand-in rule grades well: it uses the question's words, has a list and a
    sensible length. (It says nothing true: the rule cannot tell.)"""
    return (f"Here is a careful answer.\n1. {question}\n2. Each part of it matters, so I go through "
            f"them in order.\n3. In short: {question}")


def taught_chats() -> list[dict]:
    chats = []
    for item in load_mc_items(str(TQ), None):
        chats.append([{"role": "user", "content": item["question"]},
                      {"role": "assistant", "content": item["choices"][item["answer_index"]]}])
    for q in load_questions(str(MT), None, 2):
        first = [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": good_answer(q["turns"][0])}]
        chats.append(first)
        chats.append(first + [{"role": "user", "content": q["turns"][1]},
                              {"role": "assistant", "content": good_answer(q["turns"][1])}])
    return [{"messages": c} for c in chats]


@pytest.fixture(scope="module")
def taught(tiny_pool, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("taught")
    data = tmp / "chats"
    rows = taught_chats()
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:2])}).save_to_disk(str(data))
    recipe = SftRecipe.model_validate({
        "stage": "sft", "run": {"name": "t", "root": str(tmp / "runs")}, "model": str(tiny_pool[0]),
        "inputs": {"dataset": str(data)},
        "train": {"max_steps": 120, "global_batch_size": 8, "per_device_batch_size": 8, "learning_rate": 3e-3,
                  "lr_scheduler": "constant", "max_length": 256, "logging_steps": 20, "save_steps": 1000,
                  "report_to": [], "precision": "fp32"}})
    sft.run(recipe)
    return tmp / "runs" / "t" / "sft" / "model"


def reward_model(base: Path, out: Path) -> Path:
    """A tiny one-label score model (random head, saved, so it loads as a trained one): plumbing for best-of-n."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def recipe(root: Path, policies: list[dict], standin, **mtbench) -> Recipe:
    return Recipe.model_validate({
        "stage": "evaluate", "run": {"name": "t", "root": str(root)}, "policies": policies,
        "mtbench": {"questions": str(MT), "turns": 2, "max_new_tokens": 64, **mtbench,
                    "judge": {"judge": {"name": "standin-judge", "backend": "openai", "base_url": standin.base_url,
                                        "max_concurrency": 8, "timeout_s": 30},
                              "prices": {"standin-judge": {"input_per_mtok": 2.5, "output_per_mtok": 10.0}}}},
        "truthfulqa": {"items": str(TQ)}})


def test_a_taught_policy_scores_higher_and_the_grades_are_the_judges_rule_on_its_own_answers(
        tiny_pool, taught, standin, tmp_path, record_property):
    rm = reward_model(tiny_pool[0], tmp_path / "rm")
    policies = [{"name": "untrained", "model": str(tiny_pool[0])}, {"name": "taught", "model": str(taught)},
                {"name": "taught-best-of-3", "model": str(taught),
                 "best_of_n": {"n": 3, "reward_model": str(rm), "temperature": 1.0}}]
    r = recipe(tmp_path / "runs", policies, standin)
    result = evaluate.run(r)
    out = tmp_path / "runs" / "t" / "evaluate"
    summary = result["policies"]
    table = (out / "report" / "table.md").read_text()
    record_property("table", "evaluate (tiny models, stand-in judge, 8 sample MT-bench questions x 2 turns, "
                    "12 sample TruthfulQA MC1 questions):\n" + table)
    print(table)

    # MC1: taught the true answers -> it prefers them. The untrained model picks by length (a summed
    # log-likelihood favours short choices, and the true answers here are rarely the shortest).
    untrained, good = summary["untrained"]["truthfulqa"], summary["taught"]["truthfulqa"]
    assert good["mc1"] >= 0.9 and good["mc1"] > untrained["mc1"] + 0.3, (untrained, good)
    assert summary["taught-best-of-3"]["truthfulqa"] is None
    # the MC1 pick is the arg-max of the recorded log-likelihoods, and right when it is the gold index
    for line in (out / "truthfulqa.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["pick"] == max(range(len(row["logprobs"])), key=row["logprobs"].__getitem__)

    # MT-bench: every grade is the stand-in rule on that very answer (question, answer, reference).
    questions = {q["question_id"]: q for q in load_questions(str(MT), None, 2)}
    records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 8 * 2 and all(rec["grade"] is not None for rec in records)
    direct = {}
    for rec in records:
        reference = questions[rec["question_id"]]["reference"][rec["turn"]]
        assert rec["question"] == questions[rec["question_id"]]["turns"][rec["turn"]]
        assert rec["grade"] == rate(rec["question"], rec["answer"], reference)["overall"], rec
        direct.setdefault(rec["policy"], []).append(rec["grade"])
    for name, grades in direct.items():
        assert summary[name]["mtbench"]["mean"] == pytest.approx(sum(grades) / len(grades))
    ranked = sorted(summary, key=lambda n: summary[n]["mtbench"]["mean"])
    assert ranked == sorted(direct, key=lambda n: sum(direct[n]) / len(direct[n]))
    assert summary["taught"]["mtbench"]["mean"] > summary["untrained"]["mtbench"]["mean"] + 1.0
    assert result["mtbench"]["requests_sent_this_run"] == 48 and result["mtbench"]["judge_note"]
    # best-of-3: three ledgered samples per question and turn, one of which is the graded answer
    samples = [json.loads(line) for line in (out / "ledger-answers.jsonl").read_text().splitlines()]
    texts = {rec["result"]["text"] for rec in samples if rec.get("status") == "ok"}
    assert len(samples) == 8 * 2 * (1 + 1 + 3)
    assert all(rec["answer"] in texts for rec in records if rec["policy"] == "taught-best-of-3")
    for name in ("summary.json", "report/evaluate.png", "report/table.md", "config.yaml", "_SUCCESS"):
        assert (out / name).is_file(), name

    # A rerun pays for nothing: every answer and grade comes from the ledgers.
    before = standin.stats()["requests_total"]
    assert before == 48
    again = evaluate.run(r, RunOptions(force=True))
    assert again["mtbench"]["requests_sent_this_run"] == 0
    assert again["mtbench"]["replayed_from_ledger"] == 48
    assert again["policies"]["taught"]["mtbench"] == summary["taught"]["mtbench"]
    assert standin.stats()["requests_total"] == before


def test_bad_inputs_stop_before_anything_is_written(tiny_pool, standin, tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text(json.dumps({"input": "Two right?", "target_scores": {"a": 1, "b": 1}}) + "\n")
    r = Recipe.model_validate({**recipe(tmp_path / "runs", [{"name": "p", "model": str(tiny_pool[0])}],
                                        standin).model_dump(), "truthfulqa": {"items": str(bad)}})
    with pytest.raises(ConfigError, match=r"mc\.jsonl:1: MC1 needs exactly one correct choice"):
        evaluate.run(r)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="has not finished"):
        evaluate.run(recipe(tmp_path / "runs", [{"name": "p", "model": {"stage": "sft"}}], standin))
    with pytest.raises(ValueError, match="give `mtbench`, `truthfulqa` or both"):
        Recipe.model_validate({"stage": "evaluate", "run": {"name": "t"}, "policies": [{"name": "p", "model": "x"}]})
