"""QA data: each loader on its sample file, bad rows named by file:line, the fact world (seeded,
known/unknown/non-existent kept apart), and the `qa-data` stage end to end."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.formats.qa import QA_FORMATS, load_items
from pipeline.methods import factworld as fw
from pipeline.records import QA_FEATURES
from pipeline.stages import load_recipe
from pipeline.stages.qa_data import Recipe as QaDataRecipe

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "data" / "samples" / "qa"

# format -> (items, {kind: count}) expected from data/samples/qa/<format>.jsonl
EXPECTED = {
    "pararel": (13, {"open": 13}),
    "mmlu": (12, {"choice": 12}),
    "hotpotqa": (10, {"open": 10}),
    "fever": (10, {"choice": 10}),  # 11 rows, one NOT ENOUGH INFO skipped
    "wice": (10, {"choice": 10}),
    "falseqa": (11, {"unanswerable": 8, "open": 3}),
    "nec": (11, {"unanswerable": 10, "open": 1}),
    "selfaware": (11, {"unanswerable": 7, "open": 4}),
}


@pytest.mark.parametrize("fmt", sorted(EXPECTED))
def test_loader_on_sample(fmt):
    items = load_items(SAMPLES / f"{fmt}.jsonl", fmt)
    count, kinds = EXPECTED[fmt]
    assert len(items) == count
    found = {}
    for item in items:
        found[item["kind"]] = found.get(item["kind"], 0) + 1
        assert set(item) == set(QA_FEATURES)
        assert item["dataset"] == fmt and item["domain"]
    assert found == kinds
    assert len({i["qid"] for i in items}) == len(items)


def _by_question(items, text):
    return next(i for i in items if text in i["question"])


def test_known_items_fields():
    pararel = load_items(SAMPLES / "pararel.jsonl", "pararel")
    lyon = _by_question(pararel, "Lyon")
    assert (lyon["answers"], lyon["domain"], lyon["kind"]) == (["France"], "P17", "open")
    assert _by_question(pararel, "Rhine")["question"] == "The Rhine flows into the"
    egypt = _by_question(pararel, "Egypt")  # `prompt` instead of `question`, a list of aliases
    assert egypt["answers"] == ["Arabic", "Modern Standard Arabic"]

    mmlu = load_items(SAMPLES / "mmlu.jsonl", "mmlu")
    ph = _by_question(mmlu, "pH")  # letter answer
    assert ph["answer_index"] == 1 and ph["answers"] == ["7"] and ph["domain"] == "high_school_chemistry"

    hotpot = load_items(SAMPLES / "hotpotqa.jsonl", "hotpotqa")
    carmen = _by_question(hotpot, "Carmen")  # the original list-of-pairs context
    assert carmen["context"].startswith("Carmen: ") and "\n\n" in carmen["context"]
    assert carmen["domain"] == "bridge" and carmen["answers"] == ["France"]
    closed = load_items(SAMPLES / "hotpotqa.jsonl", "hotpotqa", with_context=False)
    assert all(i["context"] == "" for i in closed)

    fever = load_items(SAMPLES / "fever.jsonl", "fever")
    bats = _by_question(fever, "Bats")
    assert bats["choices"] == ["true", "false"] and bats["answers"] == ["false"] and "mammals" in bats["context"]

    wice = load_items(SAMPLES / "wice.jsonl", "wice")
    w2 = _by_question(wice, "twelve novels")
    assert w2["answers"] == ["partially supported"] and w2["context"]

    falseqa = load_items(SAMPLES / "falseqa.jsonl", "falseqa")
    cats = _by_question(falseqa, "cats lay eggs")
    assert cats["kind"] == "unanswerable" and cats["answers"] == [] and cats["domain"] == "false_premise"
    assert _by_question(falseqa, "legs does an insect")["answers"] == ["six", "6"]

    selfaware = load_items(SAMPLES / "selfaware.jsonl", "selfaware", dataset="sa")
    assert _by_question(selfaware, "Mona Lisa")["dataset"] == "sa"
    assert _by_question(selfaware, "thinking of")["kind"] == "unanswerable"


def test_qa_format_reads_back_items(tmp_path):
    items = load_items(SAMPLES / "mmlu.jsonl", "mmlu")
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    assert load_items(path, "qa") == items


BAD = [
    ("mmlu", {"question": "q?", "choices": ["a", "b", "c"], "answer": 0, "subject": "s"}, "choices"),
    ("mmlu", {"question": "q?", "choices": ["a", "b", "c", "d"], "answer": "E", "subject": "s"}, "answer"),
    ("pararel", {"question": "q?", "answer": "x"}, "relation"),
    ("pararel", {"question": "q?", "answer": "", "relation": "P1"}, "answer"),
    ("hotpotqa", {"question": "q?", "answer": "x", "context": {"title": ["t"], "sentences": []}}, "context"),
    ("fever", {"claim": "c", "label": "MAYBE"}, "label"),
    ("wice", {"claim": "c", "label": "supported"}, "evidence"),
    ("falseqa", {"question": "q?", "label": "perhaps"}, "label"),
    ("selfaware", {"question": 5, "answerable": False}, "question"),
    ("selfaware", {"question": "q?", "answerable": True, "answer": None}, "answer"),
]


@pytest.mark.parametrize("fmt,row,field", BAD, ids=[f"{b[0]}-{b[2]}" for b in BAD])
def test_bad_row_names_file_line_and_field(tmp_path, fmt, row, field):
    good = (SAMPLES / f"{fmt}.jsonl").read_text().splitlines()[:2]
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("\n".join(good + [json.dumps(row)]) + "\n")
    with pytest.raises(ConfigError) as err:
        load_items(path, fmt)
    assert f"{path}:3:" in str(err.value) and field in str(err.value)


def test_malformed_json_and_unknown_format(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"question": "a?", "answer": "b", "relation": "P1"}\n{not json\n')
    with pytest.raises(ConfigError, match=rf"{path}:2: not valid JSON"):
        load_items(path, "pararel")
    with pytest.raises(ConfigError, match="unknown QA format"):
        load_items(path, "trivia")
    assert set(QA_FORMATS) >= set(EXPECTED)


# ---------------------------------------------------------------- fact world


def test_factworld_is_deterministic_for_a_seed():
    a, b, c = fw.make_world(3, 20, 0.5, 5), fw.make_world(3, 20, 0.5, 5), fw.make_world(4, 20, 0.5, 5)
    assert a.to_dict() == b.to_dict() and a.to_dict() != c.to_dict()
    kw = dict(kinds=("open", "choice"), ood_attributes=("instrument",))
    assert fw.world_splits(a, **kw) == fw.world_splits(b, **kw)
    assert fw.teaching_chats(a) == fw.teaching_chats(b)
    assert len(a.known) == 10 and len(a.unknown) == 10


def test_factworld_entities_are_disjoint_and_unanswerable_never_names_a_real_one():
    world = fw.make_world(0, 40, 0.3, 15)
    known = {e.name for e in world.known}
    unknown = {e.name for e in world.unknown}
    fake = set(world.nonexistent)
    assert len(known) == 12 and len(unknown) == 28 and len(fake) == 15
    assert not known & unknown and not (known | unknown) & fake
    real_words = {w for name in known | unknown for w in name.split()}
    for item in fw.unanswerable_questions(world):
        assert item["kind"] == "unanswerable" and item["domain"] in fw.ATTRIBUTES
        assert not any(name in item["question"] for name in known | unknown)
        assert not real_words & set(item["question"].replace("'s", " ").replace("?", " ").split())
    # teaching covers exactly the known entities' facts
    taught = " ".join(m["content"] for chat in fw.teaching_chats(world) for m in chat["messages"])
    assert all(name in taught for name in known) and not any(name in taught for name in unknown | fake)
    assert len(fw.teaching_statements(world)) == len(known) * len(fw.ATTRIBUTES)


def test_factworld_splits_and_index():
    world = fw.make_world(1, 16, 0.5, 4)
    splits = fw.world_splits(world, kinds=("open", "choice"), ood_attributes=("birth_year",), test_fraction=0.25)
    index = fw.fact_index(world)
    assert all(i["domain"] == "birth_year" for i in splits["test_ood"])
    assert not any(i["domain"] == "birth_year" for i in splits["train"] + splits["test_id"])
    train_entities = {index[i["qid"]]["entity"] for i in splits["train"]}
    test_entities = {index[i["qid"]]["entity"] for i in splits["test_id"]}
    assert len(test_entities) == 4 and not train_entities & test_entities
    assert {index[i["qid"]]["known"] for i in splits["test_id"]} == {True, False}
    for item in splits["train"]:
        fact = index[item["qid"]]
        assert fact["exists"] and item["answers"] == [fact["answer"]]
        if item["kind"] == "choice":
            assert len(item["choices"]) == 4 and item["choices"][item["answer_index"]] == fact["answer"]
    assert all(not index[i["qid"]]["exists"] for i in splits["unanswerable"])



def test_factworld_holdout_questions_keeps_every_person_on_both_sides():
    world = fw.make_world(3, 12, 0.5, 2)
    splits = fw.world_splits(world, ood_attributes=("birth_year",), test_fraction=0.4, holdout="questions")
    index = fw.fact_index(world, kinds=("open",))
    per_person: dict[str, list[set]] = {}
    for side in ("train", "test_id"):
        for item in splits[side]:
            fact = index[item["qid"]]
            per_person.setdefault(fact["entity"], [set(), set()])[side == "test_id"].add(fact["attribute"])
    assert set(per_person) == {e.name for e in world.entities}
    for train_attrs, test_attrs in per_person.values():
        # 4 in-domain attributes, 40 % held out: 2 and 2, never the same question on both sides
        assert len(train_attrs) == 2 and len(test_attrs) == 2 and not train_attrs & test_attrs
        assert "birth_year" not in train_attrs | test_attrs
    assert len({frozenset(t) for _, t in per_person.values()}) > 1  # not the same attributes for all
    assert splits == fw.world_splits(world, ood_attributes=("birth_year",), test_fraction=0.4, holdout="questions")
    with pytest.raises(ValueError, match="holdout"):
        fw.world_splits(world, holdout="people")

# ---------------------------------------------------------------- the stage


def test_stage_end_to_end(tmp_path):
    from datasets import load_from_disk

    from pipeline.stages import qa_data

    recipe = load_recipe(ROOT / "recipes" / "demo-tiny" / "qa-data.yaml", [f"run.root={tmp_path}"])
    assert isinstance(recipe, QaDataRecipe)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the recipe's sample paths are relative to the repository
    try:
        summary = qa_data.run(recipe)
    finally:
        os.chdir(cwd)
    out = tmp_path / "demo-tiny" / "qa-data"
    data = load_from_disk(str(out / "dataset"))
    assert set(data) == {"train", "test_id", "test_ood", "unanswerable"}
    for name, split in data.items():
        assert split.features == QA_FEATURES
        assert len(split) == summary["splits"][name]["items"] > 0
    assert summary["splits"]["test_id"]["dataset"]["mmlu"] == 12
    assert summary["splits"]["train"]["domain"]["P17"] == 3 and "P30" in summary["splits"]["test_ood"]["domain"]
    assert "favourite_colour" not in summary["splits"]["train"]["domain"]
    train_q, test_q = set(data["train"]["qid"]), set(data["test_id"]["qid"]) | set(data["test_ood"]["qid"])
    assert not train_q & test_q
    teach = load_from_disk(str(out / "teach"))
    assert list(teach) == ["train"] and len(teach["train"]) == 12 * len(fw.ATTRIBUTES)
    assert [m["role"] for m in teach["train"][0]["messages"]] == ["user", "assistant"]
    world = json.loads((out / "factworld.json").read_text())
    assert sum(e["known"] for e in world["entities"]) == 12
    assert set(data["train"].filter(lambda r: r["dataset"] == "factworld")["qid"]) <= set(world["facts"])
    assert (out / "config.yaml").is_file() and (out / "_SUCCESS").is_file()
    assert json.loads((out / "summary.json").read_text())["splits"] == summary["splits"]


def test_stage_empty_split_loads_and_bad_source_writes_nothing(tmp_path):
    from datasets import load_from_disk

    from pipeline.stages import qa_data

    recipe = QaDataRecipe.model_validate({
        "stage": "qa-data", "run": {"name": "t", "root": str(tmp_path)},
        "inputs": {"sources": [{"path": str(SAMPLES / "mmlu.jsonl"), "format": "mmlu", "role": "test_id",
                                "sample": 5, "seed": 1}]}})
    qa_data.run(recipe)
    data = load_from_disk(str(tmp_path / "t" / "qa-data" / "dataset"))
    assert {k: len(v) for k, v in data.items()} == {"train": 0, "test_id": 5, "test_ood": 0, "unanswerable": 0}
    assert not (tmp_path / "t" / "qa-data" / "teach").exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?", "choices": ["a"], "answer": 0, "subject": "s"}\n')
    recipe = QaDataRecipe.model_validate({
        "stage": "qa-data", "run": {"name": "u", "root": str(tmp_path)},
        "inputs": {"sources": [{"path": str(bad), "format": "mmlu", "role": "train"}]},
        "factworld": {"entities": 4, "nonexistent": 2}})
    with pytest.raises(ConfigError, match=rf"{bad}:1:.*choices"):
        qa_data.run(recipe)
    assert not (tmp_path / "u" / "qa-data" / "dataset").exists()
    assert not (tmp_path / "u" / "qa-data" / "_SUCCESS").exists()


def test_recipe_needs_sources_or_factworld():
    with pytest.raises(Exception, match="factworld"):
        QaDataRecipe.model_validate({"stage": "qa-data", "run": {"name": "x"}})


def test_parquet_and_datasets_folder(tmp_path):
    from datasets import Dataset

    rows = [json.loads(line) for line in (SAMPLES / "hotpotqa.jsonl").read_text().splitlines()]
    # one shape per column in a table: dict contexts, string answers
    rows = [r for r in rows if isinstance(r["context"], dict) and isinstance(r["answer"], str)]
    table = Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "hotpot.parquet"))
    table.save_to_disk(str(tmp_path / "hotpot"))
    expected = [i for i in load_items(SAMPLES / "hotpotqa.jsonl", "hotpotqa") if i["question"] in table["question"]]
    assert load_items(tmp_path / "hotpot.parquet", "hotpotqa") == expected
    assert load_items(tmp_path / "hotpot", "hotpotqa") == expected
