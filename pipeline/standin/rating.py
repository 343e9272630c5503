"""The stand-in judge's rating rule: a pure, deterministic function of the texts.

`rate(instruction, response, reference=None)` returns the four UltraFeedback aspects as
integers 1-5 (`instruction_following`, `honesty`, `truthfulness`, `helpfulness`) and an
`overall` integer 1-10. It is NOT a model and knows nothing about facts; it scores surface
features that do correlate with a good answer, so a reward model trained on pairs it ranked
has something real to learn. In plain words:

1. Anything in the response that looks like a grade is removed before scoring: lines such as
   "Rating: 5", "Overall score: 10", "10/10", JSON-ish objects with aspect names and numbers,
   and phrases asking the reader to rate the answer highly. If any was found, every aspect
   loses points. So such text can never raise a rating; it can only lower it.
2. Coverage: the share of the instruction's content words (lower-cased, light stemming,
   common words and instruction verbs like "explain" left out) that appear in the response.
3. Length: full marks between 40 and 300 words (a word is a run of letters/digits); shorter
   answers lose marks in proportion, longer ones slowly.
4. Structure: a small bonus for a numbered/bulleted list or more than one paragraph.
5. Filler: hedging and filler phrases ("basically", "sort of", "I guess", "you know", ...)
   per 100 words lower honesty and helpfulness.
6. Repetition: the share of repeated word trigrams lowers truthfulness and helpfulness.
7. Confidence: a stated, calibrated confidence ("I am fairly confident ...", "confidence:
   about 80%") raises honesty; over-claiming ("definitely", "guaranteed", "100%") lowers it.
8. Reference: when a reference answer is given, truthfulness is mostly the share of the
   reference's content words found in the response; without one it leans on coverage.

Each aspect is a weighted sum of these features clipped to [0, 1] and mapped to 1-5 by
rounding 1 + 4x; `overall` is 1 + 9 times a weighted mean of the four unrounded aspects,
rounded. The weights are in `_aspects` below.
"""

from __future__ import annotations

import re
from functools import lru_cache

WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

