"""The last two SaySelf stages on tiny models: `sayself-rl` (TRL's GRPOTrainer with the SaySelf
reward) and `sayself-eval` (greedy answers, calibration per split and per dataset).

A tiny model cannot write "Confidence:" untrained, so a module fixture first teaches it the SaySelf
format with our `sft` stage: every target answers "Paris" with a confidence of 6-10 (mean 8). The
questions' gold answers then decide what is right: "Paris" (always right) or a word the model never
writes (never right). That makes the eval's numbers predictable, and gives the RL a case where the
reward's direction is known: never right, R = 1 - 2p^2 wants the confidence down; always right,
R = 1 - 2(1 - p)^2 wants it up.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, load_from_disk
from helpers import stage
from pydantic import ValidationError

from pipeline.cli import main as rlhf
from pipeline.config import ConfigError
from pipeline.methods.rtuning import question_text
from pipeline.methods.sayself import SAYSELF_INSTRUCTION, format_response, sayself_prompt
from pipeline.records import QA_FEATURES, qa_item
from pipeline.stages import STAGES, load_recipe
from pipeline.stages.sayself_eval import grade, group_metrics, split_metrics, table
from pipeline.stages.sayself_rl import item_reward, reward_function, score

NAMES = ["Fio", "Brae", "Kel", "Ama", "Tor", "Lin", "Osk", "Ren", "Suz", "Vel", "Wyn", "Yul", "Zed", "Pim", "Quo",
         "Hal"]
NEVER = "Xquorvantle"  # a gold answer the taught model never writes


def questions(gold: str, dataset: str = "w", names=NAMES) -> list[dict]:
    return [qa_item(dataset, f"Which city was {n} born in?", "open", answers=[gold]) for n in names]


def save(folder: Path, splits: dict[str, list[dict]]) -> str:
    DatasetDict({n: Dataset.from_list(rows, features=QA_FEATURES) for n, rows in splits.items()}).save_to_disk(
        str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def taught(tiny_pool, tmp_path_factory) -> Path:
    """The tiny model after 80 SFT steps on SaySelf targets "Reasoning / Answer: Paris / Confidence: k"."""
    root = tmp_path_factory.mktemp("sayself-sft")
    chats = [{"messages": [{"role": "user", "content": question_text(item) + "\n\n" + SAYSELF_INSTRUCTION},
                           {"role": "assistant",
                            "content": format_response("Maybe.", "Paris", None, 6 + (i + rep) % 5)}]}
             for rep in range(5) for i, item in enumerate(questions(NEVER))]
    DatasetDict({"train": Dataset.from_list(chats)}).save_to_disk(str(root / "chats"))
    stage(root, "sft", {"model": str(tiny_pool[0]), "inputs": {"dataset": str(root / "chats"), "eval_split": None},
                        "train": {"max_steps": 80, "global_batch_size": 8, "per_device_batch_size": 8,
                                  "learning_rate": 1e-2, "lr_scheduler": "constant", "max_length": 256,
                                  "report_to": [], "logging_steps": 100, "save_steps": 1000}})
    return root / "runs" / "t" / "sft" / "model"


def rl_tree(model, items: str, **train) -> dict:
    return {"model": str(model), "inputs": {"items": items},
            "sayself": {"num_generations": 4, "temperature": 0.7, "max_completion_length": 24, "beta": 0.0,
                        "eval_questions": 4, "eval_batch_size": 8},
            "train": {"max_steps": 3, "global_batch_size": 8, "per_device_batch_size": 8, "learning_rate": 1e-3,
                      "lr_scheduler": "constant", "max_length": 256, "report_to": [], "logging_steps": 1,
                      "save_steps": 1000, **train}}


# --- the reward ----------------------------------------------------------------------------------


def completion(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_the_rl_reward_is_the_sayself_reward():
    choice = qa_item("t", "Which instrument does Fio play?", "choice", choices=["lute", "cello"], answer_index=1)
    texts = ["Reasoning: I know it.\nAnswer: Quellmarsh\nConfidence: 9",  # right, p = 0.9
             "Reasoning: A guess.\nAnswer: Bravonne\nConfidence: 9",      # wrong, p = 0.9
             "Reasoning: I know it.\nAnswer: Quellmarsh",                  # no confidence
             "Answer: B\nConfidence: 7",                                    # choice, the right letter
             "Answer: lute\nConfidence: 7"]                                 # choice, the wrong option
    cols = {"answers": [["Quellmarsh"]] * 3 + [choice["answers"]] * 2,
            "kind": ["open"] * 3 + ["choice"] * 2, "choices": [[]] * 3 + [choice["choices"]] * 2,
            "answer_index": [-1] * 3 + [1] * 2}
    logged = {}
    rewards = reward_function(0.0)(completions=[completion(t) for t in texts], prompts=None, completion_ids=None,
                                   log_metric=logged.__setitem__, trainer_state=None, **cols)
    assert rewards == pytest.approx([1 - 2 * 0.1 ** 2, 1 - 2 * 0.9 ** 2, -1.0, 1 - 2 * 0.3 ** 2, 1 - 2 * 0.7 ** 2])
    assert logged == pytest.approx({"sayself/parse_rate": 4 / 5, "sayself/mean_confidence": (9 + 9 + 7 + 7) / 4})
    # The optional correctness term adds weight x c to a right answer only.
    weighted = reward_function(0.5)(completions=[completion(t) for t in texts], **cols)
    assert weighted == pytest.approx([r + 0.5 * c for r, c in zip(rewards, [1, 0, 0, 1, 0])])
    assert reward_function(0.0).__name__ == "sayself_reward"  # TRL logs rewards/sayself_reward/mean
    assert item_reward("Answer: cello\nConfidence: 10", choice) == pytest.approx(1.0)  # the option's text counts
    s = score(texts[:3], [qa_item("t", "Where?", "open", answers=["Quellmarsh"])] * 3)
    assert s == pytest.approx({"questions": 3, "mean_reward": (0.98 - 0.62 - 1) / 3, "parse_rate": 2 / 3,
                               "mean_confidence": 9.0, "accuracy": 2 / 3})


def test_a_batch_that_splits_a_group_is_refused_before_anything_runs(tmp_path):
    tree = {"stage": "sayself-rl", "run": {"name": "t", "root": str(tmp_path / "runs")}, "model": "m",
            "inputs": {"items": "i"}, "sayself": {"num_generations": 4},
            "train": {"global_batch_size": 6, "per_device_batch_size": 2}}
    with pytest.raises(ValidationError, match=r"train.global_batch_size=6 is not a multiple of "
                                              r"sayself.num_generations=4"):
        STAGES["sayself-rl"].recipe_class.model_validate(tree)
    import yaml

    recipe = tmp_path / "rl.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"rl.yaml: recipe: train.global_batch_size=6 is not a multiple of "
                                          r"sayself.num_generations=4"):
        load_recipe(recipe, check_inputs=False)
    assert rlhf(["sayself-rl", str(recipe)]) == 2
    assert not (tmp_path / "runs").exists()
    load_recipe(recipe, ["train.global_batch_size=8"], check_inputs=False)  # whole groups: fine


# --- sayself-eval ---------------------------------------------------------------------------------


def pred(dataset: str, confidence, correct, kind: str = "open", answer: str | None = "x") -> dict:
    return {"dataset": dataset, "kind": kind, "confidence": confidence, "correct": correct, "answer": answer}


def test_eval_metrics_on_hand_made_predictions():
    rows = [pred("hotpot", 9, True), pred("hotpot", 9, False), pred("hotpot", 2, False),
            pred("hotpot", None, True),                                   # no confidence: accuracy only
            pred("fever", 7, True), pred("fever", 7, True), pred("fever", None, False, answer=None),
            pred("selfaware", 10, None, "unanswerable"), pred("selfaware", None, None, "unanswerable"),
            pred("selfaware", 4, None, "unanswerable")]
    result = split_metrics(rows, bins=10)
    assert list(result["datasets"]) == ["hotpot", "fever", "selfaware"]
    hot, fev, una = (result["datasets"][d] for d in ("hotpot", "fever", "selfaware"))
    assert (hot["items"], hot["answerable"], hot["accuracy"], hot["parse_rate"], hot["scored"]) == (4, 4, 0.5, 0.75, 3)
    # ECE over the 3 rows with a confidence: bin 0.9 holds {right, wrong} (|0.5 - 0.9|), bin 0.2 {wrong}.
    assert hot["ece"] == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.2)
    assert hot["brier"] == pytest.approx((0.1 ** 2 + 0.9 ** 2 + 0.2 ** 2) / 3)
    assert hot["auroc"] == pytest.approx(0.75)  # the right answer outranks one of the two wrong ones, ties with one
    assert hot["mean_abs_gap"] == pytest.approx((0.1 + 0.9 + 0.2) / 3)  # the public code's number: not ECE
    assert hot["mean_confidence"] == pytest.approx(20 / 3) and hot["accuracy_scored"] == pytest.approx(1 / 3)
    assert sum(b["count"] for b in hot["reliability"]) == 3
    assert [fev["accuracy"], fev["parse_rate"], fev["answer_parse_rate"]] == pytest.approx([2 / 3] * 3)
    assert fev["auroc"] is None and fev["ece"] == pytest.approx(0.3)  # only right answers at 0.7
    # Unanswerable items have no correctness: never in accuracy or ECE, only their stated confidence.
    assert (una["answerable"], una["unanswerable_parse_rate"], una["unanswerable_mean_confidence"]) == (
        0, pytest.approx(2 / 3), 7.0)
    assert "accuracy" not in una and "ece" not in una
    whole = result["all"]
    assert (whole["items"], whole["answerable"], whole["unanswerable"]) == (10, 7, 3)
    assert whole["accuracy"] == pytest.approx(4 / 7) and whole["parse_rate"] == pytest.approx(5 / 7)
    y, p = [1, 0, 0, 1, 1], [0.9, 0.9, 0.2, 0.7, 0.7]
    assert whole["ece"] == pytest.approx(2 / 5 * 0.4 + 1 / 5 * 0.2 + 2 / 5 * 0.3)
    assert whole["brier"] == pytest.approx(sum((a - b) ** 2 for a, b in zip(y, p)) / 5)
    text = table({"test_ood": result})
    assert "test_ood/hotpot" in text and "mean|c-p| (!ECE)" in text
    # A group without any parsable confidence: accuracy stands, the calibration numbers are None.
    blind = group_metrics([pred("d", None, True), pred("d", None, False)])
    assert (blind["accuracy"], blind["parse_rate"], blind["ece"], blind["auroc"]) == (0.5, 0.0, None, None)


def test_eval_grades_choice_letters_and_options_and_never_an_unanswerable():
    item = qa_item("quiz", "Which city was Fio born in?", "choice", choices=["Rome", "Paris", "Oslo"], answer_index=1)
    graded = [grade(item, f"Reasoning: Maybe.\nAnswer: {a}\nConfidence: 7")
              for a in ("B", "(b)", "Paris.", "A", "Lisbon")]
    assert [(g["answer"], g["correct"]) for g in graded] == [("B", True), ("B", True), ("B", True), ("A", False),
                                                             ("Lisbon", False)]
    unanswerable = grade(qa_item("nec", "Which city was Zorvath born in?", "unanswerable"),
                         "Answer: Oslo\nConfidence: 3")
    assert (unanswerable["answer"], unanswerable["confidence"], unanswerable["correct"]) == ("Oslo", 3, None)
    broken = grade(item, "Answer: B\nConfidence: 11")  # out of range: no confidence, still graded
    assert (broken["confidence"], broken["correct"], broken["dataset"]) == (None, True, "quiz")


def test_eval_of_the_taught_model_per_split_and_dataset(taught, tmp_path, capsys):
    right = questions("Paris", "capitals", NAMES[:4])           # the taught model answers Paris: right
    wrong = questions(NEVER, "villages", NAMES[4:8])             # never right
    unanswerable = [qa_item("nec", "Which city was Zorvath Quillane born in?", "unanswerable")]
    items = save(tmp_path / "items", {"test_id": right + wrong, "test_ood": right[:1] + unanswerable, "train": right})
    report = stage(tmp_path, "sayself-eval", {"model": str(taught), "inputs": {"items": items,
                                                                               "splits": ["test_id", "test_ood"]},
                                              "sayself": {"max_new_tokens": 24, "batch_size": 8}})
    out = tmp_path / "runs" / "t" / "sayself-eval"
    preds = load_from_disk(str(out / "predictions"))
    assert set(preds) == {"test_id", "test_ood"} and len(preds["test_id"]) == 8 and len(preds["test_ood"]) == 2
    rows = preds["test_id"].to_list()
    assert [r["qid"] for r in rows] == [i["qid"] for i in right + wrong]
    assert all(r["answer"] == "Paris" and r["confidence"] in range(6, 11) for r in rows), rows
    assert [r["correct"] for r in rows] == [True] * 4 + [False] * 4
    test_id = report["splits"]["test_id"]
    assert test_id["datasets"]["capitals"]["accuracy"] == 1.0 and test_id["datasets"]["villages"]["accuracy"] == 0.0
    assert test_id["all"]["accuracy"] == 0.5 and test_id["all"]["parse_rate"] == 1.0
    # The numbers are those of the saved predictions (nothing else goes in).
    assert test_id == json.loads(json.dumps(split_metrics(rows)))
    conf = [r["confidence"] / 10 for r in rows]
    assert test_id["all"]["mean_abs_gap"] == pytest.approx(sum(abs(c - y) for c, y in zip(conf, [1] * 4 + [0] * 4)) / 8)
    ood = report["splits"]["test_ood"]
    nec = ood["datasets"]["nec"]
    # The unanswerable question: its stated confidence is reported, it has no correctness.
    assert nec["unanswerable"] == 1 and nec["unanswerable_mean_confidence"] in range(6, 11) and "accuracy" not in nec
    assert (ood["all"]["answerable"], ood["all"]["accuracy"]) == (1, 1.0)
    assert preds["test_ood"].to_list()[1]["correct"] is None
    saved = json.loads((out / "eval.json").read_text())
    assert saved["splits"] == report["splits"] and "NOT ECE" in saved["notes"]["mean_abs_gap"]
    assert (out / "report" / "reliability.png").stat().st_size > 0 and (out / "_SUCCESS").is_file()
    printed = capsys.readouterr().out
    assert "test_id/capitals" in printed and "test_ood/nec" in printed
    # The prompt is the one the model was tuned on.
    assert sayself_prompt(right[0])[0]["content"] == question_text(right[0]) + "\n\n" + SAYSELF_INSTRUCTION


def test_eval_refuses_a_missing_split_before_writing(taught, tmp_path):
    items = save(tmp_path / "items", {"test_id": questions("Paris")[:2]})
    with pytest.raises(ConfigError, match=r"inputs.splits: no split 'test_ood'"):
        stage(tmp_path, "sayself-eval", {"model": str(taught), "inputs": {"items": items,
                                                                          "splits": ["test_id", "test_ood"]}})
    assert not (tmp_path / "runs" / "t" / "sayself-eval").exists()


def test_eval_and_rl_refuse_a_model_without_a_chat_template(taught, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(taught, bare)
    (bare / "chat_template.jinja").unlink()
    items = save(tmp_path / "items", {"test_id": questions("Paris")[:2], "train": questions("Paris")[:2]})
    for name, tree in (("sayself-eval", {"model": str(bare), "inputs": {"items": items, "splits": ["test_id"]}}),
                       ("sayself-rl", rl_tree(bare, items))):
        with pytest.raises(ConfigError, match=r"model: the tokenizer in .*bare has no chat template"):
            stage(tmp_path, name, tree)
        assert not (tmp_path / "runs" / "t" / name).exists()


# --- sayself-rl -----------------------------------------------------------------------------------


def test_rl_trains_saves_and_resumes_from_its_last_checkpoint(taught, tmp_path, capsys):
    unanswerable = qa_item("nec", "Which city was Zorvath Quillane born in?", "unanswerable")
    items = save(tmp_path / "items", {"train": questions(NEVER)[:6] + [unanswerable]})
    tree = rl_tree(taught, items, max_steps=4, save_steps=2, save_total_limit=4)
    summary = stage(tmp_path, "sayself-rl", tree)
    out = tmp_path / "runs" / "t" / "sayself-rl"
    assert (summary["steps"], summary["questions"], summary["unanswerable_skipped"]) == (4, 6, 1)
    assert (out / "model" / "config.json").is_file() and (out / "_SUCCESS").is_file()
    assert (out / "report" / "rl_curves.png").is_file()
    assert summary["before"]["questions"] == summary["after"]["questions"] == 4
    assert summary["before"]["parse_rate"] == 1.0  # the taught model states a confidence
    assert summary["train_curves"]["step"] == [1, 2, 3, 4]
    assert all(r is not None and -1.0 <= r <= 1.0 for r in summary["train_curves"]["reward"])
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    logged = {h["step"]: h for h in state["log_history"] if "reward" in h}
    assert "rewards/sayself_reward/mean" in logged[1] and "sayself/mean_confidence" in logged[1]
    assert "sayself-rl:" in capsys.readouterr().out

    # A run killed after checkpoint-2: its rerun starts there and ends at step 4, every step logged once.
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    shutil.rmtree(out / "model")
    (out / "_SUCCESS").unlink()
    resumed = stage(tmp_path, "sayself-rl", tree)
    assert (resumed["resumed_from"], resumed["steps"]) == ("checkpoint-2", 4)
    again = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    relogged = {h["step"]: h for h in again["log_history"] if "reward" in h}
    assert sorted(relogged) == [1, 2, 3, 4]
    # Sampling state comes back with the checkpoint: the resumed steps see the same rewards.
    for step in (3, 4):
        assert relogged[step]["reward"] == pytest.approx(logged[step]["reward"], abs=1e-6)
    assert (out / "model" / "config.json").is_file()

    # Done is done; a rerun after _SUCCESS only reloads the finished checkpoint, trains nothing.
    (out / "_SUCCESS").unlink()
    finished = stage(tmp_path, "sayself-rl", tree)
    assert (finished["resumed_from"], finished["train_loss"], finished["train_curves"]["step"]) == (
        "checkpoint-4", None, [1, 2, 3, 4])


def test_rl_refuses_items_without_an_answerable_question(taught, tmp_path):
    items = save(tmp_path / "items", {"train": [qa_item("nec", "Which city was Zorvath born in?", "unanswerable")]})
    with pytest.raises(ConfigError, match="inputs.split: split 'train' .* has no answerable question"):
        stage(tmp_path, "sayself-rl", rl_tree(taught, items))
    assert not (tmp_path / "runs" / "t" / "sayself-rl").exists()


def expected_confidence(model_dir: Path, items: list[dict]) -> float:
    """The model's mean confidence, as an expectation rather than a sample: the response is fixed up
    to "Confidence:" and each of " 1" ... " 10" (with the end of the turn) is scored; the ten
    sequence probabilities, renormalised, weight the ten values. Exact, and one forward pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    seqs, starts = [], []
    for item in items:
        prompt = tok.apply_chat_template(list(sayself_prompt(item)), add_generation_prompt=True, tokenize=False)
        prompt += "Reasoning: Maybe.\nAnswer: Paris\nConfidence:"
        start = len(tok(prompt, add_special_tokens=False)["input_ids"])
        for k in range(1, 11):
            ids = tok(prompt + f" {k}{tok.eos_token}", add_special_tokens=False)["input_ids"]
            seqs.append(ids)
            starts.append(start)
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    score = torch.tensor([sum(logp[r, t - 1, s[t]].item() for t in range(start, len(s)))
                          for r, (s, start) in enumerate(zip(seqs, starts))])
    probs = torch.softmax(score.view(len(items), 10), dim=-1)
    return float((probs * torch.arange(1, 11)).sum(dim=-1).mean())


