"""Stage `critique`: an UltraCM-style critique model, i.e. SFT on the judge's critiques.

Input: the pairs stage's `critique` output (DatasetDict train/test; `messages` = a user turn that
asks for a critique of instruction + completion and the judge's answer "<critique>\\nOverall score: N",
plus `overall_score`). Training is the `sft` stage's (assistant-only loss). Evaluation: for up to
`critique.eval_items` held-out rows the trained model writes a critique greedily; the score is read
with the judge's own strict parser, and the parse rate plus the Spearman/Pearson correlation with
the judge's `overall_score` go to eval.json. Extra outputs: `eval_critiques.jsonl`,
`report/scores.png`.
"""

from __future__ import annotations

import json
import math
from typing import Literal

from pydantic import Field

from pipeline.config import (
    LaunchSection,
    ModelRef,
    ModelSpec,
    RunSection,
    Strict,
    TrainInputs,
    TrainSection,
    local_paths,
)
from pipeline.judge.parse import ParseError, parse_critique
from pipeline.report import figure
from pipeline.runs import RunOptions, atomic_write_text
from pipeline.train import MODEL, REPORT, check_inputs, finish, is_main_process, train_stage


class CritiqueSection(Strict):
    eval_items: int = Field(64, ge=1, description="Held-out critiques generated and scored in evaluation")
    max_new_tokens: int = Field(512, ge=1)
    batch_size: int = Field(8, ge=1, description="Prompts per generate() call in the evaluation")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Evaluation critiques never repeat an n-gram of "
                                      "this many tokens (0: off); a briefly tuned small model's greedy "
                                      "critiques otherwise loop on their first line")
    assistant_only_loss: bool = Field(True, description="Loss on the critique only (needs generation tags)")


class Recipe(Strict):
    stage: Literal["critique"]
    run: RunSection
    model: ModelRef | str = Field(description="Base model: a folder, or a stage's model ({stage: tiny-models, output: tiny-a})")
    inputs: TrainInputs
    train: TrainSection = TrainSection()
    critique: CritiqueSection = CritiqueSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return local_paths(model=self.model, **{"inputs.dataset": self.inputs.dataset})


def generate_critiques(model_dir, messages: list[list[dict]], max_new_tokens: int, batch_size: int,
                       dtype: str = "float32", no_repeat_ngram_size: int = 0) -> list[str]:
    """Greedy answers to the user turn(s) of each chat (the assistant turn is left out), from the
    hf backend (batched, left-padded, the model's chat template)."""
    from pipeline.llm.base import GenRequest, generate_all
    from pipeline.llm.hf import HFBackend

    backend = HFBackend(ModelSpec(name="critique", backend="hf", path=str(model_dir), batch_size=batch_size,
                                  dtype=dtype))
    params = {"temperature": 0.0, "max_new_tokens": max_new_tokens}
    if no_repeat_ngram_size:
        params["no_repeat_ngram_size"] = no_repeat_ngram_size
    requests = [GenRequest(key=str(i), messages=tuple(m for m in chat if m["role"] != "assistant"), params=params)
                for i, chat in enumerate(messages)]
    return generate_all(backend, requests, "critique: evaluation critiques")


def _correlation(fn, xs, ys):
    # Undefined with fewer than 3 points or a constant side: report None rather than nan.
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    value = float(fn(xs, ys)[0])
    return None if math.isnan(value) else value


def score_critiques(texts: list[str], judge_scores: list) -> dict:
    """Parse rate and correlations of parsed scores with the judge's; per-row records."""
    from scipy.stats import pearsonr, spearmanr

    rows, ours, theirs = [], [], []
    for text, judge in zip(texts, judge_scores):
        try:
            _, score = parse_critique(text, structured=False)
            error = None
        except ParseError as err:
            score, error = None, str(err)
        rows.append({"critique": text, "score": score, "judge_score": judge, "parse_error": error})
        if score is not None and judge is not None:
            ours.append(score)
            theirs.append(float(judge))
    parsed = sum(r["score"] is not None for r in rows)
    return {
        "items": len(rows),
        "parsed": parsed,
        "parse_rate": parsed / len(rows) if rows else 0.0,
        "spearman": _correlation(spearmanr, ours, theirs),
        "pearson": _correlation(pearsonr, ours, theirs),
        "rows": rows,
    }


def scatter_plot(rows: list[dict], out) -> None:
    pts = [(r["judge_score"], r["score"]) for r in rows if r["score"] is not None and r["judge_score"] is not None]
    with figure(out, figsize=(4.5, 4.5)) as (_, ax):
        if pts:
            ax.scatter(*zip(*pts), alpha=0.5)
        ax.plot([1, 10], [1, 10], "k:", linewidth=1)
        ax.set_xlim(0.5, 10.5)
        ax.set_ylim(0.5, 10.5)
        ax.set_xlabel("judge overall score")
        ax.set_ylabel("critique model score")
        ax.set_title(f"{len(pts)}/{len(rows)} critiques parsed")


def evaluate_model(model_dir, eval_ds, section) -> dict:
    import torch

    # bf16 on a GPU that has it: a 13B model in fp32 would barely fit on one card.
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    rows = eval_ds.select(range(min(section.eval_items, len(eval_ds))))
    judge = rows["overall_score"] if "overall_score" in rows.column_names else [None] * len(rows)
    texts = generate_critiques(model_dir, rows["messages"], section.max_new_tokens, section.batch_size,
                               "bfloat16" if bf16 else "float32", section.no_repeat_ngram_size)
    return score_critiques(texts, judge)


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    if opts.dry_run:
        plan = check_inputs(recipe, recipe.critique.assistant_only_loss)
        print(f"critique (dry run): {plan}")
        return plan
    path, trainer, _, eval_ds, summary, metrics = train_stage(recipe, recipe.critique.assistant_only_loss)
    if not is_main_process():
        return summary
    if eval_ds is not None:
        # The saved model (LoRA merged), as later users will load it.
        scored = evaluate_model(path / MODEL, eval_ds, recipe.critique)
        rows = scored.pop("rows")
        atomic_write_text(path / "eval_critiques.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        scatter_plot(rows, path / REPORT / "scores.png")
        metrics = {**metrics, **{f"critique_{k}": v for k, v in scored.items()}}
        summary.update({k: scored[k] for k in ("parse_rate", "spearman", "pearson")})
    finish(recipe, path, trainer, summary, metrics)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"critique: {summary['steps']} steps, eval loss {fmt(summary['eval_loss'])}, parse rate "
          f"{fmt(summary.get('parse_rate'))}, spearman {fmt(summary.get('spearman'))}, pearson "
          f"{fmt(summary.get('pearson'))}, {summary['seconds']}s -> {path / MODEL}")
    return summary
