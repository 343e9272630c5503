"""Stage `prompts`: collect instructions from several sources into one prompt dataset.

Order of work, each step counted per source:
  1. read every source and map its rows to prompt records (any bad row stops the stage before
     anything is written, naming file:line);
  2. `max_words`: drop instructions longer than the source's limit;
  3. `sample`: keep a seeded random subset of the source;
  4. de-duplication across all sources, in recipe order (the first occurrence wins): exact text,
     then normalised text (Unicode NFKC, case-folded, punctuation dropped, spacing collapsed);
  5. decontamination: drop an instruction sharing any run of `decontaminate_ngram` normalised
     words with a text of the evaluation sets (or, when shorter than that, equal to one).

Output: `dataset/` (PROMPT_FEATURES), `summary.json` (counts per source and filter, and the
file:line of every dropped prompt), `_SUCCESS` last.
"""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipeline import records
from pipeline.config import ConfigError, LaunchSection, RunSection, Strict
from pipeline.formats.instructions import SOURCE_FORMATS, to_prompt
from pipeline.records import saved_rows
from pipeline.runs import DATASET, RunOptions, atomic_dir, clear_done, mark_done, save_config, stage_dir, write_json


class SourceSpec(Strict):
    name: str = Field(description="Source label written to each prompt's `source`")
    path: str | None = Field(None, description="Local JSONL, parquet or `datasets` folder")
    hub: str | None = Field(None, description="Hub dataset name (only when online)")
    split: str = "train"
    format: Literal[SOURCE_FORMATS] | None = Field(  # type: ignore[valid-type]
        None, description="Row shape; default: the source name when it is a known shape"
    )
    sample: int | None = Field(None, ge=1, description="Keep this many (seeded); None = all")
    max_words: int | None = Field(None, ge=1, description="Drop instructions longer than this")

    @model_validator(mode="after")
    def _one_location(self) -> "SourceSpec":
        if (self.path is None) == (self.hub is None):
            raise ValueError(f"source {self.name!r}: give exactly one of `path` or `hub`")
        if self.format is None and self.name not in SOURCE_FORMATS:
            raise ValueError(
                f"source {self.name!r}: set `format` (one of {', '.join(SOURCE_FORMATS)})"
            )
        return self

    @property
    def row_format(self) -> str:
        return self.format or self.name


class EvalSetSpec(Strict):
    path: str
    fields: list[str] = Field(default_factory=lambda: ["question"], description="Text fields to index")


class PromptsInputs(Strict):
    sources: list[SourceSpec] = Field(min_length=1)
    eval_sets: list[EvalSetSpec] = Field(default_factory=list)


class PromptsData(Strict):
    seed: int = 0
    dedupe: bool = True
    decontaminate_ngram: int = Field(13, ge=1, description="n of the n-gram overlap filter")


class Recipe(Strict):
    stage: Literal["prompts"]
    run: RunSection
    inputs: PromptsInputs
    data: PromptsData = PromptsData()
    launch: LaunchSection = LaunchSection()

    def input_files(self) -> list[tuple[str, str]]:
        files = [(f"inputs.sources[{i}].path", s.path) for i, s in enumerate(self.inputs.sources) if s.path]
        files += [(f"inputs.eval_sets[{i}].path", e.path) for i, e in enumerate(self.inputs.eval_sets)]
        return files


@dataclass
class Prompt:
    record: dict
    where: str  # "file:line" (or "file:row N" for tables), for error messages and the summary


@dataclass
class SourceCounts:
    read: int = 0
    too_long: int = 0
    not_sampled: int = 0
    exact_duplicate: int = 0
    near_duplicate: int = 0
    contaminated: int = 0
    kept: int = 0
    removed: dict[str, list[str]] = field(default_factory=dict)


# ---------------------------------------------------------------- reading rows


def _table_rows(dataset, label: str):
    for index, row in enumerate(dataset):
        yield f"{label}:row {index + 1}", row


def _read_source(spec: SourceSpec):
    """Yield (where, raw row) for a source; the reader is chosen by what the path is."""
    if spec.hub:
        from datasets import load_dataset

        try:
            dataset = load_dataset(spec.hub, split=spec.split)
        except Exception as err:
            raise ConfigError(f"source {spec.name!r}: cannot load hub dataset {spec.hub!r} "
                              f"(split {spec.split!r}): {str(err).splitlines()[0]}") from None
        yield from _table_rows(dataset, f"hub:{spec.hub}")
        return
    yield from saved_rows(Path(spec.path), spec.split)


def load_source(spec: SourceSpec) -> list[Prompt]:
    prompts = [Prompt(to_prompt(spec.row_format, spec.name, row, where), where)
               for where, row in _read_source(spec)]
    if not prompts:
        raise ConfigError(f"{spec.path or spec.hub}: source {spec.name!r} holds no rows")
    return prompts


# ---------------------------------------------------------------- filters

