"""UltraRM, PPO and UltraCM on SmolLM2-135M-Instruct, through the real stages.

Our judged data first: the 80 sample instructions -> generate (SmolLM2 at temperature 0.7 and a
tiny untrained model, one completion each) -> annotate (the stand-in judge over HTTP: four aspects
and a critique) -> pairs (chosen = the higher overall score) with the critique export. Then:

- UltraRM: reward models from SmolLM2 (LoRA) on our pairs only, and on the mixture our pairs +
  half of BIG-bench's HHH pairs (a seeded split per subset); both, and SmolLM2 with its untrained
  score head, scored on the other half of HHH, per subset.
- PPO and RLOO: SmolLM2-Instruct (already a supervised chat policy) against the mixture RM, on the
  same prompts with the same budget, with the RM's mean score on held-out prompts before and
  after, the exact KL to the start and the entropy per token (pipeline.stages.ppo.sample_and_score).
- UltraCM: a critique model from SmolLM2 (LoRA SFT on the judge's critiques), asked to critique
  held-out completions: the share whose own "Overall score" line parses, and the Spearman
  correlation of those scores with the judge's.

RLHF_METHOD_SEED (default 0) seeds the sampling and the training; the README's tables are this
file's printed tables for seeds 0, 1 and 2, and each bound below says which figures it rests on.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
from helpers import lora_train, stage

REPO = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("RLHF_METHOD_SEED", "0"))
SUBSETS = ("harmless", "helpful", "honest", "other")
RM_STEPS = 24
HHH_UNAVAILABLE = "hhh-unavailable.txt"  # written by `judged` when the registry no longer serves BIG-bench
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def judged(smollm2, tiny_pool, tmp_path_factory):
    """Our judged pairs and critiques (see the module docstring); returns the root of the runs."""
    from pipeline.formats.fetch import SourceWithdrawn, public_file
    from pipeline.standin import start_standin

    root = tmp_path_factory.mktemp("smollm2-ultrafeedback")
    sources = sorted((REPO / "data" / "samples" / "instructions").glob("*.jsonl"))
    stage(root, "prompts", {"inputs": {"sources": [{"name": p.stem, "path": str(p)} for p in sources]},
                            "data": {"seed": SEED, "dedupe": True}})
    with start_standin(root / "standin", latency_s=0.0) as server:
        stage(root, "generate", {
            "inputs": {"prompts": {"stage": "prompts"}},
            "generation": {"pool": [{"name": "smollm2-135m", "backend": "hf", "path": str(smollm2), "batch_size": 16},
                                    {"name": "tiny-a", "backend": "hf", "path": str(tiny_pool[0]), "batch_size": 16}],
                           "models_per_prompt": 2, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64,
                           "seed": SEED}})
        stage(root, "annotate", {
            "inputs": {"completions": {"stage": "generate"}},
            "annotation": {"judge": {"name": "standin-judge", "backend": "openai", "base_url": server.base_url,
                                     "max_concurrency": 8}, "mode": "faithful", "critique": True, "seed": 0}})
    stage(root, "pairs", {"inputs": {"annotations": {"stage": "annotate"}},
                          "pairs": {"strategy": "h4", "score": "overall", "remove_truthful_qa": False,
                                    "test_fraction": 0.2, "seed": SEED, "critique_export": True}})
    # HHH split in half per subset (seeded): one half may be trained on, the other is the test.
    try:
        rows = [json.loads(line) for line in public_file("bigbench", "hhh_alignment").read_text().splitlines()]
    except SourceWithdrawn as err:  # UltraRM's HHH check is then skipped; PPO/RLOO use the RM on our pairs
        (root / HHH_UNAVAILABLE).write_text(str(err))
        return root
    rng = random.Random(SEED)
    train, test = [], []
    for subset in SUBSETS:
        mine = [r for r in rows if r.get("subset") == subset]
        rng.shuffle(mine)
        train += mine[:len(mine) // 2]
        test += mine[len(mine) // 2:]
    for name, part in (("hhh-train", train), ("hhh-test", test)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return root


def untrained_head_accuracy(model_path: Path, hhh_file: Path) -> dict:
    """HHH accuracy of SmolLM2 with a freshly initialised score head (seeded), scored as the
    reward stage scores."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.formats.preferences import convert
    from pipeline.stages.reward import accuracy_table, score_pairs

    rows = []
    for i, line in enumerate(hhh_file.read_text().splitlines()):
        pair = convert(json.loads(line), "bigbench-hhh", f"{hhh_file}:{i + 1}", "hhh")
        rows.append({**pair, "source": "hhh"})
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_path), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    scores = score_pairs(model, tokenizer, rows, 256, batch_size=8)
    return accuracy_table(rows, scores, ["hhh"], [r.pop("subset", "") for r in rows])


