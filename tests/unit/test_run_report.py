"""`rlhf report`: one page with every stage's state, summary and plots, in pipeline order."""

from __future__ import annotations

import json

from pipeline.cli import main
from pipeline.report import figure
from pipeline.runs import mark_done, write_json


def _stage(root, run, name, summary=None, done=True, plot=None):
    path = root / run / name
    path.mkdir(parents=True)
    if summary is not None:
        write_json(path / "summary.json", summary)
    if plot:
        with figure(path / "report" / f"{plot}.png") as (fig, ax):
            ax.plot([0, 1], [1, 0])
    if done:
        mark_done(path, {})
    return path


def test_report_gathers_stages_in_pipeline_order_with_plots_and_no_secrets(tmp_path, capsys):
    root = tmp_path / "runs"
    # made in the wrong order on purpose: the page follows the pipeline, not the folders' times
    _stage(root, "r", "reward", {"accuracy": 0.8125, "api_key": "sk-abcdefghijklmnop"}, plot="accuracy")
    _stage(root, "r", "pairs", {"pairs_train": 42, "splits": {"train_prefs": 42}}, plot="margins")
    _stage(root, "r", "generate", {"completions": 304, "note": "key sk-zyxwvutsrqponmlk leaked"})
    annotate = _stage(root, "r", "annotate", done=False)
    (annotate / "ledger.jsonl").write_text(json.dumps({"key": "k1", "status": "failed", "reason": "HTTP 500"}) + "\n")
    _stage(root, "r-rtuning", "rtuning-eval", {"splits": {"test_id": {"ap": 0.765}}})

    assert main(["report", "r", "r-rtuning", "--root", str(root)]) == 0
    page = (root / "r" / "REPORT.md").read_text()
    html = (root / "r" / "REPORT.html").read_text()
    order = [page.index(f"### {name} (") for name in ("generate", "annotate", "pairs", "reward", "rtuning-eval")]
    assert order == sorted(order)
    assert "### annotate (failed)" in page and "### reward (done)" in page
    assert "| accuracy | 0.8125 |" in page and "| splits.train_prefs | 42 |" in page
    assert "| splits.test_id.ap | 0.765 |" in page
    assert "sk-" not in page and "sk-" not in html and "<redacted>" in page
    for rel in ("reward/report/accuracy.png", "pairs/report/margins.png"):
        assert f"]({rel})" in page and f"src='{rel}'" in html and (root / "r" / rel).is_file()
    assert "report: 2 run(s), 5 stages, 2 plots" in capsys.readouterr().out


def test_report_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "runs" / "r").mkdir(parents=True)
    assert main(["report", "r", "nope", "--root", str(tmp_path / "runs")]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "r" / "REPORT.md").exists()


def test_a_step_folder_follows_the_stage_its_inputs_name(tmp_path):
    root = tmp_path / "runs"
    for name in ("rtuning-eval", "rtuning-data", "qa-data", "sft", "reward"):
        _stage(root, "r", name, {"n": 1})
    step = _stage(root, "r", "rtuning-sft", {"n": 1})  # an sft with `run.step: rtuning-sft`
    (step / "config.yaml").write_text("stage: sft\nrun: {name: r, step: rtuning-sft}\n"
                                      "inputs: {dataset: {stage: rtuning-data}}\n")
    assert main(["report", "r", "--root", str(root)]) == 0
    page = (root / "r" / "REPORT.md").read_text()
    order = [page.index(f"### {name} (") for name in
             ("sft", "reward", "qa-data", "rtuning-data", "rtuning-sft", "rtuning-eval")]
    assert order == sorted(order)


def test_report_never_shows_url_credentials_or_secret_keys(tmp_path):
    """Issue 18 #11: a credential inside a URL, or under a key that says token/password, stays out."""
    root = tmp_path / "runs"
    _stage(root, "r", "generate", {"base_url": "http://user:SECRET1@host/v1", "hf_token": "SECRET2",
                                   "db_password": "SECRET3", "max_new_tokens": 12})
    annotate = _stage(root, "r", "annotate", done=False)
    (annotate / "ledger.jsonl").write_text(json.dumps({"key": "k1", "status": "failed",
                                                       "reason": "POST http://u:SECRET4@host/v1 refused"}) + "\n")
    assert main(["report", "r", "--root", str(root)]) == 0
    for page in ("REPORT.md", "REPORT.html"):
        text = (root / "r" / page).read_text()
        assert "SECRET" not in text, page
    assert "| max_new_tokens | 12 |" in (root / "r" / "REPORT.md").read_text()


