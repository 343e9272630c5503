"""The `dpo` and `bestofn` stages on tiny models: DPO raises the implicit reward of the chosen
answers over the rejected ones (measured here from the models' own log-probs), the stage writes
its outputs only after checking its inputs, and best-of-n's reward grows with n."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.stages.bestofn import Recipe as BestOfNRecipe
from pipeline.stages.dpo import Recipe as DpoRecipe

BETA = 0.1
TOPICS = ["rivers", "snow", "bread", "spiders", "Paris", "budgets", "poems", "the sea",
          "mills", "winter", "flour", "Python"]


def pairs_rows(n: int) -> list[dict]:
    """A controlled preference: the chosen answer is always upbeat and short, the rejected one
    is always the same refusal, so a policy can learn the difference in a few steps."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        prompt = [{"role": "user", "content": f"Tell me about {topic}."}]
        chosen = [{"role": "assistant", "content": f"Yes, {topic} are good."}]
        rejected = [{"role": "assistant", "content": "No. I am not sure about the answer."}]
        rows.append({"prompt": prompt, "prompt_id": f"p{i}", "chosen": chosen, "rejected": rejected,
                     "messages": prompt + chosen, "score_chosen": 8.0, "score_rejected": 2.0,
                     "source": "flan", "chosen_model": "a", "rejected_model": "b", "margin": 6 / 9})
    return rows


def save_pairs(folder: Path, drop: str | None = None) -> Path:
    from datasets import Dataset, DatasetDict

    def split(rows):
        data = Dataset.from_list(rows)
        return data.remove_columns(drop) if drop else data

    rows = pairs_rows(16)
    DatasetDict({"train_prefs": split(rows), "test_prefs": split(rows[:8]),
                 "train_gen": split(rows), "test_gen": split(rows[:6])}).save_to_disk(str(folder))
    return folder


def completion_logps(model, tokenizer, rows: list[dict]) -> tuple[list[float], list[float]]:
    """Sum of log pi(answer tokens | prompt) for chosen and rejected, tokenised as TRL does:
    the prompt with the generation prompt, then the rest of the full conversation's text."""
    import torch

    out = {"chosen": [], "rejected": []}
    model.eval()
    for row in rows:
        prompt_text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        for side in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
            assert full.startswith(prompt_text)
            answer_ids = tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + answer_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].float()
            logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            out[side].append(logps[len(prompt_ids) - 1:].sum().item())
    return out["chosen"], out["rejected"]


def implicit_rewards(policy, reference, tokenizer, rows):
    """DPO's implicit reward r = beta * (log pi - log pi_ref); accuracy = share of pairs with
    r(chosen) > r(rejected), margin = mean r(chosen) - r(rejected)."""
    pc, pr = completion_logps(policy, tokenizer, rows)
    rc, rr = completion_logps(reference, tokenizer, rows)
    margins = [BETA * ((a - b) - (c - d)) for a, b, c, d in zip(pc, pr, rc, rr)]
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def dpo_recipe(root: Path, model, dataset, **train) -> DpoRecipe:
    return DpoRecipe.model_validate({
        "stage": "dpo", "run": {"name": "t", "root": str(root)}, "model": str(model),
        "inputs": {"dataset": str(dataset)},
        "train": {"max_steps": 20, "global_batch_size": 8, "per_device_batch_size": 4, "learning_rate": 2e-3,
                  "lr_scheduler": "constant", "max_length": 128, "logging_steps": 5, "save_steps": 1000,
                  "report_to": [], **train},
        "dpo": {"beta": BETA},
    })


def test_dpo_raises_the_implicit_reward_of_chosen_answers(tiny_pool, tmp_path):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.stages import dpo

    data = save_pairs(tmp_path / "pairs")
    base = tiny_pool[0]
    tokenizer = AutoTokenizer.from_pretrained(base)
    reference = AutoModelForCausalLM.from_pretrained(base)
    rows = list(load_from_disk(str(data))["train_prefs"])

    acc0, margin0 = implicit_rewards(reference, reference, tokenizer, rows)
    assert acc0 == 0 and margin0 == 0  # the policy starts as the reference

    summary = dpo.run(dpo_recipe(tmp_path / "runs", base, data))
    out = tmp_path / "runs" / "t" / "dpo"
    policy = AutoModelForCausalLM.from_pretrained(out / "model")
    acc1, margin1 = implicit_rewards(policy, reference, tokenizer, rows)
    print(f"DPO implicit reward on training pairs: accuracy {acc0:.2f} -> {acc1:.2f}, "
          f"mean margin {margin0:.3f} -> {margin1:.3f}; TRL eval {summary['eval']}")
    (tmp_path.parent / "dpo_figures.json").write_text(json.dumps(
        {"accuracy_before": acc0, "accuracy_after": acc1, "margin_before": margin0, "margin_after": margin1,
         "trl_eval": summary["eval"]}))
    assert acc1 > 0.9
    assert margin1 > margin0 + 0.5
    # TRL's own bookkeeping agrees on the held-out pairs.
    assert summary["eval"]["eval_rewards/accuracies"] > 0.9 and summary["eval"]["eval_rewards/margins"] > 0

    for name in ("model/config.json", "eval.json", "summary.json", "config.yaml", "report/rewards.png", "_SUCCESS"):
        assert (out / name).is_file(), name
    assert summary["steps"] == 20
    assert "eval_loss" in json.loads((out / "eval.json").read_text())


