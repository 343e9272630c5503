"""Stage `ppo` on tiny models: it runs TRL's PPOTrainer end to end and writes the policy, the
before/after evaluation and the curves; a reward model without a score head or with another
vocabulary is refused before anything is trained. The method check at the end: on a reward
model whose score one response token decides, the held-out reward rises and a larger KL
coefficient keeps the policy closer to the start."""

from __future__ import annotations

import json
import math
import os

import pytest
from datasets import Dataset, DatasetDict

from pipeline.config import ConfigError
from pipeline.runs import is_done
from pipeline.stages import ppo
from pipeline.stages.ppo import Recipe as PpoRecipe

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(scope="module")
def setup(tiny_pool, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tmp = tmp_path_factory.mktemp("ppo")
    reward = tmp / "reward-model"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_pool[0], num_labels=1)
    model.save_pretrained(reward)
    AutoTokenizer.from_pretrained(tiny_pool[0]).save_pretrained(reward)
    rows = [{"prompt": [{"role": "user", "content": f"Say something kind about item {i}."}]} for i in range(24)]
    DatasetDict({"train_gen": Dataset.from_list(rows[:16]), "test_gen": Dataset.from_list(rows[16:])}
                ).save_to_disk(str(tmp / "prompts"))
    return tmp, tiny_pool[0], reward


def recipe(tmp, policy, reward, **ppo_fields) -> PpoRecipe:
    return PpoRecipe.model_validate({
        "stage": "ppo", "run": {"name": "t", "root": str(tmp / "runs")}, "model": str(policy),
        "inputs": {"dataset": str(tmp / "prompts"), "train_split": "train_gen", "eval_split": "test_gen"},
        "train": {"learning_rate": 1e-3, "per_device_batch_size": 4, "max_length": 64, "report_to": [],
                  "logging_steps": 1, "seed": 0},
        "ppo": {"reward_model": str(reward), "samples_per_iteration": 8, "mini_batch_size": 4, "iterations": 2,
                "ppo_epochs": 1, "max_new_tokens": 8, "eval_prompts": 8, **ppo_fields},
    })


def test_ppo_runs_and_writes_policy_eval_and_curves(setup):
    tmp, policy, reward = setup
    summary = ppo.run(recipe(tmp, policy, reward))
    out = tmp / "runs" / "t" / "ppo"
    assert is_done(out)
    assert (out / "model" / "config.json").is_file() and (out / "report" / "ppo_curves.png").stat().st_size > 1000
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["before"]["n"] == evaluation["after"]["n"] == 8
    assert summary["episodes"] == 16
    # The exact KL to the starting policy is positive once the policy moved (and never negative);
    # entropy is per token, so it is bounded by log(vocabulary size).
    assert summary["kl_per_token_after"] > 0
    assert evaluation["before"]["kl_per_token"] == 0 and evaluation["before"]["kl_per_response"] == 0
    vocab = json.loads((policy / "config.json").read_text())["vocab_size"]
    for key in ("entropy_per_token_before", "entropy_per_token_after"):
        assert 0 < summary[key] <= math.log(vocab), summary


def test_a_causal_lm_is_not_a_reward_model(setup):
    tmp, policy, _ = setup
    with pytest.raises(ConfigError, match="is not a reward model"):
        ppo.run(recipe(tmp, policy, policy))


def test_batch_arithmetic_is_checked_before_training(setup):
    tmp, policy, reward = setup
    with pytest.raises(ConfigError, match=r"ppo.mini_batch_size=6 is not divisible by processes \(1\) x "
                                          r"train.per_device_batch_size \(4\)"):
        ppo.run(recipe(tmp, policy, reward, mini_batch_size=6, samples_per_iteration=12))
    with pytest.raises(ConfigError, match="samples_per_iteration=12 is not divisible by ppo.mini_batch_size=8"):
        ppo.run(recipe(tmp, policy, reward, mini_batch_size=8, samples_per_iteration=12))


# --- method check --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_reward(tiny_pool, tmp_path_factory):
    """A reward model whose score is the base model's logit for " the" after the response: which
    one-token response a policy picks decides the reward, so there is something to learn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("token-reward") / "model"
    tokenizer = AutoTokenizer.from_pretrained(tiny_pool[0])
    head = AutoModelForCausalLM.from_pretrained(tiny_pool[0]).lm_head.weight
    model = AutoModelForSequenceClassification.from_pretrained(tiny_pool[0], num_labels=1)
    target = tokenizer.encode(" the", add_special_tokens=False)[0]
    with torch.no_grad():
        model.score.weight.copy_(head[target][None] * 20.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_ppo_raises_held_out_reward_and_the_kl_coefficient_bounds_the_drift(setup, token_reward):
    tmp, policy, _ = setup
    results = {}
    for kl_coef in (0.05, 1.0):
        r = recipe(tmp, policy, token_reward, iterations=24, samples_per_iteration=16, mini_batch_size=8,
                   ppo_epochs=2, kl_coef=kl_coef, max_new_tokens=1, eval_prompts=8)
        r.train.learning_rate = 3e-3
        r.train.per_device_batch_size = 8
        r.train.lr_scheduler = "constant"
        r.run.name = f"kl-{kl_coef}"
        results[kl_coef] = ppo.run(r)
    for kl_coef, summary in results.items():
        # held-out prompts, fixed sampling seed: the reward model's mean score goes up
        assert summary["reward_after"] > summary["reward_before"] + 1.0, (kl_coef, summary)
        assert 0 < summary["kl_per_response_after"] < 10, (kl_coef, summary)
    # a stronger KL penalty keeps the policy closer to where it started
    assert results[1.0]["kl_per_response_after"] < results[0.05]["kl_per_response_after"]
