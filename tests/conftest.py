"""Shared fixtures. Tests never touch a hub: HF_HUB_OFFLINE is set before anything imports it."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


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
