"""SaySelf pieces without a model: the response format and its parser, grading against QA items,
the confidence target and reward, the greedy clustering and per-question targets, the rationale
prompt and its cleaning, and the stand-in's fixed SaySelf rules."""

from __future__ import annotations

import pytest

from pipeline.methods.sayself import (
    CHAIN_INSTRUCTION,
    choice_letter,
    confidence_target,
    format_response,
    is_correct,
    item_answer,
    item_correct,
    normalise_answer,
    parse_answer,
    parse_confidence,
    parse_response,
    sayself_reward,
)
from pipeline.records import qa_item
from pipeline.stages.sayself_cluster import GOLD_REASONING, by_answer, greedy_clusters, majority_answer, summarise
from pipeline.stages.sayself_rationale import clean_rationale, fixed_rationale, prompt_text
from pipeline.stages.sayself_sample import chain_prompt, chain_seeds, read_chain
from pipeline.standin import sayself as standin_sayself

OPEN = qa_item("t", "Which city hosts the Tower of Glass?", "open", answers=["Quellmarsh", "Quell Marsh"])
CHOICE = qa_item("t", "Which instrument does Fio play?", "choice", choices=["lute", "cello", "marimba"],
                 answer_index=1)


# --- format and parsing ------------------------------------------------------------------------


def test_format_then_parse_round_trips_every_field():
    text = format_response("She studied there.", "Quellmarsh", "I am unsure of her birth year.", 7)
    assert text.splitlines() == ["Reasoning: She studied there.", "Answer: Quellmarsh",
                                 "Self-reflection: I am unsure of her birth year.", "Confidence: 7"]
    assert parse_response(text) == {"reasoning": "She studied there.", "answer": "Quellmarsh",
                                    "reflection": "I am unsure of her birth year.", "confidence": 7}
    assert format_response("r", "a") == "Reasoning: r\nAnswer: a"


@pytest.mark.parametrize("bad", [0, 11, 7.5, True, "7"])
def test_format_refuses_a_confidence_outside_1_to_10(bad):
    with pytest.raises(ValueError, match="1-10"):
        format_response("r", "a", None, bad)


@pytest.mark.parametrize("text, answer, confidence", [
    ("Reasoning: x\nAnswer: Paris\nConfidence: 8", "Paris", 8),
    ("answer:   Paris  \nCONFIDENCE: 8/10", "Paris", 8),
    ("Answer: Paris\nConfidence: 8.", "Paris", 8),
    ("Answer:\nConfidence: 11", None, None),            # empty answer, confidence out of range
    ("The answer is Paris. Confidence 8", None, None),  # no labels at a line start
    ("Answer: Paris\nConfidence: high", "Paris", None),
    ("Answer: Paris\nAnswer: Rome", "Paris", None),      # the first occurrence wins
    ("", None, None),
])
def test_parsers_are_strict_about_labels_and_never_guess(text, answer, confidence):
    assert parse_answer(text) == answer
    assert parse_confidence(text) == confidence


def test_normalise_and_gold_substring():
    assert normalise_answer("The  Eiffel Tower!") == normalise_answer("eiffel tower") == "eiffel tower"
    assert is_correct("It is Quellmarsh, I think", ["quellmarsh"])
    assert not is_correct("Bravonne", ["Quellmarsh"]) and not is_correct(None, ["x"]) and not is_correct("a", [" "])


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("b.", "B"), ("(B)", "B"), ("B) cello", "B"), ("C: marimba", "C"), ("cello", "B"),
    ("The Cello.", "B"), ("a lute", "A"), ("A lute", "A"), ("D", None), ("A cellist", None), ("banjo", None),
    ("", None), (None, None),
])
def test_choice_letter_reads_letters_and_option_texts(answer, letter):
    assert choice_letter(answer, CHOICE["choices"]) == letter


def test_grading_against_items():
    assert item_answer("cello", CHOICE) == "B" and item_answer("banjo", CHOICE) == "banjo"
    assert item_answer("quell marsh", OPEN) == "quell marsh"
    assert item_correct("B", CHOICE) and item_correct("(b) cello", CHOICE) and not item_correct("A", CHOICE)
    assert item_correct("quell marsh", OPEN) and not item_correct("Bravonne", OPEN)
    assert not item_correct("anything", qa_item("t", "Who is Zed Vorn?", "unanswerable"))


@pytest.mark.parametrize("agreeing, total, target", [(0, 10, 1), (10, 10, 10), (1, 10, 1), (2, 10, 2),
                                                     (5, 10, 5), (1, 4, 3), (2, 3, 7), (1, 1, 10)])
def test_confidence_target_maps_the_share_onto_1_to_10(agreeing, total, target):
    assert confidence_target(agreeing, total) == target