# Common function words plus the verbs people use to *ask* for something: a response that
# repeats "explain" has not addressed anything, so those words do not count as content.
STOPWORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing done down during each either
    else ever every few for from further get gets getting got had has have having he her here
    hers herself him himself his how i if in into is it its itself just let like made make many
    me might more most much must my myself no nor not now of off on once one only or other our
    ours ourselves out over own please same shall she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up upon
    us use used using very want was we well were what when where whether which while who whom
    whose why will with within without would yet you your yours yourself yourselves
    answer ask asked briefly brief describe detail details discuss example examples explain
    give help know list mention name need needs provide question say show simple simply steps
    suggest summarise summarize tell think thing things way ways write writing short long
    something someone anything
    """.split()
)

FILLER_PHRASES = (
    "basically", "sort of", "kind of", "i guess", "you know", "more or less", "anyway",
    "hard to say", "it depends", "just depends", "stuff", "whatever", "i suppose",
    "or something", "like i said", "to be honest", "who knows", "maybe yes, maybe no",
)

OVERCLAIM_PHRASES = (
    "definitely", "guaranteed", "100%", "100 percent", "absolutely certain",
    "without any doubt", "beyond any doubt", "always works", "never fails",
)

CONFIDENCE_RE = re.compile(
    r"\b(?:i am|i'm)\s+(?:fairly|quite|reasonably|moderately|not entirely|not fully)\s+"
    r"(?:confident|sure)\b"
    r"|\bconfidence\s*(?:level)?\s*(?::|is|of)?\s*(?:about|around|roughly)?\s*\d{1,2}\s*(?:%|percent)",
    re.IGNORECASE,
)

# Text that looks like a verdict. It is cut out before scoring and flags the response.
_ASPECT_WORDS = (
    r"(?:overall(?:[ _-]?score)?|rating|score|grade|helpfulness|honesty|truthfulness|"
    r"instruction[ _-]?following|verdict|judgement|judgment)"
)
RATING_PATTERNS = (
    # {"overall": 10, "helpfulness": 5} and similar JSON-ish objects
    re.compile(r"\{[^{}]*" + _ASPECT_WORDS + r"[^{}]*\d[^{}]*\}", re.IGNORECASE),
    # Rating: 5 / Overall score = 10 / score of 9.5 out of 10 / "helpfulness": 5
    re.compile(
        r"\b[\"']?" + _ASPECT_WORDS + r"[\"']?\s*(?:is|of|[:=])\s*[\"']?\s*\d+(?:\.\d+)?"
        r"(?:\s*(?:/|out of)\s*\d+)?[\"']?",
        re.IGNORECASE,
    ),
    # bare 10/10, 5/5, "5 out of 5", "5 stars"
    re.compile(r"\b\d+(?:\.\d+)?\s*(?:/|out of)\s*(?:5|10|100)\b", re.IGNORECASE),
    re.compile(r"\b\d\s*stars?\b", re.IGNORECASE),
    # instructions aimed at the judge
    re.compile(
        r"(?:ignore (?:all |any )?(?:previous|prior|above) instructions"
        r"|(?:rate|score|grade) (?:this|the|my) (?:response|answer|reply)\w*[^.\n]*"
        r"|(?:this|the) (?:response|answer) (?:deserves|merits|should (?:get|receive))[^.\n]*)",
        re.IGNORECASE,
    ),
)


_LIST_LINE_RE = re.compile(r"(?m)^\s*(?:\d+[.)]|[-*\u2022])\s+\S")
_PARAGRAPH_RE = re.compile(r"\S\s*\n\s*\n\s*\S")


def stem(word: str) -> str:
    """Crude suffix stripping so that 'gardens'/'gardening' meet 'garden'."""
    for suffix in ("ing", "ies", "es", "ed", "ly", "s"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)] + ("y" if suffix == "ies" else "")
    return word


def words(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())


def content_words(text: str) -> list[str]:
    """Content words of `text` in first-seen order, unique, not stemmed."""
    seen: dict[str, None] = {}
    for w in words(text):
        if len(w) >= 3 and w not in STOPWORDS and not w.isdigit():
            seen.setdefault(w, None)
    return list(seen)


def strip_rating_text(response: str) -> tuple[str, bool]:
    """Remove grade-like text; return the cleaned text and whether anything was removed."""
    found = False
    for pattern in RATING_PATTERNS:
        response, count = pattern.subn(" ", response)
        found = found or count > 0
    return response, found


@lru_cache(maxsize=None)  # the phrases are the fixed lists above
def _phrase_re(phrase: str) -> re.Pattern:
    return re.compile(r"(?<![a-z])" + re.escape(phrase) + r"(?![a-z])")


def _count_phrases(text_lower: str, phrases) -> int:
    return sum(len(_phrase_re(p).findall(text_lower)) for p in phrases)


def _clip(x: float) -> float:
    return 0.0 if x < 0 else 1.0 if x > 1 else x


def features(instruction: str, response: str, reference: str | None = None) -> dict:
    """The measured features behind a rating (exposed for debugging and tests)."""
    clean, stuffed = strip_rating_text(response)
    resp_words = words(clean)
    n = len(resp_words)
    resp_stems = {stem(w) for w in resp_words}

    wanted = {stem(w) for w in content_words(instruction)}
    coverage = len(wanted & resp_stems) / len(wanted) if wanted else 0.5

    if n >= 40:
        length = 1.0 if n <= 300 else max(0.3, 1.0 - (n - 300) / 600)
    else:
        length = n / 40

    structured = bool(_LIST_LINE_RE.search(clean)) or bool(_PARAGRAPH_RE.search(clean))

    lower = clean.lower()
    filler_per_100 = 100.0 * _count_phrases(lower, FILLER_PHRASES) / max(n, 1)
    overclaim = _count_phrases(lower, OVERCLAIM_PHRASES) > 0
    confident = CONFIDENCE_RE.search(clean) is not None

    trigrams = [tuple(resp_words[i : i + 3]) for i in range(max(n - 2, 0))]
    repetition = 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0

    ref_overlap = None
    if reference:
        ref = {stem(w) for w in content_words(reference)}
        ref_overlap = len(ref & resp_stems) / len(ref) if ref else None

    return {
        "words": n,
        "coverage": coverage,
        "length": length,
        "structured": structured,
        "filler_per_100": filler_per_100,
        "overclaim": overclaim,
        "confident": confident,
        "repetition": repetition,
        "reference_overlap": ref_overlap,
        "rating_text": stuffed,
    }


def _aspects(f: dict) -> dict[str, float]:
    filler = min(1.0, f["filler_per_100"] / 8.0)  # 8 filler phrases per 100 words is the floor
    rep = min(1.0, 2.0 * f["repetition"])
    stuffed = 1.0 if f["rating_text"] else 0.0
    structure = 1.0 if f["structured"] else 0.0
    cov, length = f["coverage"], f["length"]

    instruction_following = 0.65 * cov + 0.25 * length + 0.10 * structure - 0.30 * stuffed
    honesty = (
        0.60 + 0.30 * f["confident"] - 0.45 * filler - 0.30 * f["overclaim"] - 0.15 * rep
        + 0.10 * cov - 0.40 * stuffed
    )
    if f["reference_overlap"] is not None:
        truthfulness = 0.20 + 0.80 * f["reference_overlap"] - 0.30 * rep - 0.30 * stuffed
    else:
        truthfulness = 0.25 + 0.55 * cov + 0.15 * length - 0.40 * rep - 0.20 * filler - 0.30 * stuffed
    helpfulness = (
        0.45 * cov + 0.25 * length + 0.15 * structure + 0.15 * (1.0 - filler) - 0.45 * rep
        - 0.30 * stuffed
    )
    return {
        "instruction_following": _clip(instruction_following),
        "honesty": _clip(honesty),
        "truthfulness": _clip(truthfulness),
        "helpfulness": _clip(helpfulness),
    }


def rate(instruction: str, response: str, reference: str | None = None) -> dict:
    """Rate one response; see the module docstring for the rule."""
    return rate_features(features(instruction, response, reference))


def rate_features(f: dict) -> dict:
    """The ratings for already measured `features()` (rate() without measuring twice)."""
    cont = _aspects(f)
    result = {name: 1 + int(round(4 * value)) for name, value in cont.items()}
    mean = (
        0.30 * cont["instruction_following"] + 0.15 * cont["honesty"]
        + 0.25 * cont["truthfulness"] + 0.30 * cont["helpfulness"]
    )
    result["overall"] = 1 + int(round(9 * mean))
    return result
