"""Preference sets: public row shapes -> the one pair form every stage trains on, TRL's
explicit-prompt conversational pair (`prompt` = the turns before the answer, `chosen`/`rejected`
= the answer as assistant turns).

`CONVERTERS` maps each format name to its converter `(row, where, key) -> {prompt, chosen,
rejected, margin}` (margin None = the row gives none); `PREFERENCE_FORMATS` (the `format`
choices of reward sources and dpo inputs) is its keys:
- `auto`: the layout is detected per row by its shape (`detect`, `LAYOUTS`); a row of no known
  shape is refused, naming the file and line and the layouts expected;
- `h4`, `trl-explicit`, `trl-implicit`: HuggingFaceH4/ultrafeedback_binarized's layout and TRL's
  explicit- and implicit-prompt pairs;
- `pairs`: our `pairs` output, or any chosen/rejected pairs of those three layouts;
- `anthropic_hh`, `shp`, `summarize`: Anthropic HH-RLHF, Stanford SHP and OpenAI
  summarize_from_feedback comparisons;
- `bigbench-hhh`: BIG-bench hhh_alignment examples (the rows `pipeline.formats.fetch` writes);
  the converted pair also carries `subset` (harmless/helpful/honest/other) for per-subset scores.
A bad row is a ConfigError naming `key` (the recipe entry) and `where` (file:line).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from pipeline.config import ConfigError
from pipeline.records import field_problem


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _need(row: dict, fields: tuple[str, ...], where: str, key: str) -> None:
    missing = [f for f in fields if row.get(f) is None]
    if missing:
        raise ConfigError(f"{key}: {where}: missing {', '.join(repr(f) for f in missing)} "
                          f"(have {', '.join(sorted(row)) or 'no fields'})")


def _kinds(row: dict, schema: dict[str, str], where: str, key: str) -> None:
    """Field types (`pipeline.records.field_problem` kinds) before a converter relies on them."""
    for name, kind in schema.items():
        problem = field_problem(row.get(name), kind)
        if problem:
            raise ConfigError(f"{key}: {where}: field {name!r} {problem}")


def _hh_turns(text: str, where: str, key: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages; the last turn must be the assistant's."""
    parts = re.split(r"\n\n(Human|Assistant): ?", "\n\n" + text.lstrip("\n"))
    if len(parts) < 3 or parts[0].strip():
        raise ConfigError(f"{key}: {where}: not an HH transcript (expected '\\n\\nHuman: ...')")
    turns = [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
             for speaker, content in zip(parts[1::2], parts[2::2])]
    if turns[-1]["role"] != "assistant":
        raise ConfigError(f"{key}: {where}: the transcript does not end with an Assistant turn")
    return turns


def _same_kind(chosen, rejected, where: str, key: str) -> None:
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise ConfigError(f"{key}: {where}: `chosen` and `rejected` must both be strings or both conversations")


def _split_conversations(chosen: list, rejected: list, where: str, key: str) -> tuple[list, list, list]:
    """(prompt, chosen answer, rejected answer) of two whole conversations: they must share every
    turn before their last one, the answer."""
    if chosen[:-1] != rejected[:-1]:
        raise ConfigError(f"{key}: {where}: `chosen` and `rejected` must share every turn before their last "
                          "(the prompt); these differ earlier")
    if not chosen[:-1]:
        raise ConfigError(f"{key}: {where}: empty prompt (each conversation holds only its answer)")
    return chosen[:-1], chosen[-1:], rejected[-1:]


def trl_explicit(row: dict, where: str, key: str) -> dict:
    """TRL's explicit prompt (our `pairs` output too): `prompt` beside the two answers, all strings or
    all conversations; a string prompt with conversational answers is the user turn."""
    _need(row, ("prompt", "chosen", "rejected"), where, key)
    # A wrong type here would surface as a TypeError deep in the conversion
    _kinds(row, {"chosen": "chat", "rejected": "chat", "prompt": "chat", "margin": "number?"}, where, key)
    chosen, rejected, prompt = row["chosen"], row["rejected"], row["prompt"]
    _same_kind(chosen, rejected, where, key)
    if isinstance(chosen, str):
        chosen, rejected = _assistant(chosen), _assistant(rejected)
    if isinstance(prompt, str):
        prompt = _user(prompt)
    return {"prompt": list(prompt), "chosen": list(chosen), "rejected": list(rejected), "margin": row.get("margin")}


