"""A judge on several servers (pipeline.llm.fleet): three stand-ins, one killed mid-run; the
recipe keys that make a fleet and their errors; how the fleet picks and sets aside servers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import yaml
from datasets import load_from_disk
from helpers import standin_model, write_completion_sets, write_prompts, write_recipe

from pipeline.config import ConfigError
from pipeline.llm.fleet import Fleet
from pipeline.runs import RunOptions
from pipeline.stages import annotate, generate, load_recipe
from pipeline.standin import start_standin


def judge_recipe(tmp_path: Path, sets: Path, root: Path, **judge) -> Path:
    spec = {"name": "standin-judge", "backend": "openai", "max_concurrency": 6, "timeout_s": 10, "max_retries": 3,
            **judge}
    path = tmp_path / f"annotate-{len(list(tmp_path.glob('annotate-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"stage": "annotate", "run": {"name": "t", "root": str(root)},
                                    "inputs": {"completions": str(sets)}, "annotation": {"judge": spec}}))
    return path


def ok_records(stage: Path) -> list[dict]:
    return [rec for p in stage.glob("shard-*/ledger.jsonl") for line in p.read_text().splitlines()
            if line.strip() and (rec := json.loads(line))["status"] == "ok"]


@pytest.fixture
def three_standins(tmp_path):
    # 0.2 s an answer: longer than the moment between asking the doomed one what it received and killing it
    servers = [start_standin(tmp_path / f"standin-{i}", latency_s=0.2) for i in range(3)]
    yield servers
    for server in servers:
        server.stop()


def test_a_server_killed_mid_run_the_others_finish_and_counts_add_up(tmp_path, three_standins):
    sets = write_completion_sets(tmp_path / "sets.jsonl", 16)  # 16 rows x 6 requests
    root = tmp_path / "runs"
    urls = [s.base_url for s in three_standins]
    path = judge_recipe(tmp_path, sets, root, base_urls=urls, set_aside_after=2, set_aside_s=600)
    stage = root / "t" / "annotate"
    doomed = three_standins[1]
    seen_by_doomed: list[int] = []

    def kill_after_some_answers():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(ok_records(stage)) < 20:
            time.sleep(0.01)
        seen_by_doomed.append(doomed.stats()["requests_total"])  # what it got, as late as it can say
        doomed.process.kill()  # a crash: connections in flight are cut, new ones refused

    killer = threading.Thread(target=kill_after_some_answers)
    killer.start()
    summary = annotate.run(load_recipe(path), RunOptions())
    killer.join()
    assert doomed.process.poll() is not None, "the run ended before the server was killed"

    # every item annotated, each answer recorded once whichever server gave it
    rows = load_from_disk(str(stage / "dataset")).to_list()
    assert len(rows) == 16 and all(c["overall_score"] is not None for r in rows for c in r["completions"])
    assert summary["items_failed"] == 0 and summary["completions_annotated"] == 32
    keys = [r["key"] for r in ok_records(stage)]
    assert len(keys) == len(set(keys)) == 16 * 6

    # per-server counts: they add up to the requests sent; the live servers received exactly theirs
    counts = summary["servers_this_run"]
    assert list(counts) == urls
    assert sum(c["requests"] for c in counts.values()) == summary["requests_sent_this_run"]
    for server in (three_standins[0], three_standins[2]):
        assert counts[server.base_url]["requests"] == server.stats()["requests_total"] > 0
        assert counts[server.base_url]["failed"] == 0
    dead = counts[doomed.base_url]
    assert dead["failed"] >= 1 and dead["set_aside"] == 1  # set aside once, never back (600 s)
    # it said what it had received just before it died; the client sent those and, after, only
    # the failing ones that set it aside (each failed request was sent again elsewhere)
    assert seen_by_doomed[0] <= dead["requests"] <= seen_by_doomed[0] + dead["failed"]
    assert summary["requests_sent_this_run"] == 16 * 6 + dead["failed"]

    # the ledger keys name no server: the same run on another fleet replays all of it
    again = annotate.run(load_recipe(judge_recipe(tmp_path, sets, root, base_urls=urls[::2])), RunOptions())
    assert again["requests_sent_this_run"] == 0 and again["requests_replayed"] == 16 * 6
    assert load_from_disk(str(stage / "dataset")).to_list() == rows


def test_a_generate_pool_model_on_two_servers(tmp_path, three_standins):
    prompts = write_prompts(tmp_path / "prompts", 8)
    urls = [s.base_url for s in three_standins[:2]]
    pool = [{**standin_model(three_standins[0], "standin-strong"), "base_url": None, "base_urls": urls},
            standin_model(three_standins[2], "standin-weak")]
    summary = generate.run(load_recipe(write_recipe(tmp_path, pool, prompts)), RunOptions())
    assert summary["completions"] == 16 and summary["failed_completions"] == 0
    counts = summary["servers_per_model"]["standin-strong"]
    assert sum(c["requests"] for c in counts.values()) == 8
    assert [counts[s.base_url]["requests"] for s in three_standins[:2]] == [
        s.stats()["requests_total"] for s in three_standins[:2]]


# --- recipe keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("judge, message", [
    ({"base_url": "http://a/v1", "base_urls": ["http://b/v1"]}, r"base_urls: give one server as base_url"),
    ({"base_url": "http://a/v1", "base_url_file": ["a.url", "b.url"]}, r"base_url_file: a list of URL files"),
    ({"base_urls": ["http://a/v1"], "base_url_file": "a.url"}, r"base_url_file: one URL file names one server"),
    ({"base_urls": []}, r"annotation\.judge\.base_urls"),
])
def test_fleet_keys_that_conflict_are_named(tmp_path, judge, message):
    path = judge_recipe(tmp_path, write_completion_sets(tmp_path / "sets.jsonl", 1), tmp_path / "runs", **judge)
    with pytest.raises(ConfigError, match=message):
        load_recipe(path)


def test_url_files_make_a_fleet_of_the_servers_that_are_up(tmp_path, caplog):
    from pipeline.launch.serve import resolve_url_files

    (tmp_path / "a.url").write_text("http://a:8000/v1\n")
    (tmp_path / "c.url").write_text("http://c:8000/v1\n")
    files = [str(tmp_path / n) for n in ("a.url", "b.url", "c.url")]
    recipe = load_recipe(judge_recipe(tmp_path, write_completion_sets(tmp_path / "sets.jsonl", 1), tmp_path / "runs",
                                      base_url_file=files))
    resolve_url_files(recipe)
    assert recipe.annotation.judge.base_urls == ["http://a:8000/v1", "http://c:8000/v1"]
    assert "annotation.judge.base_url_file[1]" in caplog.text
    recipe = load_recipe(judge_recipe(tmp_path, write_completion_sets(tmp_path / "sets.jsonl", 1), tmp_path / "runs",
                                      base_url_file=[str(tmp_path / "b.url")]))
    with pytest.raises(ConfigError, match=r"annotation\.judge\.base_url_file: no server of the fleet is up"):
        resolve_url_files(recipe)


# --- how the fleet picks ----------------------------------------------------------------------


def _down(url):
    from pipeline.llm import transport

    return transport.APIConnectionError()


def test_least_loaded_first_a_failing_server_set_aside_then_tried_again():
    clock = [100.0]
    fleet = Fleet(["a", "b", "c"], set_aside_after=2, set_aside_s=5.0, clock=lambda: clock[0])
    for server in fleet.servers:
        server.client = server.url
    fleet.servers[0].in_flight, fleet.servers[1].in_flight = 2, 1
    assert fleet.pick().url == "c"  # the fewest in flight
    fleet.servers[0].in_flight = fleet.servers[1].in_flight = 0

    calls = []

    async def send(client):
        calls.append(client)
        if client == "a":
            raise _down(client)
        return client

    async def many(n):
        return [await fleet.call(send) for _ in range(n)]

    # "a" fails twice (each time the request moves on at once), is set aside, then gets nothing
    answers = asyncio.run(many(6))
    assert all(a in ("b", "c") for a in answers) and calls.count("a") == 2
    assert fleet.counts()["a"] == {"requests": 2, "failed": 2, "set_aside": 1}
    assert sum(c["requests"] for c in fleet.counts().values()) == len(calls)
    clock[0] += 6  # the cool-down is over: "a" is tried again, fails once, is set aside again
    calls.clear()
    asyncio.run(many(3))
    assert calls.count("a") == 1 and fleet.counts()["a"]["set_aside"] == 2

    # every server down: the error reaches the caller after one try on each
    async def all_down(client):
        raise _down(client)

    with pytest.raises(Exception, match="Connection error"):
        asyncio.run(fleet.call(all_down))
