"""Public preference layouts: each is detected by its shape and converted to the one pair form the
stages train on (`prompt` = the turns before the answer, `chosen`/`rejected` = the answer); a row of
no known shape is refused naming the file and line and the layouts expected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.formats.preferences import CONVERTERS, LAYOUTS, convert, detect

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples" / "preferences"


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def first_row(name: str) -> dict:
    return json.loads((SAMPLES / name).read_text(encoding="utf-8").splitlines()[0])


# (sample file, its layout, the pair its first row must become)
EXPECTED = [
    ("h4.jsonl", "h4", {
        "prompt": user("How long should I boil an egg for a runny yolk?"),
        "chosen": assistant("About six minutes from when it goes into boiling water, then straight into cold "
                            "water to stop it cooking."),
        "rejected": assistant("Eggs are boiled in water."), "margin": None}),
    ("trl_explicit.jsonl", "trl-explicit", {
        "prompt": user("Name a fruit that is high in vitamin C."),
        "chosen": assistant("Oranges are a classic example, and kiwis have even more per gram."),
        "rejected": assistant("Bread."), "margin": None}),
    ("trl_explicit_text.jsonl", "trl-explicit", {
        "prompt": user("Translate 'good morning' into French."),
        "chosen": assistant("Bonjour."), "rejected": assistant("Buenos dias."), "margin": None}),
    ("trl_implicit.jsonl", "trl-implicit", {
        "prompt": user("Which planet is closest to the sun?"),
        "chosen": assistant("Mercury."), "rejected": assistant("Jupiter."), "margin": None}),
    ("anthropic_hh.jsonl", "anthropic_hh", {
        "prompt": user("How do I keep basil alive on a windowsill?"),
        "chosen": assistant("Give it the sunniest window you have, water when the top of the soil feels dry, "
                            "and pinch off flower buds so it keeps making leaves."),
        "rejected": assistant("Basil is a plant."), "margin": None}),
    ("shp.jsonl", "shp", {
        "prompt": user("Why does my bread come out dense?"),
        "chosen": assistant("Usually the dough hasn't risen enough. Let it proof until it has roughly doubled, "
                            "and check that your yeast is still active."),
        "rejected": assistant("Use more flour."), "margin": None}),
]


@pytest.mark.parametrize("name,layout,pair", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_each_layout_converts_to_the_expected_pair(name, layout, pair):
    row = first_row(name)
    assert detect(row) == layout
    for fmt in (layout, "auto"):
        assert convert(row, fmt, f"{name}:1", "k") == pair


def test_summarize_converts_to_the_chosen_summary():
    row = first_row("summarize.jsonl")
    assert detect(row) == "summarize"
    pair = convert(row, "auto", "summarize.jsonl:1", "k")
    assert pair["chosen"] == assistant(row["summaries"][row["choice"]]["text"])
    assert pair["rejected"] == assistant(row["summaries"][1 - row["choice"]]["text"])
    assert pair["prompt"][0]["role"] == "user" and row["info"]["post"] in pair["prompt"][0]["content"]


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.glob("*.jsonl")))
def test_every_row_of_every_sample_is_detected_and_converts(name):
    for line, text in enumerate((SAMPLES / name).read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(text)
        layout = detect(row)
        assert layout in LAYOUTS and layout in CONVERTERS, f"{name}:{line}"
        pair = convert(row, "auto", f"{name}:{line}", "k")
        assert pair["prompt"] and pair["chosen"][-1]["role"] == pair["rejected"][-1]["role"] == "assistant"


def test_multi_turn_conversations_keep_the_earlier_turns_in_the_prompt():
    row = json.loads((SAMPLES / "trl_implicit.jsonl").read_text().splitlines()[1])
    pair = convert(row, "auto", "trl_implicit.jsonl:2", "k")
    assert [t["role"] for t in pair["prompt"]] == ["user", "assistant", "user"]
    assert pair["rejected"] == assistant("Bring a suitcase.")


def test_the_default_pairs_format_reads_h4_rows_as_turns_not_characters():
    # Before: the string prompt became a list of its characters and the whole conversations stayed answers.
    row = first_row("h4.jsonl")
    pair = convert(row, "pairs", "h4.jsonl:1", "k")
    assert pair == EXPECTED[0][2]
    ours = {"prompt": user("Hi?"), "chosen": assistant("Hello."), "rejected": assistant("Go away."), "margin": 0.5}
    assert convert(ours, "pairs", "x:1", "k") == ours  # our pairs output passes through unchanged


@pytest.mark.parametrize("row,fmt,message", [
    ({"prompt": "Hi?", "chosen": user("Hello?") + assistant("Hi."), "rejected": user("Hi?") + assistant("No.")},
     "h4", "`prompt` differs from the user turn"),
    ({"chosen": user("A?") + assistant("Yes."), "rejected": user("B?") + assistant("No.")},
     "trl-implicit", "must share every turn before their last"),
    ({"chosen": assistant("Yes."), "rejected": assistant("No.")}, "trl-implicit", "empty prompt"),
    ({"chosen": "Yes.", "rejected": "No."}, "trl-implicit", "no prompt to train on"),
    ({"prompt": "Q?", "chosen": "Yes.", "rejected": assistant("No.")}, "trl-explicit", "must both be strings"),
])
def test_rows_that_do_not_fit_their_layout_are_named(row, fmt, message):
    with pytest.raises(ConfigError, match=rf"reward\.sources\[2\]: data\.jsonl:7: .*{message}"):
        convert(row, fmt, "data.jsonl:7", "reward.sources[2]")


@pytest.mark.parametrize("row", [
    {"question": "What is 2 + 2?", "answer": "4"},
    {"chosen": "plain text", "rejected": "other text"},  # strings, but no prompt and no HH turns
    {"response_0": "a", "response_1": "b", "better_response_id": 1},
])
def test_an_unknown_layout_is_refused_naming_the_line_and_the_layouts(row):
    with pytest.raises(ConfigError) as err:
        convert(row, "auto", "prefs.jsonl:3", "inputs.dataset")
    text = str(err.value)
    assert text.startswith("inputs.dataset: prefs.jsonl:3: not a known preference layout")
    assert all(name in text for name in LAYOUTS)
