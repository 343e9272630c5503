"""Position debiasing without a server: the orders asked, mapping answers back through them, the
mean and spread per completion, the extra-order and inconsistency rules, and the recipe keys."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.judge import positions, rubric
from pipeline.judge.session import Item, Outcome, Requests, assemble, extra_items, plan
from pipeline.stages import load_recipe
from pipeline.stages.annotate import Recipe


def recipe(**annotation) -> Recipe:
    return Recipe.model_validate({
        "stage": "annotate", "run": {"name": "t"}, "inputs": {"completions": "sets.jsonl"},
        "annotation": {"judge": {"name": "standin-judge", "backend": "openai", "base_url": "http://127.0.0.1:1/v1"},
                       **annotation}})


def rows(n_rows: int = 1, n: int = 4) -> list[dict]:
    return [{"prompt_id": f"p{r}", "source": "flan", "instruction": "Say something.",
             "completions": [{"model": f"m{c}", "response": f"text {c}", "principle": "helpfulness",
                              "custom_system_prompt": ""} for c in range(n)],
             "correct_answers": [], "incorrect_answers": [], "reference": ""} for r in range(n_rows)]


def answer(ratings_shown: list[str]) -> Outcome:
    """A parsed aspect answer (untyped aspect shape), ratings in shown order."""
    return Outcome("ok", value=[{"Rating": r, "Rationale": f"at place {i}"} for i, r in enumerate(ratings_shown)])


# --- the orders ------------------------------------------------------------------------------


def test_order_family_reverses_then_rotates_and_never_repeats():
    base = (2, 0, 3, 1)
    family = positions.order_family(base, 100)
    assert family[:4] == [base, (1, 3, 0, 2), (0, 3, 1, 2), (2, 1, 3, 0)]
    assert len(family) == len(set(family)) == 8  # rotations and their reverses of 4 places
    assert positions.order_family((1, 0), 5) == [(1, 0), (0, 1)]
    assert positions.order_family((0,), 3) == [(0,)]
    # orders 0 and 1 put each completion at places i and n-1-i
    for c in base:
        assert family[0].index(c) + family[1].index(c) == 3


def test_modes_show_input_order_one_shuffle_or_several_orders():
    data = rows(1, 4)
    assert Requests(data, recipe(position_debias="none")).orders(0) == [(0, 1, 2, 3)]
    shuffled = Requests(data, recipe()).orders(0)
    permuted = Requests(data, recipe(position_debias="permute", position_orders=3)).orders(0)
    assert len(shuffled) == 1 and permuted[0] == shuffled[0] and len(permuted) == 4  # 3 asked + 1 extra
    assert len(plan(data, recipe())) == 4 + 4
    assert len(plan(data, recipe(position_debias="permute"))) == 4 * 2 + 4
    assert len(plan(data, recipe(position_debias="permute", position_orders=3, mode="compact"))) == 3 + 4
    assert len(plan(rows(1, 1), recipe(position_debias="permute"))) == 4 + 1  # one text: one order exists


def test_each_order_is_its_own_request_and_order_zero_is_the_shuffles():
    data = rows(1, 4)
    for c in data[0]["completions"]:
        c["response"] = "the same text"  # every order shows the same texts
    shuffle, permute = Requests(data, recipe()), Requests(data, recipe(position_debias="permute"))
    keys = {o: permute.key(*permute.first(Item(0, "aspect", "honesty", order=o))) for o in (0, 1, 2)}
    assert len(set(keys.values())) == 3
    assert keys[0] == shuffle.key(*shuffle.first(Item(0, "aspect", "honesty")))


# --- agreement, mean, spread --------------------------------------------------------------------


@pytest.mark.parametrize("ratings, gap, all_agree, majority", [
    (["3", "3"], 0, True, True),
    (["3", "4"], 1, True, True),
    (["2", "4"], 1, False, False),
    (["2", "4", "4"], 1, False, True),
    (["2", "3", "4"], 0, False, False),
    (["2", "3", "4"], 1, False, True),
    (["N/A", "N/A"], 0, True, True),
    (["N/A", "3"], 4, False, False),  # N/A agrees only with N/A
    (["N/A", "N/A", "3"], 0, False, True),
])
def test_agreement_rules(ratings, gap, all_agree, majority):
    assert positions.all_agree(ratings, gap) is all_agree
    assert positions.majority_agrees(ratings, gap) is majority


def test_combine_keeps_the_mean_the_spread_and_a_public_rating():
    assert positions.combine(["3", "4"]) == {"mean": 3.5, "spread": 1.0, "rating": "4"}  # half rounds up
    assert positions.combine(["2", "3", "3"]) == {"mean": pytest.approx(8 / 3), "spread": 1.0, "rating": "3"}
    assert positions.combine(["N/A", "4"]) == {"mean": 4.0, "spread": 0.0, "rating": "4"}
    assert positions.combine(["N/A", "N/A"]) == {"mean": None, "spread": None, "rating": "N/A"}


# --- mapping back through the orders ------------------------------------------------------------


def permuted_run(shown: dict[tuple[str, int], list[str]], **annotation):
    """assemble() over one row of 4 completions, from answers given per (aspect, order index) in
    shown order; critiques all score 7."""
    data = rows(1, 4)
    rec = recipe(position_debias="permute", **annotation)
    requests = Requests(data, rec)
    items = plan(data, rec)
    outcomes = {}
    for item in items:
        if item.kind == "critique":
            outcomes[item] = Outcome("ok", value=("fine", 7))
        else:
            outcomes[item] = answer(shown[(item.aspect, item.order)])
    extras = extra_items(requests, items, outcomes)
    for item in extras:
        outcomes[item] = answer(shown[(item.aspect, item.order)])
    out_rows, failures, incomplete = assemble(data, items + extras, outcomes, requests, True)
    return requests, extras, out_rows, failures, incomplete


def by_completion(requests: Requests, order_index: int, ratings: list[int]) -> list[str]:
    """The answer (in shown order) that gives completion c the rating ratings[c] in that order."""
    order = requests.order(Item(0, "aspect", "honesty", order=order_index))
    return [str(ratings[c]) for c in order]


def test_ratings_map_back_to_their_completion_and_average_over_orders():
    requests = Requests(rows(1, 4), recipe(position_debias="permute"))
    true = [4, 3, 2, 1]
    # every order gives the completion shown first one point more (clipped at 5)
    shown = {}
    for aspect in rubric.ASPECTS:
        for o in (0, 1):
            plain = by_completion(requests, o, true)
            shown[(aspect, o)] = [str(min(5, int(plain[0]) + 1))] + plain[1:]
    _, extras, out_rows, failures, incomplete = permuted_run(shown)
    assert extras == [] and failures == [] and incomplete == 0
    order0, order1 = requests.order(Item(0, "aspect", "honesty")), requests.order(Item(0, "aspect", "honesty", order=1))
    for c, completion in enumerate(out_rows[0]["completions"]):
        record = completion["position_debias"]
        bonus = [order0[0] == c, order1[0] == c]
        want = [true[c] + b for b in bonus]
        assert record["ratings"]["honesty"] == [str(w) for w in want]
        assert record["mean"]["honesty"] == sum(want) / 2
        assert record["spread"]["honesty"] == max(want) - min(want)
        assert completion["annotations"]["honesty"]["Rating"] == positions.combine([str(w) for w in want])["rating"]
        assert completion["annotations"]["honesty"]["Rationale"] == f"at place {order0.index(c)}"  # order 0's text
        assert completion["fine-grained_score"] == pytest.approx(sum(want) / 2)
        assert completion["overall_score"] == 7.0


def test_a_wide_spread_gets_one_extra_order_then_inconsistent_or_settled():
    requests = Requests(rows(1, 4), recipe(position_debias="permute"))
    shown = {}
    for aspect in rubric.ASPECTS:
        shown[(aspect, 0)] = by_completion(requests, 0, [5, 3, 3, 3])
        shown[(aspect, 1)] = by_completion(requests, 1, [1, 3, 3, 3])  # completion 0: 5 then 1
    settled = {**shown, **{(a, 2): by_completion(requests, 2, [4, 3, 3, 3]) for a in rubric.ASPECTS}}
    _, extras, out_rows, failures, _ = permuted_run(settled)
    assert [(e.aspect, e.order) for e in extras] == [(a, 2) for a in rubric.ASPECTS]
    record = out_rows[0]["completions"][0]["position_debias"]
    assert record["ratings"]["honesty"] == ["5", "1", "4"] and record["inconsistent"] == []
    assert record["mean"]["honesty"] == pytest.approx(10 / 3) and record["spread"]["honesty"] == 4.0
    assert out_rows[0]["completions"][1]["position_debias"]["ratings"]["honesty"] == ["3", "3"]  # no extra
    assert failures == []

    unsettled = {**shown, **{(a, 2): by_completion(requests, 2, [3, 3, 3, 3]) for a in rubric.ASPECTS}}
    _, _, out_rows, failures, _ = permuted_run(unsettled)
    assert out_rows[0]["completions"][0]["position_debias"]["inconsistent"] == list(rubric.ASPECTS)
    assert [(f["status"], f["completion"], f["aspect"], f["ratings"]) for f in failures] == [
        ("inconsistent", 0, a, ["5", "1", "3"]) for a in rubric.ASPECTS]
    assert "max_position_gap=1" in failures[0]["reason"]
    assert out_rows[0]["completions"][0]["annotations"]["honesty"]["Rating"] == "3"  # kept as the mean


def test_a_failed_order_leaves_the_aspect_out_rather_than_half_averaged():
    data = rows(1, 4)
    rec = recipe(position_debias="permute")
    requests = Requests(data, rec)
    items = plan(data, rec)
    outcomes = {item: (Outcome("ok", value=("fine", 7)) if item.kind == "critique" else answer(["3"] * 4))
                for item in items}
    lost = Item(0, "aspect", "honesty", order=1)
    outcomes[lost] = Outcome("failed", reason="HTTP 500")
    out_rows, failures, incomplete = assemble(data, items, outcomes, requests, True)
    assert out_rows == [] and incomplete == 4
    assert [(f["aspect"], f["order_index"], f["status"]) for f in failures] == [("honesty", 1, "failed")]


# --- recipe keys ----------------------------------------------------------------------------------


def write_recipe(tmp_path, **annotation):
    (tmp_path / "sets.jsonl").write_text("")
    data = {"stage": "annotate", "run": {"name": "t", "root": str(tmp_path / "runs")},
            "inputs": {"completions": str(tmp_path / "sets.jsonl")},
            "annotation": {"judge": {"name": "standin-judge", "backend": "openai",
                                     "base_url": "http://127.0.0.1:1/v1"}, **annotation}}
    path = tmp_path / "annotate.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("annotation, message", [
    ({"position_debias": "reverse"}, r"annotation\.position_debias: Input should be 'none', 'shuffle' or 'permute'"),
    ({"position_debias": "permute", "position_orders": 1}, r"annotation\.position_orders: .*greater than or equal to 2"),
    ({"position_debias": "permute", "position_orders": "two"}, r"annotation\.position_orders: .*integer"),
    ({"position_debias": "permute", "max_position_gap": -1}, r"annotation\.max_position_gap: .*greater than or equal to 0"),
    ({"position_orders": 3}, r"annotation: position_orders applies only to position_debias: permute"),
    ({"position_debias": "none", "max_position_gap": 2}, r"annotation: max_position_gap applies only to position_debias: permute"),
])
def test_bad_position_settings_are_named_by_recipe_key(tmp_path, annotation, message):
    path = write_recipe(tmp_path, **annotation)
    with pytest.raises(ConfigError, match=r"annotate\.yaml: " + message):
        load_recipe(path)


def test_position_settings_have_defaults_and_take_overrides(tmp_path):
    ann = load_recipe(write_recipe(tmp_path)).annotation
    assert (ann.position_debias, ann.position_orders, ann.max_position_gap) == ("shuffle", 2, 1.0)
    ann = load_recipe(write_recipe(tmp_path), ["annotation.position_debias=permute",
                                               "annotation.position_orders=4"]).annotation
    assert (ann.position_debias, ann.position_orders) == ("permute", 4)


def test_resolved_copies_reload_whatever_the_mode(tmp_path):
    from pipeline.config import dump_recipe

    for overrides in ([], ["annotation.position_debias=permute", "annotation.max_position_gap=0.5"]):
        loaded = load_recipe(write_recipe(tmp_path), overrides)
        saved = tmp_path / "config.yaml"
        saved.write_text(dump_recipe(loaded))
        assert load_recipe(saved, check_inputs=False).model_dump() == loaded.model_dump()
