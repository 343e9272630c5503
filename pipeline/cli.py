"""`rlhf <stage> RECIPE [key=value ...]`: the one entry point (also `python -m pipeline`).

Also `rlhf validate`, `rlhf status RUN`, `rlhf report RUN ...` (pipeline/run_report.py),
`rlhf push RUN STAGE --repo org/name` (pipeline/publish.py),
`rlhf all PIPELINE` (pipeline/launch/chain.py) and `rlhf serve` (pipeline/launch/serve.py). With
`launch.launcher=slurm` a stage is submitted (pipeline/launch/slurm.py), not run.

Exit codes: 0 done (or skipped: already done, or submitted), 1 the stage ran and failed (too many
failed requests, say), 2 bad input (recipe, data files, options), 75 stopped inside a Slurm job
to be requeued (pipeline/preempt.py), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError
from pipeline.runs import RunOptions
from pipeline.stages import STAGES, load_recipe


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf", description="Preference data and RLHF pipeline: run one stage from a YAML recipe.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES.values():
        p = sub.add_parser(stage.name, help=stage.help)
        p.add_argument("recipe", help="YAML recipe")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. generation.temperature=0.7 run.name=try2")
        p.add_argument("--force", action="store_true",
                       help="run even if the stage is marked done (the ledger still serves paid results)")
        if stage.sharded:
            p.add_argument("--shard", type=int, help="run only this shard (0-based); no merge")
            p.add_argument("--num-shards", type=int, help="number of shards (default: launch.num_shards)")
            p.add_argument("--merge", dest="merge_only", action="store_true", help="only merge finished shards")
        if stage.retry:
            p.add_argument("--retry-failed", action="store_true",
                           help="send again the requests the ledger records as failed" + (
                               " and give unusable answers new re-asks" if stage.name == "annotate" else ""))
        if stage.dry_run:
            p.add_argument("--dry-run", action="store_true",
                           help="check the inputs and print what would be done (calls, tokens, cost); change nothing")
        if stage.batch:
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
    u = sub.add_parser("push", help="publish a finished stage's model or dataset on the Hugging Face Hub, with a "
                       "generated card (token from HF_TOKEN)")
    u.add_argument("run", help="run name (a folder under --root)")
    u.add_argument("stage", help="the stage's folder in the run (its stage name, or its run.step)")
    u.add_argument("--repo", required=True, help="hub repo id to push to (org/name); created if missing")
    u.add_argument("--root", default="data/runs", help="folder holding the runs (default: data/runs)")
    u.add_argument("--output", choices=("model", "dataset", "critique"),
                   help="which output of the stage (default: model/ when the stage has one, else dataset/)")
    u.add_argument("--private", action="store_true", help="create the repo as private")
    u.add_argument("--dry-run", action="store_true",
                   help="write the card and the files to <stage>/push/ and list them; upload nothing, no token needed")
    a = sub.add_parser("all", help="run the stage recipes of a pipeline file in order, or submit them chained")
    a.add_argument("pipeline", help="pipeline YAML (a `stages:` list of recipes)")
    a.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every stage (run.name=...)")
    a.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: run here, in order; slurm: submit every stage, each after the one before")
    a.add_argument("--profile", help="Slurm profile (recipes/slurm/<name>.yaml) for every stage")
    a.add_argument("--force", action="store_true", help="run stages already done again (local launcher)")
    m = sub.add_parser("serve", help="submit vLLM servers (one Slurm job per model) that write their URLs to files")
    m.add_argument("recipe", help="serve recipe (e.g. recipes/slurm/serve/ultrafeedback-pool.yaml)")
    m.add_argument("--dry-run", action="store_true", help="render the scripts; submit nothing")
    return parser


def _options(args) -> RunOptions:
    """The stage's flags as one RunOptions (a flag the stage does not offer keeps its default)."""
    fields = RunOptions.__dataclass_fields__
    return RunOptions(**{name: getattr(args, name) for name in fields if getattr(args, name, None) is not None})


def _run_stage(args) -> int:
    from pipeline.launch import run_stage

    run_stage(args.command, args.recipe, args.overrides, _options(args))
    return 0


def _validate(args) -> int:
    """Check every recipe given, report each, and fail (exit 2) if any is bad."""
    bad = 0
    for recipe in args.recipes:
        try:
            from pipeline.launch import chain

            if chain.is_pipeline_file(recipe):  # a pipeline: each of its stage recipes
                chain.validate(recipe, check_inputs=not args.no_inputs)
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


def _push(args) -> int:
    from pipeline import publish

    return publish.main(args.run, args.stage, args.repo, root=args.root, output=args.output, private=args.private,
                        dry_run=args.dry_run)


def _serve(args) -> int:
    from pipeline.launch import serve

    return serve.main(args.recipe, dry_run=args.dry_run)


def _all(args) -> int:
    from pipeline.launch import chain

    return chain.run(args.pipeline, args.overrides, launcher=args.launcher, profile=args.profile, force=args.force)


def main(argv: list[str] | None = None) -> int:
    from pipeline.launch import setup_logging

    setup_logging()
    parser = _parser()
    # `key=value` overrides may come after options too (`rlhf sft r.yaml --force train.seed=1`):
    # argparse stops collecting positionals at the first option, so gather the rest here.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from pipeline.launch import exit_code

    commands = {"validate": _validate, "status": _status, "all": _all, "serve": _serve, "report": _report,
                "push": _push}
    return exit_code(lambda: commands.get(args.command, _run_stage)(args))

if __name__ == "__main__":
    sys.exit(main())
