"""Benchmark: the `reward` stage against a bare TRL RewardTrainer script. Prints figures; asserts nothing.

Both train the same tiny model (built here with `build_tiny_pool` in a temporary folder) on the
same pairs for the same steps, batch, learning rate and seed, checkpointing on the same steps.
Step time = seconds inside `trainer.train()` / steps. Each side runs `--repeats` times,
alternating, and the fastest run counts (the CPU may be shared). The figure is our step time /
bare step time (goal <= 1.05). The stage's whole wall time (reading, scoring, writing) is
printed apart, since the bare script does none of that.

    python bench/train_overhead.py                # about two minutes on 2 cores
    python bench/train_overhead.py --steps 40 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ["river", "spider", "budget", "snow", "sea", "poem", "flour", "sky", "mill", "winter", "salt", "milk"]


def pair_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = " ".join(rng.sample(WORDS, 3))
        rows.append({"prompt": [{"role": "user", "content": f"Write about {topic} ({i})."}],
                     "chosen": [{"role": "assistant", "content": f"Thank you for asking: {topic}, in detail."}],
                     "rejected": [{"role": "assistant", "content": f"No. {topic}."}],
                     "margin": 0.5, "source": "bench"})
    return rows


def settings(args) -> dict:
    return {"max_steps": args.steps, "global_batch_size": args.batch, "per_device_batch_size": args.batch,
            "learning_rate": 1e-4, "lr_scheduler": "constant", "max_length": 128, "precision": "fp32",
            "logging_steps": 10, "save_steps": args.save_steps, "save_total_limit": 1, "report_to": [], "seed": 0}


def ours(model: Path, data: Path, root: Path, args) -> tuple[float, float]:
    from pipeline.stages import reward
    from pipeline.stages.reward import Recipe as RewardRecipe

    recipe = RewardRecipe.model_validate({
        "stage": "reward", "run": {"name": "bench", "root": str(root)}, "model": str(model),
        "reward": {"sources": [{"name": "bench", "dataset": str(data)}]}, "train": settings(args)})
    started = time.perf_counter()
    summary = reward.run(recipe)
    return summary["train_seconds"], time.perf_counter() - started


def bare(model: Path, data: Path, out: Path, args) -> float:
    """What a user would write by hand with TRL: same data, same hyperparameters."""
    from datasets import load_from_disk
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    s = settings(args)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    net = AutoModelForSequenceClassification.from_pretrained(str(model), num_labels=1)
    net.config.pad_token_id = tokenizer.pad_token_id
    config = RewardConfig(output_dir=str(out), max_steps=s["max_steps"], per_device_train_batch_size=s["per_device_batch_size"],
                          gradient_accumulation_steps=1, learning_rate=s["learning_rate"], lr_scheduler_type="constant",
                          max_length=s["max_length"], seed=0, data_seed=0, logging_steps=s["logging_steps"],
                          save_strategy="steps", save_steps=s["save_steps"], save_total_limit=1, report_to=[],
                          use_cpu=True, bf16=False, fp16=False)
    trainer = RewardTrainer(model=net, args=config, train_dataset=load_from_disk(str(data))["train_prefs"],
                            processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from datasets import Dataset, DatasetDict

    from pipeline.tiny import build_tiny_pool

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_pool(tmp / "pool", count=1, seed=0)[0]
        data = tmp / "pairs"
        DatasetDict({"train_prefs": Dataset.from_list(pair_rows(args.steps * args.batch, 0)),
                     "test_prefs": Dataset.from_list(pair_rows(16, 1))}).save_to_disk(str(data))
        our_train, our_wall, bare_train = [], [], []
        for i in range(args.repeats):  # alternate who goes first: warm-up and neighbours even out
            if i % 2:
                bare_train.append(bare(model, data, tmp / f"bare-{i}", args))
            t, w = ours(model, data, tmp / f"ours-{i}", args)
            our_train.append(t)
            our_wall.append(w)
            if not i % 2:
                bare_train.append(bare(model, data, tmp / f"bare-{i}", args))
    ours_step, bare_step = min(our_train) / args.steps, min(bare_train) / args.steps
    print(f"\ntrain_overhead: {args.steps} steps x {args.batch} pairs, tiny model, CPU, best of {args.repeats}")
    print(f"  reward stage step time   {ours_step * 1000:8.1f} ms   (runs: {', '.join(f'{t:.2f}s' for t in our_train)})")
    print(f"  bare TRL step time       {bare_step * 1000:8.1f} ms   (runs: {', '.join(f'{t:.2f}s' for t in bare_train)})")
    print(f"  ratio ours / bare        {ours_step / bare_step:8.3f}   (goal <= 1.05)")
    print(f"  stage wall time (read, train, save, score, write): best {min(our_wall):.2f}s")


if __name__ == "__main__":
    main()
