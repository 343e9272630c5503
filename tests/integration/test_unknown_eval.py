"""The unknown-eval stage: confidence parser, refusal detector, both backends end to end, the ledger
on rerun, and a missing split refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from datasets import Dataset
from helpers import write_items

from pipeline.cli import main as rlhf
from pipeline.config import ConfigError
from pipeline.methods import refusal
from pipeline.records import QA_FEATURES, qa_item
from pipeline.stages import load_recipe, unknown_eval
from pipeline.stages.unknown_eval import detect_refusal, is_correct, parse_confidence

# --- the confidence parser ---------------------------------------------------------------------

CONFIDENCE_CASES = [
    ("7", 7),
    ("0", 0),
    ("10", 10),
    ("10/10", 10),
    ("I'd say 7 out of 10", 7),
    ("I’d say 7 out of 10.", 7),  # curly apostrophe
    ("Confidence: 8.", 8),
    ("8, because the question is about well-known geography.", 8),
    ("On a scale of 0 to 10, I would say 6.", 6),  # the echoed scale is not the rating
    ("Between 0 and 10: 3", 3),
    ("(0-10) 9", 9),
    ("none", None),
    ("", None),
    (None, None),
    ("seven", None),  # number words are not read
    ("11", None),  # out of range: unparsed, never clipped
    ("100", None),
    ("80%", None),
    ("-2", None),
    ("7.5", None),  # a fraction is not a whole rating
    ("I cannot rate that.", None),
]


@pytest.mark.parametrize("reply,expected", CONFIDENCE_CASES)
def test_confidence_parser(reply, expected):
    assert parse_confidence(reply) == expected


# --- the refusal detector ----------------------------------------------------------------------

REFUSAL_CASES = [
    ("I don't know.", True),
    ("I DO NOT KNOW the answer to that.", True),
    ("I’m not sure who that is.", True),
    ("I am not certain, but it might be 1900.", True),
    ("I am unable to find any information on that.", True),
    ("I can't answer that question.", True),
    ("This cannot be answered with the information given.", True),
    ("There is no such element in the periodic table.", True),
    ("There is no record of a treaty by that name.", True),
    ("The Glorbian Empire does not exist.", True),
    ("That country doesn't exist.", True),
    ("The question rests on a false premise: the moon has no capital.", True),
    ("Grenwick's theorem appears to be fictional.", True),
    ("Nobody knows what he said that day.", True),
    ("It is impossible to know the exact number.", True),
    ("Honestly it is kind of hard to say anything for sure.", True),
    # negations that assert an answer are not refusals
    ("There is no doubt that Paris is the capital of France.", False),
    ("There is no question about it: water boils at 100 C at sea level.", False),
    ("No, the Earth is not flat; it is an oblate spheroid.", False),
    ("It is not Sydney but Canberra.", False),
    ("Paris.", False),
    ("The answer is B.", False),
    ("", False),
    (None, False),
]


@pytest.mark.parametrize("answer,refused", REFUSAL_CASES)
def test_refusal_detector(answer, refused):
    assert (detect_refusal(answer) is not None) is refused


def test_every_refusal_pattern_is_documented_and_compiles():
    assert all(isinstance(p, str) and doc for p, doc in refusal.REFUSAL_PATTERNS)
    assert len({p for p, _ in refusal.REFUSAL_PATTERNS}) == len(refusal.REFUSAL_PATTERNS)


def test_gold_match():
    open_item = qa_item("t", "What is the capital of France?", "open", answers=["Paris"])
    choice = qa_item("t", "2 + 2?", "choice", choices=["3", "4", "5"], answer_index=1)
    none = qa_item("t", "What did the Zorblax say?", "unanswerable")
    assert is_correct(open_item, "It is Paris, of course.")
    assert not is_correct(open_item, "Lyon")
    assert not is_correct(open_item, "Parisian food")  # whole words only
    assert is_correct(choice, "B")
    assert is_correct(choice, "(B) 4")
    assert not is_correct(choice, "A. 3")
    assert is_correct(choice, "It is 4.")
    assert is_correct(none, "anything") is None


# --- the stage -----------------------------------------------------------------------------------


def write_recipe(tmp_path: Path, models: list[dict], items: Path, **evaluation) -> Path:
    recipe = {
        "stage": "unknown-eval",
        "run": {"name": "t", "root": str(tmp_path / "runs")},
        "inputs": {"items": str(items)},
        "evaluation": {"models": models, "splits": ["test_id", "unanswerable"], "answer_max_tokens": 16,
                       "confidence_max_tokens": 6, **evaluation},
    }
    path = tmp_path / "unknown-eval.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def stage_path(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "t" / "unknown-eval"


def check_outputs(out: Path, models: list[str], splits: list[str], per_split: dict[str, int]) -> tuple[list, dict]:
    assert (out / "_SUCCESS").is_file()
    assert (out / "ledger.jsonl").is_file()
    assert (out / "report" / "unknown_eval.png").stat().st_size > 1000
    records = json.loads((out / "eval.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert len(records) == len(models) * sum(per_split[s] for s in splits)
    for rec in records:
        # the stored rating is what the parser makes of the stored reply: unparsed stays None
        assert rec["confidence"] == parse_confidence(rec["confidence_reply"])
        assert rec["refused"] == (detect_refusal(rec["answer"]) is not None)
        assert rec["group"] == ("unanswerable" if rec["kind"] == "unanswerable" else "answerable")
    for model in models:
        entry = summary["models"][model]
        for split in splits:
            rows = [r for r in records if r["model"] == model and r["split"] == split]
            for group, m in entry["splits"][split]["groups"].items():
                mine = [r for r in rows if r["group"] == group]
                assert m["items"] == len(mine)
                parsed = [r["confidence"] for r in mine if r["confidence"] is not None]
                assert m["confidence_parsed"] == len(parsed)
                assert m["confidence_unparsed"] == len(mine) - len(parsed)  # counted, not zero
                assert m["confidence_parsed"] + m["confidence_unparsed"] == m["confidence_replies"]
                assert m["refusals"] == sum(1 for r in mine if r["refused"])
                if mine:
                    assert m["refusal_rate"] == pytest.approx(m["refusals"] / len(mine))
                    assert m["confidence_parse_rate"] == pytest.approx(len(parsed) / len(mine))
                if parsed:
                    assert m["mean_confidence"] == pytest.approx(sum(parsed) / len(parsed))
                else:
                    assert m["mean_confidence"] is None
                assert sum(m["confidence_histogram"].values()) == len(parsed)
    return records, summary


def test_standin_end_to_end_and_rerun_sends_nothing_twice(tmp_path, standin, capsys):
    items = write_items(tmp_path / "items")
    model = {"name": "standin-medium", "backend": "openai", "base_url": standin.base_url, "max_concurrency": 4,
             "max_retries": 0, "timeout_s": 10}
    recipe = write_recipe(tmp_path, [model], items, splits=["test_id", "test_ood", "unanswerable"])
    assert rlhf(["unknown-eval", str(recipe)]) == 0
    out = stage_path(tmp_path)
    per_split = {"test_id": 4, "test_ood": 1, "unanswerable": 3}
    records, summary = check_outputs(out, ["standin-medium"], list(per_split), per_split)
    assert "unknown-eval" in capsys.readouterr().out
    stats = standin.stats()
    assert stats["requests_total"] == 2 * 8  # a confidence and an answer request per item
    keys = [entry["request_key"] for entry in stats["log"]]
    assert len(set(keys)) == len(keys)
    # the stand-in writes made-up prose, not ratings: most replies are unparsed and counted so
    unparsed = sum(1 for r in records if r["confidence"] is None)
    assert unparsed >= len(records) // 2
    assert summary["models"]["standin-medium"]["all"]["confidence_unparsed"] == unparsed
    ledger_lines = (out / "ledger.jsonl").read_text().splitlines()
    assert len(ledger_lines) == 16

    # skipped when done; --force rebuilds from the ledger without a single request
    assert rlhf(["unknown-eval", str(recipe)]) == 0
    assert rlhf(["unknown-eval", str(recipe), "--force"]) == 0
    assert standin.stats()["requests_total"] == 16
    assert (out / "ledger.jsonl").read_text().splitlines() == ledger_lines
    assert json.loads((out / "eval.json").read_text()) == records
    assert json.loads((out / "summary.json").read_text())["requests_sent_this_run"] == 0

    # a new split asks only for its own items
    assert rlhf(["unknown-eval", str(recipe), "evaluation.splits=[test_id, train]", "--force"]) == 0
    assert standin.stats()["requests_total"] == 16  # train items are also in test_id: nothing new


def test_tiny_hf_model_end_to_end(tmp_path, tiny_pool):
    items = write_items(tmp_path / "items")
    models = [{"name": p.name, "backend": "hf", "path": str(p), "batch_size": 4} for p in tiny_pool[:2]]
    recipe = load_recipe(write_recipe(tmp_path, models, items))
    assert recipe.evaluation.temperature == 0.0  # greedy by default
    summary = unknown_eval.run(recipe)
    out = stage_path(tmp_path)
    records, _ = check_outputs(out, ["tiny-a", "tiny-b"], ["test_id", "unanswerable"],
                               {"test_id": 4, "unanswerable": 3})
    assert summary["requests_sent_this_run"] == 2 * 2 * 7
    assert all(isinstance(r["answer"], str) and isinstance(r["confidence_reply"], str) for r in records)
    # greedy: a rerun (from the ledger) gives the same records and sends nothing
    again = unknown_eval.run(recipe)
    assert again["requests_sent_this_run"] == 0
    assert json.loads((out / "eval.json").read_text()) == records


def test_missing_split_is_a_config_error_and_nothing_is_written(tmp_path, standin, capsys):
    items = write_items(tmp_path / "items")
    model = {"name": "standin-medium", "backend": "openai", "base_url": standin.base_url}
    recipe = write_recipe(tmp_path, [model], items, splits=["test_id", "test_odd"])
    with pytest.raises(ConfigError, match="test_odd"):
        unknown_eval.run(load_recipe(recipe))
    assert rlhf(["unknown-eval", str(recipe)]) == 2
    assert "test_odd" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert standin.stats()["requests_total"] == 0


def test_input_that_is_not_a_datasetdict_is_refused(tmp_path, standin):
    single = tmp_path / "single"
    Dataset.from_list([qa_item("t", "Q?", "open", answers=["a"])], features=QA_FEATURES).save_to_disk(str(single))
    model = {"name": "standin-medium", "backend": "openai", "base_url": standin.base_url}
    with pytest.raises(ConfigError, match="DatasetDict"):
        unknown_eval.run(load_recipe(write_recipe(tmp_path, [model], single)))
    with pytest.raises(ConfigError, match="qa-data"):
        unknown_eval.run(load_recipe(write_recipe(tmp_path, [model], single), ["inputs.items={stage: qa-data}"]))
    assert not (tmp_path / "runs").exists()