def trl_implicit(row: dict, where: str, key: str) -> dict:
    """TRL's implicit prompt: two whole conversations, no `prompt`; the shared turns are the prompt."""
    _need(row, ("chosen", "rejected"), where, key)
    _kinds(row, {"chosen": "chat", "rejected": "chat", "margin": "number?"}, where, key)
    _same_kind(row["chosen"], row["rejected"], where, key)
    if isinstance(row["chosen"], str):
        raise ConfigError(f"{key}: {where}: two plain strings without a `prompt` have no prompt to train on "
                          "(give `prompt`, or whole conversations)")
    prompt, chosen, rejected = _split_conversations(row["chosen"], row["rejected"], where, key)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": row.get("margin")}


def h4(row: dict, where: str, key: str) -> dict:
    """HuggingFaceH4/ultrafeedback_binarized's own layout: `prompt` a string, `chosen`/`rejected` whole
    conversations that open with that prompt as the user turn. Fed to TRL as is, the string prompt
    beside whole conversations repeats the prompt (or, read as turns, becomes a list of characters)."""
    _need(row, ("prompt", "chosen", "rejected"), where, key)
    _kinds(row, {"prompt": "text", "chosen": "messages", "rejected": "messages", "margin": "number?"}, where, key)
    for side in ("chosen", "rejected"):
        if row[side][0]["role"] != "user":
            raise ConfigError(f"{key}: {where}: `{side}` must open with the user turn (H4 layout)")
    if row["chosen"][0]["content"].strip() != row["prompt"].strip():
        raise ConfigError(f"{key}: {where}: `prompt` differs from the user turn that opens `chosen`")
    prompt, chosen, rejected = _split_conversations(row["chosen"], row["rejected"], where, key)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": row.get("margin")}


def pairs(row: dict, where: str, key: str) -> dict:
    """Any chosen/rejected pairs: H4's layout, TRL's explicit prompt (ours) or implicit prompt."""
    if detect(row) == "h4":
        return h4(row, where, key)
    return (trl_explicit if row.get("prompt") is not None else trl_implicit)(row, where, key)


def anthropic_hh(row: dict, where: str, key: str) -> dict:
    _need(row, ("chosen", "rejected"), where, key)
    _kinds(row, {"chosen": "text", "rejected": "text"}, where, key)
    chosen, rejected = _hh_turns(row["chosen"], where, key), _hh_turns(row["rejected"], where, key)
    # Both transcripts share the dialogue; only the last answer differs.
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:], "margin": None}


def shp(row: dict, where: str, key: str) -> dict:
    _need(row, ("history", "human_ref_A", "human_ref_B", "labels"), where, key)
    _kinds(row, {"history": "text", "human_ref_A": "text", "human_ref_B": "text", "labels": "int"}, where, key)
    if row["labels"] not in (0, 1):
        raise ConfigError(f"{key}: {where}: field 'labels' must be 0 or 1, got {row['labels']!r}")
    a_wins = row["labels"] == 1
    chosen, rejected = ((row["human_ref_A"], row["human_ref_B"]) if a_wins
                        else (row["human_ref_B"], row["human_ref_A"]))
    return {"prompt": _user(row["history"]), "chosen": _assistant(chosen), "rejected": _assistant(rejected),
            "margin": None}


