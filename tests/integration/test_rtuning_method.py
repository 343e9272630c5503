"""R-Tuning against vanilla tuning on the synthetic fact world, with a tiny model whose knowledge
is set by us: first it is taught the facts of half the invented people (SFT on `teach/`), then
the same training questions tune it two ways (R-Tuning: gold answer + sure/unsure from the
probe; vanilla: gold answer only), and both are scored on held-out people (known and unknown)
and on questions about people who do not exist.

What this small setting shows reliably (3 world seeds tried, see the issue note): R-Tuning refuses
unanswerable questions where vanilla never does, and its confidence is better calibrated (lower
ECE). Its AP beats vanilla's only in some seeds (the tiny model's sure/unsure does not
generalise well to people it was not tuned on), so AP is reported, not asserted."""

from __future__ import annotations

import importlib

from pipeline.cli import STAGE_MODULES
from pipeline.config import STAGE_RECIPES


def test_rtuning_refuses_the_unknowable_and_is_better_calibrated_than_vanilla(tmp_path, tiny_pool, capsys):
    def run(stage, tree):
        tree = {"stage": stage, **tree, "run": {"root": str(tmp_path / "runs"), **tree["run"]}}
        return importlib.import_module(STAGE_MODULES[stage]).run(STAGE_RECIPES[stage].model_validate(tree))

    def train(steps, lr):
        return {"max_steps": steps, "global_batch_size": 16, "per_device_batch_size": 16, "learning_rate": lr,
                "lr_scheduler": "constant", "max_length": 96, "report_to": [], "logging_steps": 50,
                "save_steps": 10_000}

    eval_settings = {"batch_size": 32, "max_new_tokens": 40}
    run("qa-data", {"run": {"name": "world"}, "inputs": {"sources": []},
                    "factworld": {"seed": 0, "entities": 40, "known_fraction": 0.5, "nonexistent": 10,
                                  "test_fraction": 0.3, "ood_attributes": [], "kinds": ["open"]}})
    items = {"stage": "qa-data", "run": "world"}
    run("sft", {"run": {"name": "world"}, "model": str(tiny_pool[0]),
                "inputs": {"dataset": {**items, "output": "teach"}, "train_split": "train", "eval_split": None},
                "train": train(300, 3e-3)})
    taught = str(tmp_path / "runs" / "world" / "sft" / "model")
    probe = run("rtuning-probe", {"run": {"name": "world"}, "model": taught,
                                  "inputs": {"items": items, "split": "train"}, "rtuning": eval_settings})
    # The teaching worked: about the known half of the training questions is answered right.
    assert 0.3 < probe["accuracy"] < 0.8, probe

    results = {}
    for variant in ("r-tuning", "vanilla"):
        run("rtuning-data", {"run": {"name": variant}, "inputs": {"probe": {"stage": "rtuning-probe", "run": "world"}},
                             "rtuning": {"variant": variant}})
        run("sft", {"run": {"name": variant}, "model": taught,
                    "inputs": {"dataset": {"stage": "rtuning-data"}, "train_split": "train", "eval_split": None},
                    "train": train(40, 5e-4)})
        report = run("rtuning-eval", {"run": {"name": variant}, "model": {"stage": "sft"},
                                      "inputs": {"items": items, "splits": ["test_id", "unanswerable"]},
                                      "rtuning": {**eval_settings, "probe": variant != "vanilla"}})
        results[variant] = report["splits"]
    rt, van = results["r-tuning"], results["vanilla"]
    with capsys.disabled():
        for name, r in results.items():
            print(f"\n{name}: test_id accuracy {r['test_id']['accuracy']:.3f} AP {r['test_id']['ap']:.3f} "
                  f"ECE {r['test_id']['ece']:.3f}; refusal on unanswerable {r['unanswerable']['refusal_rate']:.2f}")
    # Both keep what they were taught about the held-out known people.
    assert rt["test_id"]["accuracy"] > 0.3 and van["test_id"]["accuracy"] > 0.3
    assert rt["unanswerable"]["refusal_rate"] >= van["unanswerable"]["refusal_rate"] + 0.5
    assert rt["test_id"]["ece"] < van["test_id"]["ece"]