@pytest.fixture(scope="module")
def reward_models(judged, smollm2):
    """{arm: accuracy table} for the untrained head, our pairs only, and the mixture; without HHH
    (see HHH_UNAVAILABLE) only the RM on our pairs, which PPO and RLOO then use."""
    root = judged
    if (root / HHH_UNAVAILABLE).exists():
        stage(root, "reward", {"run": {"name": "rm-ours"}, "model": str(smollm2),
                               "reward": {"sources": [{"name": "ours", "dataset": {"stage": "pairs", "run": "t"}}]},
                               "train": lora_train(RM_STEPS, 3e-4, 256, SEED, batch=4, logging_steps=10)})
        return {"unavailable": (root / HHH_UNAVAILABLE).read_text()}
    hhh_test = {"name": "hhh", "dataset": str(root / "hhh-test.jsonl"), "format": "bigbench-hhh", "eval_only": True}
    ours = {"name": "ours", "dataset": {"stage": "pairs", "run": "t"}}
    # The reward stage holds out a tenth of an unsplit file (for its own accuracy row): 11 of the 110.
    hhh_train = {"name": "hhh-train", "dataset": str(root / "hhh-train.jsonl"), "format": "bigbench-hhh"}
    results = {"untrained": untrained_head_accuracy(smollm2, root / "hhh-test.jsonl")}
    for arm, sources in (("ours", [ours, hhh_test]), ("mixture", [ours, hhh_train, hhh_test])):
        stage(root, "reward", {"run": {"name": f"rm-{arm}"}, "model": str(smollm2), "reward": {"sources": sources},
                               "train": lora_train(RM_STEPS, 3e-4, 256, SEED, batch=4, logging_steps=10)})
        results[arm] = json.loads((root / "runs" / f"rm-{arm}" / "reward" / "eval.json").read_text())["accuracy"]
    return results


def hhh_table(results: dict) -> str:
    lines = [f"{'reward model':<12} {'HHH all':>8} " + " ".join(f"{s:>9}" for s in SUBSETS) + f" {'ours':>6}"]
    for arm, acc in results.items():
        hhh = acc["hhh"]
        lines.append(f"{arm:<12} {hhh['accuracy']:8.3f} " + " ".join(
            f"{hhh['subsets'][s]['accuracy']:9.3f}" for s in SUBSETS) + f" {acc['ours']['accuracy'] if 'ours' in acc else float('nan'):6.3f}")
    return "\n".join(lines)


def test_ultrarm_beats_the_untrained_head_on_held_out_hhh(reward_models, record_property):
    if "unavailable" in reward_models:
        pytest.skip(f"held-out HHH pairs unavailable: {reward_models['unavailable']}")
    record_property("table", f"\nUltraRM on SmolLM2, seed {SEED}: held-out pair accuracy\n{hhh_table(reward_models)}")
    untrained, ours, mixture = (reward_models[a]["hhh"]["accuracy"] for a in ("untrained", "ours", "mixture"))
    # On 112 held-out pairs (one standard error about 0.047), seeds 0 / 1 / 2: untrained 0.357 /
    # 0.348 / 0.500, ours 0.589 / 0.580 / 0.545, mixture 0.562 / 0.562 / 0.598. The untrained head is
    # a random linear map, so its accuracy is anywhere around chance with the seed; what holds for
    # every seed is that both trained models beat it and chance (smallest margins over the
    # untrained head: mixture 0.098, ours 0.045; over chance: ours 0.045, mixture 0.062). The
    # mixture's edge over our pairs alone changes sign with the seed, so it is printed, not asserted.
    assert mixture > untrained + 0.05 and ours > untrained and min(ours, mixture) > 0.53, reward_models


def policy_reward_run(root) -> str:
    """The reward model PPO and RLOO train against: the mixture, or our pairs' alone without HHH."""
    return "rm-ours" if (root / HHH_UNAVAILABLE).exists() else "rm-mixture"