def summarize(row: dict, where: str, key: str) -> dict:
    _need(row, ("info", "summaries", "choice"), where, key)
    _kinds(row, {"choice": "int"}, where, key)
    info, summaries, choice = row["info"], row["summaries"], row["choice"]
    if not isinstance(summaries, list) or len(summaries) != 2 or choice not in (0, 1):
        raise ConfigError(f"{key}: {where}: `summaries` must hold two entries and `choice` be 0 or 1")
    if not isinstance(info, dict) or not all(isinstance(s, dict) and isinstance(s.get("text"), str)
                                             for s in summaries):
        raise ConfigError(f"{key}: {where}: `info` must be a mapping and each summary have a string `text`")
    body = info.get("post") or info.get("article")
    if not body:
        raise ConfigError(f"{key}: {where}: `info` has neither 'post' nor 'article'")
    head = f"Summarize this post from r/{info['subreddit']}" if info.get("subreddit") else "Summarize this text"
    title = f"\nTitle: {info['title']}" if info.get("title") else ""
    prompt = f"{head} in a sentence or two.{title}\n\n{body}"
    return {"prompt": _user(prompt), "chosen": _assistant(summaries[choice]["text"]),
            "rejected": _assistant(summaries[1 - choice]["text"]), "margin": None}


def bigbench_hhh(row: dict, where: str, key: str) -> dict:
    """One hhh_alignment example: {"input": dialogue, "target_scores": {answer: 1, answer: 0},
    "subset": "honest"}. The dialogue opens with the human's words (no 'Human:' label), may hold
    earlier '\n\nAssistant:' / '\n\nHuman:' turns, and ends with the human; the answer scored 1
    is chosen. `subset` is kept ("" when the row has none)."""
    _need(row, ("input", "target_scores"), where, key)
    text, scores, subset = row["input"], row["target_scores"], row.get("subset", "")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{key}: {where}: `input` must be a non-empty string")
    if not isinstance(subset, str):
        raise ConfigError(f"{key}: {where}: `subset` must be a string, got {type(subset).__name__}")
    if (not isinstance(scores, dict) or len(scores) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values())):
        raise ConfigError(f"{key}: {where}: `target_scores` must map exactly two answers to numbers")
    (first, s1), (second, s2) = scores.items()
    if s1 == s2:
        raise ConfigError(f"{key}: {where}: `target_scores` gives both answers the same score ({s1})")
    chosen, rejected = (first, second) if s1 > s2 else (second, first)
    if not all(isinstance(a, str) and a.strip() for a in (chosen, rejected)):
        raise ConfigError(f"{key}: {where}: an answer in `target_scores` is empty")
    # Reuse the HH transcript reader: label the opening turn, end on a stand-in assistant turn.
    turns = _hh_turns("\n\nHuman: " + text.lstrip("\n") + "\n\nAssistant: -", where, key)[:-1]
    if not turns or turns[-1]["role"] != "user":
        raise ConfigError(f"{key}: {where}: `input` must end with the human's turn")
    return {"prompt": turns, "chosen": _assistant(chosen.strip()), "rejected": _assistant(rejected.strip()),
            "margin": None, "subset": subset}


# --- detection by shape ---------------------------------------------------------------------------
# What each public layout looks like (the error for an unknown row lists these). Checked in this
# order: the first shape that fits names the converter; the converter then checks the fields.
LAYOUTS = {
    "shp": "Stanford SHP: `history`, `human_ref_A`, `human_ref_B`, `labels` (1 = A preferred)",
    "summarize": "OpenAI summarize_from_feedback comparisons: `info` {post or article, title, subreddit}, "
                 "`summaries` [{text}, {text}], `choice` (0 or 1)",
    "bigbench-hhh": "BIG-bench hhh_alignment: `input` (the dialogue), `target_scores` {answer: score}",
    "anthropic_hh": "Anthropic HH-RLHF: `chosen`/`rejected` strings of '\\n\\nHuman: ...\\n\\nAssistant: ...' turns",
    "h4": "HuggingFaceH4/ultrafeedback_binarized: `prompt` string, `chosen`/`rejected` whole conversations "
          "opening with the user turn",
    "trl-explicit": "TRL explicit prompt: `prompt` + `chosen`/`rejected`, as strings or as conversations "
                    "without the prompt (our `pairs` output)",
    "trl-implicit": "TRL implicit prompt: only `chosen`/`rejected` conversations sharing the turns before "
                    "the answer",
}


