"""SaySelf on SmolLM2-135M-Instruct and the real-fact questions, through the real stages.

qa-data (data/samples/qa/real_facts_*.jsonl, see test_smollm2_rtuning.py) -> sayself-sample
(SmolLM2's own replies to the training questions, hf backend: asked for "Reasoning: ... /
Answer: ...", it answers in plain prose nearly every time, so `unlabelled: answer` reads a
reply's first line as its answer) -> sayself-cluster (by
final answer) -> sayself-rationale (the stand-in over HTTP writes the self-reflections) ->
sayself-data for three arms -> LoRA SFT of SmolLM2 on each -> sayself-eval on the held-out
questions of the six in-domain relations (test_id) and on currencies (test_ood), each its own
dataset as in the paper's per-dataset tables:

- constant: the answer chain plus one confidence for every question (the rounded mean of the
  SaySelf targets);
- no-rationale: the chain plus the per-question confidence from the cluster agreement, without
  the self-reflection;
- sayself: chain, self-reflection and confidence (the paper's SFT stage);
- sayself-rl: the sayself model after a few steps of the confidence-reward RL (sayself-rl).

RLHF_METHOD_SEED (default 0) seeds the chain sampling and the training; the README's table is
this file's printed table for seeds 0, 1 and 2.
"""

from __future__ import annotations

import os

import pytest
from helpers import lora_train, stage
from test_smollm2_rtuning import sources

SEED = int(os.environ.get("RLHF_METHOD_SEED", "0"))
# Sizes chosen for CI time (about 20 minutes of one core): seeded samples of the 245 training
# questions (4 chains each), of the 90 in-domain held-out ones and of the 40 currencies.
QUESTIONS = 64
TEST_ID = 30
TEST_OOD = 30
SFT_STEPS = 20  # of 4 chats each, lr 3e-4
RL_STEPS = 2
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def sayself(smollm2, tmp_path_factory):
    from pipeline.standin import start_standin

    root = tmp_path_factory.mktemp("smollm2-sayself")
    stage(root, "qa-data", {"run": {"name": "facts"}, "inputs": {"sources": sources(train_sample=QUESTIONS, test_sample=TEST_ID, ood_sample=TEST_OOD)}})
    items = {"stage": "qa-data", "run": "facts"}
    sample = stage(root, "sayself-sample", {"run": {"name": "facts"},
                                   "model": {"name": "smollm2-135m", "backend": "hf", "path": str(smollm2),
                                             "batch_size": 64},
                                   "inputs": {"items": items, "split": "train"},
                                   "sayself": {"samples": 4, "temperature": 0.9, "max_new_tokens": 48, "unlabelled": "answer",
                                               "seed": SEED}})
    stage(root, "sayself-cluster", {"run": {"name": "facts"}, "inputs": {"samples": {"stage": "sayself-sample"}}})
    with start_standin(root / "standin", latency_s=0.0) as server:
        stage(root, "sayself-rationale", {"run": {"name": "facts"},
                                          "inputs": {"clusters": {"stage": "sayself-cluster"}},
                                          "rationale": {"judge": {"name": "standin-judge", "backend": "openai",
                                                                  "base_url": server.base_url},
                                                        "max_representatives": 2, "max_new_tokens": 64}})
    results = {}
    for arm, variant in (("constant", "constant"), ("no-rationale", "no-rationale"), ("sayself", "full"),
                         ("sayself-rl", None)):
        if variant:
            stage(root, "sayself-data", {"run": {"name": arm},
                                         "inputs": {"dataset": {"stage": "sayself-rationale", "run": "facts"}},
                                         "sayself": {"variant": variant}})
            stage(root, "sft", {"run": {"name": arm}, "model": str(smollm2),
                                "inputs": {"dataset": {"stage": "sayself-data"}, "train_split": "train",
                                           "eval_split": None},
                                "train": lora_train(SFT_STEPS, 3e-4, 256, SEED, batch=4), "sft": {"assistant_only_loss": True}})
            trained = "sft"
        else:
            stage(root, "sayself-rl", {"run": {"name": arm}, "model": {"stage": "sft", "run": "sayself"},
                                       "inputs": {"items": items, "split": "train"},
                                       "sayself": {"num_generations": 4, "temperature": 1.0,
                                                   "max_completion_length": 96, "beta": 0.04, "eval_questions": 16,
                                                   "eval_batch_size": 16},
                                       "train": {**lora_train(RL_STEPS, 2e-4, 256, SEED), "learning_rate": 5e-5,
                                                 "global_batch_size": 16, "per_device_batch_size": 16,
                                                 "logging_steps": 5}})
            trained = "sayself-rl"
        report = stage(root, "sayself-eval", {"run": {"name": arm}, "model": {"stage": trained},
                                              "inputs": {"items": items, "splits": ["test_id", "test_ood"]},
                                              "sayself": {"max_new_tokens": 80, "batch_size": 48}})
        results[arm] = {split: report["splits"][split]["all"] for split in ("test_id", "test_ood")}
    return results, {"kept": sample["chains_kept"], "correct": sample["chains_correct"]}



def _num(value, width: int, digits: int) -> str:  # ECE/AUROC/Brier are undefined without parsed confidences
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def table(results: dict) -> str:
    lines = [f"{'arm':<13} | {'in-domain: acc parse ECE AUROC Brier':>38} | {'currencies: acc parse ECE AUROC Brier':>39}"]
    for arm, r in results.items():
        cells = []
        for split in ("test_id", "test_ood"):
            m = r[split]
            cells.append(" ".join(_num(m[k], w, d) for k, w, d in (("accuracy", 6, 3), ("parse_rate", 5, 2),
                                                                   ("ece", 6, 3), ("auroc", 6, 3), ("brier", 6, 3))))
        lines.append(f"{arm:<13} | {cells[0]:>38} | {cells[1]:>39}")
    return "\n".join(lines)


def test_sayself_on_smollm2_runs_every_arm_on_its_own_chains(sayself, record_property):
    results, sampled = sayself
    record_property("table", f"\nSaySelf on SmolLM2, seed {SEED}: {sampled['kept']} chains kept, {sampled['correct']} right\n"
        f"{table(results)}")
    # Seeds 1 / 2: all 256 replies read (50 / 53 right: SmolLM2 half-knows the training facts),
    # but 20 LoRA steps of 4 chats teach no arm the four-line format (parse rate 0-0.20) and cost
    # the model its recall (0-3 % right), so the paper's calibration effect cannot show here (a
    # longer run, 30 steps of 8 on 96 questions, gave the same picture); the figures are printed,
    # and what is asserted is that the chain sampling read SmolLM2's plain-prose replies and that
    # every arm was evaluated on both held-out datasets (an empty reply is still dropped, hence 95 %).
    assert sampled["kept"] >= 0.95 * QUESTIONS * 4 and 0 < sampled["correct"] < sampled["kept"], sampled
    for arm, r in results.items():
        assert (r["test_id"]["items"], r["test_ood"]["items"]) == (TEST_ID, TEST_OOD), (arm, r)