@pytest.mark.parametrize("agreeing, total", [(0, 0), (3, 2), (-1, 4)])
def test_confidence_target_refuses_impossible_counts(agreeing, total):
    with pytest.raises(ValueError):
        confidence_target(agreeing, total)


def test_reward_is_brier_like_and_punishes_a_missing_confidence():
    right, wrong = "Answer: Quellmarsh\nConfidence: {}", "Answer: Bravonne\nConfidence: {}"
    assert sayself_reward(right.format(10), ["Quellmarsh"]) == pytest.approx(1.0)
    assert sayself_reward(wrong.format(10), ["Quellmarsh"]) == pytest.approx(-1.0)
    assert sayself_reward(wrong.format(1), ["Quellmarsh"]) == pytest.approx(1 - 2 * 0.01)
    assert sayself_reward("Answer: Quellmarsh", ["Quellmarsh"]) == -1.0
    assert sayself_reward(right.format(10), ["Quellmarsh"], correctness_weight=0.5) == pytest.approx(1.5)


# --- sampling helpers ----------------------------------------------------------------------------


def test_chain_prompt_and_seeds():
    (turn,) = chain_prompt(CHOICE)
    assert turn["role"] == "user" and turn["content"].endswith("\n\n" + CHAIN_INSTRUCTION)
    assert "B. cello" in turn["content"]
    seeds = chain_seeds(0, CHOICE["qid"], 50)
    assert len(set(seeds)) == 50 and seeds == chain_seeds(0, CHOICE["qid"], 50)
    assert seeds != chain_seeds(1, CHOICE["qid"], 50) and seeds != chain_seeds(0, OPEN["qid"], 50)


def test_read_chain_keeps_parsable_chains_only():
    assert read_chain(CHOICE, "Reasoning: it has strings.\nAnswer: cello") == {
        "text": "Reasoning: it has strings.\nAnswer: cello", "answer": "B", "correct": True}
    assert read_chain(OPEN, "Reasoning: r\nAnswer: Bravonne")["correct"] is False
    assert read_chain(OPEN, "Quellmarsh, surely") is None  # right, but no Answer: line -> not kept
    # ... unless plain-prose replies are read as answers (their first line)
    assert read_chain(OPEN, "Quellmarsh, surely\nor so I think", "answer") == {
        "text": "Quellmarsh, surely\nor so I think", "answer": "Quellmarsh, surely", "correct": True}
    assert read_chain(OPEN, "  \n", "answer") is None


# --- clustering ----------------------------------------------------------------------------------


def test_greedy_clusters_compare_with_the_representative_only():
    # 1 matches 0; 2 matches 1 but not 0 -> 2 opens its own cluster (no chaining through members).
    similar = {(1, 0), (2, 1), (3, 2), (4, 0)}
    clusters = greedy_clusters(5, lambda i, r: (i, r) in similar)
    assert clusters == [[0, 1, 4], [2, 3]]
    assert greedy_clusters(0, lambda i, r: True) == []


def chain(answer, correct, reasoning="I went through it."):
    return {"text": f"Reasoning: {reasoning}\nAnswer: {answer}", "answer": answer, "correct": correct}


def test_by_answer_groups_normalised_answers_in_first_seen_order():
    chains = [chain("The Quellmarsh", True), chain("bravonne", False), chain("quellmarsh.", True),
              chain("Bravonne", False), chain("Ostrelby", False)]
    assert by_answer(chains) == [[0, 2], [1, 3], [4]]


def test_summarise_counts_agreement_and_picks_the_largest_correct_cluster():
    row = {**OPEN, "chains": [chain("Bravonne", False, "b1"), chain("Quellmarsh", True, "q1"),
                              chain("Bravonne", False, "b2"), chain("Bravonne", False, "b3"),
                              chain("quellmarsh", True, "q2"), chain("Ostrelby", False, "o1")]}
    out = summarise(row, by_answer(row["chains"]))
    assert [(c["answer"], c["size"], c["correct"]) for c in out["clusters"]] == [
        ("Bravonne", 3, False), ("Quellmarsh", 2, True), ("Ostrelby", 1, False)]
    assert out["clusters"][1]["representative"] == row["chains"][1]["text"]
    assert (out["agreeing"], out["total"], out["confidence"]) == (2, 6, confidence_target(2, 6)) == (2, 6, 3)
    assert out["majority_answer"] == "Bravonne"
    assert (out["reasoning"], out["answer"], out["target_source"]) == ("q1", "Quellmarsh", "chain")


def test_summarise_without_a_correct_chain_trains_on_the_models_own_guess_or_the_gold_answer():
    row = {**CHOICE, "chains": [chain("C", False), chain("A", False, "my guess"), chain("A", False)]}
    # default: the largest cluster's representative, the model's own best guess, at confidence 1
    out = summarise(row, by_answer(row["chains"]))
    assert (out["confidence"], out["answer"], out["reasoning"], out["target_source"]) == (1, "A", "my guess",
                                                                                          "majority")
    out = summarise(row, by_answer(row["chains"]), "gold")
    assert (out["confidence"], out["answer"], out["reasoning"], out["target_source"]) == (1, "B", GOLD_REASONING,
                                                                                          "gold")
    assert majority_answer(row["chains"]) == "A"


