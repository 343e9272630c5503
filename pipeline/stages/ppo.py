"""Stage `ppo`: PPO (or RLOO) of a policy against our reward model.

Reads: `model` (the starting policy, usually the sft stage's model), `ppo.reward_model` (the
reward stage's model, a sequence classifier with a score head; PPO's value model starts from it,
as in UltraLM-PPO), `inputs.dataset` (prompts: the `prompt` column of the pairs output, a list of
chat messages; default splits train_gen / test_gen in the recipes).

`ppo.algorithm: ppo` (default) runs the loop below; `rloo` runs TRL 1.12's RLOOTrainer on the
same prompts with the same reward model (no value model; each prompt sampled `ppo.rloo_k` times,
the others' mean reward as its baseline), for comparison on equal terms.

Why our own PPO loop. TRL 1.12's PPOTrainer (trl.experimental.ppo, the last release with it)
cannot run the paper's iteration: its optimizer steps once per rollout batch and PPO epoch
(`num_mini_batches` only splits the gradient accumulation, since accelerate's accumulation count
is the whole rollout batch), and it has no resume (its loop restarts its counters and its data
iterator at zero). So an iteration here is:

1. sample `ppo.samples_per_iteration` responses from the current policy (over all processes),
   score them with the reward model (prompt, response and the chat template's end of turn, as
   the reward stage scores a pair; `reward_scores`), value them with the value model;
2. per-token rewards: -kl_coef x the KL estimate (`ppo.kl_estimator`, k3 by default, never
   negative) at every response token, plus the reward model's score at the last one
   (optionally whitened); advantages by GAE (`ppo.gamma`, `ppo.lam`), whitened by default;
3. `ppo.ppo_epochs` passes over the samples in a fresh random order, one optimizer step per
   mini-batch of `ppo.mini_batch_size` (gradient accumulation = mini-batch / (processes x
   train.per_device_batch_size)): clipped policy loss (`ppo.clip_range`) plus `ppo.value_coef` x
   the clipped value loss (`ppo.value_clip_range`). With 512 samples and mini-batches of 64 that
   is 8 optimizer steps per epoch, as in the paper. The value model is trained whole, except
   under `train.lora.top_layers`, where only its top layers (and score head) are, as the policy's
   LoRA covers only those.

TRL's pieces used: masked_mean / masked_whiten, first_true_indices, selective_log_softmax,
PolicyAndValueWrapper (one module to prepare), unwrap_model_for_generation and prepare_deepspeed
(ZeRO-3). Attention masks are built from the padding we add, never from `token == pad`: SmolLM2's
pad token is its end-of-turn token, which also ends every turn of the prompt.

Resume. Every `train.save_steps` iterations (and on a Slurm preemption request) the policy, value
model, optimizer, scheduler and RNG states (accelerate's save_state) and the iteration counter with
the log so far are written to `checkpoints/.iteration-N.tmp` and renamed to `iteration-N` when
whole (`progress.json` last); `train.save_total_limit` are kept. A rerun continues from the newest
complete one. Each iteration's prompts and sampling seed depend only on (train.seed, iteration,
process), so a resumed run samples what an uninterrupted one would have. RLOO resumes through the
Trainer's own checkpoints (`checkpoints/checkpoint-N`), as the other TRL stages.

Writes: `model/` (the policy), `eval.json` (mean reward of sampled responses on held-out prompts
before and after, the exact KL to the starting policy on those samples), `summary.json` (with one
log line per iteration), `log.jsonl` (the same lines, as they happen), `report/ppo_curves.png`
(reward, KL and entropy per iteration). KL and entropy are exact (from the full next-token
distributions), in nats per response token; `_SUCCESS` last.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

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
from pipeline.train import (
    CHECKPOINTS,
    MODEL,
    check_split,
    is_main_process,
    last_checkpoint,
    load_reward_model,
    lora_config,
    precision,
    save_model,
    seed_all,
    train_or_resume,
    trl_config,
    world_size,
)


class PpoSection(Strict):
    algorithm: Literal["ppo", "rloo"] = Field(
        "ppo", description="ppo: our PPO loop (value model, GAE); rloo: TRL's RLOOTrainer on the same prompts")
    reward_model: ModelRef | str = Field(description="The reward stage's model (PPO's value model starts from it)")
    samples_per_iteration: int = Field(512, ge=1, description="Responses sampled from the policy per iteration")
    mini_batch_size: int = Field(64, ge=1, description="Samples per optimizer step")
    iterations: int = Field(80, ge=1)
    ppo_epochs: int = Field(4, ge=1, description="Passes over an iteration's samples")
    kl_coef: float = Field(0.05, ge=0, description="Weight of the per-token KL penalty (RLOO: its beta)")
    kl_estimator: Literal["k3", "k1"] = Field(
        "k3", description="Per-token KL penalty estimate: k3 is never negative, k1 (log-ratio) can be")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount (GAE)")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip_range: float = Field(0.2, gt=0, description="Policy ratio clip")
    value_clip_range: float = Field(0.2, gt=0, description="Value prediction clip around the rollout's value")
    value_coef: float = Field(0.1, ge=0, description="Weight of the value loss")
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    rloo_k: int = Field(2, ge=2, description="rloo: responses per prompt (the leave-one-out group)")
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

    @model_validator(mode="after")
    def _trl_fields_only_for_rloo(self) -> "Recipe":
        if self.train.trl and self.ppo.algorithm == "ppo":
            raise ValueError("train.trl: ppo.algorithm ppo runs our own loop, not a TRL config; its settings are "
                             "in the ppo section (train.trl is handed to RLOOConfig under ppo.algorithm: rloo)")
        return self


REPORT = "report"
LOG = "log.jsonl"
PROGRESS = "progress.json"  # written last into a checkpoint: a checkpoint without it is incomplete


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


# --- sampling and scoring (rollouts and the held-out evaluation share these) --------------------


def left_pad(prompts: list[list[int]], pad: int, width: int | None = None):
    import torch

    width = width or max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    return ids, mask


def position_ids(mask):
    return (mask.cumsum(1) - 1).clamp_min(0)


def sample(policy, ids, mask, max_new_tokens: int, temperature: float, pad: int, eos: int):
    """Sampled responses after left-padded prompts: (full ids, full mask, response mask), the response
    padded to `max_new_tokens`; tokens after the first end-of-turn are padding, not response."""
    import torch

    out = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                          top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=pad)
    response = out[:, ids.shape[1]:]
    if response.shape[1] < max_new_tokens:  # every sequence ended early
        fill = torch.full((response.shape[0], max_new_tokens - response.shape[1]), pad, dtype=response.dtype)
        response = torch.cat([response, fill.to(response.device)], dim=1)
    ended = torch.cumsum((response == eos).long(), dim=1)
    keep = (ended == 0) | ((ended == 1) & (response == eos))
    response = torch.where(keep, response, torch.full_like(response, pad))
    return torch.cat([ids, response], dim=1), torch.cat([mask, keep.long()], dim=1), keep.long()


def response_logits(model, ids, mask, width: int, temperature: float):
    """The next-token logits at each response position (the distributions it was sampled from)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    return logits[:, width - 1:-1].float() / temperature


