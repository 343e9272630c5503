"""`make demo` (and `make rtuning`, `make sayself`): a pipeline file of demo recipes, offline, on
tiny models and the stand-in server.

The chain itself is the pipeline file (`recipes/pipelines/demo.yaml` and the files it includes),
run by `rlhf all` (so a finished stage is skipped on a rerun). This module only starts the
stand-in server, which writes its URL to `data/runs/standin.url` for the recipes that name it as
`base_url_file`, and prints a summary of what the run holds. The stand-in is not a real model:
its outputs are labelled as such wherever they appear.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from pipeline.launch import chain, exit_code, setup_logging
from pipeline.stages import load_recipe

PIPELINE = "recipes/pipelines/demo.yaml"  # on SmolLM2; demo-tiny.yaml: the tiny models
STANDIN_URL_FILE = "data/runs/standin.url"  # the demo recipes' `base_url_file` for the stand-in
SERVED_URL_FILE = "data/runs/smollm2.url"  # ... and for SmolLM2 behind transformers serve

def _show_rows(run_root: Path, run: str) -> None:
    from datasets import load_from_disk

    path = run_root / run / "generate" / "dataset"
    rows = load_from_disk(str(path))
    print(f"\nDemo output: {path}  ({len(rows)} rows; `datasets.load_from_disk` reads it)")
    for row in rows.select(range(min(2, len(rows)))):
        print(f"\n[{row['source']}] {row['instruction'][:100]}")
        for c in row["completions"]:
            print(f"  - {c['model']}{_who(c['model'])} / {c['principle']}: {c['response'][:80]!r}")


def _who(model: str) -> str:
    """Which kind of model a pool name is, in words, so nobody mistakes noise for a model's answer."""
    if model.startswith("standin"):
        return " (stand-in server: a rule, NOT a model)"
    if model.startswith("tiny-"):
        return " (tiny untrained model: noise on purpose)"
    if model.endswith("-served"):
        return " (SmolLM2-135M-Instruct behind transformers serve)"
    if model.startswith("smollm2"):
        return " (SmolLM2-135M-Instruct, in process)"
    return ""


def _show_judging(run_root: Path, run: str) -> None:
    import json

    annotate = run_root / run / "annotate"
    summary = json.loads((annotate / "summary.json").read_text())
    pairs = json.loads((run_root / run / "pairs" / "summary.json").read_text())
    judge = summary["judge_model"] + (" (the stand-in server's rule, NOT a model)" if "standin" in summary["judge_model"] else "")
    print(f"\nJudge {judge}: {summary['completions_annotated']} completions, "
          f"{summary['tokens']['total']:,} tokens, ${summary['cost_usd_all_runs'] or 0:.4f} at the recipe's "
          "illustrative price")
    print(f"  report: {annotate / 'report'} ({', '.join(summary['report']['plots'])})")
    out = run_root / run / "pairs"
    print(f"Pairs ({pairs['strategy']} on {pairs['score_source']}): {pairs['pairs_train']} train + "
          f"{pairs['pairs_test']} test pairs from {pairs['rows_with_pairs']} of {pairs['rows_read']} prompts "
          f"({pairs['rows_dropped']['tied']} tied), mean margin {pairs['margin']['mean']:.3f}")
    print(f"  dataset: {out / 'dataset'} (TRL RewardTrainer/DPOTrainer read train_prefs as is)")
    if pairs.get("critique"):
        print(f"  critique SFT data: {out / 'critique'} ({pairs['critique']['train']} train rows)")
    print(f"  report: {out / 'report' / 'margins.png'}; counts: {out / 'summary.json'}")


