"""`rlhf push RUN STAGE --repo org/name` (pipeline/publish.py): the generated card says what made the
output (models, the stand-in judge labelled as a rule, template version, counts, filters, the method
check's numbers, input licences), `--dry-run` needs no token, and an upload reaches a local stand-in
of the hub's create-repo, preupload and commit endpoints (tests/helpers/hub_server.py) with the files
and the card, the token only in the Authorization header. Never the real hub."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.hub_server import HubServer
from pipeline import publish
from pipeline.config import ConfigError
from pipeline.runs import PROVENANCE, SUCCESS

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_TestTokenThatMustNeverBeWritten0123"
SAMPLES = ROOT / "data/samples/instructions/flan.jsonl"


def _stage(folder: Path, config: dict, summary: dict | None = None, evaluation: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    if evaluation is not None:
        (folder / "eval.json").write_text(json.dumps(evaluation))
    (folder / PROVENANCE).write_text(json.dumps({
        "git": {"commit": "c0ffee" * 6 + "beef", "dirty": False, "note": None},
        "packages": {"transformers": "9.9.9", "datasets": "8.8.8"}, "python": "3.11.7",
        "host": "secret-build-host-17"}))
    (folder / SUCCESS).write_text("{}")
    return folder


def _ref(stage: str, output: str = "dataset") -> dict:
    return {"stage": stage, "run": None, "output": output}


@pytest.fixture(scope="module")
def run_root(tiny_pool, tmp_path_factory):
    """A small finished chain written by hand: prompts -> generate -> annotate (stand-in judge) -> pairs
    -> reward (a tiny model), with the records each stage writes."""
    from datasets import Dataset, DatasetDict

    root = tmp_path_factory.mktemp("runs")
    run = root / "r"
    _stage(run / "prompts", {"stage": "prompts", "inputs": {
        "sources": [{"name": "flan", "path": str(SAMPLES)}], "eval_sets": []},
        "data": {"dedupe": True, "decontaminate_ngram": 13}}, {"kept": 12, "read": 13})
    tiny = run / "tiny-models"
    shutil.copytree(tiny_pool[0].parent, tiny, dirs_exist_ok=True)
    (tiny / SUCCESS).write_text("{}")
    _stage(run / "generate", {"stage": "generate", "inputs": {"prompts": _ref("prompts")}, "generation": {"pool": [
        {"name": "tiny-a", "backend": "hf", "path": str(tiny / "tiny-a")},
        {"name": "standin-medium", "backend": "openai", "model": "standin-medium",
         "base_url": "http://127.0.0.1:9/v1"}]}}, {"rows": 12, "completions": 24})
    _stage(run / "annotate", {"stage": "annotate", "inputs": {"completions": _ref("generate")}, "annotation": {
        "judge": {"name": "standin-judge", "backend": "openai", "base_url": "http://127.0.0.1:9/v1"},
        "mode": "faithful", "critique": True, "seed": 3, "position_debias": "shuffle"}},
        {"mode": "faithful", "judge_model": "standin-judge", "template_version": "v7", "seed": 3,
         "position_debias": "shuffle", "rows_out": 12, "completions_annotated": 24})
    pairs = _stage(run / "pairs", {"stage": "pairs", "inputs": {"annotations": _ref("annotate")},
                                   "pairs": {"strategy": "h4", "score": "overall", "test_fraction": 0.25,
                                             "remove_truthful_qa": True}},
                   {"score_source": "overall_score", "ties_dropped": 2, "pairs_train": 3, "pairs_test": 1,
                    "margin": {"mean": 0.25}, "input": "/home/someone/private/annotate/dataset"})
    row = {"prompt": "Name a colour.", "chosen": [{"role": "assistant", "content": "Blue."}],
           "rejected": [{"role": "assistant", "content": "No."}], "score_chosen": 8.0, "score_rejected": 3.0}
    DatasetDict({"train_prefs": Dataset.from_list([row] * 3), "test_prefs": Dataset.from_list([row])}).save_to_disk(
        str(pairs / "dataset"))
    reward = _stage(run / "reward", {"stage": "reward", "model": _ref("tiny-models", "tiny-a"),
                                     "train": {"max_steps": 5, "learning_rate": 1e-4, "lr_scheduler": "cosine",
                                               "global_batch_size": 8, "max_length": 256, "seed": 0, "lora": None},
                                     "reward": {"sources": [{"name": "uf", "dataset": _ref("pairs")}]}},
                    {"global_step": 5, "train_pairs": 3},
                    {"accuracy": {"overall": {"pairs": 1, "accuracy": 0.875, "mean_reward_gap": 0.31}}})
    shutil.copytree(tiny_pool[0], reward / "model")
    (reward / "model" / "checkpoint-5").mkdir()
    (reward / "model" / "checkpoint-5" / "optimizer.pt").write_bytes(b"resume state")
    return root


def test_the_card_says_what_made_the_dataset(run_root):
    card = publish.build_card(run_root, "r", "pairs", "dataset", "me/prefs", "dataset", {"train_prefs": 3, "test_prefs": 1})
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["configs"][0]["data_files"][0] == {"split": "train_prefs", "path": "data/train_prefs-*.parquet"}
    assert "stand-in-judge" in meta["tags"] and meta["license"] == "other"
    assert "**Stand-in judge.**" in card and "not a language model" in card
    assert "Judge: `standin-judge` -- the project's offline stand-in server" in card  # never as a real judge
    assert "template version `v7`" in card and "seed 3" in card
    assert "strategy `h4` on `overall_score`, test fraction 0.25, TruthfulQA prompts removed; 2 tied rows" in card
    assert "`standin-medium`: the project's offline stand-in server (a deterministic rule, NOT a language model)" in card
    assert "`tiny-a`: a tiny randomly initialised model" in card
    assert "| `pairs_train` | 3 |" in card and "| `train_prefs` | 3 |" in card
    assert "`data/samples/instructions/flan.jsonl`: sample rows written for this project" in card
    assert "git commit `c0ffeec0ffee" in card and "transformers 9.9.9" in card
    assert "secret-build-host-17" not in card and "/home/someone" not in card  # nothing of this machine


def test_the_model_card_carries_the_method_check(run_root):
    card = publish.build_card(run_root, "r", "reward", "model", "me/rm", "model")
    assert "library_name: transformers" in card
    assert "The method check (`reward`'s `eval.json`)" in card and "| `accuracy.overall.accuracy` | 0.875 |" in card
    assert "Training: 5 steps, learning rate 0.0001 (cosine)" in card
    assert "model: the `tiny-a` output of stage `tiny-models`" in card
    assert "**Stand-in judge.**" in card  # the reward model learnt from stand-in ratings, two stages back


def _rlhf(*args: str, env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**clean, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_TELEMETRY": "1", **env})


def test_dry_run_writes_the_card_and_lists_the_files_without_a_token(run_root):
    done = _rlhf("push", "r", "pairs", "--repo", "me/prefs", "--root", str(run_root), "--dry-run",
                 env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "would push dataset me/prefs: 3 file(s)" in done.stdout
    for name in ("data/train_prefs-00000-of-00001.parquet", "data/test_prefs-00000-of-00001.parquet", "README.md"):
        assert name in done.stdout
    staged = run_root / "r" / "pairs" / "push" / "dataset"
    assert (staged / "README.md").read_text().startswith("---\nlicense: other\n")


def test_push_sends_the_dataset_and_card_to_the_hub_endpoint(run_root):
    import pyarrow.parquet as pq

    with HubServer() as hub:
        done = _rlhf("push", "r", "pairs", "--repo", "me/prefs", "--root", str(run_root), "--private",
                     env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN})
    assert done.returncode == 0, done.stderr
    assert hub.record.unknown == []
    repo = hub.record.repos["dataset/me/prefs"]
    assert repo["visibility"] == "private" and repo["commits"][0]["summary"] == "rlhf push r/pairs (dataset)"
    assert sorted(repo["files"]) == ["README.md", "data/test_prefs-00000-of-00001.parquet",
                                     "data/train_prefs-00000-of-00001.parquet"]
    card = repo["files"]["README.md"].decode()
    assert card == (run_root / "r" / "pairs" / "push" / "dataset" / "README.md").read_text()
    assert "**Stand-in judge.**" in card
    table = pq.read_table(io.BytesIO(repo["files"]["data/train_prefs-00000-of-00001.parquet"]))
    assert table.num_rows == 3 and "chosen" in table.column_names
    assert f"{hub.url}/datasets/me/prefs/commit/" in done.stdout
    # the token went in the Authorization header of every call, and nowhere else
    assert {r["authorization"] for r in hub.record.requests} == {f"Bearer {TOKEN}"}
    assert TOKEN not in done.stdout + done.stderr
    for path in run_root.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_push_sends_a_model_folder_without_its_checkpoints(run_root, monkeypatch):
    from huggingface_hub import constants

    with HubServer() as hub:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        assert publish.main("r", "reward", "me/rm", root=str(run_root)) == 0
    files = hub.record.repos["model/me/rm"]["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert not any(name.startswith("checkpoint-") for name in files)
    assert files["model.safetensors"] == (run_root / "r" / "reward" / "model" / "model.safetensors").read_bytes()
    assert b"AutoModelForCausalLM" in files["README.md"]


def test_push_refuses_clearly(run_root, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="HF_TOKEN is not set"):
        publish.main("r", "pairs", "me/prefs", root=str(run_root))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE=1 .* run the push with HF_HUB_OFFLINE=0"):
        publish.main("r", "pairs", "me/prefs", root=str(run_root))  # tests run offline
    with pytest.raises(ConfigError, match="'a/b/c' is not a hub repo id"):
        publish.stage_upload(run_root, "r", "pairs", "a/b/c")
    (run_root / "r" / "half").mkdir(exist_ok=True)
    with pytest.raises(ConfigError, match="stage 'half' of run 'r' has not finished"):
        publish.stage_upload(run_root, "r", "half", "me/x")
    with pytest.raises(ConfigError, match="--output: .* has no critique/ folder"):
        publish.stage_upload(run_root, "r", "pairs", "me/x", output="critique")
