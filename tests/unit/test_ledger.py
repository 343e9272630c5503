"""The request ledger: stable keys, durable outcomes, torn and damaged lines, shards, kill -9."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import inspect
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.ledger import Ledger, request_key

ROOT = Path(__file__).resolve().parents[2]

IDENTITY = {"backend": "hf", "model": "tiny-a", "path": "models/tiny-a"}
MESSAGES = [{"role": "system", "content": "Be honest."}, {"role": "user", "content": "Hi?"}]
PARAMS = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 32, "seed": 5}


def key(identity=IDENTITY, template="v1", messages=MESSAGES, params=PARAMS) -> str:
    return request_key(identity, template, messages, params)


# --- keys ------------------------------------------------------------------------------------


def test_key_is_stable_across_dict_ordering():
    base = key()
    assert len(base) == 64 and int(base, 16) >= 0  # sha256 hex
    assert key(identity=dict(reversed(list(IDENTITY.items())))) == base
    assert key(params=dict(reversed(list(PARAMS.items())))) == base
    assert key(messages=[dict(reversed(list(m.items()))) for m in MESSAGES]) == base
    assert key(messages=tuple(MESSAGES)) == base  # a tuple of messages is the same conversation
    assert key() == base  # and deterministic (no salt, no time)


@pytest.mark.parametrize("change", [
    {"identity": {**IDENTITY, "model": "tiny-b"}},
    {"identity": {**IDENTITY, "path": "models/other"}},
    {"template": "v2"},
    {"messages": [MESSAGES[0], {"role": "user", "content": "Hi!"}]},
    {"messages": [{"role": "user", "content": "Be honest."}, MESSAGES[1]]},
    {"messages": MESSAGES[1:]},
    {"messages": list(reversed(MESSAGES))},
    {"params": {**PARAMS, "temperature": 0.7}},
    {"params": {**PARAMS, "seed": 6}},
    {"params": {**PARAMS, "stop": ["\n"]}},
])
def test_key_changes_with_what_decides_the_answer(change):
    assert key(**change) != key()


def test_batch_size_and_concurrency_are_not_inputs(tmp_path):
    """The key has exactly four inputs; batch size and concurrency are not among them, and the
    backends' identities (what callers pass in) leave them out, so a rerun with another batch
    size or concurrency (or another server address) finds its paid-for results."""
    assert list(inspect.signature(request_key).parameters) == ["identity", "template_version", "messages",
                                                              "params"]
    from pipeline.config import ModelSpec
    from pipeline.llm.base import make_backend

    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")  # enough for the backend; nothing is loaded
    hf = [make_backend(ModelSpec(name="t", backend="hf", path=str(model_dir), batch_size=b)) for b in (1, 64)]
    assert hf[0].identity() == hf[1].identity()
    api = [make_backend(ModelSpec(name="m", backend="openai", base_url=url, max_concurrency=c))
           for url, c in (("http://a:1/v1", 1), ("http://b:2/v1", 256))]
    assert api[0].identity() == api[1].identity()
    assert "batch_size" not in hf[0].identity() and "max_concurrency" not in api[0].identity()


# --- outcomes --------------------------------------------------------------------------------


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_outcomes_persist_across_reopen(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        assert len(ledger) == 0 and ledger.result("a") is None and not ledger.is_ok("a")
        ledger.record_ok("a", {"text": "héllo ✓", "tokens": 3}, model="m1")
        ledger.record_failure("b", "HTTP 500: boom")
        assert ledger.is_ok("a") and not ledger.is_ok("b")
    with Ledger(path) as again:
        assert again.is_ok("a") and again.result("a") == {"text": "héllo ✓", "tokens": 3}
        assert not again.is_ok("b") and again.result("b") is None
        assert again.failed_keys == {"b"}
        assert again.failure("b")["reason"] == "HTTP 500: boom"
        assert len(again) == 1
    recs = lines(path)
    assert [r["key"] for r in recs] == ["a", "b"]
    assert recs[0]["model"] == "m1"  # extra metadata is kept


def test_failure_then_success_is_ok(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.record_failure("k", "timeout")
        assert ledger.failed_keys == {"k"}
        ledger.record_ok("k", {"text": "fine"})
        assert ledger.is_ok("k") and "k" not in ledger.failed_keys and ledger.failure("k") is None
    with Ledger(path) as again:
        assert again.is_ok("k") and again.result("k") == {"text": "fine"}
        assert again.failed_keys == set()


def test_success_then_failure_stays_ok(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.record_ok("k", {"text": "paid for"})
        ledger.record_failure("k", "a later retry broke")
        assert ledger.is_ok("k") and ledger.failed_keys == set()
    with Ledger(path) as again:
        assert again.is_ok("k") and again.result("k") == {"text": "paid for"}
        assert again.failed_keys == set()


def test_later_success_replaces_earlier_success(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.record_ok("k", {"text": "first"})
        ledger.record_ok("k", {"text": "second"})
    with Ledger(path) as again:
        assert again.result("k") == {"text": "second"} and len(again) == 1


def test_creates_parent_folders(tmp_path):
    path = tmp_path / "a" / "b" / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.record_ok("k", {})
    assert path.is_file()


# --- torn and damaged lines ------------------------------------------------------------------


def fill(path: Path, count: int) -> None:
    with Ledger(path) as ledger:
        for i in range(count):
            ledger.record_ok(f"k{i}", {"i": i})


def test_torn_last_line_is_dropped_and_truncated(tmp_path):
    path = tmp_path / "ledger.jsonl"
    fill(path, 3)
    whole = path.read_bytes()
    torn = json.dumps({"key": "k3", "status": "ok", "result": {"i": 3}}).encode()[:17]
    with open(path, "ab") as handle:  # what a kill -9 in the middle of a write leaves
        handle.write(torn)
    with Ledger(path) as ledger:
        assert path.read_bytes() == whole  # truncated to the last whole line
        assert len(ledger) == 3 and not ledger.is_ok("k3")
        ledger.record_ok("k3", {"i": 3})  # the torn call is simply made again
        ledger.record_failure("k4", "nope")
    recs = lines(path)  # every line is valid JSON again
    assert [r["key"] for r in recs] == ["k0", "k1", "k2", "k3", "k4"]
    with Ledger(path) as again:
        assert len(again) == 4 and again.result("k3") == {"i": 3} and again.failed_keys == {"k4"}


def test_complete_record_without_newline_counts_as_torn(tmp_path):
    path = tmp_path / "ledger.jsonl"
    fill(path, 2)
    whole = path.read_bytes()
    with open(path, "ab") as handle:  # the newline never made it to disk
        handle.write(json.dumps({"key": "k2", "status": "ok", "result": {"i": 2}}).encode())
    with Ledger(path) as ledger:
        assert len(ledger) == 2 and path.read_bytes() == whole
        ledger.record_ok("k9", {})
    assert [r["key"] for r in lines(path)] == ["k0", "k1", "k9"]


def test_torn_multibyte_character_at_the_end(tmp_path):
    path = tmp_path / "ledger.jsonl"
    fill(path, 1)
    whole = path.read_bytes()
    record = json.dumps({"key": "k1", "status": "ok", "result": {"t": "ünïcødé"}}, ensure_ascii=False).encode()
    cut = record.index("ü".encode()) + 1  # in the middle of a two-byte character
    with open(path, "ab") as handle:
        handle.write(record[:cut])
    with Ledger(path) as ledger:
        assert len(ledger) == 1 and path.read_bytes() == whole


@pytest.mark.parametrize("damage", [
    b'{"key": "kX", "status": "ok", "res',               # half a record, then a newline
    b"\x00\x00\x00\x00\x00\x00",                          # zeros (a block lost in a crash)
    b'{"key": "kX", "status": "ok", "result": "\xff\xfe"}',  # bytes that are not UTF-8
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",                                         # valid JSON, but not a record
    b'"just a string"',
    b'{"no_key": 1}',
    b'{"key": "kX"}',                                     # a record without a status
    b'{"key": "kX", "status": "ok"}',                     # a success without its result
])
def test_damaged_line_in_the_middle_is_skipped(tmp_path, damage):
    path = tmp_path / "ledger.jsonl"
    fill(path, 2)
    with open(path, "ab") as handle:
        handle.write(damage + b"\n")
    with Ledger(path) as ledger:
        ledger.record_ok("k2", {"i": 2})
        ledger.record_failure("k3", "bad")
    before = path.read_bytes()
    with Ledger(path) as again:  # loads without an exception and loses none of the others
        assert len(again) == 3
        assert [again.result(f"k{i}") for i in range(3)] == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert again.failed_keys == {"k3"}
        assert not again.is_ok("kX") and again.result("kX") is None
    assert path.read_bytes() == before  # a whole damaged line is skipped, not cut out


def test_blank_lines_are_ignored(tmp_path):
    path = tmp_path / "ledger.jsonl"
    fill(path, 1)
    with open(path, "ab") as handle:
        handle.write(b"\n   \n")
    with Ledger(path) as ledger:
        ledger.record_ok("k1", {"i": 1})
    with Ledger(path) as again:
        assert len(again) == 2


# --- shards ----------------------------------------------------------------------------------


def test_also_read_sees_other_shards_and_never_writes_there(tmp_path):
    mine, other = tmp_path / "shard-0-of-2" / "ledger.jsonl", tmp_path / "shard-1-of-2" / "ledger.jsonl"
    with Ledger(other) as ledger:
        ledger.record_ok("theirs", {"text": "from shard 1"})
        ledger.record_failure("flaky", "HTTP 503")
        ledger.record_ok("both", {"text": "theirs"})
    other_bytes = other.read_bytes()
    with Ledger(mine, also_read=[other, mine, tmp_path / "shard-9-of-9" / "ledger.jsonl"]) as ledger:
        assert ledger.is_ok("theirs") and ledger.result("theirs") == {"text": "from shard 1"}
        assert ledger.failed_keys == {"flaky"}
        ledger.record_ok("flaky", {"text": "retried here"})
        ledger.record_failure("both", "a late failure does not undo their success")
        ledger.record_ok("mine", {"text": "mine"})
        assert ledger.failed_keys == set() and ledger.is_ok("both")
        assert len(ledger) == 4
    assert other.read_bytes() == other_bytes  # nothing written into the other shard's file
    assert not (tmp_path / "shard-9-of-9").exists()
    assert [r["key"] for r in lines(mine)] == ["flaky", "both", "mine"]
    with Ledger(other, also_read=[mine]) as theirs:  # and the other way round
        assert theirs.is_ok("mine") and theirs.is_ok("flaky") and theirs.failed_keys == set()
    assert [r["key"] for r in lines(mine)] == ["flaky", "both", "mine"]


def test_also_read_leaves_another_shards_torn_tail_alone(tmp_path):
    """Another shard may be in the middle of a write: reading its file must not cut it."""
    mine, other = tmp_path / "mine.jsonl", tmp_path / "other.jsonl"
    fill(other, 2)
    with open(other, "ab") as handle:
        handle.write(b'{"key": "k2", "sta')
    other_bytes = other.read_bytes()
    with Ledger(mine, also_read=[other]) as ledger:
        assert len(ledger) == 2 and not ledger.is_ok("k2")
    assert other.read_bytes() == other_bytes


# --- kill -9 with a real process -------------------------------------------------------------

CHILD = r"""
import random, sys
from pipeline.ledger import Ledger
path, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
ledger = Ledger(path)
print("ready", flush=True)
for i in range(10_000_000):
    # sizes from a few bytes to ~200 kB, so some writes take several system calls
    ledger.record_ok(f"k{i}", {"i": i, "pad": "x" * rng.choice([0, 10, 1000, 50_000, 200_000])})