def kl_and_entropy(logits, ref_logits):
    """Exact per-token KL(policy || reference) and policy entropy from the full distributions."""
    import torch

    logp = torch.log_softmax(logits, dim=-1)
    logq = torch.log_softmax(ref_logits, dim=-1)
    probs = logp.exp()
    kl = (probs * (logp - logq)).sum(-1).clamp_min(0.0)  # clamp: float rounding only
    return kl, -(probs * logp).sum(-1)


def turn_suffix(tokenizer) -> list[int]:
    """The token ids the chat template writes after an assistant message's text (ChatML: the
    end-of-turn token and a newline; none for a template that ends with the text); the
    end-of-turn token alone without a template."""
    probe = "<<rlhf-end-of-answer>>"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant", "content": probe}],
                                             tokenize=False)
    except ValueError:  # no chat template
        return [tokenizer.eos_token_id]
    return tokenizer.encode(text[text.rindex(probe) + len(probe):], add_special_tokens=False)


def reward_scores(reward_model, full, full_mask, keep, width: int, eos: int, pad: int, suffix: list[int]):
    """The reward model's score of each sample, read as the reward stage trained and scored it:
    prompt, the response's text, then the chat template's end of the assistant turn, right-padded
    (the score head reads the last token that is not padding). The sampled ids alone would end at
    the response's last word when the pad token is the end-of-turn token (SmolLM2): a position the
    reward model never saw scored."""
    import torch

    rows = []
    for i in range(full.shape[0]):
        prompt = full[i, :width][full_mask[i, :width].bool()]
        response = full[i, width:]
        answer = response[keep[i].bool() & (response != eos)]
        rows.append(torch.cat([prompt, answer, torch.tensor(suffix, dtype=full.dtype, device=full.device)]))
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad, dtype=full.dtype, device=full.device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return reward_model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