def test_report_opens_with_banner_headlines_totals_provenance_and_examples(tmp_path):
    from datasets import Dataset, DatasetDict

    root = tmp_path / "runs"
    generate = _stage(root, "r", "generate", {"completions": 2, "failed_completions": 0, "prompts": 1})
    (generate / "config.yaml").write_text(
        "stage: generate\ngeneration:\n  pool:\n  - {name: small, backend: hf, path: models/small}\n"
        "  - {name: standin-medium, backend: openai}\n")
    annotate = _stage(root, "r", "annotate", {"judge_model": "standin-judge", "completions_annotated": 2,
                                              "items_failed": 0, "tokens": {"total": 900},
                                              "cost_usd_all_runs": 0.25, "seconds": 30.0})
    completion = {"response": "Water boils at 212 degrees Fahrenheit at sea level.", "overall_score": 7.5,
                  "annotations": {"honesty": {"Rating": "4"}, "helpfulness": {"Rating": "5"}}}
    Dataset.from_list([{"instruction": "At what temperature does water boil?", "source": "flan",
                        "models": ["small"], "completions": [completion]}]).save_to_disk(str(annotate / "dataset"))
    pairs = _stage(root, "r", "pairs", {"pairs_train": 1, "pairs_test": 0, "ties_dropped": 0})
    DatasetDict({"train_prefs": Dataset.from_list([{
        "prompt": [{"role": "user", "content": "Boiling point of water?"}],
        "chosen": [{"role": "assistant", "content": "212 F at sea level."}],
        "rejected": [{"role": "assistant", "content": "Cold."}]}])}).save_to_disk(str(pairs / "dataset"))
    DatasetDict({"train": Dataset.from_list([{"instruction": "Boiling point of water?", "completion": "Cold.",
                                              "critique": "Wrong: water boils at 100 C."}])}
                ).save_to_disk(str(pairs / "critique"))
    ppo = _stage(root, "r", "ppo", {"algorithm": "ppo", "reward_before": 0.1, "reward_after": 0.3,
                                    "kl_per_token_after": 0.00145, "seconds": 90.0})
    write_json(ppo / "provenance.json", {"git": {"commit": "abc123", "dirty": True},
                                         "packages": {"torch": "2.13.0", "trl": "1.12.0"}, "python": "3.11.7",
                                         "host": "node1"})
    with figure(ppo / "report" / "ppo_curves.png", empty_reason="No iteration was logged.") as (_, ax):
        ax.plot([], [])
    _stage(root, "r", "custom-thing", {"score": 0.5, "seed": 3, "label": "x"})

    assert main(["report", "r", "--root", str(root)]) == 0
    page = (root / "r" / "REPORT.md").read_text()
    html = (root / "r" / "REPORT.html").read_text()
    assert "> Completions by: small (hf: models/small); standin-medium (openai: standin-medium) \u2013 a stand-in" in page
    assert "> Judged by: standin-judge \u2013 the stand-in server, a fixed rule and not a model" in page
    # headline numbers per stage, a key named like a token count is not taken for a secret
    assert ("| annotate | done | completions annotated 2, items failed 0, tokens 900, USD (all runs) 0.25 | 30 |"
            in page.replace("[annotate](#r-annotate)", "annotate"))
    assert "algorithm ppo, RM score before 0.1, after 0.3, KL nats/token 0.00145" in page
    assert "score 0.5" in page and "seed 3" not in page.split("Total:")[0]  # first numbers, seed skipped
    assert "Total: 2.0 min of stage time, $0.2500 in judge calls (all runs)." in page
    assert "- Code: abc123 (dirty tree)" in page and "- Libraries: torch 2.13.0, trl 1.12.0" in page
    assert "Host: node1, Python 3.11.7" in page
    assert "Instruction (flan): At what temperature does water boil?" in page
    assert "- small: overall 7.5; honesty 4, helpfulness 5;" in page
    assert "Chosen: assistant: 212 F at sea level." in page and "Critique: Wrong: water boils at 100 C." in page
    assert "*ppo_curves is empty: No iteration was logged.*" in page
    assert "ppo_curves is empty: No iteration was logged." in html and "class='banner'" in html
