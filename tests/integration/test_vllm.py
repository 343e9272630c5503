"""vLLM for CPU (`make test-vllm`, opt-in): SmolLM2 behind vLLM's OpenAI server, started by the test
from its own virtualenv (`.venv-vllm`, named by RLHF_VLLM_PYTHON), through generate and through
the judge in structured mode, where vLLM's guided decoding holds the answer to the JSON schema.

vLLM takes minutes to start on a 2-core CPU, so this is not part of `make test`: without
RLHF_VLLM_PYTHON every test here is skipped."""

from __future__ import annotations

import json
import os
import time

import pytest
import yaml
from helpers import ledger_records, stage_path, write_prompts

from pipeline.cli import main as rlhf

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not os.environ.get("RLHF_VLLM_PYTHON"),
                                                   reason="opt-in: make test-vllm (sets RLHF_VLLM_PYTHON)")]


@pytest.fixture(scope="module")
def vllm_server(smollm2, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` on the SmolLM2 folder; its base URL."""
    from pipeline.launch.local_servers import vllm_serve

    started = time.monotonic()
    with vllm_serve(os.environ["RLHF_VLLM_PYTHON"], smollm2, tmp_path_factory.mktemp("vllm"),
                    served_name="smollm2-135m") as base_url:
        print(f"vLLM ready after {time.monotonic() - started:.0f} s")
        yield base_url


def _served(base_url: str, **extra) -> dict:
    return {"name": "smollm2-vllm", "backend": "openai", "base_url": base_url, "model": "smollm2-135m",
            "max_concurrency": 4, "timeout_s": 600, "max_retries": 1, **extra}


def test_generate_and_the_structured_judge_through_vllm(vllm_server, tmp_path):
    prompts = write_prompts(tmp_path / "prompts", 4)
    recipe = {"stage": "generate", "run": {"name": "t", "root": str(tmp_path / "runs")},
              "inputs": {"prompts": str(prompts)},
              "generation": {"pool": [_served(vllm_server)], "models_per_prompt": 1, "max_new_tokens": 48,
                             "temperature": 0.7, "seed": 0}}
    path = tmp_path / "generate.yaml"
    path.write_text(yaml.safe_dump(recipe))
    started = time.monotonic()
    assert rlhf(["generate", str(path)]) == 0
    summary = json.loads((stage_path(tmp_path) / "summary.json").read_text())
    tokens = summary["tokens"]["completion"] if isinstance(summary["tokens"], dict) else summary["tokens"]
    print(f"vLLM generate: 4 completions, {tokens} tokens in {time.monotonic() - started:.1f} s")
    assert summary["failed_completions"] == 0

    for mode in ("structured", "faithful"):
        judge = {"stage": "annotate", "run": {"name": "t", "root": str(tmp_path / "runs"), "step": f"annotate-{mode}"},
                 "inputs": {"completions": {"stage": "generate"}},
                 "annotation": {"judge": _served(vllm_server, name="smollm2-vllm-judge"), "mode": mode,
                                "critique": True, "max_reasks": 1, "aspect_max_tokens": 384,
                                "critique_max_tokens": 384, "schema_max_chars": 300,
                                "max_failure_fraction": 1.0, "seed": 0}}
        path = tmp_path / f"annotate-{mode}.yaml"
        path.write_text(yaml.safe_dump(judge))
        code = rlhf(["annotate", str(path)])
        folder = tmp_path / "runs" / "t" / f"annotate-{mode}"
        failures = (folder / "failures.jsonl").read_text().splitlines()
        items = len([r for r in ledger_records(folder) if r.get("reask") == 0])
        print(f"vLLM judge, {mode}: {items - len(failures)}/{items} items parsed (exit {code})")
        if mode == "structured":  # guided decoding: the answer matches the schema, so it parses
            assert code == 0 and len(failures) <= items // 4
