"""provenance.json: every stage folder says which commit (and whether the tree was dirty), which
library versions, Python and host produced it; the run report shows it; nothing secret is in it."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from pipeline import runs
from pipeline.cli import main
from pipeline.runs import PROVENANCE, PROVENANCE_PACKAGES, mark_done, provenance, save_config
from pipeline.stages import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid",
                           *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    git(path, "init", "-q")
    (path / "module.py").write_text("x = 1\n")
    git(path, "add", "module.py")
    git(path, "commit", "-q", "-m", "first")
    return path


def test_a_stage_run_records_the_projects_commit_and_versions(tmp_path):
    from pipeline.stages import prompts

    recipe = load_recipe(ROOT / "recipes/demo-tiny/prompts.yaml", [f"run.root={tmp_path}"])
    prompts.run(recipe)
    saved = json.loads((tmp_path / "demo-tiny" / "prompts" / PROVENANCE).read_text())
    # The stage writes it beside config.yaml; the commit is the checkout the code was imported from.
    assert (tmp_path / "demo-tiny" / "prompts" / "config.yaml").is_file()
    assert saved["git"]["commit"] == git(ROOT, "rev-parse", "HEAD")
    assert saved["git"]["dirty"] == bool(git(ROOT, "status", "--porcelain"))
    assert set(saved["packages"]) == set(PROVENANCE_PACKAGES)
    for name in PROVENANCE_PACKAGES:
        try:
            assert saved["packages"][name] == metadata.version(name)
        except metadata.PackageNotFoundError:
            assert saved["packages"][name] is None
    assert saved["python"] == platform.python_version() and saved["host"] == socket.gethostname()


def test_the_dirty_flag_follows_uncommitted_changes(repo):
    clean = provenance(repo)["git"]
    assert clean == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False, "note": None}
    (repo / "module.py").write_text("x = 2\n")  # an edit to a tracked file
    assert provenance(repo)["git"]["dirty"] is True
    git(repo, "commit", "-q", "-am", "second")
    after = provenance(repo)["git"]
    assert after["dirty"] is False and after["commit"] == git(repo, "rev-parse", "HEAD") != clean["commit"]
    (repo / "new_module.py").write_text("y = 1\n")  # an untracked file git does not ignore
    assert provenance(repo)["git"]["dirty"] is True


def test_no_repository_or_no_git_is_said_not_fatal(tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git must not find a repo above
    state = provenance(plain)["git"]
    assert state["commit"] is None and state["dirty"] is None and "not a git repository" in state["note"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    state = provenance(plain)["git"]
    assert state["commit"] is None and "git not found" in state["note"]


def test_report_shows_provenance_per_stage_and_nothing_secret(repo, tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "PROJECT_ROOT", repo)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-provenancetestsecret123")
    recipe = load_recipe(ROOT / "recipes/demo-tiny/prompts.yaml",
                         [f"run.root={tmp_path / 'runs'}", "run.name=r"])
    out = tmp_path / "runs" / "r" / "prompts"
    out.mkdir(parents=True)
    save_config(out, recipe)
    mark_done(out)
    text = (out / PROVENANCE).read_text()
    assert "sk-provenance" not in text and "OPENAI_API_KEY" not in text
    commit = git(repo, "rev-parse", "HEAD")
    assert main(["report", "r", "--root", str(tmp_path / "runs")]) == 0
    page = (tmp_path / "runs" / "r" / "REPORT.md").read_text()
    assert "`provenance.json`" in page and f"| git.commit | {commit} |" in page
    assert "| git.dirty | False |" in page and f"| host | {socket.gethostname()} |" in page
    assert "| packages.trl |" in page and "| packages.torch |" in page
    assert commit in (tmp_path / "runs" / "r" / "REPORT.html").read_text()