def _show_training(run_root: Path, run: str) -> None:
    import json

    def summary(stage: str) -> dict:
        return json.loads((run_root / run / stage / "summary.json").read_text())

    base = summary("reward").get("model", "")
    real = "real-models" in base
    print("\nTraining from " + ("SmolLM2-135M-Instruct, a few LoRA steps each: the loop on a real model, too short and "
                              "too small to show quality" if real else "tiny untrained models, a few steps each: "
                              "plumbing, not quality") + ":")
    reward = json.loads((run_root / run / "reward" / "eval.json").read_text())["accuracy"]
    overall = reward.get("overall", {})
    few = " (too few pairs for the figure to mean much)" if overall.get("pairs", 0) < 50 else ""
    print(f"  reward model, held-out pair accuracy {overall.get('accuracy', 0):.3f} on {overall.get('pairs', 0)} "
          f"pairs{few}")
    ppo = summary("ppo")
    kl_text = (f"KL to the start policy {ppo['kl_per_token_after']} nats/token, entropy "
               f"{ppo['entropy_per_token_before']} -> {ppo['entropy_per_token_after']} nats/token")
    print(f"  ppo: mean held-out reward {ppo['reward_before']} -> {ppo['reward_after']} over {ppo['eval_prompts']} "
          f"prompts, {kl_text}; curves {run_root / run / 'ppo' / 'report' / 'ppo_curves.png'}")
    table = json.loads((run_root / run / "bestofn" / "eval.json").read_text())
    print("  best-of-n mean reward of the pick: " + ", ".join(f"n={row['n']} {row['mean_best_reward']:.4f}"
                                                              for row in table["table"]))
    critique = summary("critique")
    rate, rho = critique.get("parse_rate"), critique.get("spearman")
    rate_text = ("no critique ended with a parsable overall score" if not rate
                 else f"{rate:.0%} of critiques ended with a parsable score")
    rho_text = (f"Spearman {rho:.2f} with the judge's scores" if isinstance(rho, (int, float))
                else "no rank correlation (it needs at least two parsed scores that differ)")
    print(f"  critique model: {rate_text}; {rho_text}")
    print(f"  outputs: {run_root / run}/{{sft,reward,dpo,ppo,bestofn,critique}}/ (model/, eval.json, report/)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo")
    parser.add_argument("--run", default="demo", help="run name (outputs under data/runs/<run>/)")
    parser.add_argument("--pipeline", default=PIPELINE, help=f"pipeline file to run (default {PIPELINE})")
    parser.add_argument("--force", action="store_true", help="run every stage again")
    args = parser.parse_args(argv)
    setup_logging()
    started = time.monotonic()
    overrides = [f"run.name={args.run}"]
    with contextlib.ExitStack() as servers:
        tmp = servers.enter_context(tempfile.TemporaryDirectory())
        from pipeline.standin import start_standin

        standin = servers.enter_context(start_standin(tmp, url_file=STANDIN_URL_FILE))
        print(f"stand-in server (an offline stand-in for a real API, NOT a model) at {standin.base_url}")
        # The URL is not part of a request's ledger key, so a rerun on another port still finds
        # every answer already paid for.
        real = _real_models_step(args.pipeline, overrides)
        if real is not None:  # the real model first: transformers serve needs its folder
            code = exit_code(lambda: chain.run_steps([real], overrides, force=args.force))
            if code:
                return code
            from pipeline.launch.local_servers import transformers_serve
            from pipeline.runs import stage_dir

            recipe = load_recipe(real.recipe, [*real.overrides, *overrides], check_inputs=False)
            folder = stage_dir(recipe) / recipe.models[0]
            url = servers.enter_context(transformers_serve(folder, tmp, url_file=SERVED_URL_FILE))
            print(f"transformers serve (a real server, not ours) serving {folder} at {url}")
        code = exit_code(lambda: chain.run(args.pipeline, overrides, force=args.force))
    if code:
        return code
    _summary(Path("data/runs"), args.run)
    _timings(Path("data/runs") / args.run, time.time() - (time.monotonic() - started))
    print(f"demo: {time.monotonic() - started:.0f} s")
    return 0


