"""Stage `qa-data`: QA items for R-Tuning, UnknownBench and SaySelf, in four splits.

Reads each source in `inputs.sources` (a local JSONL, parquet file or `datasets` folder in one of
the `pipeline.formats.qa` formats: pararel, mmlu, hotpotqa, fever, wice, falseqa, nec, selfaware, qa) and
maps its rows to QA items (`pipeline.records.QA_FEATURES`); a bad row stops the stage before
anything is written, naming file:line and the field. Per source, in order: keep `domains` (drop
`exclude_domains`), keep `kinds`, then a seeded `sample`. The unanswerable sets are kept whole
unless `kinds` says otherwise: their answerable controls (FalseQA label 0, SelfAware answerable)
stay as open items, since UnknownBench compares refusals on both halves. Each source's items go to the split its `role` names.
Optionally, a `factworld` section adds a synthetic world of invented people
(`pipeline.methods.factworld`): in-domain questions with entities divided between train and test_id,
`ood_attributes` in test_ood, questions about non-existent people in unanswerable.

Within a split an item whose qid is already there (same dataset, question and context) is
dropped and counted; an item in train whose qid is also in a test split is dropped from train,
so the test splits stay unseen.

Output:
- `dataset/`: a DatasetDict with splits train, test_id, test_ood, unanswerable (QA_FEATURES);
  every split exists, empty ones too.
- `teach/` (with `factworld`): a DatasetDict `train` with a `messages` column, one chat per
  known fact, for the `sft` stage (`inputs.dataset: {stage: qa-data, output: teach}`).
- `factworld.json` (with `factworld`): the world (entities, facts, known flags, non-existent
  names) and `facts`: qid -> entity, attribute, answer, known, exists, since QA items carry no
  known flag.
- `summary.json`: counts per split, dataset, domain and kind, and what was dropped;
  `config.yaml`; `_SUCCESS` last.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipeline import records
from pipeline.config import ConfigError, LaunchSection, RunSection, Strict
from pipeline.formats.qa import QA_FORMATS, load_items
from pipeline.methods import factworld as fw
from pipeline.runs import DATASET, RunOptions, atomic_dir, clear_done, mark_done, save_config, stage_dir, write_json

QA_ROLES = ("train", "test_id", "test_ood", "unanswerable")


class QaSourceSpec(Strict):
    path: str = Field(description="Local JSONL, parquet or `datasets` folder")
    format: Literal[QA_FORMATS]  # type: ignore[valid-type]
    role: Literal[QA_ROLES] = Field(description="The split its items go to")  # type: ignore[valid-type]
    name: str | None = Field(None, description="Label written to each item's `dataset` (default: format)")
    domains: list[str] | None = Field(None, description="Keep only these domains (e.g. ParaRel ID relations)")
    exclude_domains: list[str] = Field(default_factory=list, description="Drop these domains")
    kinds: list[Literal["open", "choice", "unanswerable"]] | None = Field(
        None, description="Keep only these kinds (e.g. only the unanswerable half of SelfAware)")
    sample: int | None = Field(None, ge=1, description="Keep this many (seeded); None = all")
    seed: int = 0
    with_context: bool = Field(True, description="hotpotqa: keep the paragraphs as context")


class QaDataInputs(Strict):
    sources: list[QaSourceSpec] = Field(default_factory=list)


class FactWorldSection(Strict):
    seed: int = 0
    entities: int = Field(40, ge=2, description="Invented people with facts")
    known_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Share whose facts go to teach/")
    nonexistent: int = Field(10, ge=0, description="Names in no fact: unanswerable questions")
    test_fraction: float = Field(0.25, ge=0.0, lt=1.0, description="Share held out for test_id (of the "
                                 "entities, or of each entity's questions; see `holdout`)")
    holdout: Literal["entities", "questions"] = Field(
        "entities", description="test_id holds out whole entities (new people) or some questions of every "
        "entity (new questions about people the tuning saw)")
    ood_attributes: list[str] = Field(default_factory=lambda: ["favourite_colour"],
                                      description="Attributes asked only in test_ood")
    kinds: list[Literal["open", "choice"]] = Field(default_factory=lambda: ["open"], min_length=1)
    n_choices: int = Field(4, ge=2, le=8)


class Recipe(Strict):
    stage: Literal["qa-data"]
    run: RunSection
    inputs: QaDataInputs = QaDataInputs()
    factworld: FactWorldSection | None = None
    launch: LaunchSection = LaunchSection()

    @model_validator(mode="after")
    def _something(self) -> "Recipe":
        if not self.inputs.sources and self.factworld is None:
            raise ValueError("give `inputs.sources`, a `factworld` section, or both")
        return self

    def input_files(self) -> list[tuple[str, str]]:
        return [(f"inputs.sources[{i}].path", s.path) for i, s in enumerate(self.inputs.sources)]


SPLITS = ("train", "test_id", "test_ood", "unanswerable")
TEACH = "teach"


def _source_items(spec: QaSourceSpec, key: str) -> tuple[list[dict], dict]:
    items = load_items(spec.path, spec.format, dataset=spec.name, with_context=spec.with_context)
    counts = {"read": len(items)}
    if spec.domains is not None:
        items = [i for i in items if i["domain"] in spec.domains]
    items = [i for i in items if i["domain"] not in spec.exclude_domains]
    counts["domain_filtered"] = counts["read"] - len(items)
    if spec.kinds is not None:
        before = len(items)
        items = [i for i in items if i["kind"] in spec.kinds]
        counts["kind_filtered"] = before - len(items)
    if spec.sample is not None and spec.sample < len(items):
        # Sample positions, then keep file order, so the output reads like the input.
        keep = sorted(random.Random(spec.seed).sample(range(len(items)), spec.sample))
        counts["not_sampled"] = len(items) - spec.sample
        items = [items[k] for k in keep]
    if not items:
        raise ConfigError(f"{key}: no items left from {spec.path} after the domain and kind filters")
    counts["kept"] = len(items)
    return items, counts


def _counts(items: list[dict]) -> dict:
    return {"items": len(items),
            "dataset": dict(sorted(Counter(i["dataset"] for i in items).items())),
            "domain": dict(sorted(Counter(i["domain"] for i in items).items())),
            "kind": dict(sorted(Counter(i["kind"] for i in items).items()))}


def _save_splits(splits: dict[str, list[dict]], features, columns, folder: Path) -> None:
    from datasets import Dataset, DatasetDict

    data, empty = {}, []
    for name, rows in splits.items():
        if rows:
            data[name] = Dataset.from_list(rows, features=features)
        else:
            data[name] = Dataset.from_dict({c: [] for c in columns}, features=features)
            empty.append(name)
    # datasets cannot load back a split saved as 0 shards, which an empty split gets by default
    DatasetDict(data).save_to_disk(str(folder), num_shards={name: 1 for name in empty} or None)


def build(recipe: Recipe) -> tuple[dict[str, list[dict]], dict, fw.FactWorld | None]:
    """The four splits, the per-source counts, and the fact world (or None)."""
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    sources = {}
    for index, spec in enumerate(recipe.inputs.sources):
        key = f"inputs.sources[{index}]"
        items, counts = _source_items(spec, key)
        splits[spec.role].extend(items)
        sources[f"{index}:{spec.name or spec.format}:{spec.role}"] = {"path": spec.path, **counts}
    world = None
    if recipe.factworld is not None:
        cfg = recipe.factworld
        try:
            world = fw.make_world(cfg.seed, cfg.entities, cfg.known_fraction, cfg.nonexistent)
            parts = fw.world_splits(world, kinds=cfg.kinds, ood_attributes=cfg.ood_attributes,
                                    test_fraction=cfg.test_fraction, n_choices=cfg.n_choices,
                                    holdout=cfg.holdout)
        except ValueError as err:
            raise ConfigError(f"factworld: {err}") from None
        for name, items in parts.items():
            splits[name].extend(items)
        sources["factworld"] = {name: len(items) for name, items in parts.items()}
    return splits, sources, world


def _dedupe(splits: dict[str, list[dict]]) -> dict:
    dropped = {"duplicate_in_split": {}, "train_also_in_test": 0}
    for name in SPLITS:
        seen, kept = set(), []
        for item in splits[name]:
            if item["qid"] not in seen:
                seen.add(item["qid"])
                kept.append(item)
        dropped["duplicate_in_split"][name] = len(splits[name]) - len(kept)
        splits[name] = kept
    held_out = {i["qid"] for name in SPLITS if name != "train" for i in splits[name]}
    train = [i for i in splits["train"] if i["qid"] not in held_out]
    dropped["train_also_in_test"] = len(splits["train"]) - len(train)
    splits["train"] = train
    return dropped


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    out = stage_dir(recipe)
    clear_done(out)
    splits, sources, world = build(recipe)  # every source is read and checked before any write
    dropped = _dedupe(splits)
    if not any(splits.values()):
        raise ConfigError("qa-data: every split is empty")

    out.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out / DATASET) as tmp:
        _save_splits(splits, records.QA_FEATURES, records.QA_FEATURES, tmp)
    teach = []
    if world is not None:
        from datasets import Features, List, Value

        teach = fw.teaching_chats(world)
        features = Features({"messages": List({"role": Value("string"), "content": Value("string")})})
        with atomic_dir(out / TEACH) as tmp:
            _save_splits({"train": teach}, features, ["messages"], tmp)
        cfg = recipe.factworld
        write_json(out / "factworld.json",
                   {**world.to_dict(), "facts": fw.fact_index(world, kinds=cfg.kinds, n_choices=cfg.n_choices)})

    summary = {"splits": {name: _counts(items) for name, items in splits.items()},
               "sources": sources, "dropped": dropped,
               "teach": {"chats": len(teach), "known_entities": len(world.known) if world else 0,
                         "unknown_entities": len(world.unknown) if world else 0,
                         "nonexistent_entities": len(world.nonexistent) if world else 0}}
    write_json(out / "summary.json", summary)
    save_config(out, recipe)
    for name in SPLITS:
        print(f"qa-data: {name:<12} {len(splits[name]):>6} items  {summary['splits'][name]['kind']}")
    if teach:
        print(f"qa-data: teach        {len(teach):>6} chats about {len(world.known)} known entities")
    mark_done(out, {"items": {name: len(items) for name, items in splits.items()}})
    return summary