_NOT_WORD = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    """Compare texts by words only: NFKC, case-folded, punctuation dropped, spacing collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _NOT_WORD.sub(" ", text).replace("_", " ")
    return " ".join(text.split())


def ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


class Contamination:
    """Index of evaluation texts; `hits(text)` is True when the text overlaps one of them."""

    def __init__(self, texts: list[str], n: int):
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.short: set[str] = set()
        self.texts: list[str] = []
        for text in texts:
            norm = normalise(text)
            self.texts.append(norm)
            self.grams |= ngrams(norm.split(), n)

    def hits(self, text: str) -> bool:
        words = normalise(text).split()
        if len(words) >= self.n:
            return not self.grams.isdisjoint(ngrams(words, self.n))
        # Too short for an n-gram: contaminated only when it is a whole evaluation text.
        return " ".join(words) in self.texts


def load_eval_texts(recipe: Recipe) -> list[str]:
    texts = []
    for index, spec in enumerate(recipe.inputs.eval_sets):
        found = 0
        for where, row in _read_source(SourceSpec(name="eval", path=spec.path, format="generic")):
            for key in spec.fields:
                value = row.get(key)
                if isinstance(value, str) and value.strip():
                    texts.append(value)
                    found += 1
                elif isinstance(value, list):
                    texts += [v for v in value if isinstance(v, str) and v.strip()]
                    found += len(value)
        if not found:
            raise ConfigError(f"inputs.eval_sets[{index}]: {spec.path} has no text in field(s) "
                              f"{', '.join(spec.fields)}")
    return texts


# ---------------------------------------------------------------- the stage


def select(recipe: Recipe, by_source: list[list[Prompt]], eval_texts: list[str]
           ) -> tuple[list[dict], dict[str, SourceCounts]]:
    """Apply the filters in order; return the kept records and the counts per source."""
    counts: dict[str, SourceCounts] = {}
    candidates: list[tuple[SourceCounts, Prompt]] = []
    for spec, prompts in zip(recipe.inputs.sources, by_source):
        count = counts.setdefault(spec.name, SourceCounts())
        count.read += len(prompts)
        if spec.max_words:
            long = [p for p in prompts if len(p.record["instruction"].split()) > spec.max_words]
            count.too_long += len(long)
            count.removed.setdefault("too_long", []).extend(p.where for p in long)
            prompts = [p for p in prompts if len(p.record["instruction"].split()) <= spec.max_words]
        if spec.sample is not None and spec.sample < len(prompts):
            # One generator per source, seeded by the run seed and the source name, so adding or
            # reordering sources does not change what another source keeps.
            rng = random.Random(f"{recipe.data.seed}:{spec.name}")
            chosen = sorted(rng.sample(range(len(prompts)), spec.sample))
            count.not_sampled += len(prompts) - spec.sample
            prompts = [prompts[i] for i in chosen]
        candidates += [(count, p) for p in prompts]

    contamination = Contamination(eval_texts, recipe.data.decontaminate_ngram) if eval_texts else None
    seen_exact: set[str] = set()
    seen_norm: set[str] = set()
    kept = []
    for count, prompt in candidates:
        text = prompt.record["instruction"]
        reason = None
        if recipe.data.dedupe:
            norm = normalise(text)
            if text in seen_exact:
                reason = "exact_duplicate"
            elif norm in seen_norm:
                reason = "near_duplicate"
            seen_exact.add(text)
            seen_norm.add(norm)
        if reason is None and contamination is not None and contamination.hits(text):
            reason = "contaminated"
        if reason:
            setattr(count, reason, getattr(count, reason) + 1)
            count.removed.setdefault(reason, []).append(prompt.where)
            continue
        count.kept += 1
        kept.append(prompt.record)
    return kept, counts


FILTERS = ("too_long", "not_sampled", "exact_duplicate", "near_duplicate", "contaminated")


_LABELS = {"too_long": "long", "not_sampled": "unsampled", "exact_duplicate": "dup",
           "near_duplicate": "near-dup", "contaminated": "contam"}


def print_counts(counts: dict[str, SourceCounts], total: int, path: Path) -> None:
    print(f"prompts: {total} kept -> {path}")
    print(f"  {'source':<16}{'read':>6}" + "".join(f"{_LABELS[f]:>10}" for f in FILTERS) + f"{'kept':>7}")
    for name, c in counts.items():
        print(f"  {name:<16}{c.read:>6}" + "".join(f"{getattr(c, f):>10}" for f in FILTERS) + f"{c.kept:>7}")


def run(recipe: Recipe, opts: RunOptions = RunOptions()) -> dict:
    from datasets import Dataset

    path = stage_dir(recipe)
    # Read and check everything before touching the output: a bad row leaves nothing behind.
    by_source = [load_source(spec) for spec in recipe.inputs.sources]
    eval_texts = load_eval_texts(recipe)
    kept, counts = select(recipe, by_source, eval_texts)
    if not kept:
        raise ConfigError("prompts: every instruction was filtered out; nothing to write")

    path.mkdir(parents=True, exist_ok=True)
    clear_done(path)
    save_config(path, recipe)
    with atomic_dir(path / DATASET) as tmp:
        Dataset.from_list(kept, features=records.PROMPT_FEATURES).save_to_disk(str(tmp))
    summary = {
        "kept": len(kept),
        "read": sum(c.read for c in counts.values()),
        "removed": {f: sum(getattr(c, f) for c in counts.values()) for f in FILTERS},
        "decontaminate_ngram": recipe.data.decontaminate_ngram,
        "eval_texts": len(eval_texts),
        "per_source": {
            name: {"read": c.read, **{f: getattr(c, f) for f in FILTERS}, "kept": c.kept,
                   "removed": {reason: where for reason, where in c.removed.items() if where}}
            for name, c in counts.items()
        },
    }
    write_json(path / "summary.json", summary)
    mark_done(path, {"prompts": len(kept)})
    print_counts(counts, len(kept), path / DATASET)
    return summary
