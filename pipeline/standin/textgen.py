"""Deterministic "model" answers for the stand-in server (no model involved).

`generate_answer(model, messages, temperature, seed, index)` builds an English-looking answer
from sentence pieces, seeded by a hash of its inputs, so the same request always gives the same
text. Model ids carry a quality level in [0, 1]:

    standin-strong 0.85, standin-medium 0.55, standin-weak 0.20, any other standin-<x>: from
    a hash of the id, in [0.15, 0.85].

Quality changes the *kind* of answer systematically: a high level usually reuses the
instruction's content words, has a sensible length, is often a numbered list and sometimes
states a calibrated confidence; a low level is often off-topic, one line long, or rambling with
filler phrases and repeated sentences. That is the signal the stand-in rating rule
(`pipeline.standin.rating`) and any reward model trained on its pairs can pick up.

Temperature 0 gives one answer per (model, messages), whatever the seed or choice index;
temperature > 0 mixes the seed and the choice index into the hash, so `n` choices differ and
two seeds differ. The generated text itself carries no stand-in marker on purpose: downstream
code treats it as model output. The server labels it in headers and the fingerprint instead.
"""

from __future__ import annotations

import hashlib
import json
import random

from pipeline.standin.rating import content_words, words

MODEL_QUALITY = {"standin-strong": 0.85, "standin-medium": 0.55, "standin-weak": 0.20}

# Used when the instruction has too few content words to fill the slots.
GENERIC_NOUNS = ["the main idea", "the goal", "the first step", "the context", "the result", "the details"]

OPENERS = [
    "Here is a clear way to approach {a}.",
    "The short answer is that {a} comes down to a few ideas.",
    "Let me walk through {a} one piece at a time.",
    "{A} becomes easier once it is split into parts.",
    "A good answer about {a} starts with what {b} is for.",
]

BODY = [
    "First, look at what {a} really requires before spending effort on {b}.",
    "The link between {a} and {b} matters, because each one shapes the other.",
    "A common mistake is to treat {a} as if it had nothing to do with {b}.",
    "In practice, {a} works best when it is checked against a concrete case.",
    "When {a} changes, expect {b} to shift along with it.",
    "A useful test is to ask whether {a} still holds once {b} is taken away.",
    "Short notes on {a} make the later work on {b} much faster.",
    "It also helps to set {a} and {b} side by side and compare them.",
    "Most of the effort tends to go into {a}, while {b} is usually quick.",
    "Think of {a} as the frame and {b} as what fills it in.",
    "Any plan for {a} should say how {b} will be measured.",
    "People who handle {a} well usually start small and revisit {b} later.",
]

CLOSERS = [
    "In short, get {a} right first and let {b} follow from it.",
    "To sum up, {a} and {b} together give a fairly complete picture.",
    "Put simply, {a} is the part that deserves the most care.",
]

CONFIDENCE = [
    "I am fairly confident in this answer, roughly {p} percent.",
    "I am reasonably sure about the general approach; confidence about {p}%.",
    "I am not entirely sure about every detail, so please double-check the specifics.",
]

FILLER = [
    "Well, basically, it sort of depends.",
    "I guess there is a lot one could say here, more or less.",
    "Honestly it is kind of hard to say anything for sure, you know.",
    "Anyway, stuff like this is what it is.",
    "Maybe yes, maybe no, it just depends on stuff.",
    "Or something like that, whatever works.",
]

WANDER = [
    "My favourite thing about {a} is how it looks in the evening.",
    "That reminds me of {a}, which is a whole other story.",
    "Some people prefer {a}, others prefer {b}, and that is fine.",
    "It is worth remembering that {a} was popular for a while.",
]

# Topics a weak answer drifts into instead of the question asked.
OFF_TOPIC = {
    "gardening": ["tomato seedlings", "compost heaps", "garden soil", "watering cans", "hedges"],
    "trains": ["night trains", "railway timetables", "station platforms", "ticket machines", "carriages"],
    "weather": ["summer storms", "morning fog", "weather forecasts", "sea breezes", "cold fronts"],
    "cooking": ["bread dough", "soup stock", "kitchen knives", "spice racks", "frying pans"],
    "sport": ["football boots", "penalty kicks", "running tracks", "team captains", "league tables"],
}


def model_quality(model: str) -> float:
    """Quality level of a stand-in model id (see module docstring)."""
    if model in MODEL_QUALITY:
        return MODEL_QUALITY[model]
    h = int.from_bytes(hashlib.sha256(model.encode()).digest()[:4], "big")
    return 0.15 + 0.70 * (h / 2**32)


