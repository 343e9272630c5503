"""The Makefile is the interface: every stage of the STAGES table has a `make` target that `make help`
lists and that hands RECIPE= on to the stage; the two method chains take RECIPE= as their pipeline file.
Only `make -n` (print, run nothing) and `make help` are run here."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args: str) -> str:
    # The variables a caller's environment may set are fixed here, so the commands are the plain ones.
    fixed = ["RUN=t", "LAUNCHER=local", "ACCELERATE=", "ARGS="]
    done = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args, *fixed], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_help_lists_a_target_for_every_stage():
    listed = set(re.findall(r"^  make (\S+)", make("help"), re.MULTILINE))
    missing = sorted(set(STAGES) - listed)
    assert not missing, f"stages without a make target: {missing}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_target_passes_recipe_on(stage):
    out = make("-n", stage, "RECIPE=x.yaml")
    # the stage's own command, in this shell or under accelerate launch, with x.yaml as its recipe
    assert re.search(rf"-m pipeline {re.escape(stage)} x\.yaml run\.name=t", out), out


@pytest.mark.parametrize("chain", ["rtuning", "sayself"])
def test_the_method_chains_take_recipe_as_their_pipeline_file(chain):
    assert "--pipeline x.yaml --run t" in make("-n", chain, "RECIPE=x.yaml")
    assert f"--pipeline recipes/pipelines/demo-{chain}.yaml --run t" in make("-n", chain)
    assert (ROOT / f"recipes/pipelines/demo-{chain}.yaml").is_file()


def test_every_default_recipe_a_target_names_exists():
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    defaults = re.findall(r"\$\(or \$\(RECIPE\),([^)]+)\)", text)
    assert defaults and all((ROOT / path).is_file() for path in defaults), defaults