def test_dpo_with_lora_writes_a_merged_model_and_bad_input_writes_nothing(tiny_pool, tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.stages import dpo

    # A split without `rejected`: ConfigError naming the key and the path, no stage folder.
    bad = save_pairs(tmp_path / "bad", drop="rejected")
    with pytest.raises(ConfigError, match=r"inputs\.dataset.*rejected"):
        dpo.run(dpo_recipe(tmp_path / "runs", tiny_pool[0], bad))
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="model"):
        dpo.run(dpo_recipe(tmp_path / "runs", tmp_path / "nowhere", save_pairs(tmp_path / "ok")))
    with pytest.raises(ConfigError, match="has not finished"):
        dpo.run(DpoRecipe.model_validate({"stage": "dpo", "run": {"name": "t", "root": str(tmp_path / "runs")},
                                          "model": {"stage": "sft"}, "inputs": {"dataset": str(tmp_path / "ok")}}))
    assert not (tmp_path / "runs").exists()

    summary = dpo.run(dpo_recipe(tmp_path / "runs", tiny_pool[0], tmp_path / "ok", max_steps=2,
                                 lora={"r": 4, "alpha": 8}))
    out = tmp_path / "runs" / "t" / "dpo"
    assert summary["lora"] and summary["steps"] == 2 and (out / "_SUCCESS").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "model")  # plain weights, no adapter folder
    assert not (out / "model" / "adapter_config.json").exists() and merged is not None


def bestofn_recipe(root: Path, policy, reward_model, dataset, **extra) -> BestOfNRecipe:
    return BestOfNRecipe.model_validate({
        "stage": "bestofn", "run": {"name": "t", "root": str(root)}, "model": str(policy),
        "inputs": {"dataset": str(dataset)},
        "bestofn": {"reward_model": str(reward_model), "n_values": [2, 4, 8], "prompts": 6,
                    "max_new_tokens": 8, "batch_size": 8, "seed": 3, **extra},
    })


@pytest.fixture(scope="module")
def reward_model(tiny_pool, tmp_path_factory):
    """A tiny model with a (random but saved, hence fixed) one-label score head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("rm") / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_pool[1], num_labels=1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_pool[1]).save_pretrained(out)
    return out


def test_best_of_n_reward_grows_with_n_and_reruns_agree(tiny_pool, reward_model, tmp_path):
    from pipeline.stages import bestofn

    data = save_pairs(tmp_path / "pairs")
    recipe = bestofn_recipe(tmp_path / "runs", tiny_pool[0], reward_model, data)
    summary = bestofn.run(recipe)
    out = tmp_path / "runs" / "t" / "bestofn"
    table = json.loads((out / "eval.json").read_text())["table"]
    (tmp_path.parent / "bestofn_figures.json").write_text(json.dumps(table))
    means = [row["mean_best_reward"] for row in table]
    assert [row["n"] for row in table] == [1, 2, 4, 8]  # n=1 is always reported
    assert all(b >= a for a, b in zip(means, means[1:]))
    assert means[-1] > means[0]

    # best.jsonl: the kept sample is the best of all 8 and the table follows from its rewards.
    rows = [json.loads(line) for line in (out / "best.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["rewards"]) == 8 for r in rows)
    assert all(r["reward"] == max(r["rewards"]) == r["rewards"][r["best_index"]] for r in rows)
    for row in table:
        assert row["mean_best_reward"] == pytest.approx(sum(max(r["rewards"][:row["n"]]) for r in rows) / 6)
    # Samples differ (otherwise best-of-n would be trivially flat).
    assert len({r["completion"] for r in rows}) > 1
    for name in ("report/bestofn.png", "summary.json", "config.yaml", "_SUCCESS"):
        assert (out / name).is_file(), name

    # Same recipe, same numbers (seeded sampling, scored deterministically).
    again = bestofn.run(recipe)
    assert again["table"] == summary["table"]


def test_a_causal_lm_is_not_a_reward_model(tiny_pool, tmp_path):
    from pipeline.stages import bestofn

    data = save_pairs(tmp_path / "pairs")
    with pytest.raises(ConfigError, match=r"bestofn\.reward_model.*ForCausalLM"):
        bestofn.run(bestofn_recipe(tmp_path / "runs", tiny_pool[0], tiny_pool[1], data))
    assert not (tmp_path / "runs").exists()
    # Without the architectures hint, the newly initialised head gives it away.
    bare = tmp_path / "bare"
    import shutil

    shutil.copytree(tiny_pool[1], bare)
    config = json.loads((bare / "config.json").read_text())
    config.pop("architectures")
    (bare / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="no trained score head"):
        bestofn.run(bestofn_recipe(tmp_path / "runs", tiny_pool[0], bare, data))
    with pytest.raises(ConfigError, match="eval_split"):
        bestofn.run(bestofn_recipe(tmp_path / "runs", tiny_pool[0], tiny_pool[1], data).model_copy(
            update={"inputs": bestofn_recipe(tmp_path, "x", "y", data).inputs.model_copy(update={"eval_split": "nope"})}))
    assert not (tmp_path / "runs").exists()
