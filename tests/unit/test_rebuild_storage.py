"""What a rebuild and a long annotate run stand on: the parse cache (versioned, torn and damaged
lines, read-back across shards), the row writer (Arrow parts in a hidden folder, one rename,
rows gathered back in input order, a chunk at a time) and the input rows kept on disk."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pyarrow as pa
import pytest
from datasets import Dataset, load_from_disk

from pipeline import records
from pipeline.judge import parse
from pipeline.judge.parsecache import ParseCache
from pipeline.shardrows import ROW, RowWriter, SpilledRows, gather

VALUE = [{"Rating": "4", "Rationale": "clear"}, {"Rating": "N/A", "Rationale": "no claim"}]


def test_parse_cache_reads_back_entries_of_its_own_version_only(tmp_path):
    path = tmp_path / "shard-0-of-1" / "parsed.jsonl"
    with ParseCache(path) as cache:
        cache.put("item-a", "ledger-a", 0, VALUE)
        cache.put("item-b", "ledger-b", 2, ["Good.", 7])
        assert cache.get("item-a") is None  # appends are for later runs, not indexed
    with ParseCache(path) as cache:
        assert len(cache) == 2
        assert cache.get("item-a") == ("ledger-a", 0, VALUE)
        assert cache.get("item-b") == ("ledger-b", 2, ["Good.", 7])
        assert cache.get("item-c") is None
    # another parser version: nothing of the old one is used
    with ParseCache(path, version=parse.PARSER_VERSION + 1) as cache:
        assert len(cache) == 0 and cache.get("item-a") is None
        cache.put("item-a", "ledger-a2", 1, ["Fine.", 5])
    with ParseCache(path, version=parse.PARSER_VERSION + 1) as cache:
        assert cache.get("item-a") == ("ledger-a2", 1, ["Fine.", 5])
    with ParseCache(path) as cache:  # and the old version's lines are still the old version's
        assert cache.get("item-a") == ("ledger-a", 0, VALUE)


def test_parse_cache_follows_the_parser_version_in_force(tmp_path, monkeypatch):
    path = tmp_path / "parsed.jsonl"
    with ParseCache(path) as cache:
        cache.put("item", "ledger", 0, VALUE)
    monkeypatch.setattr(parse, "PARSER_VERSION", parse.PARSER_VERSION + 1)
    with ParseCache(path) as cache:
        assert cache.get("item") is None


def test_parse_cache_drops_a_torn_tail_and_misses_on_a_damaged_line(tmp_path):
    path = tmp_path / "parsed.jsonl"
    with ParseCache(path) as cache:
        cache.put("good", "ledger-good", 0, VALUE)
        cache.put("damaged", "ledger-damaged", 0, VALUE)
    text = path.read_text()
    text = text.replace('"ledger-damaged"', '"ledger-damaged')  # no longer JSON
    torn = f"{parse.PARSER_VERSION}\ttorn\t[\"ledger-torn\", 0, [{{\"Rat"  # a kill -9 mid-line
    path.write_text(text + torn)
    with ParseCache(path) as cache:
        assert cache.get("good") == ("ledger-good", 0, VALUE)
        assert cache.get("damaged") is None
        assert cache.get("torn") is None
        assert path.read_text() == text  # cut back to the last whole line
        cache.put("after", "ledger-after", 1, VALUE)
    with ParseCache(path) as cache:
        assert cache.get("after") == ("ledger-after", 1, VALUE)


def test_parse_cache_reads_other_shards_files(tmp_path):
    with ParseCache(tmp_path / "shard-0-of-2" / "parsed.jsonl") as cache:
        cache.put("from-0", "ledger-0", 0, VALUE)
    other = tmp_path / "shard-0-of-2" / "parsed.jsonl"
    with ParseCache(tmp_path / "shard-1-of-2" / "parsed.jsonl", also_read=[other]) as cache:
        assert cache.get("from-0") == ("ledger-0", 0, VALUE)
        cache.put("from-1", "ledger-1", 0, VALUE)
    assert "from-1" not in other.read_text()  # another shard's file is only read


def row(i: int) -> dict:
    annotations = {
        "instruction_following": {"Rating": "4", "Rationale": f"r{i}"},
        "honesty": {"Rating": "N/A", "Rationale": "none"},
        "truthfulness": {"Type": ["1"], "Rationale": "t", "Rating": "3", "Rationale For Rating": "u"},
        "helpfulness": {"Type": [], "Rationale": "h", "Rating": 5, "Rationale For Rating": "v"},  # an int: cast
    }
    completion = {"model": "m", "principle": "helpfulness", "custom_system_prompt": "", "response": f"answer {i}",
                  "annotations": annotations, "critique": "ok", "overall_score": 7.0, "fine-grained_score": 4.0}
    return {"prompt_id": f"p{i}", "source": "flan", "instruction": f"q{i}", "models": ["m"],
            "completions": [completion], "correct_answers": [], "incorrect_answers": [], "reference": ""}


def read_parts(folder: Path) -> list[dict]:
    """The rows of every part file as they stand now (whole record batches only)."""
    out = []
    for part in sorted(folder.glob("part-*.arrow")):
        with pa.memory_map(str(part)) as source:
            reader = pa.ipc.open_stream(source)
            while True:
                try:
                    out += reader.read_next_batch().to_pylist()
                except (StopIteration, pa.ArrowInvalid):
                    break
    return out


def test_rows_are_readable_in_a_hidden_part_before_commit_then_one_rename(tmp_path):
    features = records.COMPLETION_SET_FEATURES
    final = tmp_path / "shard-0-of-1" / "rows"
    writer = RowWriter(final, features, rows_per_part=4, batch_rows=2)
    for i in (5, 3):
        writer.write(i, row(i))
    assert not final.exists()
    assert writer.tmp.name.startswith(".rows.tmp-")
    assert [r[ROW] for r in read_parts(writer.tmp)] == [5, 3]  # on disk while the stage runs
    for i in (0, 4, 1, 2, 6):
        writer.write(i, row(i))
    writer.commit()
    assert not writer.tmp.exists() and len(list(final.glob("part-*.arrow"))) == 2  # 4 rows a part
    gather([final], tmp_path / "dataset", features)
    got = load_from_disk(str(tmp_path / "dataset"))
    assert got.features == features
    assert got.to_list() == Dataset.from_list([row(i) for i in range(7)], features=features).to_list()


def test_a_discarded_or_killed_writer_leaves_no_rows_and_the_next_one_cleans_up(tmp_path):
    features = records.COMPLETION_SET_FEATURES
    final = tmp_path / "rows"
    writer = RowWriter(final, features, batch_rows=1)
    writer.write(0, row(0))
    writer.discard()
    assert list(tmp_path.iterdir()) == []
    # a killed process's folder (another pid) is removed by the next writer of that place
    stale = tmp_path / ".rows.tmp-999999"
    stale.mkdir()
    (stale / "part-00000.arrow").write_bytes(b"half")
    writer = RowWriter(final, features)
    assert not stale.exists()
    writer.write(1, row(1))
    writer.commit()
    assert [r[ROW] for r in read_parts(final)] == [1]
    # committing again over an existing folder replaces it whole
    writer = RowWriter(final, features)
    writer.write(2, row(2))
    writer.commit()
    assert [r[ROW] for r in read_parts(final)] == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows"]


def test_gather_takes_rows_of_several_shards_in_input_order_and_refuses_a_repeated_row(tmp_path):
    features = records.COMPLETION_SET_FEATURES
    folders = []
    for shard in range(3):
        writer = RowWriter(tmp_path / f"shard-{shard}-of-3" / "rows", features)
        for i in reversed(range(shard, 10, 3)):
            writer.write(i, row(i))
        writer.commit()
        folders.append(writer.final)
    assert gather(folders, tmp_path / "dataset", features) == 10
    assert [r["prompt_id"] for r in load_from_disk(str(tmp_path / "dataset"))] == [f"p{i}" for i in range(10)]
    with pytest.raises(ValueError, match="rows written twice"):
        gather([folders[0], folders[0]], tmp_path / "again", features)
    assert not (tmp_path / "again").exists()


def test_gather_reads_back_any_arrival_order_a_chunk_at_a_time(tmp_path):
    """Rows finishing far out of order (a slow prompt written last), in many small batches and
    parts: chunks of 3 rows from a cache of 4 batches still give input order, and `on_chunk`
    sees each written row once, in that order."""
    import random

    features = records.COMPLETION_SET_FEATURES
    arrival = list(range(40))
    random.Random(0).shuffle(arrival)
    arrival.remove(0)
    arrival.append(0)  # the first row comes last
    writer = RowWriter(tmp_path / "rows", features, rows_per_part=7, batch_rows=2)
    for i in arrival:
        writer.write(i, row(i))
    writer.commit()
    assert len(list((tmp_path / "rows").glob("part-*.arrow"))) == 5  # 8 rows a part: 4 batches of 2
    seen = []
    assert gather([writer.final], tmp_path / "dataset", features, chunk_rows=3,
                  on_chunk=lambda table: seen.extend(table.column("prompt_id").to_pylist())) == 40
    assert seen == [f"p{i}" for i in range(40)]
    got = load_from_disk(str(tmp_path / "dataset"))
    assert got.features == features
    assert got.to_list() == Dataset.from_list([row(i) for i in range(40)], features=features).to_list()
    assert gather([], tmp_path / "empty", features) == 0
    assert len(load_from_disk(str(tmp_path / "empty"))) == 0


def test_spilled_rows_read_back_by_position_from_a_file_without_a_name(tmp_path):
    rows = SpilledRows(cache_rows=2)
    for i in range(5):
        rows.append({"prompt_id": f"p{i}", "completions": [{"response": "x" * i, "score": (i, None)}]})
    assert os.fstat(rows._file.fileno()).st_nlink == 0  # nothing left on disk whatever ends the process
    assert len(rows) == 5
    assert [r["prompt_id"] for r in rows] == [f"p{i}" for i in range(5)]
    assert rows[0] == {"prompt_id": "p0", "completions": [{"response": "", "score": (0, None)}]}  # read again
    assert rows[-1]["completions"][0]["response"] == "xxxx"
    assert len(rows._cache) == 2
    with pytest.raises(IndexError, match="row 5 of 5"):
        rows[5]
    rows.append({"prompt_id": "late"})  # appended after reads: flushed before it is read
    assert rows[5] == {"prompt_id": "late"}
    rows.close()
