"""R-Tuning on SmolLM2-135M-Instruct and real facts it half-knows, through the real stages.

The questions are ours (data/samples/qa/real_facts_*.jsonl, written for this check): six
relations in domain (capitals, elements, authors, planets and moons, units, years of events; 245
training and 90 held-out questions about other facts), currencies as the out-of-domain relation
(40), and 80 unanswerable questions (invented entities, false premises).

qa-data -> rtuning-probe (SmolLM2's greedy answers to the training questions: right -> D1,
wrong -> D0; its accuracy per relation is printed) -> rtuning-data for R-Tuning (gold answer +
"I am sure/unsure" by D1/D0), R-Tuning-U (sure/unsure by the entropy of 5 sampled answers, no
labels) and vanilla (gold answer only) -> LoRA SFT of SmolLM2 on each (adapters on the top 8 of 30
layers, which keeps backpropagation short on a CPU), same questions, steps and seed -> rtuning-eval on test_id, test_ood and unanswerable: AP of the confidence against
correctness, ECE, and the refusal rate on unanswerable questions.

RLHF_METHOD_SEED (default 0) seeds the training (LoRA init, data order) and R-Tuning-U's
sampling; the README's table is this file's printed table for seeds 0, 1 and 2.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import lora_train, stage

REPO = Path(__file__).resolve().parents[2]
QA = REPO / "data" / "samples" / "qa"
SEED = int(os.environ.get("RLHF_METHOD_SEED", "0"))
STEPS = 40
# SmolLM2 answers by restating the question ("The capital of Belgium is Brussels"); trained on
# bare entities it learnt to say the first entity of its usual sentence, the question's own
# ("Belgium": 8 % of held-out questions right), so the answer turn keeps a lead-in.
ANSWER_FORMAT = "The answer is {answer}."
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def sources(train_sample: int | None = None, test_sample: int | None = None,
            ood_sample: int | None = None) -> list[dict]:
    """The real-fact files as qa-data sources; `train_sample` / `test_sample` / `ood_sample` keep
    that many training / in-domain held-out / currency questions (seeded samples)."""
    out = [{"path": str(QA / f"real_facts_{part}.jsonl"), "format": "qa", "role": role, "name": f"realfacts-{part}"}
           for part, role in (("train", "train"), ("test", "test_id"), ("ood", "test_ood"),
                              ("unanswerable", "unanswerable"))]
    for source, sample in zip(out, (train_sample, test_sample, ood_sample)):
        if sample:
            source.update(sample=sample, seed=0)
    return out


@pytest.fixture(scope="module")
def rtuning(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-rtuning")
    model = str(smollm2)
    settings = {"batch_size": 32, "max_new_tokens": 16}
    stage(root, "qa-data", {"run": {"name": "facts"}, "inputs": {"sources": sources()}})
    items = {"stage": "qa-data", "run": "facts"}
    probe = stage(root, "rtuning-probe", {"run": {"name": "facts"}, "model": model,
                                          "inputs": {"items": items, "split": "train"}, "rtuning": settings})
    results = {}
    for variant in ("r-tuning", "r-tuning-u", "vanilla"):
        extra = ({"model": model, "rtuning": {**settings, "variant": variant, "samples": 5, "seed": SEED}}
                 if variant == "r-tuning-u" else {"rtuning": {"variant": variant}})
        extra["rtuning"]["answer_format"] = ANSWER_FORMAT
        stage(root, "rtuning-data", {"run": {"name": variant},
                                     "inputs": {"probe": {"stage": "rtuning-probe", "run": "facts"}}, **extra})
        stage(root, "sft", {"run": {"name": variant}, "model": model,
                            "inputs": {"dataset": {"stage": "rtuning-data"}, "train_split": "train", "eval_split": None},
                            "train": lora_train(STEPS, 1e-4, 128, SEED),
                            "sft": {"assistant_only_loss": True}})
        report = stage(root, "rtuning-eval", {"run": {"name": variant}, "model": {"stage": "sft"},
                                              "inputs": {"items": items,
                                                         "splits": ["test_id", "test_ood", "unanswerable"]},
                                              "rtuning": {**settings, "probe": variant != "vanilla"}})
        results[variant] = report["splits"]
    return probe, results


def table(probe: dict, results: dict) -> str:
    lines = ["SmolLM2 probe accuracy per relation (training questions): " + ", ".join(
        f"{d} {c['accuracy']:.2f}" for d, c in sorted(probe["by_domain"].items())) + f"; all {probe['accuracy']:.3f}",
        f"{'arm':<11} {'ID acc':>6} {'ID AP':>6} {'ID ECE':>6} {'OOD acc':>7} {'OOD AP':>6} {'OOD ECE':>7} "
        f"{'willing':>7} {'refusal':>7}"]
    def f(value, width: int, digits: int = 3) -> str:  # AP is undefined (None) with no right answer
        return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"

    for arm, r in results.items():
        i, o, u = r["test_id"], r["test_ood"], r["unanswerable"]
        lines.append(f"{arm:<11} {f(i['accuracy'], 6)} {f(i['ap'], 6)} {f(i['ece'], 6)} {f(o['accuracy'], 7)} "
                     f"{f(o['ap'], 6)} {f(o['ece'], 7)} {f(i['willing_rate'], 7, 2)} {f(u['refusal_rate'], 7, 2)}")
    return "\n".join(lines)


def test_rtuning_on_smollm2_refuses_unanswerable_questions_vanilla_tuning_answers(rtuning, record_property):
    probe, results = rtuning
    record_property("table", f"\nR-Tuning on SmolLM2, seed {SEED}\n{table(probe, results)}")
    # SmolLM2 half-knows these facts: the probe splits the training questions into both sets.
    assert 0.2 < probe["accuracy"] < 0.8, probe
    rt, van = results["r-tuning"], results["vanilla"]
    # Refusals of the 80 unanswerable questions, seeds 0 / 1 / 2: R-Tuning 0.69 / 0.81 / 0.72,
    # R-Tuning-U 0.54 / 0.10 / 0.35, vanilla 0 / 0 / 0 (a model tuned on answers only never says it
    # does not know). Asserted: R-Tuning's margin (0.69 at worst). Printed only: R-Tuning-U, which
    # swings with the seed, and the paper's AP gain (0.359 / 0.356 / 0.367 against vanilla 0.297 /
    # 0.291 / 0.286 in domain), which seed 0 with two torch threads instead of one reversed (0.291
    # against 0.359): after 40 LoRA steps the tuned models get 11-19 % of the held-out facts right.
    assert rt["unanswerable"]["refusal_rate"] >= van["unanswerable"]["refusal_rate"] + 0.3, results
