"""The `pairs` output loads unchanged in TRL 1.12's RewardTrainer and DPOTrainer and trains a few
steps on a tiny model; the reward trainer keeps the `margin` column and the loss uses it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from datasets import load_from_disk

from pipeline.stages import pairs as stage
from pipeline.stages.pairs import Recipe as PairsRecipe

ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")


def judged_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        completions = []
        for m in ("m1", "m2", "m3"):
            rating = rng.randint(1, 5)
            completions.append({
                "model": m, "response": f"{m} says {' '.join(rng.choice(['yes', 'no', 'maybe']) for _ in range(5))}",
                "principle": "helpfulness", "custom_system_prompt": "",
                "annotations": {a: {"Rating": str(rating), "Rationale": "r"} for a in ASPECTS},
                "fine-grained_score": float(rating), "overall_score": float(rng.randint(1, 10)),
                "critique": "ok"})
        rows.append({"prompt_id": f"p{i}", "source": "flan", "instruction": f"Say something about {i}.",
                     "models": ["m1", "m2", "m3"], "completions": completions})
    return rows


@pytest.fixture(scope="module")
def pairs_dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    source = tmp / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in judged_rows(24)))
    recipe = PairsRecipe.model_validate({"stage": "pairs", "run": {"name": "t", "root": str(tmp / "runs")},
                                         "inputs": {"annotations": str(source)},
                                         "pairs": {"test_fraction": 0.25}})
    stage.run(recipe)
    return load_from_disk(str(tmp / "runs" / "t" / "pairs" / "dataset"))


def _cpu_args(cls, out: Path, **extra):
    return cls(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2,
               learning_rate=1e-3, use_cpu=True, bf16=False, fp16=False, report_to=[], logging_steps=1,
               save_strategy="no", seed=0, **extra)


def test_reward_trainer_takes_train_prefs_unchanged_and_uses_the_margin(pairs_dataset, tiny_pool, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    path = tiny_pool[0]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    trainer = RewardTrainer(model=model, args=_cpu_args(RewardConfig, tmp_path / "rm", max_length=128),
                            train_dataset=pairs_dataset["train_prefs"], eval_dataset=pairs_dataset["test_prefs"],
                            processing_class=tokenizer)
    # The tokenised training set still carries our margins, row for row.
    assert "margin" in trainer.train_dataset.column_names
    assert trainer.train_dataset["margin"] == pairs_dataset["train_prefs"]["margin"]
    # prompt + chosen is the whole conversation: the user turn comes before the answer.
    first = tokenizer.decode(trainer.train_dataset[0]["chosen_ids"])
    row = pairs_dataset["train_prefs"][0]
    assert first.index(row["prompt"][0]["content"]) < first.index(row["chosen"][0]["content"])

    # With the margin, the loss on a batch is larger than without (-log sigma(d - m) > -log sigma(d)).
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert torch.all(batch["margin"] > 0)
    with torch.no_grad():
        with_margin = trainer.compute_loss(model, dict(batch))
        without = trainer.compute_loss(model, {k: v for k, v in batch.items() if k != "margin"})
    assert with_margin > without

    result = trainer.train()
    assert result.global_step == 2 and result.training_loss > 0
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics


def test_dpo_trainer_takes_train_prefs_unchanged(pairs_dataset, tiny_pool, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    path = tiny_pool[0]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    trainer = DPOTrainer(model=model, args=_cpu_args(DPOConfig, tmp_path / "dpo", max_length=128, beta=0.1),
                         train_dataset=pairs_dataset["train_prefs"], eval_dataset=pairs_dataset["test_prefs"],
                         processing_class=tokenizer)
    sample = trainer.train_dataset[0]
    row = pairs_dataset["train_prefs"][0]
    # The prompt is the user turn with the generation prompt; the completions are the answers alone.
    prompt_text = tokenizer.decode(sample["prompt_ids"])
    assert row["prompt"][0]["content"] in prompt_text and prompt_text.rstrip().endswith("assistant")
    assert row["chosen"][0]["content"] in tokenizer.decode(sample["chosen_ids"])
    assert row["chosen"][0]["content"] not in prompt_text
    result = trainer.train()
    assert result.global_step == 2
    assert "eval_loss" in trainer.evaluate()
