"""The R-Tuning stages on a tiny model: the probe splits items by correctness (items are built so
the correctness is known: the gold answer is, or is not, what the model answers greedily), the data
variants carry the right messages and labels, the sft stage trains on them with loss on the answer
and sure/unsure words only, p_sure equals a manual softmax, and bad inputs stop before writing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from pipeline.config import ConfigError, RtuningModelSection
from pipeline.methods.rtuning import PROBE_QUESTION, REFUSALS, SURE, UNSURE, QAModel
from pipeline.records import QA_FEATURES, qa_item
from pipeline.stages import rtuning_data, rtuning_eval, rtuning_probe, sft
from pipeline.stages.rtuning_data import Recipe as RtuningDataRecipe
from pipeline.stages.rtuning_eval import Recipe as RtuningEvalRecipe
from pipeline.stages.rtuning_probe import Recipe as RtuningProbeRecipe
from pipeline.stages.sft import Recipe as SftRecipe

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "What colour is snow?",
             "Who wrote the play about the Danish prince?", "Which planet is the largest?",
             "What do bees make?"]
CHOICE = [("Which is a fruit?", ["apple", "chair", "river"]), ("Which one swims?", ["fish", "stone", "cloud"])]


def save_items(folder: Path, splits: dict[str, list[dict]]) -> Path:
    DatasetDict({n: Dataset.from_list(rows, features=QA_FEATURES) for n, rows in splits.items()}).save_to_disk(
        str(folder))
    return folder


@pytest.fixture(scope="module")
def world(tiny_pool, tmp_path_factory):
    """Items whose probe outcome is known: for even rows the gold answer is the model's own greedy
    answer (right), for odd rows a string it never says (wrong); choice items the same by argmax."""
    model_dir = tiny_pool[0]
    qa = QAModel(model_dir, RtuningModelSection(batch_size=4))
    draft = [qa_item("t", q, "open", answers=["x"]) for q in QUESTIONS]
    answers = [a for a, _ in qa.answer(draft)]
    items, expect = [], []
    for i, (q, a) in enumerate(zip(QUESTIONS, answers)):
        right = i % 2 == 0 and bool(a.strip())
        items.append(qa_item("t", q, "open", answers=[a.strip() if right else "zzq never said"], domain="d1"))
        expect.append(right)
    cdraft = [qa_item("t", q, "choice", choices=c, answer_index=0) for q, c in CHOICE]
    for j, ((q, c), probs) in enumerate(zip(CHOICE, qa.letter_probs(cdraft))):
        best = max(range(len(probs)), key=probs.__getitem__)
        right = j == 0
        items.append(qa_item("t", q, "choice", choices=c, answer_index=best if right else (best + 1) % len(c)))
        expect.append(right)
    unans = [qa_item("t", "What is the colour of the invisible moon of Mercury?", "unanswerable")]
    root = tmp_path_factory.mktemp("rtuning")
    data = save_items(root / "items", {"train": items, "test_id": items[:4], "test_ood": items[4:] + unans,
                                       "unanswerable": unans})
    return {"model": model_dir, "items": items, "expect": expect, "data": data, "root": root}


def probe_recipe(root: Path, model, items, **extra) -> RtuningProbeRecipe:
    return RtuningProbeRecipe.model_validate({
        "stage": "rtuning-probe", "run": {"name": "t", "root": str(root / "runs")}, "model": str(model),
        "inputs": {"items": str(items), **extra}, "rtuning": {"batch_size": 3}})


def data_recipe(root: Path, variant: str, **extra) -> RtuningDataRecipe:
    return RtuningDataRecipe.model_validate({
        "stage": "rtuning-data", "run": {"name": variant, "root": str(root / "runs")},
        "inputs": {"probe": {"stage": "rtuning-probe", "run": "t"}}, "rtuning": {"variant": variant}, **extra})


@pytest.fixture(scope="module")
def probed(world):
    summary = rtuning_probe.run(probe_recipe(world["root"], world["model"], world["data"]))
    return summary


def test_probe_splits_by_correctness(world, probed):
    from datasets import load_from_disk

    out = world["root"] / "runs" / "t" / "rtuning-probe"
    rows = load_from_disk(str(out / "dataset"))["train"].to_list()
    assert [r["correct"] for r in rows] == world["expect"]
    assert [r["probe_set"] for r in rows] == ["D1" if e else "D0" for e in world["expect"]]
    assert probed["D1"] == sum(world["expect"]) and probed["D0"] == len(rows) - probed["D1"]
    assert sum(world["expect"]) >= 3  # the construction really gives both sets
    assert json.loads((out / "summary.json").read_text())["count"] == len(rows)
    assert (out / "_SUCCESS").is_file()


def test_data_variants(world, probed):
    from datasets import load_from_disk

    root, expect = world["root"], world["expect"]
    rows = {}
    for variant in ("r-tuning", "r-tuning-r", "vanilla"):
        rtuning_data.run(data_recipe(root, variant))
        rows[variant] = load_from_disk(str(root / "runs" / variant / "rtuning-data" / "dataset"))["train"].to_list()
    for r, right, item in zip(rows["r-tuning"], expect, world["items"]):
        m = r["messages"]
        assert [x["role"] for x in m] == ["user", "assistant", "user", "assistant"]
        assert m[2]["content"] == PROBE_QUESTION and m[3]["content"] == (SURE if right else UNSURE)
        assert r["label"] == ("sure" if right else "unsure")
        assert m[1]["content"] == (item["answers"][0] if item["kind"] == "open" else "ABC"[item["answer_index"]])
    for r, v, right in zip(rows["r-tuning-r"], rows["vanilla"], expect):
        assert len(r["messages"]) == 2 and len(v["messages"]) == 2 and v["label"] == ""
        if right:
            assert r["messages"] == v["messages"]
        else:
            assert r["messages"][1]["content"] in REFUSALS and r["label"] == "refuse"
    assert all(PROBE_QUESTION not in json.dumps(r["messages"]) for r in rows["vanilla"])


def test_answer_format_wraps_open_answers_and_needs_its_slot(world, probed):
    from datasets import load_from_disk

    root = world["root"]
    recipe = data_recipe(root, "vanilla")
    recipe.run.name = "formatted"
    recipe.rtuning.answer_format = "The answer is {answer}."
    rtuning_data.run(recipe)
    rows = load_from_disk(str(root / "runs" / "formatted" / "rtuning-data" / "dataset"))["train"].to_list()
    for row, item in zip(rows, world["items"]):
        expected = (f"The answer is {item['answers'][0]}." if item["kind"] == "open" else "ABC"[item["answer_index"]])
        assert row["messages"][1]["content"] == expected
    with pytest.raises(ValueError, match="answer_format must contain"):
        RtuningDataRecipe.model_validate({"stage": "rtuning-data", "run": {"name": "x"},
                                          "inputs": {"probe": "p"}, "rtuning": {"answer_format": "no slot"}})


def test_assistant_only_loss_covers_answer_and_sure_words(world, probed):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    row = load_from_disk(str(world["root"] / "runs" / "r-tuning" / "rtuning-data" / "dataset"))["train"][1]
    tok = AutoTokenizer.from_pretrained(str(world["model"]))
    enc = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    kept = tok.decode([t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
    assert kept == row["messages"][1]["content"] + "<|im_end|>" + row["messages"][3]["content"] + "<|im_end|>"
    assert "Reply with" not in kept


def test_r_tuning_u_marks_the_highest_entropy_fraction(world, probed, monkeypatch):
    root = world["root"]
    n = len(world["items"])
    # Row i: i distinct answers among 6 -> entropy grows with i; top half = the last rows.
    fake = [["a"] * (6 - i) + [f"b{j}" for j in range(i)] for i in range(n)]
    monkeypatch.setattr(QAModel, "sample", lambda self, items, k, t, seed: fake[: len(items)])
    rtuning_data.run(data_recipe(root, "r-tuning-u", model=str(world["model"])))
    from datasets import load_from_disk

    rows = load_from_disk(str(root / "runs" / "r-tuning-u" / "rtuning-data" / "dataset"))["train"].to_list()
    assert [r["label"] for r in rows] == ["sure"] * (n - n // 2) + ["unsure"] * (n // 2)
    assert rows[0]["entropy"] == pytest.approx(0.0) and rows[2]["entropy"] == pytest.approx(
        -(4 / 6) * math.log(4 / 6) - 2 * (1 / 6) * math.log(1 / 6))


def test_r_tuning_u_samples_for_real(world, probed):
    from pipeline.methods.rtuning import QAModel as Real

    qa = Real(world["model"], RtuningModelSection(batch_size=4, max_new_tokens=4))
    samples = qa.sample(world["items"], 3, 0.7, seed=1)
    assert [len(s) for s in samples] == [3] * len(world["items"])
    assert samples == qa.sample(world["items"], 3, 0.7, seed=1)  # seeded
    assert all(s in "ABC" for s in samples[-1])


def test_chain_sft_then_eval_and_p_sure_by_hand(world, probed):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = world["root"]
    recipe = SftRecipe.model_validate({
        "stage": "sft", "run": {"name": "r-tuning", "root": str(root / "runs")}, "model": str(world["model"]),
        "inputs": {"dataset": {"stage": "rtuning-data"}, "train_split": "train", "eval_split": None},
        "train": {"max_steps": 2, "global_batch_size": 4, "per_device_batch_size": 4, "learning_rate": 1e-3,
                  "max_length": 128, "report_to": [], "precision": "fp32", "save_steps": 50}})
    sft.run(recipe)
    ev = RtuningEvalRecipe.model_validate({
        "stage": "rtuning-eval", "run": {"name": "r-tuning", "root": str(root / "runs")}, "model": {"stage": "sft"},
        "inputs": {"items": str(world["data"])}, "rtuning": {"batch_size": 3, "weight": 0.25}})
    assert ev.model.output == "model"
    report = rtuning_eval.run(ev)
    out = root / "runs" / "r-tuning" / "rtuning-eval"
    assert (out / "_SUCCESS").is_file() and (out / "report" / "reliability.png").stat().st_size > 0
    saved = json.loads((out / "eval.json").read_text())
    assert set(saved["splits"]) == {"test_id", "test_ood", "unanswerable"}
    assert saved["splits"]["unanswerable"]["answerable"] == 0 and "refusal_rate" in saved["splits"]["unanswerable"]
    assert 0 <= saved["splits"]["test_id"]["ece"] <= 1 and "ap" in saved["splits"]["test_ood"]

    # p_sure of one prediction by hand: the full softmax after the probe, "I am" pre-filled.
    from datasets import load_from_disk

    pred = load_from_disk(str(out / "predictions"))["test_id"][0]
    item = world["items"][0]
    mdir = root / "runs" / "r-tuning" / "sft" / "model"
    tok = AutoTokenizer.from_pretrained(str(mdir))
    model = AutoModelForCausalLM.from_pretrained(str(mdir)).eval()
    chat = [{"role": "user", "content": item["question"]}, {"role": "assistant", "content": pred["answer"]},
            {"role": "user", "content": PROBE_QUESTION}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + "I am"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    sure_id = tok(text + " sure", add_special_tokens=False)["input_ids"][len(ids)]
    unsure_id = tok(text + " unsure", add_special_tokens=False)["input_ids"][len(ids)]
    assert sure_id != unsure_id
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1], -1)
    manual = float(probs[sure_id] / (probs[sure_id] + probs[unsure_id]))
    assert pred["p_sure"] == pytest.approx(manual, abs=1e-5)
    assert pred["confidence"] == pytest.approx(0.25 * pred["answer_confidence"] + 0.75 * manual, abs=1e-5)
    assert report["splits"]["test_id"]["items"] == 4


def test_missing_split_is_named_and_nothing_written(world, tmp_path):
    recipe = probe_recipe(tmp_path, world["model"], world["data"], split="nope")
    with pytest.raises(ConfigError, match="inputs.split: no split 'nope'"):
        rtuning_probe.run(recipe)
    ev = RtuningEvalRecipe.model_validate({
        "stage": "rtuning-eval", "run": {"name": "t", "root": str(tmp_path / "runs")}, "model": str(world["model"]),
        "inputs": {"items": str(world["data"]), "splits": ["test_id", "missing"]}})
    with pytest.raises(ConfigError, match="inputs.splits: no split 'missing'"):
        rtuning_eval.run(ev)
    assert not (tmp_path / "runs").exists()


def test_item_without_answers_is_named_and_nothing_written(world, tmp_path):
    bad = dict(world["items"][0], answers=[], qid="deadbeef0000ffff")
    data = save_items(tmp_path / "items", {"train": [world["items"][1], bad]})
    with pytest.raises(ConfigError, match=r"split 'train' row 1: item deadbeef0000.*no gold answers"):
        rtuning_probe.run(probe_recipe(tmp_path, world["model"], data))
    unans = save_items(tmp_path / "items2", {"train": [qa_item("t", "Why is the sky green?", "unanswerable")]})
    with pytest.raises(ConfigError, match="unanswerable"):
        rtuning_probe.run(probe_recipe(tmp_path, world["model"], unans))
    with pytest.raises(ConfigError, match="inputs.probe: stage 'rtuning-probe' .* has not finished"):
        rtuning_data.run(data_recipe(tmp_path, "r-tuning"))
    assert not (tmp_path / "runs").exists()


def test_r_tuning_u_needs_a_model(tmp_path):
    with pytest.raises(Exception, match="r-tuning-u"):
        data_recipe(tmp_path, "r-tuning-u")


def test_every_r_tuning_r_refusal_is_read_as_a_refusal():
    # The phrases R-Tuning-R trains on must count as refusals when the tuned model says them.
    from pipeline.methods.refusal import detect_refusal
    from pipeline.methods.rtuning import REFUSALS

    assert all(detect_refusal(phrase) for phrase in REFUSALS)
    assert detect_refusal("Quellmarsh") is None
