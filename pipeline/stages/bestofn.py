"""Stage `bestofn`: best-of-n sampling against a reward model, reported as reward versus n.

For each of the first `bestofn.prompts` prompts of `inputs.eval_split` (default `test_gen` of the
`pairs` output; its `prompt` column, a list of chat turns or a plain string), the policy
(`model`) samples max(n_values) completions ONCE (seeded; pipeline.llm.hf does the batched,
left-padded generation with the policy's chat template). For every n the best of the FIRST n
samples is taken, so the curve is nested (best-of-2 can only improve on best-of-1) and the
same recipe gives the same numbers again.

The reward model (`bestofn.reward_model`) is a folder that AutoModelForSequenceClassification
loads with one label and a trained score head; a causal LM (no score head: loading would
initialise a random `score` layer) is a ConfigError, found before any sampling.

Tokenizers: the completions are scored as TEXT, re-rendered with the reward model's own
tokenizer and chat template, not as the policy's token ids. A reward model only means something
on the rendering it was trained on, and text is the one thing both models share whatever their
vocabularies, so a policy and a reward model from different families work. Where a mismatch does
matter, the reward model has no chat template to render the conversation with: ConfigError.

Outputs: `eval.json` (the table: n, mean reward of the best of n, and the mean over all samples),
`best.jsonl` (per prompt, the chosen completion for the largest n, with every sample's reward),
`report/bestofn.png`, `summary.json`, `config.yaml`, `_SUCCESS` last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import (
    ConfigError,
    LaunchSection,
    ModelRef,
    ModelSpec,
    RunSection,
    Strict,
    TrainInputs,
    local_paths,
    preference_defaults,
)
from pipeline.report import figure
from pipeline.runs import (
    RunOptions,
    StageFailed,
    atomic_write_text,
    clear_done,
    mark_done,
    resolve_input,
    resolve_model,
    save_config,
    stage_dir,
    write_json,
)
from pipeline.train import check_split, load_scorer, reward_scores


class BestOfNSection(Strict):
    reward_model: ModelRef | str
    n_values: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    prompts: int = Field(64, ge=1, description="Held-out prompts to sample for")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(8, ge=1, description="Sequences per generate() / reward model call")
    seed: int = 0

    @field_validator("n_values")
    @classmethod
    def _n_values(cls, value: list[int]) -> list[int]:
        if not value or any(n < 1 for n in value):
            raise ValueError("give one or more n, each at least 1")
        return sorted(set(value))


class Recipe(Strict):
    stage: Literal["bestofn"]
    run: RunSection
    model: ModelRef | str = Field(description="Policy that samples")
    inputs: TrainInputs
    bestofn: BestOfNSection
    launch: LaunchSection = LaunchSection()

    @model_validator(mode="before")
    @classmethod
    def _pairs_defaults(cls, tree: Any) -> Any:
        # Prompts come from the held-out generation split (one row per prompt) of the pairs output.
        return preference_defaults(tree, None, "test_gen")

    def input_files(self) -> list[tuple[str, str]]:
        return local_paths(model=self.model, **{"inputs.dataset": self.inputs.dataset,
                                                 "bestofn.reward_model": self.bestofn.reward_model})


REPORT = "report"


def _messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def load_prompts(path: Path, split: str | None, count: int) -> list[dict]:
    from datasets import DatasetDict

    from pipeline.hub import open_dataset

    if split is None:
        raise ConfigError("inputs.eval_split: bestofn samples for held-out prompts; name a split (e.g. test_gen)")
    try:
        data = open_dataset(path)
    except Exception as err:
        raise ConfigError(f"inputs.dataset: {path} is not a `datasets` folder ({type(err).__name__}: {err})") from None
    if not isinstance(data, DatasetDict) or split not in data:
        have = ", ".join(data) if isinstance(data, DatasetDict) else "a single Dataset"
        raise ConfigError(f"inputs.eval_split: split {split!r} is not in {path} (it has {have})")
    rows = data[split]
    if "prompt" not in rows.column_names:
        raise ConfigError(f"inputs.dataset: split {split!r} of {path} has no `prompt` column")
    if len(rows) == 0:
        raise ConfigError(f"inputs.dataset: split {split!r} of {path} is empty")
    rows = rows.select(range(min(count, len(rows))))
    ids = [c for c in ("prompt_id",) if c in rows.column_names]
    check_split(rows, path, split, "inputs.dataset", {"prompt": "chat", **{c: "text" for c in ids}}, unique=tuple(ids))
    ids = rows["prompt_id"] if "prompt_id" in rows.column_names else [str(i) for i in range(len(rows))]
    return [{"prompt_id": pid, "messages": _messages(p)} for pid, p in zip(ids, rows["prompt"])]


def sample(policy_path: Path, prompts: list[dict], per_prompt: int, recipe: Recipe) -> list[list[str]]:
    """`per_prompt` completions for each prompt; seeds are fixed per request, so reruns agree."""
    from pipeline.llm.base import GenRequest
    from pipeline.llm.hf import HFBackend

    cfg = recipe.bestofn
    backend = HFBackend(ModelSpec(name="policy", backend="hf", path=str(policy_path), batch_size=cfg.batch_size))
    params = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens}
    requests = [GenRequest(key=f"{i}:{k}", messages=tuple(p["messages"]),
                           params={**params, "seed": cfg.seed * 1_000_003 + i * per_prompt + k})
                for i, p in enumerate(prompts) for k in range(per_prompt)]
    texts: dict[str, str] = {}
    errors: list[str] = []
    try:
        backend.generate(requests, lambda req, res: texts.__setitem__(req.key, res.text),
                         lambda req, reason: errors.append(f"{req.key}: {reason}"))
    finally:
        backend.close()
    if errors:
        raise StageFailed(f"bestofn: {len(errors)} of {len(requests)} samples failed, first: {errors[0]}")
    return [[texts[f"{i}:{k}"] for k in range(per_prompt)] for i in range(len(prompts))]


def score(model, tokenizer, prompts: list[dict], completions: list[list[str]], batch_size: int) -> list[list[float]]:
    flat = [p["messages"] + [{"role": "assistant", "content": c}] for p, cs in zip(prompts, completions) for c in cs]
    values = iter(reward_scores(model, tokenizer, flat, batch_size))
    return [[next(values) for _ in cs] for cs in completions]


def best_of_n_table(rewards: list[list[float]], n_values: list[int]) -> list[dict]:
    """Mean over prompts of max(reward of the first n samples), for each n."""
    table = []
    for n in n_values:
        best = [max(r[:n]) for r in rewards]
        table.append({"n": n, "mean_best_reward": sum(best) / len(best)})
    return table


def plot_curve(table: list[dict], mean_reward: float, out: Path) -> Path:
    with figure(out, figsize=(6, 4)) as (_, ax):
        ax.plot([r["n"] for r in table], [r["mean_best_reward"] for r in table], "o-", label="best of n")
        ax.axhline(mean_reward, color="grey", linestyle="--", label="mean over all samples")
        ax.set_xscale("log", base=2)
        ax.set(title="best-of-n: reward of the kept sample", xlabel="n (samples per prompt)", ylabel="mean reward")
        ax.grid(alpha=0.3)
        ax.legend()
    return out


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    from transformers import AutoTokenizer

    cfg = recipe.bestofn
    # Everything is checked before anything is written or sampled.
    policy_path = resolve_model(recipe, recipe.model, "model")
    if not AutoTokenizer.from_pretrained(policy_path, local_files_only=True).chat_template:
        raise ConfigError(f"model: the tokenizer at {policy_path} has no chat template")
    data_path = resolve_input(recipe, recipe.inputs.dataset, "inputs.dataset")
    prompts = load_prompts(data_path, recipe.inputs.eval_split, cfg.prompts)
    rm_path = resolve_model(recipe, cfg.reward_model, "bestofn.reward_model")
    rm, rm_tokenizer = load_scorer(rm_path, "bestofn.reward_model")
    n_values = sorted(set([1, *cfg.n_values]))  # n=1 (plain sampling) is always the baseline
    per_prompt = n_values[-1]
    if opts.dry_run:
        plan = {"policy": str(policy_path), "reward_model": str(rm_path), "prompts": len(prompts),
                "samples": len(prompts) * per_prompt}
        print(f"bestofn (dry run): {plan}")
        return plan

    path = stage_dir(recipe)
    path.mkdir(parents=True, exist_ok=True)
    clear_done(path)
    save_config(path, recipe)
    started = time.time()

    completions = sample(policy_path, prompts, per_prompt, recipe)
    rewards = score(rm, rm_tokenizer, prompts, completions, cfg.batch_size)
    table = best_of_n_table(rewards, n_values)
    all_rewards = [v for r in rewards for v in r]
    mean_reward = sum(all_rewards) / len(all_rewards)

    lines = []
    for p, texts, r in zip(prompts, completions, rewards):
        k = max(range(per_prompt), key=r.__getitem__)
        lines.append(json.dumps({"prompt_id": p["prompt_id"], "prompt": p["messages"], "n": per_prompt,
                                 "best_index": k, "completion": texts[k], "reward": r[k], "rewards": r}))
    atomic_write_text(path / "best.jsonl", "".join(line + "\n" for line in lines))

    policy_vocab = AutoTokenizer.from_pretrained(policy_path, local_files_only=True).get_vocab()
    result = {
        "table": table, "mean_reward_all_samples": mean_reward, "prompts": len(prompts),
        "samples_per_prompt": per_prompt, "policy": str(policy_path), "reward_model": str(rm_path),
        # informational: scoring re-renders text, so differing vocabularies are allowed
        "same_vocab": policy_vocab == rm_tokenizer.get_vocab(),
    }
    write_json(path / "eval.json", result)
    plot = plot_curve(table, mean_reward, path / REPORT / "bestofn.png")
    summary = {**result, "split": recipe.inputs.eval_split, "temperature": cfg.temperature, "top_p": cfg.top_p,
               "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "report": str(plot),
               "seconds": round(time.time() - started, 1)}
    write_json(path / "summary.json", summary)
    mark_done(path, {"prompts": len(prompts), "samples_per_prompt": per_prompt})

    print(f"bestofn: {len(prompts)} prompts x {per_prompt} samples; mean reward of the kept sample:")
    print("     n  mean best reward")
    for row in table:
        print(f"{row['n']:>6}  {row['mean_best_reward']:>16.4f}")
    return summary
