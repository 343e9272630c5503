"""Stage `prompts`: source shapes, seeded sampling, de-duplication and decontamination on crafted
cases, bad rows named by file:line with nothing written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from datasets import Dataset, load_from_disk

from pipeline.config import ConfigError
from pipeline.runs import is_done
from pipeline.stages import prompts as stage
from pipeline.stages.prompts import Recipe as PromptsRecipe

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "data" / "samples"
SHAPES = ("evol_instruct", "false_qa", "flan", "sharegpt", "truthful_qa", "ultrachat")

# Thirteen-plus words shared with the evaluation question below.
EVAL_QUESTION = ("Which gas do green plants absorb from the air during photosynthesis, "
                 "and what do they release in return?")


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def recipe(tmp_path: Path, sources: list[dict], eval_sets: list[dict] | None = None, **data) -> PromptsRecipe:
    return PromptsRecipe.model_validate({
        "stage": "prompts", "run": {"name": "t", "root": str(tmp_path / "runs")},
        "inputs": {"sources": sources, "eval_sets": eval_sets or []}, "data": data,
    })


def generic(tmp_path: Path, name: str, instructions: list, **extra) -> dict:
    path = write_jsonl(tmp_path / f"{name}.jsonl", [{"instruction": i} for i in instructions])
    return {"name": name, "path": str(path), "format": "generic", **extra}


def kept(summary_path: Path) -> list[dict]:
    return load_from_disk(str(summary_path / "dataset")).to_list()


# --- the shipped samples ----------------------------------------------------------------------


def test_demo_samples_known_removals(tmp_path):
    from pipeline.stages import load_recipe

    r = load_recipe(ROOT / "recipes/demo-tiny/prompts.yaml", [f"run.root={tmp_path}"])
    summary = stage.run(r)
    out = tmp_path / "demo-tiny" / "prompts"
    assert is_done(out)
    assert summary["read"] == 80 and summary["kept"] == 76
    per = summary["per_source"]
    rel = lambda items: [i.split("data/samples/")[-1] for i in items]  # noqa: E731
    assert rel(per["sharegpt"]["removed"]["exact_duplicate"]) == ["instructions/sharegpt.jsonl:13"]
    assert rel(per["sharegpt"]["removed"]["near_duplicate"]) == ["instructions/sharegpt.jsonl:14"]
    assert rel(per["evol_instruct"]["removed"]["contaminated"]) == ["instructions/evol_instruct.jsonl:2"]
    assert rel(per["ultrachat"]["removed"]["contaminated"]) == ["instructions/ultrachat.jsonl:3"]
    rows = kept(out)
    assert len(rows) == 76 and len({r["prompt_id"] for r in rows}) == 76
    assert {r["source"] for r in rows} == set(SHAPES)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["removed"] == {"too_long": 0, "not_sampled": 0, "exact_duplicate": 1,
                                "near_duplicate": 1, "contaminated": 2}


def test_flan_item_sharing_ten_words_is_kept_at_13_and_removed_at_8(tmp_path):
    sources = [{"name": "flan", "path": str(SAMPLES / "instructions/flan.jsonl")}]
    evals = [{"path": str(SAMPLES / "eval/eval_questions.jsonl"), "fields": ["question"]}]
    at13 = stage.run(recipe(tmp_path / "a", sources, evals))
    at8 = stage.run(recipe(tmp_path / "b", sources, evals, decontaminate_ngram=8))
    assert at13["per_source"]["flan"]["contaminated"] == 0
    assert [w.rsplit("/", 1)[-1] for w in at8["per_source"]["flan"]["removed"]["contaminated"]] == ["flan.jsonl:8"]


# --- shapes -----------------------------------------------------------------------------------


def test_each_shape_maps_to_the_prompt_record(tmp_path):
    rows = {
        "evol_instruct": {"instruction": " Sort a list. ", "output": "sorted(xs)"},
        "false_qa": {"question": "Why is the sun cold?", "answer": "It is not cold."},
        "flan": {"inputs": "Add 2 and 3.", "targets": "5", "task": "arith"},
        "sharegpt": {"id": "x", "conversations": [{"from": "system", "value": "be nice"},
                                                  {"from": "human", "value": "First question?"},
                                                  {"from": "gpt", "value": "answer"},
                                                  {"from": "human", "value": "Second question?"}]},
        "truthful_qa": {"question": "Do bulls hate red?", "best_answer": "No, they are colour-blind to it.",
                        "correct_answers": ["No"], "incorrect_answers": ["Yes", "Only bright red"]},
        "ultrachat": {"id": "1", "data": ["Opening turn?", "reply", "follow-up"]},
    }
    sources = [{"name": s, "path": str(write_jsonl(tmp_path / f"{s}.jsonl", [row]))} for s, row in rows.items()]
    stage.run(recipe(tmp_path, sources, dedupe=False))
    got = {r["source"]: r for r in kept(tmp_path / "runs/t/prompts")}
    assert got["evol_instruct"]["instruction"] == "Sort a list."
    assert got["false_qa"]["reference"] == "It is not cold."
    assert (got["flan"]["instruction"], got["flan"]["reference"]) == ("Add 2 and 3.", "5")
    assert got["sharegpt"]["instruction"] == "First question?"
    tq = got["truthful_qa"]
    assert tq["correct_answers"] == ["No"] and tq["incorrect_answers"] == ["Yes", "Only bright red"]
    assert tq["reference"] == "No, they are colour-blind to it."
    assert got["ultrachat"]["instruction"] == "Opening turn?"
    for row in got.values():
        assert row["prompt_id"] == hashlib.sha256(row["instruction"].encode()).hexdigest()
    assert got["sharegpt"]["correct_answers"] == [] and got["sharegpt"]["reference"] == ""


def test_parquet_and_datasets_folder_read_like_jsonl(tmp_path):
    rows = [{"instruction": f"Explain idea number {i} in plain words."} for i in range(5)]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    Dataset.from_list(rows).to_parquet(str(tmp_path / "b.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "c"))
    results = []
    for name, path in (("a", jsonl), ("b", tmp_path / "b.parquet"), ("c", tmp_path / "c")):
        stage.run(recipe(tmp_path / name, [{"name": "src", "path": str(path), "format": "generic"}]))
        results.append([r["instruction"] for r in kept(tmp_path / name / "runs/t/prompts")])
    assert results[0] == results[1] == results[2] == [r["instruction"] for r in rows]


def test_table_errors_name_the_row(tmp_path):
    Dataset.from_list([{"instruction": "fine"}, {"instruction": ""}]).to_parquet(str(tmp_path / "b.parquet"))
    with pytest.raises(ConfigError, match=r"b\.parquet:row 2: field 'instruction' is empty"):
        stage.run(recipe(tmp_path, [{"name": "src", "path": str(tmp_path / "b.parquet"), "format": "generic"}]))


# --- filters ----------------------------------------------------------------------------------


def test_exact_and_normalised_duplicates_first_occurrence_wins_across_sources(tmp_path):
    first = generic(tmp_path, "first", ["How do tides work?", "Name three moons of Jupiter."])
    second = generic(tmp_path, "second", [
        "How do tides work?",                      # exact copy of first:1
        "  how DO tides   work ",                  # same words: case, punctuation, spacing
        "Ｎａｍｅ three moons of Jupiter!",          # full-width letters fold under NFKC
        "How do tides work in lakes?",             # different words: kept
    ])
    summary = stage.run(recipe(tmp_path, [first, second]))
    per = summary["per_source"]
    assert per["first"]["kept"] == 2
    assert per["second"]["exact_duplicate"] == 1 and per["second"]["near_duplicate"] == 2
    assert [w.rsplit(":", 1)[-1] for w in per["second"]["removed"]["near_duplicate"]] == ["2", "3"]
    assert [r["instruction"] for r in kept(tmp_path / "runs/t/prompts")] == [
        "How do tides work?", "Name three moons of Jupiter.", "How do tides work in lakes?"]


def test_dedupe_off_keeps_duplicates(tmp_path):
    src = generic(tmp_path, "s", ["Same text.", "Same text."])
    assert stage.run(recipe(tmp_path, [src], dedupe=False))["kept"] == 2


def test_decontamination_boundary_at_n_words(tmp_path):
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"question": EVAL_QUESTION, "answer": "CO2"}])
    words = EVAL_QUESTION.split()
    assert len(words) >= 14
    share_13 = "Quick quiz: " + " ".join(words[:13]).upper() + " -- explain briefly."
    share_12 = "Quick quiz: " + " ".join(words[:12]) + " -- explain briefly."
    src = generic(tmp_path, "s", [share_13, share_12, EVAL_QUESTION.split(",")[0]])
    summary = stage.run(recipe(tmp_path, [src], [{"path": str(evals), "fields": ["question"]}]))
    removed = summary["per_source"]["s"]["removed"]["contaminated"]
    assert [w.rsplit(":", 1)[-1] for w in removed] == ["1"]
    assert summary["kept"] == 2


def test_short_instruction_equal_to_an_eval_text_is_contaminated(tmp_path):
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"question": "What is the capital of Peru?"}])
    src = generic(tmp_path, "s", ["what is the capital of peru", "What is the capital of Chile?"])
    summary = stage.run(recipe(tmp_path, [src], [{"path": str(evals), "fields": ["question"]}]))
    assert summary["per_source"]["s"]["contaminated"] == 1
    assert [r["instruction"] for r in kept(tmp_path / "runs/t/prompts")] == ["What is the capital of Chile?"]


def test_eval_set_without_the_field_is_an_error(tmp_path):
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "x"}])
    src = generic(tmp_path, "s", ["A fine instruction."])
    with pytest.raises(ConfigError, match=r"inputs\.eval_sets\[0\].*question"):
        stage.run(recipe(tmp_path, [src], [{"path": str(evals), "fields": ["question"]}]))


def test_max_words_drops_long_instructions(tmp_path):
    src = generic(tmp_path, "s", ["one two three", "one two three four five six"], max_words=4)
    summary = stage.run(recipe(tmp_path, [src]))
    assert summary["per_source"]["s"]["too_long"] == 1 and summary["kept"] == 1


def test_sampling_is_seeded_exact_and_independent_of_other_sources(tmp_path):
    many = [f"Instruction number {i} about topic {i * 7 % 11}." for i in range(40)]
    a = generic(tmp_path, "a", many, sample=10)
    b = generic(tmp_path, "b", [f"Other source item {i}." for i in range(5)])

    def chosen(where: str, sources, seed=0):
        stage.run(recipe(tmp_path / where, sources, seed=seed))
        return [r["instruction"] for r in kept(tmp_path / where / "runs/t/prompts") if r["source"] == "a"]

    first, again = chosen("1", [a]), chosen("2", [a])
    assert len(first) == 10 and first == again
    assert chosen("3", [b, a]) == first  # another source before it changes nothing
    assert chosen("4", [a], seed=1) != first
    assert first == [m for m in many if m in first]  # source order is kept


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, message", [
    ("malformed", r"malformed\.jsonl:4: not valid JSON"),
    ("missing_field", r"missing_field\.jsonl:2: missing field 'instruction'"),
    ("non_string", r"non_string\.jsonl:3: field 'instruction' must be a string, got int"),
    ("empty", r"empty\.jsonl: source 'src' holds no rows"),
])
def test_bad_files_are_named_and_nothing_is_written(tmp_path, name, message):
    fmt = "sharegpt" if name == "malformed" else "evol_instruct"
    good = {"name": "evol_instruct", "path": str(SAMPLES / "instructions/evol_instruct.jsonl")}
    bad = {"name": "src", "path": str(SAMPLES / f"bad/{name}.jsonl"), "format": fmt}
    with pytest.raises(ConfigError, match=message):
        stage.run(recipe(tmp_path, [good, bad]))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("row, message", [
    ('{"conversations": [{"from": "gpt", "value": "hi"}]}', "no human/user turn"),
    ('{"conversations": "text"}', "must be a list of turns"),
    ('[1, 2]', "expected a JSON object"),
    ('{"instruction": "   "}', "is empty"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "x.jsonl", ['{"instruction": "ok", "conversations": [{"from": "human", "value": "ok"}]}', "", row])
    fmt = "sharegpt" if "conversations" in row else "generic"
    with pytest.raises(ConfigError, match=rf"x\.jsonl:3: .*{message}"):
        stage.run(recipe(tmp_path, [{"name": "s", "path": str(path), "format": fmt}]))


def test_everything_filtered_is_an_error_not_an_empty_dataset(tmp_path):
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"question": "Tell me a joke."}])
    src = generic(tmp_path, "s", ["Tell me a joke"])
    with pytest.raises(ConfigError, match="filtered out"):
        stage.run(recipe(tmp_path, [src], [{"path": str(evals), "fields": ["question"]}]))
    assert not is_done(tmp_path / "runs/t/prompts")