def token_values(value_model, ids, mask, width: int):
    """The value head at each position that predicts a response token."""
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
    return value_model.score(hidden)[:, width - 1:-1, 0].float()


def sample_and_score(policy, reference, reward_model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                     temperature: float, seed: int, suffix: list[int], batch_size: int = 8) -> dict:
    """Sampled responses' mean reward; the exact KL(policy || reference) and the policy's entropy at
    each response token, from the full next-token distributions (so neither can be negative, unlike
    a sampled log-ratio), as nats per token and per response."""
    import torch

    torch.manual_seed(seed)
    device = next(policy.parameters()).device
    rewards, kl_sums, entropy_sums, lengths = [], [], [], []
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        ids, mask = (t.to(device) for t in left_pad(prompts[start:start + batch_size], pad))
        with torch.no_grad():
            full, full_mask, keep = sample(policy, ids, mask, max_new_tokens, temperature, pad, eos)
            width = ids.shape[1]
            rewards += reward_scores(reward_model, full, full_mask, keep, width, eos, pad, suffix).tolist()
            kl, entropy = kl_and_entropy(response_logits(policy, full, full_mask, width, temperature),
                                         response_logits(reference, full, full_mask, width, temperature))
            weight = keep.float()
            kl_sums += (kl * weight).sum(1).tolist()
            entropy_sums += (entropy * weight).sum(1).tolist()
            lengths += weight.sum(1).tolist()
    tokens = max(sum(lengths), 1.0)
    n = len(rewards)
    return {"mean_reward": sum(rewards) / n, "n": n, "tokens": int(sum(lengths)),
            "kl_per_token": sum(kl_sums) / tokens, "kl_per_response": sum(kl_sums) / n,
            "entropy_per_token": sum(entropy_sums) / tokens}


# --- the PPO loop --------------------------------------------------------------------------------


def iteration_prompts(n_prompts: int, iteration: int, per_iteration: int, seed: int, rank: int, processes: int):
    """Indices of this process's prompts for `iteration` (0-based): a fresh permutation of all prompts
    per pass over them, seeded by (seed, pass), so any iteration's prompts are known without state."""
    import numpy as np

    first = iteration * per_iteration
    orders, picked = {}, []
    for sample_index in range(first + rank, first + per_iteration, processes):
        epoch, position = divmod(sample_index, n_prompts)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n_prompts)
        picked.append(int(orders[epoch][position]))
    return picked


