"""`make demo`: the whole chain built so far, offline, on tiny models and the stand-in server.

Runs each demo recipe through the normal CLI (so a finished stage is skipped on a rerun) and
starts the stand-in server for the stages that call an OpenAI-compatible API. The stand-in is
not a real model: its outputs are labelled as such wherever they appear.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from pipeline.launch import run_stage_exit_code, setup_logging
from pipeline.runs import RunOptions


def rlhf(argv: list[str]) -> int:
    """One stage, as `rlhf STAGE RECIPE [key=value ...] [--force]` runs it (exit code)."""
    stage, recipe, *rest = argv
    overrides = [a for a in rest if a != "--force"]
    return run_stage_exit_code(stage, recipe, overrides, RunOptions(force="--force" in rest))

RECIPES = Path("recipes/demo")


def _show_rows(run_root: Path, run: str) -> None:
    from datasets import load_from_disk

    path = run_root / run / "generate" / "dataset"
    rows = load_from_disk(str(path))
    print(f"\nDemo output: {path}  ({len(rows)} rows; `datasets.load_from_disk` reads it)")
    for row in rows.select(range(min(2, len(rows)))):
        print(f"\n[{row['source']}] {row['instruction'][:100]}")
        for c in row["completions"]:
            label = " (stand-in server, not a real model)" if c["model"].startswith("standin") else ""
            print(f"  - {c['model']}{label} / {c['principle']}: {c['response'][:80]!r}")


def _show_judging(run_root: Path, run: str) -> None:
    import json

    annotate = run_root / run / "annotate"
    summary = json.loads((annotate / "summary.json").read_text())
    pairs = json.loads((run_root / run / "pairs" / "summary.json").read_text())
    print(f"\nJudge (the stand-in server's rule, not a model): {summary['completions_annotated']} completions, "
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

    print("\nTraining (tiny untrained models, a few steps each: plumbing, not quality):")
    reward = json.loads((run_root / run / "reward" / "eval.json").read_text())["accuracy"]
    print("  reward model, held-out pair accuracy: "
          + ", ".join(f"{name} {row['accuracy']:.3f} (n={row['pairs']})" for name, row in reward.items()))
    ppo = summary("ppo")
    print(f"  ppo: held-out reward {ppo['reward_before']} -> {ppo['reward_after']}, KL {ppo['kl_after']}; "
          f"curves {run_root / run / 'ppo' / 'report' / 'ppo_curves.png'}")
    table = json.loads((run_root / run / "bestofn" / "eval.json").read_text())
    print("  best-of-n mean reward: " + ", ".join(f"n={row['n']} {row['mean_best_reward']:.4f}"
                                                   for row in table["table"]))
    critique = summary("critique")
    print(f"  critique model: parse rate {critique.get('parse_rate')}, Spearman {critique.get('spearman')}")
    print(f"  outputs: {run_root / run}/{{sft,reward,dpo,ppo,bestofn,critique}}/ (model/, eval.json, report/)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo")
    parser.add_argument("--run", default="demo", help="run name (outputs under data/runs/<run>/)")
    parser.add_argument("--force", action="store_true", help="run every stage again")
    args = parser.parse_args(argv)
    setup_logging()
    common = [f"run.name={args.run}"] + (["--force"] if args.force else [])

    for stage in ("tiny-models", "prompts"):
        code = rlhf([stage, str(RECIPES / f"{stage}.yaml"), *common])
        if code:
            return code

    from pipeline.standin import start_standin

    models = f"data/runs/{args.run}/tiny-models"
    with tempfile.TemporaryDirectory() as tmp, start_standin(tmp) as standin:
        print(f"stand-in server (an offline stand-in for a real API) at {standin.base_url}")
        pool = [f"generation.pool.{i}.path={models}/tiny-{c}" for i, c in enumerate("abcd")]
        code = rlhf(["generate", str(RECIPES / "generate.yaml"), *common, *pool,
                     f"generation.pool.4.base_url={standin.base_url}"])
        if code:
            return code
        # The judge is the stand-in too: the base_url is not part of a request's ledger key, so
        # a rerun on another port still finds every answer already paid for.
        code = rlhf(["annotate", str(RECIPES / "annotate.yaml"), *common,
                     f"annotation.judge.base_url={standin.base_url}"])
        if code:
            return code
    # Training on tiny models: the numbers show that every stage runs end to end, not quality.
    for stage in ("pairs", "sft", "reward", "dpo", "ppo", "bestofn", "critique"):
        code = rlhf([stage, str(RECIPES / f"{stage}.yaml"), *common])
        if code:
            return code
    # R-Tuning and the unknown-question evaluation on QA items (samples + a synthetic fact world).
    rtuning_run = [f"run.name={args.run}-rtuning"] + (["--force"] if args.force else [])
    for stage, recipe, extra in (("qa-data", "qa-data", common), ("rtuning-probe", "rtuning-probe", common),
                                 ("rtuning-data", "rtuning-data", common),
                                 ("sft", "rtuning-sft", [*rtuning_run, f"inputs.dataset.run={args.run}",
                                                         f"model={models}/tiny-a"]),
                                 ("rtuning-eval", "rtuning-eval", [*rtuning_run, f"inputs.items.run={args.run}"]),
                                 ("unknown-eval", "unknown-eval", common)):
        code = rlhf([stage, str(RECIPES / f"{recipe}.yaml"), *extra])
        if code:
            return code
    # SaySelf: chains and rationales from the stand-in (a fixed rule: the untrained tiny model
    # writes no parsable answer), then SFT, RL and evaluation of the tiny model (plumbing only).
    sayself_run = [f"run.name={args.run}-sayself", f"inputs.items.run={args.run}"] + (["--force"] if args.force else [])
    with tempfile.TemporaryDirectory() as tmp, start_standin(tmp) as standin:
        for stage, extra in (("sayself-sample", [*common, f"model.base_url={standin.base_url}"]),
                             ("sayself-cluster", common),
                             ("sayself-rationale", [*common, f"rationale.judge.base_url={standin.base_url}"])):
            code = rlhf([stage, str(RECIPES / f"{stage}.yaml"), *extra])
            if code:
                return code
    for stage, recipe, extra in (("sayself-data", "sayself-data", common),
                                 ("sft", "sayself-sft", [f"run.name={args.run}-sayself", f"model={models}/tiny-a",
                                                         f"inputs.dataset.run={args.run}"]
                                  + (["--force"] if args.force else [])),
                                 ("sayself-rl", "sayself-rl", sayself_run),
                                 ("sayself-eval", "sayself-eval", sayself_run)):
        code = rlhf([stage, str(RECIPES / f"{recipe}.yaml"), *extra])
        if code:
            return code
    _show_rows(Path("data/runs"), args.run)
    _show_judging(Path("data/runs"), args.run)
    _show_training(Path("data/runs"), args.run)
    print(f"R-Tuning: {Path('data/runs') / (args.run + '-rtuning') / 'rtuning-eval' / 'eval.json'}; "
          f"unknown-eval: {Path('data/runs') / args.run / 'unknown-eval' / 'summary.json'}; "
          f"SaySelf: {Path('data/runs') / (args.run + '-sayself') / 'sayself-eval' / 'eval.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
