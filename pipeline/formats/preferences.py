"""Preference sets: public row shapes -> TRL's explicit-prompt conversational pairs.

`CONVERTERS` maps each format name to its converter `(row, where, key) -> {prompt, chosen,
rejected, margin}` (margin None = the row gives none); `PREFERENCE_FORMATS` (the reward recipe's
`format` choices) is its keys:
- `pairs`: our `pairs` output, or any chosen/rejected pairs (conversational with or without an
  explicit `prompt`, or plain strings);
- `anthropic_hh`, `shp`, `summarize`: Anthropic HH-RLHF, Stanford SHP and OpenAI
  summarize_from_feedback comparisons;
- `bigbench-hhh`: BIG-bench hhh_alignment examples (the rows `pipeline.formats.fetch` writes);
  the converted pair also carries `subset` (harmless/helpful/honest/other) for per-subset scores.
A bad row is a ConfigError naming `key` (the recipe entry) and `where` (file:line).
"""

from __future__ import annotations

import re
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


def pairs(row: dict, where: str, key: str) -> dict:
    """Explicit prompt (ours), implicit prompt (whole conversations) or plain strings."""
    _need(row, ("chosen", "rejected"), where, key)
    # A wrong type here would surface as a TypeError deep in the conversion
    _kinds(row, {"chosen": "chat", "rejected": "chat", "prompt": "chat?", "margin": "number?"}, where, key)
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise ConfigError(f"{key}: {where}: `chosen` and `rejected` must both be strings or both conversations")
    if isinstance(chosen, str):
        chosen, rejected = _assistant(chosen), _assistant(rejected)
        prompt = _user(prompt) if isinstance(prompt, str) else prompt
    if prompt is None:  # implicit prompt: the shared turns before the last answer
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    if not prompt:
        raise ConfigError(f"{key}: {where}: empty prompt")
    return {"prompt": list(prompt), "chosen": list(chosen), "rejected": list(rejected), "margin": row.get("margin")}


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


CONVERTERS: dict[str, Callable[[dict, str, str], dict]] = {
    "pairs": pairs, "anthropic_hh": anthropic_hh, "shp": shp, "summarize": summarize,
    "bigbench-hhh": bigbench_hhh,
}
PREFERENCE_FORMATS = tuple(CONVERTERS)


def convert(row: dict, fmt: str, where: str, key: str) -> dict:
    """One public or pairs row -> {prompt, chosen, rejected, margin}; margin None = none given
    (`bigbench-hhh` adds `subset`)."""
    # Unknown names fell through to `pairs` before the registry; the recipe allows only known ones.
    return CONVERTERS.get(fmt, pairs)(row, where, key)
