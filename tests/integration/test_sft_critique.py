"""The `sft` and `critique` stages on tiny models: the loss covers assistant tokens only, training
lowers the answers' NLL, a rerun resumes from the last checkpoint, a trained critique model ends
with a parseable score that follows the prompt, and bad inputs stop the stage before it writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from pipeline import train
from pipeline.config import ConfigError
from pipeline.runs import RunOptions
from pipeline.stages import critique, sft
from pipeline.stages.critique import Recipe as CritiqueRecipe
from pipeline.stages.sft import Recipe as SftRecipe

CHATS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What colour is snow?", "Snow is white."),
    ("Name a fruit.", "An apple is a fruit."),
    ("Where does the river go?", "The river runs to the sea."),
    ("What do you bake bread with?", "You bake bread with flour."),
]


def chat(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def save_chats(folder: Path, splits: dict[str, list[dict]]) -> Path:
    DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(str(folder))
    return folder


def train_section(**extra) -> dict:
    # Full fine-tuning, fp32 on CPU, no logger (tensorboard is not installed here).
    return {"global_batch_size": 4, "per_device_batch_size": 4, "learning_rate": 3e-3, "lr_scheduler": "constant",
            "max_length": 64, "logging_steps": 5, "report_to": [], "precision": "fp32", **extra}


def sft_recipe(tmp_path: Path, model: Path, data: Path, **train) -> SftRecipe:
    return SftRecipe.model_validate({
        "stage": "sft", "run": {"name": "t", "root": str(tmp_path / "runs")}, "model": str(model),
        "inputs": {"dataset": str(data), "train_split": "train_sft", "eval_split": "test_sft"},
        "train": train_section(**train)})


def answer_nll(model_dir: Path, chats: list[list[dict]]) -> float:
    """Mean NLL per assistant token (the answer and its <|im_end|>), teacher-forced."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    total, count = 0.0, 0
    for messages in chats:
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = torch.tensor([enc["input_ids"]])
        mask = torch.tensor(enc["assistant_masks"][1:], dtype=torch.bool)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], dim=-1)
        token_logp = logp.gather(1, ids[0, 1:, None])[:, 0]
        total -= float(token_logp[mask].sum())
        count += int(mask.sum())
    return total / count


def test_sft_loss_covers_assistant_tokens_only(tiny_pool, tmp_path):
    from transformers import AutoTokenizer

    data = save_chats(tmp_path / "data", {"train_sft": [{"messages": chat(u, a)} for u, a in CHATS],
                                          "test_sft": [{"messages": chat(*CHATS[0])}]})
    recipe = sft_recipe(tmp_path, tiny_pool[0], data, max_steps=1)
    train_ds, eval_ds, _ = train.load_chat_splits(recipe)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_pool[0]))

    def labelled(assistant_only: bool) -> list[tuple[str, str]]:
        """(text of the tokens with a label, whole text) per training row, as the trainer prepared them."""
        model, tok = train.load_model(recipe)
        trainer = train.build_trainer(recipe, tmp_path / f"stage-{assistant_only}", train_ds, eval_ds, model, tok,
                                    assistant_only)
        out = []
        for row in trainer.train_dataset:
            kept = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
            out.append((tokenizer.decode(kept), tokenizer.decode(row["input_ids"])))
        return out

    for (user, answer), (kept, whole) in zip(CHATS, labelled(True), strict=True):
        # Exactly the answer and its end-of-turn token; the user turn and role headers are -100.
        assert kept == answer + "<|im_end|>"
        assert user in whole and user not in kept
    # The switch matters: without it every token is a label.
    kept, whole = labelled(False)[0]
    assert kept == whole and CHATS[0][0] in kept


def test_sft_learns_writes_its_outputs_and_resumes(tiny_pool, tmp_path):
    chats = [chat(u, a) for u, a in CHATS]
    data = save_chats(tmp_path / "data", {"train_sft": [{"messages": c} for c in chats],
                                          "test_sft": [{"messages": c} for c in chats[:2]]})
    recipe = sft_recipe(tmp_path, tiny_pool[0], data, max_steps=20, save_steps=10, learning_rate=5e-3)
    before = answer_nll(tiny_pool[0], chats)
    summary = sft.run(recipe)
    stage = tmp_path / "runs" / "t" / "sft"
    after = answer_nll(stage / "model", chats)
    print(f"sft answer NLL before {before:.3f} after {after:.3f}")
    assert after < 0.5 * before

    for name in ("model/config.json", "eval.json", "summary.json", "config.yaml", "report/loss.png", "_SUCCESS"):
        assert (stage / name).is_file(), name
    assert summary["steps"] == 20 and summary["resumed_from"] is None
    assert json.loads((stage / "eval.json").read_text())["eval_loss"] == pytest.approx(summary["eval_loss"])
    assert (stage / "checkpoints" / "checkpoint-20").is_dir()

    # An interrupted run (no _SUCCESS) picks up from its newest checkpoint.
    (stage / "_SUCCESS").unlink()
    again = sft.run(recipe)
    assert again["resumed_from"] == "checkpoint-20" and again["steps"] == 20
    assert again["train_loss"] is None  # nothing was left to train
    assert json.loads((stage / "summary.json").read_text())["resumed_from"] == "checkpoint-20"
    assert (stage / "_SUCCESS").is_file()


