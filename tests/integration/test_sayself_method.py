"""SaySelf against SFT with a constant confidence, and SaySelf + RL, on the synthetic fact world,
through the real stages: qa-data -> (teach) sft -> sayself-sample (hf backend) -> sayself-cluster
-> sayself-rationale (stand-in server over HTTP) -> sayself-data -> sft -> sayself-rl ->
sayself-eval on held-out questions.

The tiny model's knowledge is set by us: it is taught every fact of half of 80 invented people,
in the chain format ("Reasoning: ... / Answer: ..."), and never sees the other half. Every
person has three training questions and two held-out ones (`factworld.holdout: questions`).
Chains are sampled at temperature 0.3 (a 2-layer model's distribution is far flatter than a
7B model's at the paper's 1.2; at 1.0 its chains are noisy text and SFT on them failed). The
SFT arms also see the taught facts again (chain prompt), so the knowledge stays what we set:
without it 1500 steps of SaySelf SFT cost the 2-layer model a fifth of its held-out facts
(0.79 against the constant arm's 0.88), which no 7B model with LoRA would lose.

Why per population: on the pooled held-out questions the constant (the rounded mean of the
SaySelf targets) is calibrated on average by construction, since held-out questions come from
the training distribution. With populations g of weight w_g, training agreement t_g and
held-out accuracy a_g, the constant's ECE is |sum_g w_g (a_g - t_g)| (plus its rounding to an
integer, at most 0.05), while a SaySelf model that tells the populations apart perfectly and
states t_g has ECE sum_g w_g |a_g - t_g|, never less. So pooled ECE cannot show the method here
(it is printed; the constant wins it). The paper reports ECE per dataset, on datasets whose
accuracy differs from the training set's; the check does the same with the fact world's two
populations as two held-out datasets (questions about taught people, accuracy ~0.9, and about
never-taught ones, ~0.2): a constant is off on both, a confidence that tracks knowledge is not.

Settings come from SS_* environment variables, so `python tests/integration/test_sayself_method.py
[folder]` reproduces the figures of other settings (SS_SEED=1, SS_REPLAY=0, SS_TEMP=1.0, ...)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from helpers import stage

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def knob(name, default):
    value = os.environ.get(f"SS_{name}")
    return default if value is None else type(default)(value)


def settings() -> dict:
    return {"people": knob("PEOPLE", 80), "seed": knob("SEED", 0), "teach_steps": knob("TEACH_STEPS", 1200),
            "samples": knob("SAMPLES", 10), "temperature": knob("TEMP", 0.3), "sft_steps": knob("SFT_STEPS", 1500),
            "sft_lr": knob("SFT_LR", 1e-3), "rl_steps": knob("RL_STEPS", 40), "rl_lr": knob("RL_LR", 1e-4),
            "replay": knob("REPLAY", 1)}


def experiment(root: Path, model: Path, cfg: dict, log=print) -> dict:
    """Run the three arms; return {arm: pooled test_id metrics + per-population accuracy, mean
    stated confidence and ECE}."""
    from datasets import Dataset, DatasetDict, load_from_disk

    from pipeline.methods.metrics import expected_calibration_error
    from pipeline.methods.sayself import CHAIN_INSTRUCTION, SAYSELF_INSTRUCTION
    from pipeline.standin import start_standin

    runs = root / "runs"

    def run(name, tree):
        return stage(root, name, tree)

    def train(steps, lr, max_length, batch=16):
        return {"max_steps": steps, "global_batch_size": batch, "per_device_batch_size": batch, "learning_rate": lr,
                "lr_scheduler": "constant", "max_length": max_length, "report_to": [], "logging_steps": 100,
                "save_steps": 100_000}

    clock = time.time()
    run("qa-data", {"run": {"name": "world"}, "inputs": {"sources": []},
                    "factworld": {"seed": cfg["seed"], "entities": cfg["people"], "known_fraction": 0.5,
                                  "nonexistent": 0, "test_fraction": 0.4, "holdout": "questions",
                                  "ood_attributes": [], "kinds": ["open"]}})
    items = {"stage": "qa-data", "run": "world"}
    world = json.loads((runs / "world" / "qa-data" / "factworld.json").read_text())
    known = {qid for qid, fact in world["facts"].items() if fact["known"]}
    # The known half's facts (held-out questions too: that is what "known" means), in the chain
    # format, under both prompts the later stages ask with.
    teach = load_from_disk(str(runs / "world" / "qa-data" / "teach"))["train"]
    chats = [{"messages": [{"role": "user", "content": f"{chat['messages'][0]['content']}\n\n{instruction}"},
                           {"role": "assistant", "content": f"Reasoning: I recall this person.\n"
                                                            f"Answer: {chat['messages'][1]['content']}"}]}
             for chat in teach for instruction in (CHAIN_INSTRUCTION, SAYSELF_INSTRUCTION)]
    DatasetDict({"train": Dataset.from_list(chats)}).save_to_disk(str(root / "teach"))
    run("sft", {"run": {"name": "teach"}, "model": str(model),
                "inputs": {"dataset": str(root / "teach"), "train_split": "train", "eval_split": None},
                "train": train(cfg["teach_steps"], 3e-3, 160)})
    taught = str(runs / "teach" / "sft" / "model")
    log(f"[{time.time() - clock:.0f}s] taught")

    # max_new_tokens 48: 24 cut invented names short, and a cut answer is graded wrong.
    run("sayself-sample", {"run": {"name": "world"}, "model": {"name": "taught", "backend": "hf", "path": taught,
                                                               "batch_size": 64},
                           "inputs": {"items": items, "split": "train"},
                           "sayself": {"samples": cfg["samples"], "temperature": cfg["temperature"],
                                       "max_new_tokens": 48, "seed": 0}})
    run("sayself-cluster", {"run": {"name": "world"}, "inputs": {"samples": {"stage": "sayself-sample"}}})
    with start_standin(root / "standin", latency_s=0.0) as server:
        run("sayself-rationale", {"run": {"name": "world"}, "inputs": {"clusters": {"stage": "sayself-cluster"}},
                                  "rationale": {"judge": {"name": "standin-judge", "backend": "openai",
                                                          "base_url": server.base_url},
                                                "max_representatives": 2, "max_new_tokens": 64}})
    log(f"[{time.time() - clock:.0f}s] sampled, clustered, rationales written")

    results, arms = {}, {"constant": ("constant", "sft"), "sayself": ("full", "sft")}
    if cfg["rl_steps"]:
        arms["sayself-rl"] = ("full", "sayself-rl")
    for arm, (variant, trainer) in arms.items():
        if trainer == "sft":
            run("sayself-data", {"run": {"name": arm}, "inputs": {"dataset": {"stage": "sayself-rationale",
                                                                           "run": "world"}},
                                 "sayself": {"variant": variant}})
            data = load_from_disk(str(runs / arm / "sayself-data" / "dataset"))["train"].select_columns(["messages"])
            if cfg["replay"]:  # the taught facts again, under the chain prompt, so the knowledge stays as set
                data = Dataset.from_list(data.to_list() + [c for c in chats if c["messages"][0]["content"].endswith(
                    CHAIN_INSTRUCTION)])
            DatasetDict({"train": data}).save_to_disk(str(root / f"data-{arm}"))
            run("sft", {"run": {"name": arm}, "model": taught,
                        "inputs": {"dataset": str(root / f"data-{arm}"), "train_split": "train", "eval_split": None},
                        "train": train(cfg["sft_steps"], cfg["sft_lr"], 224)})
        else:  # RL from the SaySelf SFT model, on the same training questions
            run("sayself-rl", {"run": {"name": arm}, "model": {"stage": "sft", "run": "sayself"},
                               "inputs": {"items": items, "split": "train"},
                               "sayself": {"num_generations": 8, "temperature": 1.0, "max_completion_length": 96,
                                           "beta": 0.04, "eval_questions": 32, "eval_batch_size": 32},
                               "train": {**train(cfg["rl_steps"], cfg["rl_lr"], 256, batch=32), "logging_steps": 10}})
        report = run("sayself-eval", {"run": {"name": arm}, "model": {"stage": trainer},
                                      "inputs": {"items": items, "splits": ["test_id"]},
                                      "sayself": {"max_new_tokens": 128, "batch_size": 64}})
        rows = load_from_disk(str(runs / arm / "sayself-eval" / "predictions"))["test_id"]
        pooled = report["splits"]["test_id"]["all"]
        results[arm] = {k: pooled[k] for k in ("accuracy", "parse_rate", "ece", "auroc", "brier")}
        for population, taught_about in (("known", True), ("unknown", False)):
            mine = [r for r in rows if (r["qid"] in known) == taught_about]
            scored = [r for r in mine if r["confidence"] is not None]
            y, p = [r["correct"] for r in scored], [r["confidence"] / 10 for r in scored]
            results[arm][population] = {"accuracy": sum(r["correct"] for r in mine) / len(mine),
                                        "confidence": sum(p) / len(p), "ece": expected_calibration_error(y, p)}
        results[arm]["population_ece"] = (results[arm]["known"]["ece"] + results[arm]["unknown"]["ece"]) / 2
        log(f"[{time.time() - clock:.0f}s] {arm}: {json.dumps(results[arm])}")
    return results


def table(results: dict) -> str:
    lines = [f"{'arm':<11} {'acc':>5} {'ECE':>6} {'AUROC':>6} {'Brier':>6} | {'known: acc conf ECE':>20} | "
             f"{'unknown: acc conf ECE':>22} | mean ECE"]
    for arm, r in results.items():
        k, u = r["known"], r["unknown"]
        lines.append(f"{arm:<11} {r['accuracy']:5.3f} {r['ece']:6.3f} {r['auroc'] or 0.5:6.3f} {r['brier']:6.3f} | "
                     f"{k['accuracy']:6.3f} {k['confidence']:5.3f} {k['ece']:5.3f}   | "
                     f"{u['accuracy']:6.3f} {u['confidence']:5.3f} {u['ece']:5.3f}     | {r['population_ece']:.3f}")
    return "\n".join(lines)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sayself_confidence_is_calibrated_per_population_where_a_constant_is_not(tmp_path, tiny_pool, capsys):
    results = experiment(tmp_path, tiny_pool[0], settings(), log=lambda _: None)
    with capsys.disabled():
        print("\n" + table(results))
    constant, sayself = results["constant"], results["sayself"]
    # The world has partial knowledge, and SaySelf SFT keeps most of it.
    assert constant["known"]["accuracy"] > 0.7 and constant["unknown"]["accuracy"] < 0.4, constant
    assert sayself["known"]["accuracy"] > 0.65 and sayself["parse_rate"] > 0.9, sayself
    # Its stated confidence separates what the model knows from what it does not ...
    assert sayself["known"]["confidence"] > sayself["unknown"]["confidence"] + 0.3, sayself
    assert sayself["auroc"] > 0.65, sayself
    # ... so it is better calibrated than the constant on each population's held-out questions.
    assert sayself["population_ece"] < constant["population_ece"] - 0.05, results
    assert sayself["unknown"]["ece"] < constant["unknown"]["ece"], results
    # RL from the SaySelf model keeps the format; whether it helped is reported, not asserted.
    assert results["sayself-rl"]["parse_rate"] > 0.9, results["sayself-rl"]


if __name__ == "__main__":
    from pipeline.tiny import build_tiny_pool

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "sayself-method")
    config = settings()
    print(config)
    outcome = experiment(folder / f"run-{int(time.time())}", build_tiny_pool(folder / "pool", count=1, seed=0)[0],
                         config)
    print(table(outcome))