def gae(rewards, values, mask, gamma: float, lam: float):
    """Advantages and returns by generalised advantage estimation over the response tokens."""
    import torch

    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    steps = rewards.shape[1]
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def roll_out(accelerator, model, reference, reward_model, prompts, cfg: PpoSection, pad: int, eos: int,
             micro: int, suffix: list[int]) -> dict:
    """Sample, score and value this process's share of an iteration; the per-token rewards,
    advantages and returns for the PPO epochs."""
    import torch
    from trl.experimental.ppo.ppo_trainer import masked_whiten
    from trl.models.utils import unwrap_model_for_generation
    from trl.trainer.utils import selective_log_softmax

    device = accelerator.device
    ids, mask = (t.to(device) for t in left_pad(prompts, pad))
    width = ids.shape[1]
    parts = {k: [] for k in ("full", "full_mask", "keep", "logprobs", "ref_logprobs", "kl", "entropy",
                             "values", "scores")}
    with torch.no_grad():
        unwrapped = accelerator.unwrap_model(model)
        with unwrap_model_for_generation(model, accelerator) as generating:
            samples = [sample(generating.policy, ids[i:i + micro], mask[i:i + micro], cfg.max_new_tokens,
                              cfg.temperature, pad, eos) for i in range(0, len(prompts), micro)]
        for full, full_mask, keep in samples:
            response = full[:, width:]
            logits = response_logits(unwrapped.policy, full, full_mask, width, cfg.temperature)
            ref_logits = response_logits(reference, full, full_mask, width, cfg.temperature)
            kl, entropy = kl_and_entropy(logits, ref_logits)
            parts["logprobs"].append(selective_log_softmax(logits, response))
            parts["ref_logprobs"].append(selective_log_softmax(ref_logits, response))
            del logits, ref_logits
            parts["values"].append(token_values(unwrapped.value_model, full, full_mask, width))
            parts["scores"].append(reward_scores(reward_model, full, full_mask, keep, width, eos, pad, suffix))
            for key, value in (("full", full), ("full_mask", full_mask), ("keep", keep), ("kl", kl),
                               ("entropy", entropy)):
                parts[key].append(value)
    batch = {k: torch.cat(v) for k, v in parts.items()}
    keep = batch["keep"].float()
    log_ratio = batch["ref_logprobs"] - batch["logprobs"]
    penalty = -log_ratio if cfg.kl_estimator == "k1" else log_ratio.exp() - 1 - log_ratio
    rewards = -cfg.kl_coef * penalty * keep
    last = (keep.sum(1).long() - 1).clamp_min(0)  # an empty response takes its score at position 0
    rewards[torch.arange(len(last), device=device), last] += batch["scores"]
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, keep.bool(), shift_mean=False) * keep
    values = batch["values"] * keep
    advantages, returns = gae(rewards, values, keep, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, keep.bool()) * keep
    batch.update(width=width, rewards=rewards, values=values, advantages=advantages, returns=returns,
                 penalty=penalty)
    return batch


def ppo_epochs(accelerator, model, optimizer, scheduler, batch: dict, cfg: PpoSection, micro: int,
               local_mini: int, generator, iteration: int) -> dict:
    """The PPO epochs over one iteration's samples: one optimizer step per mini-batch."""
    import torch
    from trl.experimental.ppo.ppo_trainer import masked_mean
    from trl.trainer.utils import selective_log_softmax

    width, n = batch["width"], batch["full"].shape[0]
    stats = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "approx_kl": []}
    steps = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator).to(accelerator.device)
        for start in range(0, n, local_mini):
            mini = order[start:start + local_mini]
            for m in range(0, len(mini), micro):
                rows = mini[m:m + micro]
                with accelerator.accumulate(model):
                    ids, mask = batch["full"][rows], batch["full_mask"][rows]
                    keep = batch["keep"][rows].bool()
                    policy_out, value_logits = model(input_ids=ids, attention_mask=mask,
                                                     position_ids=position_ids(mask), output_hidden_states=True)
                    logits = policy_out.logits[:, width - 1:-1].float() / cfg.temperature
                    logprobs = selective_log_softmax(logits, ids[:, width:])
                    ratio = torch.exp(logprobs - batch["logprobs"][rows])
                    advantage = batch["advantages"][rows]
                    policy_loss = masked_mean(torch.max(-advantage * ratio, -advantage * ratio.clamp(
                        1 - cfg.clip_range, 1 + cfg.clip_range)), keep)
                    value = value_logits[:, width - 1:-1, 0].float()
                    old_value, target = batch["values"][rows], batch["returns"][rows]
                    clipped = old_value + (value - old_value).clamp(-cfg.value_clip_range, cfg.value_clip_range)
                    value_loss = 0.5 * masked_mean(torch.max((value - target) ** 2, (clipped - target) ** 2), keep)
                    loss = policy_loss + cfg.value_coef * value_loss
                    if not torch.isfinite(loss):
                        raise StageFailed(f"PPO loss is {loss.item()} at iteration {iteration + 1} (non-finite); "
                                          "nothing marked done. Check the learning rate and precision")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad()
                        steps += 1
                with torch.no_grad():
                    stats["policy_loss"].append(policy_loss.item())
                    stats["value_loss"].append(value_loss.item())
                    stats["clip_fraction"].append(masked_mean(((ratio - 1).abs() > cfg.clip_range).float(), keep).item())
                    stats["approx_kl"].append(masked_mean(0.5 * (logprobs - batch["logprobs"][rows]) ** 2, keep).item())
    out = {k: sum(v) / len(v) for k, v in stats.items()}
    out["optimizer_steps"] = steps
    return out


