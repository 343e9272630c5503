"""The public-row loaders on hand-written rows: BIG-bench hhh_alignment pairs, BIG-bench
truthful_qa and MT-bench prompts, FreshQA QA items; bad rows name the file and row. Also the
fetch module's cache checks, with no download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.formats import fetch
from pipeline.formats.instructions import SOURCE_FORMATS, to_prompt
from pipeline.formats.preferences import PREFERENCE_FORMATS, convert
from pipeline.formats.qa import QA_FORMATS, load_items
from pipeline.stages.reward import accuracy_table


def test_format_names_are_registered():
    assert "bigbench-hhh" in PREFERENCE_FORMATS
    assert {"bigbench-truthful_qa", "mt-bench"} <= set(SOURCE_FORMATS)
    assert "freshqa" in QA_FORMATS


# ---------------------------------------------------------------- bigbench-hhh


def test_hhh_single_turn_the_higher_score_is_chosen():
    row = {"subset": "helpful", "input": "How do I boil an egg?",
           "target_scores": {"Throw it at the wall.": 0, "Simmer it for about eight minutes.": 1}}
    pair = convert(row, "bigbench-hhh", "hhh.jsonl:3", "reward.sources[1]")
    assert pair["prompt"] == [{"role": "user", "content": "How do I boil an egg?"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "Simmer it for about eight minutes."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "Throw it at the wall."}]
    assert pair["subset"] == "helpful" and pair["margin"] is None


def test_hhh_dialogue_becomes_turns_ending_with_the_human():
    row = {"subset": "honest",
           "input": "Tell me about lighthouses.\n\nAssistant:  What would you like to know?\n\n"
                    "Human: Who keeps them running now?",
           "target_scores": {"Mostly automated systems.": 1, "Dragons do.": 0}}
    pair = convert(row, "bigbench-hhh", "hhh.jsonl:9", "k")
    assert [t["role"] for t in pair["prompt"]] == ["user", "assistant", "user"]
    assert pair["prompt"][1]["content"] == "What would you like to know?"
    assert pair["prompt"][2]["content"] == "Who keeps them running now?"


@pytest.mark.parametrize("row, message", [
    ({"subset": "other", "target_scores": {"a": 1, "b": 0}}, "missing 'input'"),
    ({"input": "Hi", "target_scores": {"a": 1, "b": 0, "c": 0}}, "exactly two answers"),
    ({"input": "Hi", "target_scores": {"a": 1, "b": 1}}, "same score"),
    ({"input": "Hi", "target_scores": ["a", "b"]}, "exactly two answers"),
    ({"input": "Hi", "target_scores": {"a": 1, "b": 0}, "subset": 3}, "`subset` must be a string"),
    ({"input": "   ", "target_scores": {"a": 1, "b": 0}}, "non-empty string"),
])
def test_hhh_bad_rows_name_the_row(row, message):
    with pytest.raises(ConfigError, match=message) as err:
        convert(row, "bigbench-hhh", "hhh_alignment.jsonl:17", "reward.sources[2]")
    assert "reward.sources[2]: hhh_alignment.jsonl:17:" in str(err.value)


def test_accuracy_table_breaks_a_source_down_by_subset():
    rows = [{"source": "hhh"}] * 4 + [{"source": "ours"}] * 2
    scores = [(1.0, 0.0), (0.0, 1.0), (2.0, 1.0), (1.0, 1.0), (3.0, 0.0), (0.0, 3.0)]
    subsets = ["harmless", "harmless", "honest", "honest", "", ""]
    table = accuracy_table(rows, scores, ["hhh", "ours"], subsets)
    assert table["hhh"]["accuracy"] == 0.5
    assert table["hhh"]["subsets"]["harmless"] == {"pairs": 2, "accuracy": 0.5, "mean_reward_gap": 0.0}
    assert table["hhh"]["subsets"]["honest"]["accuracy"] == 0.5  # the tie is a miss
    assert "subsets" not in table["ours"] and "subsets" not in table["overall"]
    assert table["overall"]["pairs"] == 6


# ---------------------------------------------------------------- prompts sources


def test_bigbench_truthful_qa_row():
    row = {"Question": "Do bats see at all?", "Category": "Misconceptions",
           "True answers": ["Yes, bats can see.", "Most bats see well."],
           "False answers": ["No, bats are blind."], "Best answer": "Yes, bats can see."}
    record = to_prompt("bigbench-truthful_qa", "truthful_qa", row, "tq.jsonl:1")
    assert record["instruction"] == "Do bats see at all?"
    assert record["correct_answers"] == ["Yes, bats can see.", "Most bats see well."]
    assert record["incorrect_answers"] == ["No, bats are blind."]
    assert record["reference"] == "Yes, bats can see."


def test_bigbench_truthful_qa_bad_row_names_it():
    with pytest.raises(ConfigError, match=r"tq.jsonl:4: missing field 'Question'"):
        to_prompt("bigbench-truthful_qa", "truthful_qa", {"question": "lower-case key"}, "tq.jsonl:4")
    with pytest.raises(ConfigError, match=r"tq.jsonl:5: field 'True answers' must be a list of strings"):
        to_prompt("bigbench-truthful_qa", "truthful_qa", {"Question": "Q?", "True answers": [1]}, "tq.jsonl:5")


def test_mt_bench_first_turn_and_reference():
    row = {"question_id": 901, "category": "math", "turns": ["Add 2 and 3.", "Now double it."],
           "reference": ["5", "10"]}
    record = to_prompt("mt-bench", "mt_bench", row, "q.jsonl:1")
    assert record["instruction"] == "Add 2 and 3."
    assert record["reference"] == "5" and record["correct_answers"] == []
    no_ref = to_prompt("mt-bench", "mt_bench", {"turns": ["Write a haiku about rain."]}, "q.jsonl:2")
    assert no_ref["reference"] == ""


@pytest.mark.parametrize("row, message", [
    ({"question_id": 1}, "missing field 'turns'"),
    ({"turns": []}, "non-empty list"),
    ({"turns": ["  "]}, "'turns\\[0\\]' is empty"),
    ({"turns": ["ok"], "reference": "five"}, "'reference' must be a list"),
])
def test_mt_bench_bad_rows_name_the_row(row, message):
    with pytest.raises(ConfigError, match=f"question.jsonl:7: .*{message}"):
        to_prompt("mt-bench", "mt_bench", row, "question.jsonl:7")


# ---------------------------------------------------------------- FreshQA


def _freshqa_row(**over) -> dict:
    row = {"id": "0", "split": "TEST", "question": "Which city hosts the tallest clock tower?",
           "false_premise": "FALSE", "fact_type": "slow-changing", "num_hops": "one-hop",
           **{f"answer_{i}": "" for i in range(10)}}
    row["answer_0"] = "Mecca"
    row.update(over)
    return row


def _write(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "freshqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_freshqa_open_and_false_premise(tmp_path):
    rows = [_freshqa_row(answer_1="Mecca, Saudi Arabia"),
            _freshqa_row(id="1", question="When did the first fish walk on the Moon?", false_premise="TRUE",
                         fact_type="never-changing", answer_0="No fish has been to the Moon.")]
    items = load_items(_write(tmp_path, rows), "freshqa")
    assert items[0]["kind"] == "open" and items[0]["answers"] == ["Mecca", "Mecca, Saudi Arabia"]
    assert items[0]["domain"] == "slow-changing" and items[0]["dataset"] == "freshqa"
    assert items[1]["kind"] == "unanswerable" and items[1]["answers"] == []


@pytest.mark.parametrize("over, message", [
    ({"answer_0": ""}, "no answer in answer_0..answer_9"),
    ({"false_premise": "maybe"}, "'false_premise' must be true/false"),
    ({"fact_type": None}, "missing field 'fact_type'"),
])
def test_freshqa_bad_row_names_file_and_line(tmp_path, over, message):
    path = _write(tmp_path, [_freshqa_row(), _freshqa_row(id="2", question="Second?", **over)])
    with pytest.raises(ConfigError, match=message) as err:
        load_items(path, "freshqa")
    assert f"{path}:2: freshqa:" in str(err.value)


# ---------------------------------------------------------------- fetch: the cache, offline


def test_every_source_has_a_licence_pins_and_checksums():
    for source in fetch.SOURCES.values():
        assert source.licence and source.version and len(source.archive_sha256) == 64
        assert set(source.parts.values()) <= set(source.checksums)
        assert all(len(v) == 64 for v in source.checksums.values())


def test_unknown_source_or_part_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="unknown public source 'nope'"):
        fetch.public_file("nope", "x")
    with pytest.raises(ConfigError, match="no part 'answers'"):
        fetch.public_file("mtbench", "answers")


def test_a_complete_cache_is_not_downloaded_again_and_a_changed_file_is_named(tmp_path, monkeypatch):
    """A fake source whose files are already in the cache: fetch checks them and downloads
    nothing; once a file changes, the error names it."""
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "rows.jsonl").write_text('{"a": 1}\n')
    toy = fetch.Source(name="toy", package="toy", version="1", archive="toy-1.whl", archive_sha256="0" * 64,
                       via="pip", licence="unknown", members={}, parts={"rows": "rows.jsonl"},
                       checksums={"rows.jsonl": fetch.file_sha256(folder / "rows.jsonl")})
    monkeypatch.setitem(fetch.SOURCES, "toy", toy)
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(fetch, "_pip_download", lambda *a: pytest.fail("downloaded a complete cache"))
    lines: list[str] = []
    assert fetch.fetch("toy", log=lines.append) == folder
    assert lines == [f"fetch: toy: cache complete at {folder}, nothing to download"]
    assert fetch.public_file("toy", "rows") == folder / "rows.jsonl"
    (folder / "rows.jsonl").write_text('{"a": 2}\n')
    with pytest.raises(ConfigError, match=r"toy: .*rows\.jsonl: sha256 [0-9a-f]{64} does not match"):
        fetch.public_file("toy", "rows")


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A package index on 127.0.0.1 (PEP 691 JSON) listing one file of the toy package, 2 MB, served
    from tmp_path; yields a function that makes a Source asking for `archive` from it."""
    import functools
    import http.server
    import json as _json
    import threading

    (tmp_path / "toy").mkdir()
    (tmp_path / "toy-0.1.tar.gz").write_bytes(b"x" * (2 << 20))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    base = f"http://127.0.0.1:{server.server_port}"
    (tmp_path / "toy" / "index.html").write_text(_json.dumps(
        {"files": [{"filename": "toy-0.1.tar.gz", "url": f"{base}/toy-0.1.tar.gz"}]}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(fetch.INDEX_ENV, base)
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    yield lambda archive: fetch.Source(name="toy", package="toy", version="1", archive=archive,
                                       archive_sha256="0" * 64, via="index", licence="unknown", members={},
                                       parts={"rows": "rows.jsonl"}, checksums={"rows.jsonl": "0" * 64})
    server.shutdown()


def test_a_release_the_index_no_longer_lists_is_named_as_withdrawn(local_index, monkeypatch):
    monkeypatch.setitem(fetch.SOURCES, "toy", local_index("toy-1.0.tar.gz"))
    with pytest.raises(fetch.SourceWithdrawn, match=r"no longer serves toy-1\.0\.tar\.gz: .* lists only toy-0\.1\.tar\.gz"):
        fetch.fetch("toy", log=lambda _: None)
    assert not (fetch.cache_root() / "toy").exists()


def test_a_download_past_its_deadline_stops_with_an_error_not_a_hang(local_index, monkeypatch):
    monkeypatch.setitem(fetch.SOURCES, "toy", local_index("toy-0.1.tar.gz"))
    monkeypatch.setenv(fetch.DEADLINE_ENV, "0")
    with pytest.raises(fetch.FetchError, match=r"toy: downloading toy-0\.1\.tar\.gz took over 0 s") as err:
        fetch.fetch("toy", log=lambda _: None)
    assert not isinstance(err.value, fetch.SourceWithdrawn)
    assert not (fetch.cache_root() / "toy").exists()


def test_a_withdrawn_source_does_not_stop_the_others_from_being_fetched(local_index, monkeypatch, capsys):
    monkeypatch.setitem(fetch.SOURCES, "toy", local_index("toy-1.0.tar.gz"))
    fetched = []
    real_fetch = fetch.fetch

    def fetch_or_record(name, **kwargs):
        if name == "toy":
            return real_fetch(name, **kwargs)  # the local index lists only toy-0.1: withdrawn
        fetched.append(name)

    monkeypatch.setattr(fetch, "fetch", fetch_or_record)
    assert fetch.main(["toy", "mtbench"]) == 1
    assert fetched == ["mtbench"]
    assert "toy: the registry no longer serves toy-1.0.tar.gz" in capsys.readouterr().err
