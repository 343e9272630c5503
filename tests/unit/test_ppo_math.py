"""The arithmetic of our PPO loop (pipeline.stages.ppo) on numbers worked by hand: GAE, the
stateless prompt order of each iteration, and the exact KL / entropy from two distributions."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.stages.ppo import gae, iteration_prompts, kl_and_entropy, train_top_layers_only


def test_gae_on_hand_worked_numbers():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 0.75, 9.0]])  # position 3 is padding: its value must not leak in
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # gamma = lam = 1: advantage = (sum of rewards from t on) - V_t
    assert advantages.tolist() == [[0.5, 0.75, 0.25, 0.0]]
    assert returns.tolist() == [[1.0, 1.0, 1.0, 0.0]]
    advantages, _ = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    d2 = 1.0 - 0.75
    d1 = 0.0 + 0.5 * 0.75 - 0.25
    d0 = 0.0 + 0.5 * 0.25 - 0.5
    expected = [d0 + 0.25 * (d1 + 0.25 * d2), d1 + 0.25 * d2, d2, 0.0]
    assert advantages[0].tolist() == pytest.approx(expected)


def test_each_iteration_takes_fresh_prompts_and_every_prompt_once_per_pass():
    seen = [iteration_prompts(10, i, 5, seed=3, rank=0, processes=1) for i in range(4)]
    assert sorted(seen[0] + seen[1]) == list(range(10)) and sorted(seen[2] + seen[3]) == list(range(10))
    assert seen[0] + seen[1] != seen[2] + seen[3]  # a new order for the second pass
    # stateless: the same (seed, iteration) gives the same prompts, and two processes split them
    assert iteration_prompts(10, 3, 5, seed=3, rank=0, processes=1) == seen[3]
    split = iteration_prompts(10, 1, 4, seed=3, rank=0, processes=2) + iteration_prompts(10, 1, 4, seed=3, rank=1,
                                                                                          processes=2)
    assert sorted(split) == sorted(iteration_prompts(10, 1, 4, seed=3, rank=0, processes=1))


def test_exact_kl_and_entropy():
    p, q = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.25, 0.5, 0.25])
    kl, entropy = kl_and_entropy(p.log()[None, None], q.log()[None, None])
    assert kl.item() == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5))
    assert entropy.item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    same, _ = kl_and_entropy(p.log()[None, None], p.log()[None, None])
    assert same.item() == 0.0


def test_under_top_layers_the_value_model_trains_only_its_top_layers_and_head():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1))
    train_top_layers_only(model, 1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.2.", "model.norm.", "score.")) for n in trainable)
    assert "score.weight" in trainable and any(n.startswith("model.layers.2.") for n in trainable)
    assert not any(n.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens")) for n in trainable)


def test_rollout_rewards_are_read_where_the_reward_stage_reads_them(tiny_pool):
    """A sampled response scored by the PPO loop gets the score the reward stage gives the same
    prompt and answer (through the chat template, ending with its end of turn), whatever padding
    and end-of-turn tokens surround it in the rollout."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.stages.ppo import left_pad, reward_scores, turn_suffix
    from pipeline.stages.reward import score_pairs

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_pool[0]), padding_side="left")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_pool[0]), num_labels=1).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Say hello to the reader."}]]
    answers = ["Blue is a colour.", "Hello"]
    prompt_ids = [list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True)["input_ids"])
                  for p in prompts]
    ids, mask = left_pad(prompt_ids, pad)
    width, new_tokens = ids.shape[1], 12
    responses, keeps = [], []
    for answer in answers:  # the answer, its end of turn, then padding up to the sampled width
        tokens = tokenizer.encode(answer, add_special_tokens=False) + [eos]
        responses.append(tokens + [pad] * (new_tokens - len(tokens)))
        keeps.append([1] * len(tokens) + [0] * (new_tokens - len(tokens)))
    full = torch.cat([ids, torch.tensor(responses)], dim=1)
    keep = torch.tensor(keeps)
    full_mask = torch.cat([mask, keep], dim=1)
    with torch.no_grad():
        ours = reward_scores(model, full, full_mask, keep, width, eos, pad, turn_suffix(tokenizer)).tolist()
    rows = [{"prompt": p, "chosen": [{"role": "assistant", "content": a}], "rejected": [{"role": "assistant", "content": "No."}]}
            for p, a in zip(prompts, answers)]
    stage = [chosen for chosen, _ in score_pairs(model, tokenizer, rows, 256)]
    assert ours == pytest.approx(stage, abs=1e-4)
    assert turn_suffix(tokenizer)[0] == tokenizer.convert_tokens_to_ids("<|im_end|>")