def iteration_metrics(accelerator, batch: dict, iteration: int, episodes: int, update: dict, lr: float,
                      seconds: float) -> dict:
    """One log line: means over every process's samples; KL and entropy exact, in nats."""
    import torch

    keep = batch["keep"].float()
    local = torch.stack([
        batch["scores"].sum(), keep.sum(), (batch["kl"] * keep).sum(), (batch["penalty"] * keep).sum(),
        (batch["entropy"] * keep).sum(), (batch["rewards"] * keep).sum() - batch["scores"].sum(),
        torch.tensor(float(keep.shape[0]), device=keep.device)])
    scores, tokens, kl, penalty, entropy, kl_reward, n = accelerator.reduce(local, "sum").tolist()
    tokens = max(tokens, 1.0)
    return {
        "iteration": iteration + 1, "episodes": episodes, "reward_model_score": scores / n,
        "kl_nats_per_token": kl / tokens, "kl_nats_per_response": kl / n,
        "kl_penalty_estimate_nats_per_token": penalty / tokens, "entropy_nats_per_token": entropy / tokens,
        "kl_reward_per_response": kl_reward / n, "response_tokens": tokens / n,
        **{k: round(v, 6) if isinstance(v, float) else v for k, v in update.items()},
        "lr": lr, "seconds": round(seconds, 2),
    }


def train_top_layers_only(value_model, top_layers: int) -> None:
    """Freeze the value model below its top `top_layers` decoder layers (its embeddings too), as
    `train.lora.top_layers` stops the policy's LoRA there: backpropagating through every layer of
    the value model cost most of an iteration's time and memory on a CPU."""
    import re

    total = value_model.config.num_hidden_layers
    embeddings = {id(p) for p in value_model.get_input_embeddings().parameters()}
    for name, param in value_model.named_parameters():
        layer = re.search(r"\.layers\.(\d+)\.", name)
        if id(param) in embeddings or (layer is not None and int(layer.group(1)) < total - top_layers):
            param.requires_grad_(False)


def latest_checkpoint(path: Path) -> tuple[Path, dict] | None:
    """The newest complete `iteration-N` checkpoint (its progress.json, the last file, whole)."""
    found = []
    for folder in (path / CHECKPOINTS).glob("iteration-*"):
        try:
            found.append((json.loads((folder / PROGRESS).read_text())["iteration"], folder))
        except (OSError, ValueError, KeyError):
            continue
    if not found:
        return None
    iteration, folder = max(found)
    return folder, json.loads((folder / PROGRESS).read_text())


def save_checkpoint(accelerator, path: Path, iteration: int, history: list[dict], keep: int) -> Path:
    """Write `checkpoints/iteration-N` whole or not at all: into a hidden folder, renamed when done."""
    folder = path / CHECKPOINTS / f"iteration-{iteration:06d}"
    tmp = path / CHECKPOINTS / f".iteration-{iteration:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / PROGRESS, json.dumps({"iteration": iteration, "history": history}) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        done = sorted((p for p in (path / CHECKPOINTS).glob("iteration-*") if (p / PROGRESS).is_file()),
                      key=lambda p: p.name)
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def write_log(path: Path, history: list[dict]) -> None:
    atomic_write_text(path / LOG, "".join(json.dumps(line) + "\n" for line in history))


