"""The command line on bad input: a one-line error naming the key, file or variable, exit code 2,
and no output marked successful. Runs the real `python -m pipeline` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "recipes" / "demo-tiny"


def rlhf(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


def pool_overrides(tiny_pool) -> list[str]:
    # The fifth entry reads the stand-in's URL from a file that only a running stand-in writes;
    # these tests stop before any request, so a fixed URL that nothing serves is enough.
    return [f"generation.pool[{i}].path={path}" for i, path in enumerate(tiny_pool)] + [
        "generation.pool[4].base_url_file=null", "generation.pool[4].base_url=http://127.0.0.1:9/v1"]


@pytest.mark.parametrize("override, expected", [
    ("data.sed=1", "data.sed: unknown key"),
    ("data.seed=abc", "data.seed: Input should be a valid integer"),
    ("inputs.sources[2].path=missing.jsonl", "inputs.sources[2].path: no such file or folder: missing.jsonl"),
    ("inputs.sources.2.sample=0", "inputs.sources[2].sample: Input should be greater than or equal to 1"),
    ("inputs.sources[9].path=x.jsonl", "inputs.sources is a list; use an index below 6"),
    ("data", "expected key=value"),
])
def test_recipe_errors_name_the_key(tmp_path, override, expected):
    line = one_line_error(rlhf("prompts", str(DEMO / "prompts.yaml"), f"run.root={tmp_path}", override))
    assert expected in line
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("bad, fmt, expected", [
    ("malformed", "sharegpt", "malformed.jsonl:4: not valid JSON"),
    ("missing_field", "evol_instruct", "missing_field.jsonl:2: missing field 'instruction'"),
    ("non_string", "evol_instruct", "non_string.jsonl:3: field 'instruction' must be a string"),
    ("empty", "evol_instruct", "empty.jsonl: source"),
])
def test_bad_source_files_name_file_and_line(tmp_path, bad, fmt, expected):
    line = one_line_error(rlhf("prompts", str(DEMO / "prompts.yaml"), f"run.root={tmp_path}",
                               f"inputs.sources[0].path=data/samples/bad/{bad}.jsonl",
                               f"inputs.sources[0].format={fmt}"))
    assert expected in line
    assert not (tmp_path / "demo-tiny" / "prompts" / "_SUCCESS").exists()


def test_missing_model_path_is_named(tmp_path):
    line = one_line_error(rlhf("generate", str(DEMO / "generate.yaml"), f"run.root={tmp_path}",
                               "generation.pool[1].path=/no/such/model"))
    assert "generation.pool[" in line and "no such file or folder" in line


def test_generate_before_prompts_names_the_unfinished_stage(tmp_path, tiny_pool):
    line = one_line_error(rlhf("generate", str(DEMO / "generate.yaml"), f"run.root={tmp_path}",
                               *pool_overrides(tiny_pool)))
    assert "inputs.prompts: stage 'prompts' of run 'demo-tiny' has not finished" in line


def test_missing_api_key_names_the_variable_and_never_prints_a_secret(tmp_path, tiny_pool):
    ok = rlhf("prompts", str(DEMO / "prompts.yaml"), f"run.root={tmp_path}")
    assert ok.returncode == 0, ok.stderr
    env = {"OPENAI_API_KEY": "sk-should-never-appear-0123456789"}
    line = one_line_error(rlhf("generate", str(DEMO / "generate.yaml"), f"run.root={tmp_path}",
                               *pool_overrides(tiny_pool), "generation.pool[4].base_url=null",
                               "generation.pool[4].api_key_env=RLHF_TEST_UNSET_KEY", env=env))
    assert "RLHF_TEST_UNSET_KEY" in line
    assert not (tmp_path / "demo-tiny" / "generate" / "_SUCCESS").exists()
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".jsonl"):
            assert "sk-should-never-appear" not in path.read_text(errors="replace")


def test_shard_out_of_range(tmp_path, tiny_pool):
    assert rlhf("prompts", str(DEMO / "prompts.yaml"), f"run.root={tmp_path}").returncode == 0
    line = one_line_error(rlhf("generate", str(DEMO / "generate.yaml"), f"run.root={tmp_path}",
                               *pool_overrides(tiny_pool), "--shard", "3", "--num-shards", "2"))
    assert "--shard 3" in line


def test_validate_reports_every_recipe_and_fails_on_any(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((DEMO / "prompts.yaml").read_text().replace("dedupe: true", "dedup: true"))
    result = rlhf("validate", str(DEMO / "prompts.yaml"), str(bad), str(DEMO / "tiny-models.yaml"))
    assert result.returncode == 2
    assert result.stdout.count("ok ") == 2
    assert "data.dedup: unknown key" in result.stderr and "1 of 3 recipe(s) invalid" in result.stderr


def test_validate_without_inputs_accepts_every_shipped_recipe():
    recipes = sorted(str(p) for p in (ROOT / "recipes").rglob("*.yaml")
                     if p.relative_to(ROOT / "recipes").parts[0] not in ("accelerate", "slurm"))
    result = rlhf("validate", "--no-inputs", *recipes)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok ") == len(recipes)


def test_done_stage_is_skipped_and_force_reruns(tmp_path):
    args = ("prompts", str(DEMO / "prompts.yaml"), f"run.root={tmp_path}")
    assert rlhf(*args).returncode == 0
    stamp = (tmp_path / "demo-tiny/prompts/_SUCCESS").stat().st_mtime_ns
    again = rlhf(*args)
    assert again.returncode == 0 and "already done" in again.stdout
    assert (tmp_path / "demo-tiny/prompts/_SUCCESS").stat().st_mtime_ns == stamp
    forced = rlhf(*args, "--force")
    assert forced.returncode == 0 and "76 kept" in forced.stdout
    assert (tmp_path / "demo-tiny/prompts/_SUCCESS").stat().st_mtime_ns != stamp


def test_overrides_after_an_option_still_count(tmp_path):
    # `rlhf prompts r.yaml --force data.seed=abc`: the override is read (and rejected by name).
    line = one_line_error(rlhf("prompts", str(DEMO / "prompts.yaml"), f"run.root={tmp_path}", "--force",
                               "data.seed=abc"))
    assert "data.seed: Input should be a valid integer" in line
    stray = rlhf("prompts", str(DEMO / "prompts.yaml"), "--force", "not-an-override")
    assert stray.returncode == 2 and "unrecognized arguments: not-an-override" in stray.stderr