def critique_rows(n: int, offset: int = 0) -> list[dict]:
    # The score follows one word of the prompt, so a model that reads the prompt can get it right.
    rows = []
    for i in range(n):
        score = (2, 9)[(i + offset) % 2]
        verdict = "wrong" if score == 2 else "right"
        rows.append({"messages": [
            {"role": "user", "content": f"Critique this answer. This answer is {verdict}."},
            {"role": "assistant", "content": f"Good.\nOverall score: {score}"}],
            "overall_score": float(score)})
    return rows


def test_critique_model_learns_to_end_with_a_score_that_follows_the_prompt(tiny_pool, tmp_path):
    data = save_chats(tmp_path / "crit", {"train": critique_rows(36), "test": critique_rows(12, offset=1)})
    recipe = CritiqueRecipe.model_validate({
        "stage": "critique", "run": {"name": "t", "root": str(tmp_path / "runs")}, "model": str(tiny_pool[0]),
        "inputs": {"dataset": str(data)},
        "train": train_section(max_steps=50),
        "critique": {"eval_items": 12, "max_new_tokens": 16, "batch_size": 12}})
    test = critique_rows(12, offset=1)

    # The untrained model's greedy text is noise: it does not parse.
    texts = critique.generate_critiques(tiny_pool[0], [r["messages"] for r in test], 16, 12)
    before = critique.score_critiques(texts, [r["overall_score"] for r in test])

    summary = critique.run(recipe)
    stage = tmp_path / "runs" / "t" / "critique"
    print(f"critique parse rate before {before['parse_rate']:.2f} after {summary['parse_rate']:.2f}, "
          f"spearman {summary['spearman']}, pearson {summary['pearson']}")
    assert before["parse_rate"] <= 0.1
    assert summary["parse_rate"] >= 0.5
    assert summary["spearman"] is not None and summary["spearman"] > 0.5
    assert summary["pearson"] is not None and summary["pearson"] > 0.5

    rows = [json.loads(line) for line in (stage / "eval_critiques.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and [r["judge_score"] for r in rows] == [r["overall_score"] for r in test]
    evals = json.loads((stage / "eval.json").read_text())
    assert evals["critique_parse_rate"] == summary["parse_rate"] and "eval_loss" in evals
    for name in ("model/config.json", "report/loss.png", "report/scores.png", "summary.json", "_SUCCESS"):
        assert (stage / name).is_file(), name


def test_score_critiques_reports_none_for_undefined_correlations():
    scored = critique.score_critiques(["Fine.\nOverall score: 5", "no score here", "Ok.\nOverall score: 5",
                                       "Ok.\nOverall score: 5"], [3, 4, 5, 6])
    assert scored["parsed"] == 3 and scored["parse_rate"] == 0.75
    assert scored["spearman"] is None and scored["pearson"] is None  # constant scores
    assert scored["rows"][1]["score"] is None and scored["rows"][1]["parse_error"]


@pytest.mark.parametrize("case", ["missing split", "no messages", "not a dict", "missing model", "untagged template"])
def test_bad_input_is_a_config_error_and_writes_nothing(tiny_pool, tmp_path, case):
    good = [{"messages": chat(*CHATS[0])}]
    model = tiny_pool[0]
    if case == "missing split":
        data, key, named = save_chats(tmp_path / "data", {"train_sft": good}), "inputs.eval_split", "test_sft"
    elif case == "no messages":
        data = save_chats(tmp_path / "data", {"train_sft": [{"text": "hello"}], "test_sft": good})
        key, named = "inputs.train_split", "messages"
    elif case == "not a dict":
        data, key, named = tmp_path / "data", "inputs.dataset", "DatasetDict"
        Dataset.from_list(good).save_to_disk(str(data))
    elif case == "missing model":
        data = save_chats(tmp_path / "data", {"train_sft": good, "test_sft": good})
        model, key, named = tmp_path / "nope", "model", "nope"
    else:  # assistant-only loss with a template that cannot mark the assistant's tokens
        data = save_chats(tmp_path / "data", {"train_sft": good, "test_sft": good})
        model = tmp_path / "untagged"
        shutil.copytree(tiny_pool[0], model)
        template = model / "chat_template.jinja"
        text = template.read_text().replace("{% generation %}", "").replace("{% endgeneration %}", "")
        template.write_text(text)
        key, named = "sft.assistant_only_loss", str(model)
    recipe = sft_recipe(tmp_path, model, data, max_steps=1)
    for dry in (True, False):  # the dry run makes the same checks
        with pytest.raises(ConfigError) as err:
            sft.run(recipe, RunOptions(dry_run=dry))
    message = str(err.value)
    assert message.startswith(key) and named in message
    if case not in ("missing model", "untagged template"):
        assert str(data) in message
    stage = tmp_path / "runs" / "t" / "sft"
    assert not (stage / "_SUCCESS").exists() and not (stage / "model").exists()
    assert not stage.exists()