def train_ppo(recipe: Recipe, path: Path, policy, reference, reward_model, value_model, tokenizer,
              train_prompts: list[list[int]], suffix: list[int]) -> tuple[object, object, list[dict], str | None]:
    """Run (or continue) the PPO iterations; (the accelerator, the trained policy, one log line per
    iteration, the checkpoint resumed from)."""
    import torch
    from accelerate import Accelerator
    from tqdm import tqdm
    from transformers import get_scheduler
    from trl.experimental.ppo.ppo_trainer import PolicyAndValueWrapper
    from trl.trainer.utils import disable_dropout_in_model

    from pipeline import preempt

    cfg, train = recipe.ppo, recipe.train
    processes, micro = world_size(), train.per_device_batch_size
    local_mini = cfg.mini_batch_size // processes
    mixed = precision(train)
    accelerator = Accelerator(gradient_accumulation_steps=local_mini // micro, cpu=mixed["use_cpu"],
                              mixed_precision="bf16" if mixed["bf16"] else "fp16" if mixed["fp16"] else "no",
                              log_with=[r for r in train.report_to] or None,
                              project_dir=str(path / CHECKPOINTS))
    if accelerator.state.deepspeed_plugin is not None:  # no dataloader to take the micro-batch size from
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro
    for module in (policy, reference, reward_model, value_model):
        disable_dropout_in_model(module)
    if train.lora is not None and train.lora.top_layers is not None:
        train_top_layers_only(value_model, train.lora.top_layers)
    peft = lora_config(train, "CAUSAL_LM", policy)
    if peft is not None:
        from peft import get_peft_model

        policy = get_peft_model(policy, peft)
    if train.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    with warnings.catch_warnings():  # the wrapper reads transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        model = PolicyAndValueWrapper(policy, value_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.learning_rate,
                                  weight_decay=train.weight_decay)
    total_steps = cfg.iterations * cfg.ppo_epochs * (cfg.samples_per_iteration // cfg.mini_batch_size)
    scheduler = get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=int(train.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand, once per optimizer step
    if accelerator.state.deepspeed_plugin is not None:
        from trl.models.utils import prepare_deepspeed

        reference, reward_model = prepare_deepspeed(reference, accelerator), prepare_deepspeed(reward_model, accelerator)
    else:
        reference, reward_model = reference.to(accelerator.device), reward_model.to(accelerator.device)
    reference.eval()
    reward_model.eval()
    if train.report_to:
        accelerator.init_trackers(recipe.run.name, config={"samples_per_iteration": cfg.samples_per_iteration,
                                                           "mini_batch_size": cfg.mini_batch_size})

    history, start, resumed = [], 0, None
    found = latest_checkpoint(path)
    if found is not None:
        folder, progress = found
        accelerator.load_state(str(folder))
        history, start, resumed = progress["history"], progress["iteration"], folder.name
    if accelerator.is_main_process:
        write_log(path, history)  # lines logged after the checkpoint by the killed run are dropped

    rank, pad, eos = accelerator.process_index, tokenizer.pad_token_id, tokenizer.eos_token_id
    began = time.monotonic()
    bar = tqdm(total=cfg.iterations, initial=start, desc="ppo", unit="iteration",
               disable=not accelerator.is_main_process)
    for iteration in range(start, cfg.iterations):
        seed_all(train.seed + 1_000_003 * (iteration + 1) + 7919 * rank)  # sampling depends on the iteration only
        picked = iteration_prompts(len(train_prompts), iteration, cfg.samples_per_iteration, train.seed, rank,
                                   processes)
        model.eval()  # dropout is off either way; eval for generation caches
        batch = roll_out(accelerator, model, reference, reward_model, [train_prompts[i] for i in picked], cfg,
                         pad, eos, micro, suffix)
        model.train()
        generator = torch.Generator().manual_seed(train.seed + 31 * (iteration + 1) + rank)
        update = ppo_epochs(accelerator, model, optimizer, scheduler, batch, cfg, micro, local_mini, generator,
                            iteration)
        line = iteration_metrics(accelerator, batch, iteration, (iteration + 1) * cfg.samples_per_iteration,
                                 update, scheduler.get_last_lr()[0], time.monotonic() - began)
        history.append(line)
        del batch
        if accelerator.is_main_process:
            with open(path / LOG, "a") as handle:
                handle.write(json.dumps(line) + "\n")
        if train.report_to:
            accelerator.log({k: v for k, v in line.items() if isinstance(v, (int, float))}, step=iteration + 1)
        bar.update(1)
        bar.set_postfix(score=f"{line['reward_model_score']:.3f}", kl=f"{line['kl_nats_per_token']:.4f}")
        stop = preempt.active() and preempt._on_any_rank(preempt.requested())
        if (iteration + 1) % train.save_steps == 0 or iteration + 1 == cfg.iterations or stop:
            save_checkpoint(accelerator, path, iteration + 1, history, train.save_total_limit)
        if stop and iteration + 1 < cfg.iterations:
            raise preempt.Preempted(f"iteration-{iteration + 1:06d} saved; the requeued job resumes from it")
    bar.close()
    if train.report_to:
        accelerator.end_training()
    trained = accelerator.unwrap_model(model).policy
    return accelerator, trained, history, resumed


def local_device():
    import torch

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")


def save_policy(accelerator, policy, tokenizer, path: Path) -> None:
    """`model/` (LoRA merged in), renamed into place last."""
    final, tmp, old = path / MODEL, path / f".{MODEL}.tmp", path / f".{MODEL}.old"
    if hasattr(policy, "merge_and_unload"):
        policy = policy.merge_and_unload()
    state = accelerator.get_state_dict(policy) if accelerator.state.deepspeed_plugin is not None else None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save_pretrained(str(tmp), state_dict=state)
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# --- RLOO (TRL's trainer) ------------------------------------------------------------------------


def train_rloo(recipe: Recipe, path: Path, policy, reward_model, tokenizer, reward_tokenizer, data, max_prompt):
    """TRL's RLOOTrainer on the same prompts and reward model: an iteration samples
    samples_per_iteration completions (rloo_k per prompt), then ppo_epochs passes over them with one
    optimizer step per mini_batch_size completions."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    cfg, train = recipe.ppo, recipe.train
    if cfg.samples_per_iteration % cfg.rloo_k or cfg.mini_batch_size % cfg.rloo_k:
        raise ConfigError(f"ppo.rloo_k={cfg.rloo_k} must divide ppo.samples_per_iteration "
                          f"({cfg.samples_per_iteration}) and ppo.mini_batch_size ({cfg.mini_batch_size})")
    rows = [{"prompt": p if not isinstance(p, str) else [{"role": "user", "content": p}]}
            for p in data["prompt"]]
    steps_per_iteration = cfg.samples_per_iteration // cfg.mini_batch_size * cfg.ppo_epochs
    args = trl_config(
        RLOOConfig, train.model_copy(update={"global_batch_size": cfg.mini_batch_size}), path,
        max_steps=cfg.iterations * steps_per_iteration, num_generations=cfg.rloo_k,
        generation_batch_size=cfg.samples_per_iteration, num_iterations=cfg.ppo_epochs, beta=cfg.kl_coef,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_k=0, top_p=1.0,
        eval_strategy="no", log_completions=False,
        save_steps=train.save_steps * steps_per_iteration,  # train.save_steps counts iterations here too
    )
    trainer = RLOOTrainer(model=policy, reward_funcs=[reward_model], args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, reward_processing_classes=[reward_tokenizer],
                          peft_config=lora_config(train, "CAUSAL_LM", policy))
    resume = last_checkpoint(path)
    steps, _ = train_or_resume(trainer, resume)
    history = trainer.state.log_history
    if not history and resume:
        history = json.loads((Path(resume) / "trainer_state.json").read_text()).get("log_history", [])
    # TRL's RLOO logs the sampled log-ratio (k1) as its KL: an estimate that can fall below zero.
    lines = [{"iteration": math.ceil(r["step"] / steps_per_iteration), "step": r["step"],
              "reward_model_score": r.get("reward"), "kl_k1_estimate_nats_per_token": r.get("kl"),
              "entropy_nats_per_token": r.get("entropy")} for r in history if "reward" in r]
    save_model(trainer, tokenizer, path)
    return lines, Path(resume).name if resume else None, steps


def plot_curves(history: list[dict], path: Path, algorithm: str) -> list[str]:
    kl = (("kl_nats_per_token", "KL to the start (exact, nats/token)") if algorithm == "ppo" else
          ("kl_k1_estimate_nats_per_token", "KL, TRL's k1 estimate (nats/token)"))
    names = [("reward_model_score", "reward model score"), kl, ("entropy_nats_per_token", "entropy (nats/token)")]
    reason = "No iteration was logged (a finished checkpoint was loaded, or TRL logged no reward)."
    with figure(path, dpi=110, ncols=3, figsize=(12, 3.2), empty_reason=reason) as (_, axes):
        for ax, (key, title) in zip(axes, names):
            if history:
                ax.plot([r["iteration"] for r in history],
                        [math.nan if r.get(key) is None else r[key] for r in history], marker=".")
            ax.set_title(f"{algorithm}: {title}")
            ax.set_xlabel("iteration")
    return [path.name]


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.hub import open_dataset

    path = stage_dir(recipe)
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
    if cfg.algorithm == "ppo" and (cfg.whiten_advantages or cfg.whiten_rewards) and cfg.samples_per_iteration < 2:
        raise ConfigError("ppo.samples_per_iteration: whitening needs at least 2 samples; set "
                          "ppo.whiten_advantages: false (and whiten_rewards) for fewer")

    data_path = resolve_input(recipe, recipe.inputs.dataset, "inputs.dataset")
    data = open_dataset(data_path)
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

    clear_done(path)  # every input checked before anything is written
    path.mkdir(parents=True, exist_ok=True)
    device = local_device()
    seed_all(train.seed)  # LoRA adapters draw from it
    policy = AutoModelForCausalLM.from_pretrained(str(policy_path)).to(device)
    reference = AutoModelForCausalLM.from_pretrained(str(policy_path)).to(device)
    reward_model.to(device)
    for model in (policy, reference, reward_model):
        model.config.pad_token_id = tokenizer.pad_token_id
    reference.eval()
    reward_model.eval()
    # rewards are read as the reward stage read its pairs: through the reward model's own template
    suffix = turn_suffix(reward_tokenizer)
    before = sample_and_score(policy, reference, reward_model, tokenizer, eval_prompts, cfg.max_new_tokens,
                              cfg.temperature, train.seed, suffix)
    started = time.monotonic()
    if cfg.algorithm == "ppo":
        value_model = copy.deepcopy(reward_model)  # the value model starts as the reward model
        accelerator, trained, history, resumed = train_ppo(recipe, path, policy, reference, reward_model,
                                                           value_model, tokenizer, train_prompts, suffix)
        save_policy(accelerator, trained, tokenizer, path)
        steps = sum(line["optimizer_steps"] for line in history)
    else:
        history, resumed, steps = train_rloo(recipe, path, policy, reward_model, tokenizer, reward_tokenizer,
                                             data[recipe.inputs.train_split], max_prompt)
    seconds = time.monotonic() - started
    if not is_main_process():
        return {}
    # The saved policy (LoRA merged in) is what later stages load, so it is what is evaluated.
    trained = AutoModelForCausalLM.from_pretrained(str(path / MODEL)).to(device).eval()
    after = sample_and_score(trained, reference.to(device), reward_model.to(device), tokenizer, eval_prompts,
                             cfg.max_new_tokens, cfg.temperature, train.seed, suffix)
    summary = {
        "algorithm": cfg.algorithm, "iterations": cfg.iterations, "samples_per_iteration": cfg.samples_per_iteration,
        "mini_batch_size": cfg.mini_batch_size, "ppo_epochs": cfg.ppo_epochs, "processes": world_size(),
        "episodes": cfg.iterations * cfg.samples_per_iteration, "optimizer_steps": steps,
        "resumed_from": resumed, "seconds": round(seconds, 1),
        "eval_prompts": after["n"], "reward_before": round(before["mean_reward"], 4),
        "reward_after": round(after["mean_reward"], 4),
        # Exact KL to the starting policy and entropy, in nats per response token (see sample_and_score).
        "kl_per_token_after": round(after["kl_per_token"], 8), "kl_per_response_after": round(after["kl_per_response"], 6),
        "entropy_per_token_before": round(before["entropy_per_token"], 4),
        "entropy_per_token_after": round(after["entropy_per_token"], 4),
        "train_scores": [round(r["reward_model_score"], 4) for r in history if r.get("reward_model_score") is not None],
        "log": history,
    }
    save_config(path, recipe)
    write_json(path / "eval.json", {"before": before, "after": after})
    summary["report"] = plot_curves(history, path / REPORT / "ppo_curves.png", cfg.algorithm)
    write_json(path / "summary.json", summary)
    mark_done(path, {"episodes": summary["episodes"], "optimizer_steps": steps})
    print(f"{cfg.algorithm}: {cfg.iterations} iterations x {cfg.samples_per_iteration} samples, {steps} optimizer "
          f"steps in {seconds:.0f} s{', resumed from ' + resumed if resumed else ''} -> {path / MODEL}\n"
          f"  held-out reward {before['mean_reward']:.4f} -> {after['mean_reward']:.4f}; "
          f"KL to the start {after['kl_per_token']:.5f} nats/token ({after['kl_per_response']:.4f} per response); "
          f"entropy {before['entropy_per_token']:.3f} -> {after['entropy_per_token']:.3f} nats/token")
    return summary
