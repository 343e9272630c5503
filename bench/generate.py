"""Benchmark: batched vs one-at-a-time generation with the hf backend on a tiny local model.

Prints a table (wall time, generated tokens, tokens/s, speed-up over batch size 1); it asserts
nothing. The target the backend was built for: batched >= 4x one-at-a-time.

Every request asks for exactly `--max-new-tokens` tokens (`ignore_eos`, so a row that would stop
early at eos does not make a configuration look faster than it is); the token counts printed are
the tokens actually produced, as the backend reports them. Prompts differ in length, so batches
carry real left padding. A short warm-up runs first so one-time costs are not charged to batch
size 1.

    python bench/generate.py                      # builds the tiny pool in a temp folder
    python bench/generate.py --models data/runs/demo/tiny-models --batch-sizes 1,8,16,32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_TOPICS = ["rivers", "bread", "the moon", "trains", "winter", "bees", "maps", "music", "bridges", "tea"]


def make_prompts(n: int) -> list[str]:
    """n prompts of varied length (1 to 8 clauses), deterministic."""
    prompts = []
    for i in range(n):
        topic = _TOPICS[i % len(_TOPICS)]
        extra = " Please also say why it matters, and give an example." * (i % 8)
        prompts.append(f"Question {i}: tell me something about {topic}.{extra}")
    return prompts


def run_once(spec_fields: dict, batch_size: int, prompts: list[str], params: dict) -> tuple[float, int, int]:
    """Generate for every prompt; return (seconds, tokens produced, failures)."""
    from pipeline.config import ModelSpec
    from pipeline.llm.hf import HFBackend

    backend = HFBackend(ModelSpec(**spec_fields, batch_size=batch_size))
    backend._load()  # loading is not what is measured
    elapsed, produced, failures = measure(backend, prompts, params)
    backend.close()
    if failures:
        print(f"  batch_size={batch_size}: {len(failures)} failures, first: {failures[0]}", file=sys.stderr)
    return elapsed, produced, len(failures)


def measure(backend, prompts: list[str], params: dict) -> tuple[float, int, list[str]]:
    """One generate() call over every prompt: (seconds, tokens produced, failure reasons)."""
    from pipeline.llm.base import GenRequest

    requests = [GenRequest(f"p{i}", ({"role": "user", "content": p},), params) for i, p in enumerate(prompts)]
    produced, failures = 0, []

    def on_done(req, result):
        nonlocal produced
        produced += result.completion_tokens

    start = time.perf_counter()
    backend.generate(requests, on_done, lambda req, reason: failures.append(reason))
    return time.perf_counter() - start, produced, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, help="tiny pool folder (built there if missing; default: a temp folder)")
    parser.add_argument("--model", default="tiny-a", help="model folder name inside --models (default tiny-a)")
    parser.add_argument("--prompts", type=int, default=64, help="number of prompts (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per completion (default 64)")
    parser.add_argument("--batch-sizes", default="1,16,32", help="comma-separated; 1 is the baseline (default 1,16,32)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--allow-eos", action="store_true", help="let completions stop at eos (unequal work)")
    args = parser.parse_args(argv)

    from pipeline.tiny import build_tiny_pool

    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    if 1 not in sizes:
        sizes.insert(0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        pool_dir = args.models or Path(tmp) / "tiny"
        build_tiny_pool(pool_dir)
        path = pool_dir / args.model
        fields = {"name": args.model, "backend": "hf", "path": str(path), "device": args.device, "dtype": args.dtype}
        params = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": args.max_new_tokens, "seed": 0,
                  "ignore_eos": not args.allow_eos}
        prompts = make_prompts(args.prompts)

        import torch

        print(f"model {path} | device {args.device} | dtype {args.dtype} | torch threads {torch.get_num_threads()}")
        print(f"{args.prompts} prompts x {args.max_new_tokens} new tokens | sampling, seed 0 | "
              f"ignore_eos={not args.allow_eos}")
        run_once(fields, max(sizes), prompts[: max(sizes)], {**params, "max_new_tokens": 4})  # warm-up

        rows = []
        for size in sizes:
            seconds, produced, failed = run_once(fields, size, prompts, params)
            rows.append((size, seconds, produced, failed))

    base = next(r for r in rows if r[0] == 1)
    base_rate = base[2] / base[1]
    print()
    print(f"{'batch_size':>10} {'wall_s':>8} {'tokens':>7} {'tokens/s':>9} {'speed-up':>8} {'failed':>6}")
    for size, seconds, produced, failed in rows:
        rate = produced / seconds
        print(f"{size:>10} {seconds:>8.2f} {produced:>7} {rate:>9.1f} {rate / base_rate:>7.1f}x {failed:>6}")
    best = max(rows, key=lambda r: r[2] / r[1])
    print(f"\nbest: batch_size {best[0]}, {best[2] / best[1] / base_rate:.1f}x one-at-a-time (goal >= 4x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
