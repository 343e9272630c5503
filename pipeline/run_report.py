"""`rlhf report RUN [RUN ...]`: one page gathering every stage's summary and plots.

For each run (in the order given) and each stage folder in it, in pipeline order (the order of
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
from pipeline.runs import PROVENANCE

SHOWN_FILES = ("summary.json", "eval.json", PROVENANCE)
MAX_LIST = 8  # longer lists are shown by their length: the page is an overview
MAX_ROWS = 60  # per summary file


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
            stages.append({"stage": name, "path": path, "state": states[name]["state"],
                           "detail": redact(states[name]["detail"]), "finished_at": states[name].get("finished_at"),
                           "summaries": _summaries(path), "plots": sorted((path / "report").glob("*.png"))})
        out.append({"run": run, "path": run_dir, "stages": stages})
    return out


def render_markdown(report: list[dict], page_dir: Path) -> str:
    lines = ["# Run report: " + ", ".join(r["run"] for r in report), ""]
    for run in report:
        lines += [f"## Run `{run['run']}`", ""]
        if not run["stages"]:
            lines += ["No stage folders yet.", ""]
        lines += ["| stage | state | finished |", "|---|---|---|"]
        lines += [f"| [{s['stage']}](#{run['run']}-{s['stage']}) | {s['state']} | {s['finished_at'] or '-'} |"
                  for s in run["stages"]]
        lines.append("")
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
    return "\n".join(lines)


def render_html(report: list[dict], page_dir: Path) -> str:
    e = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>Run report</title>",
             "<style>body{font-family:sans-serif;max-width:72em;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}img{max-width:100%}</style>",
             f"<h1>Run report: {e(', '.join(r['run'] for r in report))}</h1>"]
    for run in report:
        parts.append(f"<h2>Run <code>{e(run['run'])}</code></h2><table><tr><th>stage<th>state<th>finished")
        parts += [f"<tr><td><a href='#{e(run['run'])}-{e(s['stage'])}'>{e(s['stage'])}</a><td>{e(s['state'])}"
                  f"<td>{e(s['finished_at'] or '-')}" for s in run["stages"]]
        parts.append("</table>")
        for s in run["stages"]:
            parts.append(f"<h3 id='{e(run['run'])}-{e(s['stage'])}'>{e(s['stage'])} ({e(s['state'])})</h3>")
            if s["detail"]:
                parts.append(f"<blockquote>{e(s['detail'])}</blockquote>")
            for name, rows in s["summaries"].items():
                parts.append(f"<p><code>{e(name)}</code></p><table>")
                parts += [f"<tr><td>{e(k)}<td>{e(v)}" for k, v in rows]
                parts.append("</table>")
            parts += [f"<p><img src='{e(os.path.relpath(png, page_dir))}' alt='{e(png.stem)}'></p>"
                      for png in s["plots"]]
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
