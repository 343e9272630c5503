"""`rlhf <stage> RECIPE [key=value ...]`: the one entry point (also `python -m pipeline`).

Also `rlhf validate`, `rlhf status RUN`, `rlhf report RUN ...` (pipeline/run_report.py),
`rlhf all PIPELINE` (pipeline/launch/chain.py) and `rlhf serve` (pipeline/launch/serve.py). With
`launch.launcher=slurm` a stage is submitted (pipeline/launch/slurm.py), not run.

Exit codes: 0 done (or skipped: already done, or submitted), 1 the stage ran and failed (too many
failed requests, say), 2 bad input (recipe, data files, options), 75 stopped inside a Slurm job
to be requeued (pipeline/launch/preempt.py), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pipeline.config import STAGE_RECIPES, ConfigError, load_recipe

# Stage name -> module with `run(recipe, ...)`. Each is imported only when asked for, so the CLI
# starts fast and a job re-imports its stage by name.
STAGE_MODULES = {
    "tiny-models": "pipeline.stages.tiny_models",
    "prompts": "pipeline.stages.prompts",
    "generate": "pipeline.stages.generate",
    "annotate": "pipeline.stages.annotate",
    "pairs": "pipeline.stages.pairs",
    "sft": "pipeline.stages.sft",
    "reward": "pipeline.stages.reward",
    "dpo": "pipeline.stages.dpo",
    "ppo": "pipeline.stages.ppo",
    "bestofn": "pipeline.stages.bestofn",
    "critique": "pipeline.stages.critique",
    "qa-data": "pipeline.stages.qa_data",
    "rtuning-probe": "pipeline.stages.rtuning_probe",
    "rtuning-data": "pipeline.stages.rtuning_data",
    "rtuning-eval": "pipeline.stages.rtuning_eval",
    "unknown-eval": "pipeline.stages.unknown_eval",
    "sayself-sample": "pipeline.stages.sayself_sample",
    "sayself-cluster": "pipeline.stages.sayself_cluster",
    "sayself-rationale": "pipeline.stages.sayself_rationale",
    "sayself-data": "pipeline.stages.sayself_data",
    "sayself-rl": "pipeline.stages.sayself_rl",
    "sayself-eval": "pipeline.stages.sayself_eval",
}
SHARDED_STAGES = {"generate"}
# Unsharded stages with ledgered requests: `run(recipe, retry_failed=...)`.
RETRY_STAGES = {"sayself-sample", "sayself-rationale"}
# Training stages resume from checkpoints/ when they were interrupted; --force trains afresh.
TRAINING_STAGES = {"sft", "reward", "dpo", "ppo", "critique", "sayself-rl"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf", description="Preference data and RLHF pipeline: run one stage from a YAML recipe.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGE_MODULES:
        p = sub.add_parser(stage, help=f"run the {stage} stage")
        p.add_argument("recipe", help="YAML recipe")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. generation.temperature=0.7 run.name=try2")
        p.add_argument("--force", action="store_true",
                       help="run even if the stage is marked done (the ledger still serves paid results)")
        if stage in SHARDED_STAGES:
            p.add_argument("--shard", type=int, help="run only this shard (0-based); no merge")
            p.add_argument("--num-shards", type=int, help="number of shards (default: launch.num_shards)")
            p.add_argument("--merge", action="store_true", help="only merge finished shards")
            p.add_argument("--retry-failed", action="store_true",
                           help="send again the requests the ledger records as failed")
        if stage in RETRY_STAGES:
            p.add_argument("--retry-failed", action="store_true",
                           help="send again the requests the ledger records as failed")
        if stage == "annotate":
            p.add_argument("--retry-failed", action="store_true",
                           help="send failed requests again and give unusable answers new re-asks")
            p.add_argument("--dry-run", action="store_true",
                           help="print the calls, tokens and cost still to pay; send nothing")
            p.add_argument("--batch", choices=("submit", "collect"),
                           help="OpenAI Batch API: submit pending requests, or collect finished batches")
    v = sub.add_parser("validate", help="check recipes without running anything")
    v.add_argument("recipes", nargs="+", help="YAML recipes")
    v.add_argument("--no-inputs", action="store_true", help="do not check that input files exist")
    s = sub.add_parser("status", help="state of every stage (and shard) of a run, with Slurm jobs and failures")
    s.add_argument("run", help="run name (a folder under --root)")
    s.add_argument("--root", default="data/runs", help="folder holding the runs (default: data/runs)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    r = sub.add_parser("report", help="one page (REPORT.md and REPORT.html) with every stage's summary and plots")
    r.add_argument("runs", nargs="+", metavar="run", help="run names (folders under --root); the page goes in the first")
    r.add_argument("--root", default="data/runs", help="folder holding the runs (default: data/runs)")
    a = sub.add_parser("all", help="run the stage recipes of a pipeline file in order, or submit them chained")
    a.add_argument("pipeline", help="pipeline YAML (a `stages:` list of recipes)")
    a.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every stage (run.name=...)")
    a.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: run here, in order; slurm: submit every stage, each after the one before")
    a.add_argument("--profile", help="Slurm profile (recipes/slurm/<name>.yaml) for every stage")
    m = sub.add_parser("serve", help="submit vLLM servers (one Slurm job per model) that write their URLs to files")
    m.add_argument("recipe", help="serve recipe (e.g. recipes/slurm/serve/ultrafeedback-pool.yaml)")
    m.add_argument("--dry-run", action="store_true", help="render the scripts; submit nothing")
    return parser


def _run_stage(args) -> int:
    from pipeline.runs import clear_done, is_done, stage_dir

    recipe = load_recipe(args.recipe, args.overrides, stage=args.command)
    path = stage_dir(recipe)
    sharded = args.command in SHARDED_STAGES
    if sharded and args.num_shards is not None and args.num_shards < 1:
        raise ConfigError("--num-shards must be at least 1")
    retry = getattr(args, "retry_failed", False)
    if getattr(args, "dry_run", False):
        importlib.import_module(STAGE_MODULES[args.command]).run(recipe, dry=True)
        return 0
    if is_done(path) and not args.force and not retry and not getattr(args, "batch", None):
        print(f"{args.command}: already done ({path}/_SUCCESS); use --force to run it again")
        return 0
    if args.force:
        clear_done(path)
        for shard in path.glob("shard-*-of-*"):
            clear_done(shard)
        if args.command in TRAINING_STAGES and int(os.environ.get("RANK", "0")) == 0:
            import shutil

            from pipeline.train import CHECKPOINTS

            shutil.rmtree(path / CHECKPOINTS, ignore_errors=True)
    from pipeline.launch import preempt, slurm

    kind = "sharded" if sharded else "training" if args.command in TRAINING_STAGES else "data"
    slurm.check_launch(recipe, args.recipe, kind, TRAINING_STAGES)
    if recipe.launch.launcher == "slurm":  # submit the stage's jobs; each runs it with launcher=local
        job_args = (["--retry-failed"] if retry else []) + ([f"--batch {args.batch}"] if getattr(args, "batch", None) else [])
        slurm.submit_stage(recipe, args.recipe, kind, TRAINING_STAGES, job_args=job_args,
                           shard=getattr(args, "shard", None), num_shards=getattr(args, "num_shards", None),
                           merge_only=getattr(args, "merge", False), retry=retry)
        return 0
    preempt.install(training=kind == "training")
    from pipeline.launch.serve import resolve_url_files

    resolve_url_files(recipe)  # base_url_file -> base_url, now that the stage starts
    import datasets

    datasets.disable_progress_bars()  # "Saving the dataset" bars would bury the stage's own output
    module = importlib.import_module(STAGE_MODULES[args.command])
    if sharded:
        module.run(recipe, shard=args.shard, num_shards=args.num_shards, merge_only=args.merge,
                   retry_failed=args.retry_failed)
    elif args.command == "annotate":
        module.run(recipe, retry_failed=args.retry_failed, batch=args.batch)
    elif args.command in RETRY_STAGES:
        module.run(recipe, retry_failed=args.retry_failed)
    else:
        module.run(recipe)
    return 0


def _validate(args) -> int:
    """Check every recipe given, report each, and fail (exit 2) if any is bad."""
    bad = 0
    for recipe in args.recipes:
        try:
            from pipeline.launch import chain as run_all

            if run_all.is_pipeline_file(recipe):  # a pipeline: each of its stage recipes
                run_all.validate(recipe, check_inputs=not args.no_inputs)
            else:
                load_recipe(recipe, check_inputs=not args.no_inputs)
            print(f"ok     {recipe}")
        except ConfigError as err:
            bad += 1
            print(f"error: {err}", file=sys.stderr)
    if bad:
        print(f"{bad} of {len(args.recipes)} recipe(s) invalid", file=sys.stderr)
        return 2
    return 0


def _status(args) -> int:
    from pipeline import status

    return status.main(args.run, args.root, as_json=args.json)


def _report(args) -> int:
    from pipeline import run_report

    return run_report.main(args.runs, args.root)


def _serve(args) -> int:
    from pipeline.launch import serve

    return serve.main(args.recipe, dry_run=args.dry_run)


def _all(args) -> int:
    from pipeline.launch import chain as run_all

    return run_all.run(args.pipeline, args.overrides, launcher=args.launcher, profile=args.profile)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("RLHF_LOG", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpx2", "openai"):  # one INFO line per request drowns the progress bar
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = _parser()
    # `key=value` overrides may come after options too (`rlhf sft r.yaml --force train.seed=1`):
    # argparse stops collecting positionals at the first option, so gather the rest here.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    assert set(STAGE_MODULES) <= set(STAGE_RECIPES)
    from pipeline.launch.preempt import EXIT_CODE, Preempted
    from pipeline.runs import StageFailed

    try:
        return {"validate": _validate, "status": _status, "all": _all, "serve": _serve, "report": _report}.get(args.command, _run_stage)(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StageFailed as err:
        print(f"failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        return 130
    except Preempted as err:  # inside a Slurm job: the work is saved, the job requeues itself
        print(f"preempted: {err}", file=sys.stderr)
        return EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
