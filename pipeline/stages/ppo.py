"""Stage `ppo`: PPO of a policy against our reward model (trl.experimental.ppo, TRL 1.12).

Reads: `model` (the starting policy, usually the sft stage's model), `ppo.reward_model` (the
reward stage's model, a sequence classifier with a score head; the value model starts from it,
as in UltraLM-PPO), `inputs.dataset` (prompts: the `prompt` column of the pairs output, a list of
chat messages; default splits train_gen / test_gen in the recipes).

Batches. In TRL 1.12's PPOTrainer the optimizer steps once per rollout batch and PPO epoch
(its `num_mini_batches` only splits the gradient accumulation), so a "mini-batch" that updates
the policy is a rollout batch there. We therefore roll out `ppo.mini_batch_size` responses at a
time (gradient accumulation = mini-batch / (processes x per-device batch)) and take
`ppo.ppo_epochs` steps on each; `ppo.samples_per_iteration` x `ppo.iterations` is the number of
episodes. With the paper's 512 samples and mini-batch 64 this keeps 8 policy updates per 512
samples per epoch, with each 64 rolled out by the latest policy rather than all 512 at once.

Writes: `model/` (the policy), `eval.json` (mean reward of sampled responses on held-out prompts
before and after, the KL to the starting policy on those samples), `summary.json`,
`report/ppo_curves.png` (reward, KL and entropy per iteration, from TRL's logs). The held-out KL
and entropy are exact (from the full next-token distributions), in nats per response token, `_SUCCESS` last.
TRL's PPOTrainer has no resume-from-checkpoint; a killed run starts again.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.config import (
    ConfigError,
    LaunchSection,
    ModelRef,
    RunSection,
    Strict,
    TrainInputs,
    TrainSection,
    local_paths,
)
from pipeline.report import figure
from pipeline.runs import (
    RunOptions,
    clear_done,
    mark_done,
    resolve_input,
    resolve_model,
    save_config,
    stage_dir,
    write_json,
)
from pipeline.train import (
    check_split,
    guard_finite_loss,
    is_main_process,
    load_reward_model,
    lora_config,
    save_model,
    seed_all,
    trl_config,
    world_size,
)


class PpoSection(Strict):
    reward_model: ModelRef | str = Field(description="The reward stage's model (its value head starts from it)")
    samples_per_iteration: int = Field(512, ge=1, description="Rollouts per PPO iteration (TRL batch_size)")
    mini_batch_size: int = Field(64, ge=1)
    iterations: int = Field(80, ge=1)
    ppo_epochs: int = Field(4, ge=1)
    kl_coef: float = Field(0.05, ge=0)
    kl_estimator: Literal["k3", "k1"] = Field(
        "k3", description="TRL's per-token KL penalty estimate: k3 is never negative, k1 (log-ratio) can be")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, gt=0)
    eval_prompts: int = Field(64, ge=1, description="Held-out prompts scored before and after")


class Recipe(Strict):
    stage: Literal["ppo"]
    run: RunSection
    model: ModelRef | str = Field(description="Starting policy (usually the sft stage's model)")
    inputs: TrainInputs
    train: TrainSection = TrainSection()
    ppo: PpoSection
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return local_paths(model=self.model, **{"inputs.dataset": self.inputs.dataset,
                                                 "ppo.reward_model": self.ppo.reward_model})


REPORT = "report"


def prompt_ids(dataset, tokenizer, limit: int | None, max_prompt_tokens: int, key: str) -> list[list[int]]:
    if "prompt" not in dataset.column_names:
        raise ConfigError(f"{key}: no `prompt` column (has {', '.join(dataset.column_names)})")
    out = []
    for row in dataset:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        if len(ids) <= max_prompt_tokens:
            out.append(list(ids))
        if limit is not None and len(out) >= limit:
            break
    return out


def sample_and_score(policy, reference, reward_model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                     temperature: float, seed: int, batch_size: int = 8) -> dict:
    """Sampled responses' mean reward; the exact KL(policy || reference) and the policy's entropy at
    each response token, from the full next-token distributions (so neither can be negative, unlike
    a sampled log-ratio), as nats per token and per response."""
    import torch

    torch.manual_seed(seed)
    rewards, kl_sums, entropy_sums, lengths = [], [], [], []
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in chunk])[:, None]).long()
        with torch.no_grad():
            out = policy.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                  top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=pad)
            response = out[:, width:]
            # Tokens after the first end-of-turn are padding, not part of the response.
            eos = tokenizer.eos_token_id
            ended = torch.cumsum((response == eos).long(), dim=1)
            keep = (ended == 0) | ((ended == 1) & (response == eos))
            response = torch.where(keep, response, torch.full_like(response, pad))
            full = torch.cat([input_ids, response], dim=1)
            full_mask = torch.cat([mask, keep.long()], dim=1)
            rewards += reward_model(input_ids=full, attention_mask=full_mask).logits[:, 0].tolist()
            # The distributions the response was sampled from (temperature applied to both models).
            logp = _next_token_logprobs(policy, full, full_mask, width, temperature)
            logq = _next_token_logprobs(reference, full, full_mask, width, temperature)
            probs = logp.exp()
            kl = (probs * (logp - logq)).sum(-1).clamp_min(0.0)  # clamp: float rounding only
            entropy = -(probs * logp).sum(-1)
            weight = keep.float()
            kl_sums += (kl * weight).sum(1).tolist()
            entropy_sums += (entropy * weight).sum(1).tolist()
            lengths += weight.sum(1).tolist()
    tokens = max(sum(lengths), 1.0)
    n = len(rewards)
    return {"mean_reward": sum(rewards) / n, "n": n, "tokens": int(sum(lengths)),
            "kl_per_token": sum(kl_sums) / tokens, "kl_per_response": sum(kl_sums) / n,
            "entropy_per_token": sum(entropy_sums) / tokens}


def _next_token_logprobs(model, ids, mask, prompt_width: int, temperature: float):
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits[:, prompt_width - 1:-1]
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def plot_curves(log_history: list[dict], path: Path) -> list[str]:
    # TRL's own curves: KL as its k3 estimate (>= 0 per token), entropy summed over a response.
    names = [("objective/scores", "reward model score"), ("objective/kl", "KL to the start (k3, nats/response)"),
             ("objective/entropy", "entropy (nats/response)")]
    rows = [r for r in log_history if "objective/scores" in r]
    with figure(path, dpi=110, ncols=3, figsize=(12, 3.2)) as (_, axes):
        for ax, (key, title) in zip(axes, names):
            ax.plot([r.get("episode", i) for i, r in enumerate(rows)], [r.get(key, math.nan) for r in rows], marker=".")
            ax.set_title(title)
            ax.set_xlabel("episodes")
    return [path.name]


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    from datasets import Dataset, load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    path = stage_dir(recipe)
    clear_done(path)
    cfg, train = recipe.ppo, recipe.train
    policy_path = resolve_model(recipe, recipe.model, "model")
    reward_path = resolve_model(recipe, cfg.reward_model, "ppo.reward_model")
    reward_model = load_reward_model(reward_path, "ppo.reward_model")

    tokenizer = AutoTokenizer.from_pretrained(str(policy_path), padding_side="left")
    reward_tokenizer = AutoTokenizer.from_pretrained(str(reward_path))
    # PPO feeds the policy's token ids straight into the reward model: the vocabularies must match.
    if tokenizer.get_vocab() != reward_tokenizer.get_vocab():
        raise ConfigError(f"ppo.reward_model: its tokenizer ({reward_path}) differs from the policy's "
                          f"({policy_path}); PPO scores the policy's token ids directly")
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"model: the tokenizer of {policy_path} has no pad token")

    processes, per_device = world_size(), train.per_device_batch_size
    if cfg.mini_batch_size % (processes * per_device):
        raise ConfigError(f"ppo.mini_batch_size={cfg.mini_batch_size} is not divisible by processes "
                          f"({processes}) x train.per_device_batch_size ({per_device})")
    if cfg.samples_per_iteration % cfg.mini_batch_size:
        raise ConfigError(f"ppo.samples_per_iteration={cfg.samples_per_iteration} is not divisible by "
                          f"ppo.mini_batch_size={cfg.mini_batch_size}")

    data_path = resolve_input(recipe, recipe.inputs.dataset, "inputs.dataset")
    data = load_from_disk(str(data_path))
    for split in (recipe.inputs.train_split, recipe.inputs.eval_split):
        if split is not None and split not in data:
            raise ConfigError(f"inputs: {data_path} has no split {split!r} (has {', '.join(data)})")
        if split is not None and "prompt" in data[split].column_names:
            check_split(data[split], data_path, split, "inputs.dataset", {"prompt": "chat"})
    max_prompt = train.max_length - cfg.max_new_tokens
    if max_prompt < 8:
        raise ConfigError(f"train.max_length={train.max_length} leaves no room for prompts after "
                          f"ppo.max_new_tokens={cfg.max_new_tokens}")
    train_prompts = prompt_ids(data[recipe.inputs.train_split], tokenizer, None, max_prompt, "inputs.train_split")
    eval_split = recipe.inputs.eval_split or recipe.inputs.train_split
    eval_prompts = prompt_ids(data[eval_split], tokenizer, cfg.eval_prompts, max_prompt, "inputs.eval_split")
    if not train_prompts or not eval_prompts:
        raise ConfigError(f"inputs.dataset: no prompt of {data_path} fits in {max_prompt} tokens")

    seed_all(train.seed)  # LoRA adapters (PPOTrainer) draw from it too
    policy = AutoModelForCausalLM.from_pretrained(str(policy_path))
    reference = AutoModelForCausalLM.from_pretrained(str(policy_path))
    value_model = copy.deepcopy(reward_model)  # the value model starts as the reward model
    for model in (policy, reference, reward_model, value_model):
        model.config.pad_token_id = tokenizer.pad_token_id
    reference.eval()
    reward_model.eval()

    before = sample_and_score(policy, reference, reward_model, tokenizer, eval_prompts, cfg.max_new_tokens,
                              cfg.temperature, train.seed)
    rollout = train.model_copy(update={"global_batch_size": cfg.mini_batch_size})
    args = trl_config(
        PPOConfig, rollout, path,
        num_mini_batches=1,
        total_episodes=cfg.iterations * cfg.samples_per_iteration,
        num_ppo_epochs=cfg.ppo_epochs, kl_coef=cfg.kl_coef, response_length=cfg.max_new_tokens,
        temperature=cfg.temperature, stop_token="eos", num_sample_generations=0, kl_estimator=cfg.kl_estimator,
        local_rollout_forward_batch_size=per_device, save_strategy="no",
    )
    started = time.monotonic()
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward_model, value_model=value_model,
                         train_dataset=Dataset.from_dict({"input_ids": train_prompts}),
                         peft_config=lora_config(train, "CAUSAL_LM", policy))
    guard_finite_loss(trainer)
    trainer.train()
    seconds = time.monotonic() - started
    trained = trainer.model.policy if hasattr(trainer.model, "policy") else trainer.model
    trained = trainer.accelerator.unwrap_model(trained)
    trained.eval()
    after = sample_and_score(trained, reference, reward_model, tokenizer, eval_prompts, cfg.max_new_tokens,
                             cfg.temperature, train.seed)
    save_model(trainer, tokenizer, path)

    summary = {
        "iterations": cfg.iterations, "samples_per_iteration": cfg.samples_per_iteration,
        "episodes": trainer.state.episode, "seconds": round(seconds, 1),
        "eval_prompts": after["n"], "reward_before": round(before["mean_reward"], 4),
        "reward_after": round(after["mean_reward"], 4),
        # Exact KL to the starting policy and entropy, in nats per response token (see sample_and_score).
        "kl_per_token_after": round(after["kl_per_token"], 5), "kl_per_response_after": round(after["kl_per_response"], 4),
        "entropy_per_token_before": round(before["entropy_per_token"], 4),
        "entropy_per_token_after": round(after["entropy_per_token"], 4),
        "train_scores": [round(r["objective/scores"], 4) for r in trainer.state.log_history if "objective/scores" in r],
    }
    if is_main_process():
        save_config(path, recipe)
        write_json(path / "eval.json", {"before": before, "after": after})
        summary["report"] = plot_curves(trainer.state.log_history, path / REPORT / "ppo_curves.png")
        write_json(path / "summary.json", summary)
        mark_done(path, {"episodes": trainer.state.episode})
        print(f"ppo: {cfg.iterations} iterations x {cfg.samples_per_iteration} samples in {seconds:.0f} s -> "
              f"{path / 'model'}\n  held-out reward {before['mean_reward']:.4f} -> {after['mean_reward']:.4f}; "
              f"KL to the start {after['kl_per_token']:.5f} nats/token ({after['kl_per_response']:.4f} per response); "
              f"entropy {before['entropy_per_token']:.3f} -> {after['entropy_per_token']:.3f} nats/token")
    return summary