def policy_gradient(root, smollm2, algorithm: str) -> dict:
    """PPO or RLOO of SmolLM2 against the mixture RM, on the same prompts with the same budget."""
    return stage(root, "ppo", {
        "run": {"name": algorithm}, "model": str(smollm2),
        "inputs": {"dataset": {"stage": "pairs", "run": "t"}, "train_split": "train_gen", "eval_split": "test_gen"},
        "train": {"learning_rate": 1e-4, "lr_scheduler": "constant", "per_device_batch_size": 8, "max_length": 256,
                  "logging_steps": 1, "report_to": [], "seed": SEED,
                  "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "top_layers": 8}},
        "ppo": {"algorithm": algorithm, "reward_model": {"stage": "reward", "run": policy_reward_run(root)},
                "samples_per_iteration": 16, "mini_batch_size": 8, "iterations": PPO_ITERATIONS, "ppo_epochs": 2,
                "kl_coef": 0.05, "rloo_k": 4, "max_new_tokens": 32, "temperature": 0.7, "eval_prompts": 16}})


@pytest.fixture(scope="module")
def ppo_summary(judged, smollm2, reward_models):
    return policy_gradient(judged, smollm2, "ppo")


@pytest.fixture(scope="module")
def rloo_summary(judged, smollm2, reward_models):
    return policy_gradient(judged, smollm2, "rloo")


PPO_ITERATIONS = 2  # our loop costs ~95 s an iteration here (value model on the top 8 layers); 2 show the numbers are sound


def test_ppo_and_rloo_on_smollm2_report_an_exact_non_negative_kl_and_per_token_entropy(ppo_summary, rloo_summary,
                                                                                      judged, record_property):
    rows = []
    for name, s in (("PPO", ppo_summary), ("RLOO", rloo_summary)):
        rows.append(f"  {name}: held-out RM score {s['reward_before']:.3f} -> {s['reward_after']:.3f} "
                    f"({s['eval_prompts']} prompts); KL to the start {s['kl_per_token_after']:.5f} nats/token "
                    f"({s['kl_per_response_after']:.4f}/response); entropy {s['entropy_per_token_before']:.3f} -> "
                    f"{s['entropy_per_token_after']:.3f} nats/token; {s['optimizer_steps']} optimizer steps, "
                    f"{s['seconds']} s; train scores {s['train_scores']}")
    rm = "the RM on our pairs (no HHH)" if policy_reward_run(judged) == "rm-ours" else "the mixture RM"
    record_property("table", f"\nPPO and RLOO on SmolLM2 against {rm}, seed {SEED}, same prompts and "
                    f"budget ({PPO_ITERATIONS} iterations x 16 samples, mini-batch 8, 2 epochs):\n" + "\n".join(rows))
    # Seeds 0 / 1 / 2 (TRL's PPOTrainer, before our loop): RM score 0.485 -> 0.406, 1.114 -> 0.998,
    # 0.257 -> 0.190; KL 0.00031 / 0.00067 / 0.00038 nats/token; entropy 0.93-1.04 nats/token before
    # and after: 16 updates of LoRA on the top 8 layers at lr 1e-4 barely move the policy, so the score
    # change is sampling noise, not the method's effect (that is shown on a controlled reward in
    # test_ppo.py). Asserted: the numbers both report are sound on a real model: an exact KL that is
    # positive once the policy moved (never negative), a per-token entropy within [0, log V], and the
    # paper's batch (one optimizer step per mini-batch: 16 / 8 x 2 epochs per iteration).
    for s in (ppo_summary, rloo_summary):
        assert 0 < s["kl_per_token_after"] < 0.1, s
        assert s["optimizer_steps"] == PPO_ITERATIONS * 4, s
        for key in ("entropy_per_token_before", "entropy_per_token_after"):
            assert 0 < s[key] < math.log(49152), s


@pytest.fixture(scope="module")
def critique_summary(judged, smollm2):
    return stage(judged, "critique", {
        "run": {"name": "ultracm"}, "model": str(smollm2),
        "inputs": {"dataset": {"stage": "pairs", "run": "t", "output": "critique"}, "train_split": "train",
                   "eval_split": "test"},
        "train": lora_train(CM_STEPS, 3e-4, 512, SEED, batch=4, logging_steps=10),
        "critique": {"eval_items": 32, "max_new_tokens": 160, "batch_size": 16, "no_repeat_ngram_size": 6}})


CM_STEPS = 30


def test_ultracm_on_smollm2_ends_some_critiques_with_a_parsable_score(critique_summary, record_property):
    s = critique_summary
    record_property("table", f"\nUltraCM on SmolLM2, seed {SEED}: {s['eval_rows']} held-out rows, {min(32, s['eval_rows'])} critiqued, parse rate "
        f"{s['parse_rate']:.2f}, Spearman {s['spearman']}, Pearson {s['pearson']}")
    # Seeds 0 / 1 / 2: 12 of 32, 8 of 28, 6 of 32 critiques (0.38 / 0.29 / 0.19) end with a parsable
    # score; the Spearman on those few (0.34 / 0.00 / 0.69) is noise. Without the n-gram guard greedy
    # decoding looped on the first line and none parsed. 30 LoRA steps over ~125 critiques do not
    # teach SmolLM2 the format to the 0.9; asserted is only that the tuned model ends some
    # critiques with a score (0.19 at worst), which the base model never does.
    assert s["parse_rate"] > 0.1, s