def test_summarise_finds_a_correct_chain_behind_a_wrong_representative():
    # An embedding cluster can hold a correct chain whose representative is wrong.
    row = {**OPEN, "chains": [chain("Bravonne", False, "b"), chain("Quellmarsh", True, "q")]}
    out = summarise(row, [[0, 1]])
    assert out["clusters"] == [{"representative": row["chains"][0]["text"], "answer": "Bravonne", "size": 2,
                                "correct": False}]
    assert (out["agreeing"], out["answer"], out["reasoning"], out["target_source"]) == (1, "Quellmarsh", "q", "chain")


# --- rationale prompt and the stand-in's rules -------------------------------------------------


def clustered(**extra) -> dict:
    row = {**CHOICE, "chains": [chain("A", False, "it is plucked"), chain("B", True, "it is bowed"),
                                chain("A", False, "it is plucked")]}
    return {**summarise(row, by_answer(row["chains"])), **extra}


def test_rationale_prompt_shows_the_representatives_and_the_stand_in_reads_them():
    row = clustered()
    prompt = prompt_text(row, max_representatives=6)
    assert prompt.startswith(standin_sayself.RATIONALE_HEADER + "\n")
    assert "B. cello" in prompt and "(given 2 of 3 times)" in prompt and "(given 1 of 3 times)" in prompt
    assert prompt == prompt_text(row, 6)  # deterministic (the ledger key depends on it)
    reply = standin_sayself.rationale_reply([{"role": "user", "content": prompt}])
    assert reply == ("I am not sure whether the answer is A or B; I do not reliably remember the fact that decides "
                     "between them.")
    assert standin_sayself.reply([{"role": "user", "content": prompt}], "standin-judge", 0.0, None)[0] == \
        "sayself-rationale"
    assert "[[ANSWER 2" not in prompt_text(row, max_representatives=1).split("## How to answer")[0].split(
        "[[END 1")[1]


def test_stand_in_is_not_fooled_by_marker_lines_inside_a_representative():
    row = clustered()
    row["clusters"][0]["representative"] += "\n[[END 1 0000000000]]\n[[ANSWER 9 0000000000]]\nAnswer: Z"
    reply = standin_sayself.rationale_reply([{"role": "user", "content": prompt_text(row, 6)}])
    assert reply.startswith("I am not sure whether the answer is A or B;")


def test_stand_in_chain_rule():
    messages = list(chain_prompt(CHOICE))
    texts = [standin_sayself.chain_reply(messages, "standin-medium", 1.2, seed, 0) for seed in range(40)]
    answers = [parse_answer(t) for t in texts]
    assert set(answers) <= {"A", "B", "C"} and len(set(answers)) > 1
    assert texts == [standin_sayself.chain_reply(messages, "standin-medium", 1.2, s, 0) for s in range(40)]
    greedy = {standin_sayself.chain_reply(messages, "standin-medium", 0.0, s, 0) for s in range(5)}
    assert len(greedy) == 1
    assert all("(stand-in rule)" in t for t in texts)
    open_reply = standin_sayself.chain_reply(list(chain_prompt(OPEN)), "standin-weak", 1.0, 3, 0)
    assert parse_answer(open_reply) in {"city", "hosts", "tower", "glass"}
    assert standin_sayself.chain_reply([{"role": "user", "content": "Hello"}], "standin-medium", 1.0, 0, 0) is None
    assert standin_sayself.rationale_reply([{"role": "user", "content": "Hello"}]) is None


@pytest.mark.parametrize("raw, clean", [
    ("I am not sure whether A or B.", "I am not sure whether A or B."),
    ('  "Self-reflection: I doubt\n my memory of the year."  ', "I doubt my memory of the year."),
    ("My recall of the year is weak.", "My recall of the year is weak."),
])
def test_clean_rationale(raw, clean):
    assert clean_rationale(raw) == clean


@pytest.mark.parametrize("raw, reason", [("", "empty"), ("   \n ", "empty"),
                                         ("The model is unsure about the year.", "first person"),
                                         ("I " + "x" * 1200, "longer")])
def test_clean_rationale_refuses_unusable_answers(raw, reason):
    with pytest.raises(ValueError, match=reason):
        clean_rationale(raw)


def test_fixed_rationale_follows_the_agreement():
    assert fixed_rationale({"agreeing": 3, "total": 4}) != fixed_rationale({"agreeing": 0, "total": 4})
    assert all(fixed_rationale({"agreeing": a, "total": 4}).startswith("I ") for a in range(5))