def _timings(run_dir: Path, started_at: float) -> None:
    """Seconds per stage run by this demo: the gap between one stage's `_SUCCESS` and the one before."""
    done = sorted((p.stat().st_mtime, p.parent.name) for p in run_dir.glob("*/_SUCCESS")
                  if p.stat().st_mtime >= started_at)
    previous, parts = started_at, []
    for finished, name in done:
        parts.append(f"{name} {finished - previous:.0f}")
        previous = finished
    if parts:
        print("time by stage (s): " + ", ".join(parts))


def _real_models_step(pipeline: str, overrides: list[str]):
    """The pipeline's `real-models` step, if it has one."""
    for step in chain.load_pipeline(pipeline).stages:
        if load_recipe(step.recipe, [*step.overrides, *overrides], check_inputs=False).stage == "real-models":
            return step
    return None


def _summary(runs: Path, run: str) -> None:
    """What the run holds, part by part (each part only when its stages ran)."""
    done = {p.parent.name for p in (runs / run).glob("*/_SUCCESS")}
    if {"generate", "annotate", "pairs"} <= done:
        _show_rows(runs, run)
        _show_judging(runs, run)
    if {"reward", "ppo", "bestofn", "critique"} <= done:
        _show_training(runs, run)
    if "evaluate" in done:
        table = runs / run / "evaluate" / "report" / "table.md"
        print(f"\nEvaluation of the trained policies ({table.parent.parent / 'summary.json'}; "
              "the judge's grades are the stand-in's fixed rule unless the recipe names a real judge):")
        print(table.read_text().rstrip())
    if done & {"rtuning-eval", "unknown-eval", "sayself-eval"}:
        _show_methods(runs / run, done)
    print(f"one page for all of it: make report RUN={run}")


def _num(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _show_methods(run_dir: Path, done: set[str]) -> None:
    """R-Tuning, UnknownBench-style and SaySelf figures of the demo's short runs."""
    import json

    print("\nMethod stages, SHORT RUNS (a few LoRA steps on a few dozen questions): smoke figures, not the "
          "methods' effects;\n  the method checks on SmolLM2 are tests/integration/test_smollm2_*.py (README, "
          "'Method checks on SmolLM2'):")
    if "rtuning-eval" in done:
        splits = json.loads((run_dir / "rtuning-eval" / "eval.json").read_text())["splits"]
        print("  R-Tuning: " + "; ".join(
            f"{name} refusal {_num(r.get('refusal_rate'))}" if name == "unanswerable" else
            f"{name} acc {_num(r.get('accuracy'))} AP {_num(r.get('ap'))} ECE {_num(r.get('ece'))}"
            for name, r in splits.items()) + f"  ({run_dir / 'rtuning-eval' / 'eval.json'})")
    if "unknown-eval" in done:
        models = json.loads((run_dir / "unknown-eval" / "summary.json").read_text())["models"]
        for model, entry in models.items():
            groups = {g: m for g, m in entry["groups"].items() if m["items"]}
            print(f"  unknown-eval {model}: " + "; ".join(
                f"{g} ({m['items']}) refusal {_num(m['refusal_rate'])}, confidence {_num(m['mean_confidence'])}/10"
                for g, m in groups.items()))
    if "sayself-eval" in done:
        splits = json.loads((run_dir / "sayself-eval" / "eval.json").read_text())["splits"]
        print("  SaySelf: " + "; ".join(
            (f"{name} stated confidence {_num(r['all'].get('mean_confidence'))}/10" if name == "unanswerable" else
             f"{name} acc {_num(r['all'].get('accuracy'))} parsed {_num(r['all'].get('parse_rate'))} "
             f"ECE {_num(r['all'].get('ece'))} AUROC {_num(r['all'].get('auroc'))}")
            for name, r in splits.items() if "all" in r) + f"  ({run_dir / 'sayself-eval' / 'eval.json'})")


if __name__ == "__main__":
    sys.exit(main())
