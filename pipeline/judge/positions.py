"""Position debiasing: in which orders a prompt's completions are shown to the judge, and how the
ratings from several orders become one rating per completion (`annotation.position_debias`).

LLM judges favour some positions (arXiv 2305.17926, 2406.07791). `shuffle` (UltraFeedback's
remedy) shows one random order per prompt: the bias no longer follows a model, but each single
rating still carries it. `permute` asks the same question in several orders and averages each
completion's ratings, so a bonus one order gives a position the next order gives another
completion.

The orders of a prompt, by index: 0 is the shuffled order (the one `shuffle` shows, so a
`shuffle` ledger is reused), 1 its reverse, 2 the shuffled order rotated by one place, 3 that
one reversed, and so on, skipping repeats. Order 0 and 1 put every completion at positions i
and n-1-i: a first-place bonus or a penalty growing with the position cancels in their mean.
A prompt with n completions has at most 2n distinct orders (1 for one completion, 2 for two).

Agreement: a completion's ratings for one aspect agree when they all fit within
`max_position_gap` of each other (max - min <= gap), all numbers or all N/A. After one extra
order they agree when a strict majority of them fit within such a window; otherwise the
completion is inconsistent.
"""

from __future__ import annotations

import math

NA = "N/A"


def order_family(base: tuple[int, ...], count: int) -> list[tuple[int, ...]]:
    """The first `count` distinct orders from `base` (see the module docstring)."""
    n = len(base)
    found: list[tuple[int, ...]] = []
    for step in range(max(n, 1)):
        rotated = base[step:] + base[:step]
        for order in (rotated, rotated[::-1]):
            if order not in found:
                found.append(order)
                if len(found) == count:
                    return found
    return found


def largest_agreeing(ratings: list[str], gap: float) -> int:
    """How many of `ratings` ("1".."5" or "N/A") fit together: the most numbers within a window
    of width `gap`, or the N/A ones (N/A agrees only with N/A)."""
    numbers = sorted(float(r) for r in ratings if r != NA)
    best, start = 0, 0
    for end, value in enumerate(numbers):
        while value - numbers[start] > gap:
            start += 1
        best = max(best, end - start + 1)
    return max(best, len(ratings) - len(numbers))


def all_agree(ratings: list[str], gap: float) -> bool:
    return largest_agreeing(ratings, gap) == len(ratings)


def majority_agrees(ratings: list[str], gap: float) -> bool:
    return 2 * largest_agreeing(ratings, gap) > len(ratings)


def combine(ratings: list[str]) -> dict:
    """One aspect of one completion over its orders: the mean and spread of the numbers given
    (None when every order said N/A), and the rating for the public row: the mean rounded half
    up, as the string the public schema holds, or "N/A"."""
    numbers = [float(r) for r in ratings if r != NA]
    if not numbers:
        return {"mean": None, "spread": None, "rating": NA}
    mean = sum(numbers) / len(numbers)
    return {"mean": mean, "spread": max(numbers) - min(numbers),
            "rating": str(min(5, max(1, math.floor(mean + 0.5))))}