def _conversation(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(turn, dict) for turn in value)


def _hh_text(value) -> bool:
    return isinstance(value, str) and value.lstrip("\n").startswith("Human:") and "\n\nAssistant:" in value


def detect(row) -> str | None:
    """The LAYOUTS name whose shape `row` has (fields and their types, not their contents), or None."""
    if not isinstance(row, dict):
        return None
    fields = {name for name, value in row.items() if value is not None}
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    answers_are = (lambda test: test(chosen) and test(rejected))
    if {"history", "human_ref_A", "human_ref_B", "labels"} <= fields:
        return "shp"
    if {"info", "summaries", "choice"} <= fields:
        return "summarize"
    if {"input", "target_scores"} <= fields:
        return "bigbench-hhh"
    if prompt is None and answers_are(_hh_text):
        return "anthropic_hh"
    if isinstance(prompt, str) and answers_are(_conversation) and chosen[0].get("role") == "user" \
            and rejected[0].get("role") == "user":
        return "h4"
    if (isinstance(prompt, str) or _conversation(prompt)) and (
            answers_are(lambda v: isinstance(v, str)) or answers_are(_conversation)):
        return "trl-explicit"
    if prompt is None and answers_are(_conversation):
        return "trl-implicit"
    return None


def auto(row: dict, where: str, key: str) -> dict:
    """Whichever public layout the row has the shape of; any other row is refused."""
    layout = detect(row)
    if layout is None:
        have = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
        expected = "; ".join(f"{name} ({text})" for name, text in LAYOUTS.items())
        raise ConfigError(f"{key}: {where}: not a known preference layout (fields: {have or 'none'}); "
                          f"expected one of: {expected}")
    return CONVERTERS[layout](row, where, key)


CONVERTERS: dict[str, Callable[[dict, str, str], dict]] = {
    "pairs": pairs, "auto": auto, "h4": h4, "trl-explicit": trl_explicit, "trl-implicit": trl_implicit,
    "anthropic_hh": anthropic_hh, "shp": shp, "summarize": summarize, "bigbench-hhh": bigbench_hhh,
}
PREFERENCE_FORMATS = tuple(CONVERTERS)


def convert(row: dict, fmt: str, where: str, key: str) -> dict:
    """One public or pairs row -> {prompt, chosen, rejected, margin}; margin None = none given
    (`bigbench-hhh` adds `subset`)."""
    # Unknown names fell through to `pairs` before the registry; the recipe allows only known ones.
    return CONVERTERS.get(fmt, pairs)(row, where, key)


# --- reading a preference source ----------------------------------------------------------------
# reward and dpo read their sources the same way: a saved DatasetDict by split, or one file.


def has_splits(path: Path) -> bool:
    """A saved DatasetDict, or a hub dataset's snapshot (its files name the splits)."""
    from pipeline.hub import is_hub_dataset_snapshot

    return path.is_dir() and ((path / "dataset_dict.json").is_file() or is_hub_dataset_snapshot(path))


def read_file_rows(path: Path, key: str) -> list[tuple[str, dict]]:
    """(file:line or file:row N, row) of a JSONL or parquet file or a single-split `datasets` folder."""
    from pipeline.records import saved_rows

    try:
        return list(saved_rows(path))
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None


def read_split_rows(path: Path, split: str, key: str, split_key: str) -> list[tuple[str, dict]]:
    """(folder/split:row N, row) of one split of a saved DatasetDict; `split_key` names the recipe key."""
    from datasets import DatasetDict

    from pipeline.hub import open_dataset

    try:
        data = open_dataset(path)
    except Exception as err:
        raise ConfigError(f"{key}: {path}: not a saved `datasets` folder ({str(err).splitlines()[0]})") from None
    if not isinstance(data, DatasetDict):
        raise ConfigError(f"{key}: {path}: a single split; {split_key} needs a DatasetDict")
    if split not in data:
        raise ConfigError(f"{split_key}: {path} has no split {split!r} (has {', '.join(data)})")
    return [(f"{path}/{split}:row {i + 1}", row) for i, row in enumerate(data[split])]