"""


@pytest.mark.parametrize("attempt", range(5))
def test_kill_minus_9_while_appending(tmp_path, attempt):
    rng = random.Random(attempt)
    path = tmp_path / "ledger.jsonl"
    if attempt % 2:  # sometimes the child continues an existing ledger
        fill(path, 3)
    start = 3 if attempt % 2 else 0
    child = CHILD.replace('f"k{i}"', f'f"k{{i + {start}}}"').replace('{"i": i,', f'{{"i": i + {start},')
    proc = subprocess.Popen([sys.executable, "-c", child, str(path), str(attempt)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL  # it really died mid-run

    raw = path.read_bytes()
    complete = raw.count(b"\n")
    last_newline = raw.rfind(b"\n") + 1
    assert complete > start  # the child wrote something before it died
    with Ledger(path) as ledger:  # no exception
        assert len(ledger) == complete
        for i in (0, complete // 2, complete - 1):
            assert ledger.result(f"k{i}")["i"] == i
        assert not ledger.is_ok(f"k{complete}")
        assert path.stat().st_size == last_newline  # a torn tail is cut off, nothing else
        ledger.record_ok("after", {"ok": True})
    recs = lines(path)
    assert len(recs) == complete + 1
    assert [r["key"] for r in recs] == [f"k{i}" for i in range(complete)] + ["after"]
