"""The reward stage on a tiny model: it learns a planted preference (and an untrained head does
not have it), trains on our pairs mixed with the three public row shapes, refuses bad input
before writing anything, and resumes from its last checkpoint."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.stages import reward as stage
from pipeline.stages.reward import Recipe as RewardRecipe

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples" / "preferences"
TOPICS = ["the river", "a spider", "the budget", "snow", "the sea", "a poem", "flour", "the sky", "Paris",
          "a list", "the mill", "winter", "the committee", "salt", "milk", "an egg", "water", "the answer"]
# The planted signal: chosen answers are courteous, rejected ones curt; topics and order vary.
GOOD = ["thank you", "please", "happy to help", "good question", "I hope this helps"]
BAD = ["no", "wrong", "stop asking", "whatever", "not my problem"]


def planted_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        filler = f"{topic} is {rng.choice(['old', 'blue', 'small', 'cold', 'short'])}"
        rows.append({"prompt": [{"role": "user", "content": f"Tell me about {topic}, {i}."}],
                     "chosen": [{"role": "assistant", "content": f"{rng.choice(GOOD)}, {filler}."}],
                     "rejected": [{"role": "assistant", "content": f"{rng.choice(BAD)}, {filler}."}],
                     "margin": 0.25, "source": "flan"})
    return rows


def save_pairs(folder: Path, train: list[dict], test: list[dict]) -> Path:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train_prefs": Dataset.from_list(train), "test_prefs": Dataset.from_list(test)}).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return save_pairs(tmp_path_factory.mktemp("planted") / "pairs", planted_rows(96, 0), planted_rows(40, 1))


def recipe(tmp_path: Path, model: str, sources: list[dict], **train) -> RewardRecipe:
    settings = {"epochs": 1, "global_batch_size": 8, "per_device_batch_size": 8, "learning_rate": 1e-3,
                "lr_scheduler": "constant", "max_length": 128, "precision": "fp32", "logging_steps": 50,
                "save_steps": 1000, "report_to": [], **train}
    return RewardRecipe.model_validate({"stage": "reward", "run": {"name": "t", "root": str(tmp_path / "runs")},
                                        "model": str(model), "reward": {"sources": sources}, "train": settings})


def test_learns_a_planted_preference_that_untrained_heads_lack(planted, tiny_pool, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    r = recipe(tmp_path, tiny_pool[0], [{"name": "planted", "dataset": str(planted)}])
    summary = stage.run(r)
    out = tmp_path / "runs" / "t" / "reward"
    trained = json.loads((out / "eval.json").read_text())["accuracy"]
    assert trained["planted"]["pairs"] == 40 and trained["overall"]["pairs"] == 40
    assert (out / "_SUCCESS").is_file() and (out / "report" / "accuracy.png").is_file()
    assert summary["accuracy"]["overall"] == trained["overall"]["accuracy"]

    # Chance baseline: the same pairs scored by the base model under fresh random score heads. One
    # random head has a fixed but arbitrary preference between the two word sets (it can sit near 0
    # or 1), so chance is the mean over heads; a head and its negation are equally likely.
    import torch

    tokenizer = AutoTokenizer.from_pretrained(tiny_pool[0])
    base = AutoModelForSequenceClassification.from_pretrained(tiny_pool[0], num_labels=1)
    base.config.pad_token_id = tokenizer.pad_token_id
    rows = [dict(row, source="planted") for row in planted_rows(40, 1)]
    heads = []
    for seed in range(8):
        torch.manual_seed(seed)
        torch.nn.init.normal_(base.score.weight, std=0.02)
        scores = stage.score_pairs(base, tokenizer, rows, 128)
        heads.append(stage.accuracy_table(rows, scores, ["planted"])["overall"]["accuracy"])
    chance = sum(heads) / len(heads)
    print(f"planted task: trained {trained['overall']['accuracy']:.3f}; untrained heads "
          f"{', '.join(f'{a:.2f}' for a in heads)} (mean {chance:.3f})")
    assert trained["overall"]["accuracy"] >= 0.75
    assert 0.3 <= chance <= 0.7
    assert trained["overall"]["accuracy"] >= chance + 0.2


def test_mixture_of_our_pairs_and_the_public_shapes(planted, tiny_pool, tmp_path):
    sources = [{"name": "ours", "dataset": str(planted), "train_size": 12, "eval_size": 5},
               {"name": "hh", "dataset": str(SAMPLES / "anthropic_hh.jsonl"), "format": "anthropic_hh",
                "train_size": 8},
               {"name": "shp", "dataset": str(SAMPLES / "shp.jsonl"), "format": "shp", "eval_size": 1},
               {"name": "tldr", "dataset": str(SAMPLES / "summarize.jsonl"), "format": "summarize",
                "use_margin": True}]
    summary = stage.run(recipe(tmp_path, tiny_pool[1], sources, max_steps=2, max_length=256))
    table = json.loads((tmp_path / "runs" / "t" / "reward" / "eval.json").read_text())["accuracy"]
    assert list(table) == ["ours", "hh", "shp", "tldr", "overall"]
    # 14 rows per sample file: 1 held out (10 %, at least one), 13 left for training.
    assert [table[n]["pairs"] for n in ("ours", "hh", "shp", "tldr")] == [5, 1, 1, 1]
    assert table["overall"]["pairs"] == 8
    s = summary["sources"]
    assert [s[n]["train"] for n in ("ours", "hh", "shp", "tldr")] == [12, 8, 13, 13]
    assert summary["train_pairs"] == 46 and summary["global_step"] == 2


def test_public_rows_become_conversations_with_margin_zero(tmp_path):
    r = RewardRecipe.model_validate({"stage": "reward", "run": {"name": "t", "root": str(tmp_path)}, "model": "m",
                                     "reward": {"sources": [
                                         {"name": n, "dataset": str(SAMPLES / f"{n}.jsonl"), "format": n}
                                         for n in ("anthropic_hh", "shp", "summarize")]}})
    for i, source in enumerate(r.reward.sources):
        train, held, _ = stage.load_source(r, i, source)
        for row in train + held:
            assert row["margin"] == 0.0 and row["source"] == source.name
            assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
            assert row["chosen"] != row["rejected"]
    hh, _, _ = stage.load_source(r, 0, r.reward.sources[0])
    assert any(len(row["prompt"]) == 3 for row in hh)  # a two-turn dialogue keeps its earlier turns
    shp = [json.loads(line) for line in (SAMPLES / "shp.jsonl").read_text().splitlines()]
    loser = next(row for row in shp if row["labels"] == 0)
    shp_rows, held, _ = stage.load_source(r, 1, r.reward.sources[1])
    match = [row for row in shp_rows + held if row["prompt"][0]["content"] == loser["history"]][0]
    assert match["chosen"][0]["content"] == loser["human_ref_B"]


def test_bad_inputs_are_refused_before_anything_is_written(planted, tiny_pool, tmp_path):
    out = tmp_path / "runs" / "t" / "reward"
    rows = [{k: v for k, v in row.items() if k != "rejected"} for row in planted_rows(8, 2)]
    no_rejected = save_pairs(tmp_path / "no_rejected", rows, rows)
    with pytest.raises(ConfigError, match=r"reward\.sources\[1\].*no_rejected.*'rejected'"):
        stage.run(recipe(tmp_path, tiny_pool[0], [{"name": "ok", "dataset": str(planted)},
                                                  {"name": "bad", "dataset": str(no_rejected)}]))
    broken = tmp_path / "shp.jsonl"
    broken.write_text('{"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 1}\n'
                      '{"history": "h", "human_ref_A": "a", "labels": 0}\n')
    with pytest.raises(ConfigError, match=r"reward\.sources\[0\].*shp\.jsonl:2.*human_ref_B"):
        stage.run(recipe(tmp_path, tiny_pool[0], [{"name": "s", "dataset": str(broken), "format": "shp",
                                                   "eval_size": 1}]))
    with pytest.raises(ConfigError, match=r"model: .* not a model folder"):
        stage.run(recipe(tmp_path, str(planted), [{"name": "ok", "dataset": str(planted)}]))
    with pytest.raises(ConfigError, match=r"global_batch_size=12 .*per_device_batch_size \(8\)"):
        stage.run(recipe(tmp_path, tiny_pool[0], [{"name": "ok", "dataset": str(planted)}], global_batch_size=12))
    assert not out.exists()


def test_resumes_from_the_last_checkpoint(planted, tiny_pool, tmp_path):
    r = recipe(tmp_path, tiny_pool[2], [{"name": "ours", "dataset": str(planted), "train_size": 48,
                                         "eval_size": 8}], max_steps=4, save_steps=2)
    first = stage.run(r)
    assert first["resumed_from"] is None and first["global_step"] == 4
    out = tmp_path / "runs" / "t" / "reward"
    (out / "_SUCCESS").unlink()
    shutil.rmtree(out / "model")
    second = stage.run(r)
    assert second["resumed_from"] == "checkpoint-4" and second["global_step"] == 4
    assert (out / "_SUCCESS").is_file() and (out / "model" / "config.json").is_file()