def message_text(content) -> str:
    """Text of an OpenAI message `content`: a string or a list of {"type": "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def topic_phrases(instruction: str) -> list[str]:
    """Runs of consecutive content words in the instruction (at most 3 words each), unique.

    Runs read more naturally in the templates than lone words ("chemical energy" rather than
    "chemical" and "energy") and still carry every content word the rating rule looks for.
    """
    wanted = set(content_words(instruction))
    phrases: list[str] = []
    run: list[str] = []
    for w in words(instruction) + [""]:
        if w in wanted and len(run) < 3:
            run.append(w)
            continue
        if run and " ".join(run) not in phrases:
            phrases.append(" ".join(run))
        run = [w] if w in wanted else []
    return phrases


def _rng(model: str, messages: list, temperature: float, seed, index: int) -> random.Random:
    parts = {"model": model, "messages": messages, "temperature": temperature}
    if temperature > 0:  # sampling: seed and choice index matter; greedy: they do not
        parts["seed"] = seed
        parts["index"] = index
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()
    return random.Random(int.from_bytes(hashlib.sha256(blob).digest()[:8], "big"))


def _fill(template: str, rng: random.Random, pool: list[str]) -> str:
    a, b = rng.sample(pool, 2) if len(pool) >= 2 else (pool[0], rng.choice(GENERIC_NOUNS))
    return template.format(a=a, b=b, A=a[:1].upper() + a[1:])


def generate_answer(model: str, messages: list, temperature: float = 1.0, seed=None, index: int = 0) -> str:
    """A deterministic answer to the last user message in `messages` (OpenAI chat format)."""
    rng = _rng(model, messages, temperature, seed, index)
    quality = model_quality(model)
    # Temperature widens the spread of per-answer quality around the model's level.
    level = min(1.0, max(0.0, quality + rng.gauss(0.0, 0.08 + 0.08 * min(temperature, 2.0))))

    user = [message_text(m.get("content")) for m in messages if m.get("role") == "user"]
    system = " ".join(message_text(m.get("content")) for m in messages if m.get("role") == "system")
    instruction = user[-1] if user else ""
    topic = topic_phrases(instruction)[:6]

    on_topic = bool(topic) and rng.random() < 0.30 + 0.65 * level
    if on_topic:
        # Better answers use more of the instruction's words.
        keep = max(2, round(len(topic) * (0.35 + 0.65 * level)))
        pool = topic[:keep] if len(topic) >= 2 else topic + rng.sample(GENERIC_NOUNS, 2)
    else:
        pool = list(rng.choice(list(OFF_TOPIC.values())))

    style = rng.random()
    if style < 0.50 * (1.0 - level):
        # Too short: a single line, sometimes pure filler.
        sentence = _fill(rng.choice(BODY), rng, pool)
        if rng.random() < 0.5:
            return rng.choice(FILLER)
        return sentence
    if style < 0.95 * (1.0 - level):
        return _ramble(rng, pool, level)
    return _structured(rng, pool, level, system)


def _ramble(rng: random.Random, pool: list[str], level: float) -> str:
    sentences = [_fill(rng.choice(OPENERS), rng, pool)]
    for _ in range(rng.randint(6, 14)):
        roll = rng.random()
        if roll < 0.35 * (1.0 - level) + 0.1:
            sentences.append(rng.choice(FILLER))
        elif roll < 0.55 and len(sentences) > 1:
            sentences.append(rng.choice(sentences))  # repeats itself
        elif roll < 0.7:
            sentences.append(_fill(rng.choice(WANDER), rng, pool))
        else:
            sentences.append(_fill(rng.choice(BODY), rng, pool))
    return " ".join(sentences)


def _structured(rng: random.Random, pool: list[str], level: float, system: str) -> str:
    opener = _fill(rng.choice(OPENERS), rng, pool)
    body = [_fill(t, rng, pool) for t in rng.sample(BODY, rng.randint(3, 6))]
    closer = _fill(rng.choice(CLOSERS), rng, pool)
    if rng.random() < 0.3 + 0.5 * level:
        text = opener + "\n\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(body, 1)) + "\n\n" + closer
    else:
        text = opener + " " + " ".join(body) + "\n\n" + closer
    # Honesty-minded system prompts make a good answer say how sure it is.
    asks_honesty = any(w in system.lower() for w in ("honest", "uncertain", "confiden", "calibrat"))
    if rng.random() < (0.7 if asks_honesty else 0.25) * level:
        text += " " + rng.choice(CONFIDENCE).format(p=rng.choice([60, 70, 75, 80, 85, 90]))
    return text
