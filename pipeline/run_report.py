"""`rlhf report RUN [RUN ...]`: one page gathering every stage's summary and plots.

Each run opens with what a reader wants first: a banner naming the models and the judge that
made its data (a stand-in, which is a fixed rule and not a model, is said to be one), a headline
table (per stage its state, the few numbers that matter, its time), the total cost and time,
the provenance of the code (commit, dirty tree, library versions), and example rows (a prompt
with its completions and ratings, a preference pair, a critique). Then, for each run (in the order given) and each stage folder in it, in pipeline order (the order of
`pipeline.stages.STAGES`; folders that are not stages come last): the stage's state as
`rlhf status` sees it (done / running / failed / missing, with the reason), its `summary.json`,
`eval.json` and `provenance.json` (git commit and dirty flag, library versions, Python, host: what
produced the outputs) flattened to tables, and the PNGs under its `report/` folder. Written as
`<root>/<first run>/REPORT.md` (images linked by relative path, so the page opens in any Markdown
viewer next to the run) and `REPORT.html` (the same content for a browser). Values are passed
through the recipe redaction, so a key that slipped into a summary is not repeated here.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import yaml

from pipeline.config import ConfigError, redact
from pipeline.report import why_empty
from pipeline.runs import PROVENANCE

SHOWN_FILES = ("summary.json", "eval.json", PROVENANCE)
MAX_LIST = 8  # longer lists are shown by their length: the page is an overview
MAX_ROWS = 60  # per summary file
EXAMPLE_CHARS = 280  # example texts are cut here: the page shows what the data looks like, not all of it

# The few numbers per stage a reader looks for first: (label, dotted key in summary.json). A stage
# not listed shows its first few top-level numbers.
HEADLINES = {
    "prompts": [("instructions kept", "kept"), ("read", "read")],
    "generate": [("completions", "completions"), ("failed", "failed_completions"), ("prompts", "prompts")],
    "annotate": [("completions annotated", "completions_annotated"), ("items failed", "items_failed"),
                 ("tokens", "tokens.total"), ("USD (all runs)", "cost_usd_all_runs")],
    "pairs": [("train pairs", "pairs_train"), ("test pairs", "pairs_test"), ("ties dropped", "ties_dropped")],
    "sft": [("train loss", "train_loss"), ("eval loss", "eval_loss"), ("steps", "steps")],
    "reward": [("held-out accuracy", "accuracy.overall"), ("steps", "global_step")],
    "dpo": [("eval reward accuracy", "eval.eval_rewards/accuracies"), ("train loss", "train_loss")],
    "ppo": [("algorithm", "algorithm"), ("RM score before", "reward_before"), ("after", "reward_after"),
            ("KL nats/token", "kl_per_token_after")],
    "bestofn": [("mean reward, all samples", "mean_reward_all_samples"), ("prompts", "prompts")],
    "critique": [("parse rate", "parse_rate"), ("Spearman", "spearman")],
}
SKIPPED_HEADLINE_KEYS = {"seed", "seconds", "train_seconds", "processes", "num_shards"}


def _flatten(tree, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(tree, dict):
        rows = []
        for key, value in tree.items():
            rows += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return rows
    if isinstance(tree, list):
        if len(tree) > MAX_LIST or any(isinstance(v, (dict, list)) for v in tree):
            return [(prefix, f"[{len(tree)} items]")]
        return [(prefix, ", ".join(_value(v) for v in tree))]
    return [(prefix, _value(tree))]


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _stage_order(path: Path) -> tuple[float, str]:
    """Table order of the folder's stage. A `run.step` folder (rtuning-sft: an sft) comes after the
    latest stage its inputs name (rtuning-data), else with its stage (read from its saved recipe)."""
    from pipeline.stages import STAGES

    order = list(STAGES)
    if path.name in order:
        return order.index(path.name), path.name
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict) or saved.get("stage") not in order:
        return len(order), path.name
    inputs = saved.get("inputs") if isinstance(saved.get("inputs"), dict) else {}
    after = [order.index(ref["stage"]) + 0.5 for ref in inputs.values()
             if isinstance(ref, dict) and ref.get("stage") in order]
    return max([order.index(saved["stage"]), *after]), path.name


def _summaries(path: Path) -> dict[str, list[tuple[str, str]]]:
    out = {}
    for name in SHOWN_FILES:
        file = path / name
        if not file.is_file():
            continue
        try:
            rows = _flatten(redact(json.loads(file.read_text())))
        except ValueError as err:
            rows = [("unreadable", f"{file}: {err}")]
        if len(rows) > MAX_ROWS:
            rows = rows[:MAX_ROWS] + [("…", f"{len(rows) - MAX_ROWS} more rows in {name}")]
        out[name] = rows
    return out


def _read_json(path: Path, redacted: bool = True) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return redact(data) if redacted else data


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def headline(stage: str, summary: dict) -> str:
    """`label value` pairs for the headline table (– when the stage has no summary yet)."""
    if not summary:
        return "–"
    # From the unredacted summary: a key named like kl_per_token_after is not a credential, and
    # only numbers and the listed keys are shown; a string value still goes through redact.
    if stage in HEADLINES:
        pairs = [(label, _lookup(summary, key)) for label, key in HEADLINES[stage]]
    else:
        pairs = [(k, v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and k not in SKIPPED_HEADLINE_KEYS][:4]
    pairs = [(label, v if isinstance(v, (int, float)) else redact(v)) for label, v in pairs]
    return ", ".join(f"{label} {_value(v)}" for label, v in pairs if v is not None) or "–"


def seconds_of(summary: dict) -> float | None:
    found = [summary[k] for k in ("seconds", "train_seconds") if isinstance(summary.get(k), (int, float))]
    return float(found[0]) if found else None


def is_standin(model: str | None) -> bool:
    return bool(model) and str(model).startswith("standin-")


def banner(run_dir: Path) -> list[str]:
    """Who made the data: the pool (generate's recipe) and the judge (annotate's summary)."""
    import yaml as _yaml

    lines = []
    try:
        generate = _yaml.safe_load((run_dir / "generate" / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, _yaml.YAMLError):
        generate = {}
    pool = ((generate.get("generation") or {}).get("pool") or []) if isinstance(generate, dict) else []
    if pool:
        shown = []
        for entry in pool:
            served = entry.get("path") if entry.get("backend") == "hf" else entry.get("model") or entry.get("name")
            label = f"{entry.get('name', '?')} ({entry.get('backend', '?')}: {served or '?'})"
            shown.append(label + (" – a stand-in, not a model" if is_standin(served) else ""))
        lines.append("Completions by: " + "; ".join(shown) + ".")
    judge = _read_json(run_dir / "annotate" / "summary.json").get("judge_model")
    if judge:
        lines.append(f"Judged by: {judge}" + (
            " – the stand-in server, a fixed rule and not a model: its ratings and critiques test the "
            "plumbing and say nothing about quality." if is_standin(judge) else "."))
    return lines


def _cut(text, limit: int = EXAMPLE_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _first_row(folder: Path, splits: tuple[str, ...] = ()):
    if not folder.exists():
        return None
    try:
        from datasets import load_from_disk

        data = load_from_disk(str(folder))
    except Exception:  # noqa: BLE001 - an example is optional; the tables above still stand
        return None
    if hasattr(data, "keys"):
        for split in [*splits, *data.keys()]:
            if split in data and len(data[split]):
                return data[split][0]
        return None
    return data[0] if len(data) else None


def _chat_text(messages) -> str:
    if isinstance(messages, list):
        return " / ".join(f"{m.get('role')}: {m.get('content')}" for m in messages if isinstance(m, dict))
    return str(messages)


def examples(run_dir: Path) -> list[tuple[str, list[str]]]:
    """(title, lines) for a judged prompt, a pair and a critique, where the run has them."""
    out = []
    row = _first_row(run_dir / "annotate" / "dataset")
    if row:
        lines = [f"Instruction ({row.get('source', '?')}): {_cut(row.get('instruction', ''))}"]
        for model, completion in zip(row.get("models") or [], row.get("completions") or []):
            ratings = {aspect: (a or {}).get("Rating") for aspect, a in (completion.get("annotations") or {}).items()}
            shown = ", ".join(f"{k} {v}" for k, v in ratings.items())
            lines.append(f"- {model}: overall {completion.get('overall_score', '-')}; {shown}; "
                         f"“{_cut(completion.get('response', ''), 160)}”")
        out.append(("A judged prompt (annotate)", lines))
    pair = _first_row(run_dir / "pairs" / "dataset", ("train_prefs",))
    if pair and "chosen" in pair:
        out.append(("A preference pair (pairs)", [
            f"Prompt: {_cut(_chat_text(pair.get('prompt')))}", f"Chosen: {_cut(_chat_text(pair.get('chosen')))}",
            f"Rejected: {_cut(_chat_text(pair.get('rejected')))}"]))
    critique = _first_row(run_dir / "pairs" / "critique", ("train",))
    if critique:
        text = critique.get("critique") or _chat_text(critique.get("messages", ""))
        out.append(("A critique (the judge's, as UltraCM learns it)", [
            f"Instruction: {_cut(critique.get('instruction', ''))}", f"Completion: {_cut(critique.get('completion', ''))}",
            f"Critique: {_cut(text)}"]))
    return out


def run_provenance(stages: list[dict]) -> list[str]:
    """The code behind the run: commits seen across its stages, dirty trees, library versions."""
    records = [_read_json(s["path"] / PROVENANCE) for s in stages]
    records = [r for r in records if r]
    if not records:
        return []
    commits = sorted({f"{(r.get('git') or {}).get('commit') or 'unknown'}"
                      f"{' (dirty tree)' if (r.get('git') or {}).get('dirty') else ''}" for r in records})
    newest = records[-1]
    versions = newest.get("versions") or newest.get("packages") or {}
    lines = [f"Code: {', '.join(commits)}" + (" – stages ran on different code" if len(commits) > 1 else "")]
    if isinstance(versions, dict) and versions:
        lines.append("Libraries: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    host = newest.get("host") or newest.get("hostname")
    if host:
        lines.append(f"Host: {host}" + (f", Python {newest['python']}" if newest.get("python") else ""))
    return lines


def collect(root: Path, runs: list[str]) -> list[dict]:
    """Per run: its stages in pipeline order with state, summaries and plots."""
    from pipeline import status

    out = []
    for run in runs:
        run_dir = root / run
        if not run_dir.is_dir():
            raise ConfigError(f"run {run!r}: no folder {run_dir}")
        states = {s["stage"]: s for s in status.collect(root, run)["stages"]}
        stages = []
        for name in sorted(states, key=lambda name: _stage_order(run_dir / name)):
            path = run_dir / name
            summary = _read_json(path / "summary.json", redacted=False)
            stages.append({"stage": name, "path": path, "state": states[name]["state"],
                           "detail": redact(states[name]["detail"]), "finished_at": states[name].get("finished_at"),
                           "summaries": _summaries(path), "plots": sorted((path / "report").glob("*.png")),
                           "headline": headline(stages_kind(path, name), summary), "seconds": seconds_of(summary),
                           "cost_usd": summary.get("cost_usd_all_runs") if isinstance(
                               summary.get("cost_usd_all_runs"), (int, float)) else None})
        costs = [s["cost_usd"] for s in stages if isinstance(s["cost_usd"], (int, float))]
        out.append({"run": run, "path": run_dir, "stages": stages, "banner": banner(run_dir),
                    "examples": examples(run_dir), "provenance": run_provenance(stages),
                    "seconds": sum(s["seconds"] or 0 for s in stages), "cost_usd": sum(costs) if costs else None})
    return out


def stages_kind(path: Path, name: str) -> str:
    """The stage a folder holds (a `run.step` folder such as rtuning-sft holds an sft)."""
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return name
    return saved.get("stage", name) if isinstance(saved, dict) else name


def _totals(run: dict) -> str:
    cost = "no paid calls recorded" if run["cost_usd"] is None else f"${run['cost_usd']:.4f} in judge calls (all runs)"
    return f"Total: {run['seconds'] / 60:.1f} min of stage time, {cost}."


def render_markdown(report: list[dict], page_dir: Path) -> str:
    lines = ["# Run report: " + ", ".join(r["run"] for r in report), ""]
    for run in report:
        lines += [f"## Run `{run['run']}`", ""]
        lines += [f"> {line}" for line in run["banner"]] + ([""] if run["banner"] else [])
        if not run["stages"]:
            lines += ["No stage folders yet.", ""]
        lines += ["| stage | state | headline | time (s) | finished |", "|---|---|---|---|---|"]
        lines += [f"| [{s['stage']}](#{run['run']}-{s['stage']}) | {s['state']} | {s['headline'].replace('|', '/')} | "
                  f"{_value(s['seconds'])} | {s['finished_at'] or '-'} |" for s in run["stages"]]
        lines += ["", _totals(run), ""]
        if run["provenance"]:
            lines += ["Provenance:", ""] + [f"- {line}" for line in run["provenance"]] + [""]
        for title, rows in run["examples"]:
            lines += [f"**Example: {title}**", ""] + [row if row.startswith("- ") else f"- {row}" for row in rows] + [""]
        for s in run["stages"]:
            lines += [f'<a id="{run["run"]}-{s["stage"]}"></a>', f"### {s['stage']} ({s['state']})", ""]
            if s["detail"]:
                lines += [f"> {s['detail']}", ""]
            for name, rows in s["summaries"].items():
                lines += [f"`{name}`", "", "| key | value |", "|---|---|"]
                lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in rows]
                lines.append("")
            for png in s["plots"]:
                lines += [f"![{s['stage']}: {png.stem}]({os.path.relpath(png, page_dir)})", ""]
                if why_empty(png):
                    lines += [f"*{png.stem} is empty: {why_empty(png)}*", ""]
    return "\n".join(lines)


def render_html(report: list[dict], page_dir: Path) -> str:
    e = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>Run report</title>",
             "<style>body{font-family:sans-serif;max-width:72em;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}img{max-width:100%}"
             ".banner{background:#fff4d6;padding:4px 8px}</style>",
             f"<h1>Run report: {e(', '.join(r['run'] for r in report))}</h1>"]
    for run in report:
        parts.append(f"<h2>Run <code>{e(run['run'])}</code></h2>")
        parts += [f"<p class='banner'>{e(line)}</p>" for line in run["banner"]]
        parts.append("<table><tr><th>stage<th>state<th>headline<th>time (s)<th>finished")
        parts += [f"<tr><td><a href='#{e(run['run'])}-{e(s['stage'])}'>{e(s['stage'])}</a><td>{e(s['state'])}"
                  f"<td>{e(s['headline'])}<td>{e(_value(s['seconds']))}<td>{e(s['finished_at'] or '-')}"
                  for s in run["stages"]]
        parts.append(f"</table><p>{e(_totals(run))}</p>")
        if run["provenance"]:
            parts.append("<ul>" + "".join(f"<li>{e(line)}" for line in run["provenance"]) + "</ul>")
        for title, rows in run["examples"]:
            parts.append(f"<p><b>Example: {e(title)}</b></p><ul>" + "".join(
                f"<li>{e(row.removeprefix('- '))}" for row in rows) + "</ul>")
        for s in run["stages"]:
            parts.append(f"<h3 id='{e(run['run'])}-{e(s['stage'])}'>{e(s['stage'])} ({e(s['state'])})</h3>")
            if s["detail"]:
                parts.append(f"<blockquote>{e(s['detail'])}</blockquote>")
            for name, rows in s["summaries"].items():
                parts.append(f"<p><code>{e(name)}</code></p><table>")
                parts += [f"<tr><td>{e(k)}<td>{e(v)}" for k, v in rows]
                parts.append("</table>")
            for png in s["plots"]:
                parts.append(f"<p><img src='{e(os.path.relpath(png, page_dir))}' alt='{e(png.stem)}'></p>")
                if why_empty(png):
                    parts.append(f"<p><i>{e(png.stem)} is empty: {e(why_empty(png))}</i></p>")
    return "\n".join(parts) + "\n"


def main(runs: list[str], root: str) -> int:
    from pipeline.runs import atomic_write_text

    root_path = Path(root)
    report = collect(root_path, runs)
    page_dir = root_path / runs[0]
    atomic_write_text(page_dir / "REPORT.md", render_markdown(report, page_dir))
    atomic_write_text(page_dir / "REPORT.html", render_html(report, page_dir))
    stages = sum(len(r["stages"]) for r in report)
    plots = sum(len(s["plots"]) for r in report for s in r["stages"])
    print(f"report: {len(report)} run(s), {stages} stages, {plots} plots -> {page_dir / 'REPORT.md'} "
          f"and {page_dir / 'REPORT.html'}")
    return 0