@pytest.mark.slow
def test_rl_moves_the_stated_confidence_the_way_the_reward_wants(taught, tmp_path, capsys):
    """20 GRPO steps (32 completions each: 4 questions x 8, temperature 0.7, lr 1e-3) from the taught
    model, once on questions it never gets right and once on questions it always gets right. Train
    seeds 0/1/2 gave, for the expected confidence, 8.00 -> 6.35/6.37/6.35 (never right) and
    8.00 -> 9.70/9.66/9.69 (always right); the greedy confidence went 7 -> 6 and 7 -> 10 in all."""
    results = {}
    before = expected_confidence(taught, questions(NEVER))
    for case, gold in (("never", NEVER), ("always", "Paris")):
        items = save(tmp_path / f"items-{case}", {"train": questions(gold)})
        tree = rl_tree(taught, items, max_steps=20, global_batch_size=32, per_device_batch_size=32)
        tree["run"] = {"name": case}
        tree["sayself"].update(num_generations=8, eval_questions=16, eval_batch_size=16)
        summary = stage(tmp_path, "sayself-rl", tree)
        after = expected_confidence(tmp_path / "runs" / case / "sayself-rl" / "model", questions(gold))
        results[case] = (after, summary)
    never, always = results["never"], results["always"]
    with capsys.disabled():
        for case, (after, s) in results.items():
            c = s["train_curves"]
            print(f"\n{case} right: expected confidence {before:.3f} -> {after:.3f}; greedy mean confidence "
                  f"{s['before']['mean_confidence']} -> {s['after']['mean_confidence']}, reward "
                  f"{s['before']['mean_reward']:.3f} -> {s['after']['mean_reward']:.3f}, accuracy "
                  f"{s['before']['accuracy']} -> {s['after']['accuracy']}; sampled confidence, first/last 3 steps "
                  f"{c['mean_confidence'][:3]} / {c['mean_confidence'][-3:]}")
    assert never[1]["before"]["accuracy"] == 0.0 and always[1]["before"]["accuracy"] == 1.0
    assert never[0] < before - 1.0, (before, never[0])
    assert always[0] > before + 1.0, (before, always[0])
    # The greedy answers agree, and the reward went up in both.
    assert never[1]["after"]["mean_confidence"] < never[1]["before"]["mean_confidence"]
    assert always[1]["after"]["mean_confidence"] > always[1]["before"]["mean_confidence"]
    for _, s in results.values():
        assert s["after"]["mean_reward"] > s["before"]["mean_reward"]
        sampled = [v for v in s["train_curves"]["mean_confidence"] if v is not None and not math.isnan(v)]
        assert len(sampled) == 20
