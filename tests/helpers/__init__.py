"""What several test modules share: data and recipe writers, the stand-in model entry, an
in-process stage runner. Tests import it as `helpers` (tests/ is on sys.path through conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.records import prompt_id
from pipeline.runs import RunOptions
from pipeline.stages import STAGES

# Instruction sources the generate tests cycle through (each has its own principle mix).
SOURCES = ["sharegpt", "flan", "truthful_qa", "evol_instruct", "ultrachat", "false_qa"]


def pairs(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        prompt = [{"role": "user", "content": f"Question number {i}?"}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": f"Thank you, here is answer {i}."}],
                     "rejected": [{"role": "assistant", "content": "No."}], "margin": 0.5, "source": "t"})
    return rows

def reward_recipe(tmp_path: Path, model: Path, name: str, train_rows: list[dict], test_rows: list[dict], *,
                  launch: dict | None = None, **train) -> Path:
    """Save the pairs to `tmp_path`/pairs and write `tmp_path`/reward.yaml, a reward recipe of run
    `name` on them (3 steps of 8 pairs unless `train` says otherwise); return the YAML's path."""
    from datasets import Dataset, DatasetDict

    DatasetDict({"train_prefs": Dataset.from_list(train_rows), "test_prefs": Dataset.from_list(test_rows)}
                ).save_to_disk(str(tmp_path / "pairs"))
    recipe = {
        "stage": "reward", "run": {"name": name, "root": str(tmp_path / "runs")}, "model": str(model),
        "train": {"max_steps": 3, "global_batch_size": 8, "per_device_batch_size": 4, "learning_rate": 1e-3,
                  "max_length": 64, "report_to": [], "logging_steps": 1, "save_steps": 100, **train},
        "reward": {"sources": [{"name": "t", "dataset": str(tmp_path / "pairs")}]},
        **({"launch": launch} if launch else {}),
    }
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path

def write_prompts(path: Path, count: int) -> Path:
    rows = []
    for i in range(count):
        text = f"Prompt {i}: tell me something useful about topic number {i * 7 % 11}."
        rows.append({"prompt_id": prompt_id(text), "source": SOURCES[i % len(SOURCES)], "instruction": text,
                     "correct_answers": ["yes"] if i % 6 == 2 else [], "incorrect_answers": [],
                     "reference": ""})
    from datasets import Dataset

    from pipeline.records import PROMPT_FEATURES

    Dataset.from_list(rows, features=PROMPT_FEATURES).save_to_disk(str(path))
    return path

def write_recipe(tmp_path: Path, pool: list[dict], prompts: Path, **generation) -> Path:
    recipe = {
        "stage": "generate",
        "run": {"name": "t", "root": str(tmp_path / "runs")},
        "inputs": {"prompts": str(prompts)},
        "generation": {"pool": pool, "models_per_prompt": 2, "max_new_tokens": 12, **generation},
    }
    path = tmp_path / "generate.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path

def write_completion_sets(path: Path, count: int) -> Path:
    """`count` completion sets of two completions each (a good one and a curt one), as JSONL in the
    openbmb/UltraFeedback row shape: what annotate reads. Faithful mode: 6 judge requests a row."""
    rows = [{"source": "evol_instruct", "instruction": f"Question {i}: how do plants turn light into sugar?",
             "completions": [{"model": model, "principle": "helpfulness", "custom_system_prompt": "",
                              "response": response} for model, response in
                             (("m0", f"Through photosynthesis in the leaves, step {i}: light, water, CO2."),
                              ("m1", "Sugar."))]} for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

def standin_model(server, name="standin-medium", **extra) -> dict:
    return {"name": name, "backend": "openai", "base_url": server.base_url, "max_concurrency": 4,
            "max_retries": 0, "timeout_s": 10, **extra}

def stage_path(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "t" / "generate"

def ledger_ok_keys(stage: Path) -> set[str]:
    keys = set()
    for path in stage.glob("shard-*/ledger.jsonl"):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # the torn last line of a killed writer
            if rec.get("status") == "ok":
                keys.add(rec["key"])
    return keys

def ledger_records(stage: Path) -> list[dict]:
    """Every record of a stage's ledgers (all shards), in file order; a torn last line is skipped."""
    records = []
    for path in sorted(stage.rglob("ledger.jsonl")):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # the torn last line of a killed writer
    return records

def stage(root: Path, name: str, tree: dict, **kwargs):
    """Run stage `name` in-process from a recipe tree, under `root`/runs (run name "t" unless the
    tree names one); the stage tests of SaySelf and the method checks share it."""
    tree = {"stage": name, **tree, "run": {"name": "t", "root": str(root / "runs"), **tree.get("run", {})}}
    recipe = STAGES[name].recipe_class.model_validate(tree)
    return STAGES[name].load().run(recipe, RunOptions(**kwargs))

def write_items(path: Path) -> Path:
    """A small QA DatasetDict (train, test_id, test_ood, unanswerable) of well-known facts and
    questions without an answer; unknown-eval and the real-server tests read it."""
    from datasets import Dataset, DatasetDict

    from pipeline.records import QA_FEATURES, qa_item

    answerable = [
        qa_item("facts", "What is the capital of France?", "open", answers=["Paris"]),
        qa_item("facts", "How many legs does a spider have?", "open", answers=["8", "eight"]),
        qa_item("facts", "Which planet is largest?", "choice", choices=["Mars", "Jupiter", "Venus"], answer_index=1),
        qa_item("facts", "Who wrote Hamlet?", "open", answers=["Shakespeare"], context="An English play."),
    ]
    ood = [qa_item("ood", "What is the boiling point of water in Celsius?", "open", answers=["100"])]
    unanswerable = [
        qa_item("nec", "What is the half-life of the element glorbium?", "unanswerable"),
        qa_item("falseqa", "Why do fish breathe through their ears?", "unanswerable"),
        qa_item("refunq", "Who founded the city of Trelvanor in 1742?", "unanswerable"),
    ]
    DatasetDict({
        "train": Dataset.from_list(answerable[:2], features=QA_FEATURES),
        "test_id": Dataset.from_list(answerable, features=QA_FEATURES),
        "test_ood": Dataset.from_list(ood, features=QA_FEATURES),
        "unanswerable": Dataset.from_list(unanswerable, features=QA_FEATURES),
    }).save_to_disk(str(path))
    return path

def lora_train(steps: int, lr: float, max_length: int, seed: int, *, batch: int = 8,
               logging_steps: int = 20) -> dict:
    """The SmolLM2 method checks' `train:` section: constant lr, batch `batch` in one device batch,
    LoRA r=16 on the top 8 of SmolLM2's 30 layers (backpropagation stops there: CPU time)."""
    return {"max_steps": steps, "global_batch_size": batch, "per_device_batch_size": batch, "learning_rate": lr,
            "lr_scheduler": "constant", "max_length": max_length, "report_to": [], "logging_steps": logging_steps,
            "save_steps": 100_000, "seed": seed, "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "top_layers": 8}}

