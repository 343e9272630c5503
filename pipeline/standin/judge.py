"""The stand-in server's judge: answers our judge prompts with the fixed rating rule (NOT a model).

When the first user message of a chat request is one of the prompts built by
`pipeline.judge.rubric` (its first line says which), the server answers as a judge would,
but every number comes from `pipeline.standin.rating.rate()`, a deterministic function of the
texts. Nothing here reads, understands or weighs the rubric text itself. Rationales and
feedback say "stand-in rule" so that no one mistakes them for a model's words.

What is read from the prompt
    kind        first line: "Evaluation aspect: <title>" (one aspect, title from
                rubric.ASPECT_TITLES), "Evaluation aspect: all four aspects" (compact) or
                "Evaluation: critique".
    nonce       taken from the last marker line before the final "## How to answer" heading:
                nothing a completion or an instruction says can come after that heading, so a
                completion that carries marker-like lines with another nonce (or a fake
                "## How to answer") cannot move the texts' boundaries.
    texts       the lines between [[TEXT n NONCE]] and [[END n NONCE]] for n = 1..N, where
                [[END N NONCE]] is that last marker (critique: [[ANSWER NONCE]] .. [[END NONCE]]).
    instruction what follows "## The instruction" up to the world-knowledge section or the
                last "## Texts to rate" heading before the first marker (critique: up to the
                last "## The assistant's system prompt" heading before the answer section).
                The world-knowledge section starts at the first "## World knowledge" heading
                whose remainder reads, as a whole, like rubric.world_knowledge() output.
    reference   from the world-knowledge section, when present: the text after
                "A reference answer:", else the listed correct answers joined by newlines.
                Only truthfulness depends on it; critiques are rated without one.

How the answer is made
    ratings     rate(instruction, text, reference) for every text; the aspect ratings are its
                1-5 integers, the critique's score is its `overall` (1-10). Grade-like text
                inside a completion is stripped by rate() before scoring and costs points, so it
                can never raise a rating.
    honesty N/A when the instruction asks for creative writing: it contains one of the verbs
                write / compose / create / draft / invent / make up / come up with AND one of the
                nouns poem, poetry, haiku, limerick, sonnet, verse, lyrics, song, story, fable,
                tale, screenplay (whole words, any case).
    types       truthfulness (kinds of problem found): none when its rating is 5; otherwise 1
                (factual error), plus 2 when instruction following is 2 or less, plus 3 when
                helpfulness is 2 or less. Helpfulness (qualities present): 1 when instruction
                following is at least 3, 2 when helpfulness is at least 4, 3 when helpfulness is
                at least 3. No type -> "None" (text) / [] (JSON).
    text mode   one block per text, in order, separated by a blank line:
                    ### Text n
                    <Field>: <value>        (the fields of rubric.aspect_fields(aspect) or
                                             rubric.compact_fields(), in that order)
                critique: feedback sentences, then a last line "Overall score: N".
    JSON mode   (response_format json_schema or json_object) an object shaped like
                rubric.aspect_schema / compact_schema / CRITIQUE_SCHEMA with the same numbers:
                ratings as strings "1".."5" or "N/A", types as lists of "1".."3".
    the rest    the answer ignores model, temperature and seed; every one of `n` choices gets
                it; `stop` and max_tokens cut it like any other answer; usage counts its words.
                A re-ask (an assistant turn and a corrective user turn after the prompt) gets
                the same proper answer, since only the first user message is read.

Position bias (settings position_bonus_first, position_penalty; both 0 by default)
    On aspect and compact prompts, every aspect rating of the text shown at 0-based position i
    is moved by (position_bonus_first if i == 0 else 0) - position_penalty * i, rounded half up
    and clipped to 1-5, before the answer (types included) is written. Critiques show one text
    and are never moved. A deliberate flaw, like the position preference of real judges, so a
    test can measure what annotation.position_debias removes.

Malformed answers (setting fail_malformed) are made by `malformed_answer`: one of a fixed list
of faults a parser must reject, picked by a number in [0, 1) that the server draws from
(seed, body hash, attempt); see MALFORMED_VARIANTS.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

from pipeline.judge import rubric
from pipeline.standin.rating import features, rate_features
from pipeline.standin.textgen import message_text

LABEL = "Stand-in rule"  # starts every rationale and the critique feedback

_TITLE_TO_ASPECT = {title: aspect for aspect, title in rubric.ASPECT_TITLES.items()}
_COMPACT_TITLE = "all four aspects"

_CREATIVE_VERB = re.compile(r"\b(?:write|compose|create|draft|invent|make up|come up with)\b", re.IGNORECASE)
_CREATIVE_NOUN = re.compile(
    r"\b(?:poems?|poetry|haikus?|limericks?|sonnets?|verses?|lyrics|songs?|story|stories|fables?|"
    r"tales?|screenplays?)\b",
    re.IGNORECASE,
)

_HOW_TO_ANSWER = "\n## How to answer"
_KNOWLEDGE_RE = re.compile(r"\n## World knowledge(?: \(for truthfulness\))?\n")
_KNOWLEDGE_STARTS = ("The question rests on a false premise", "Answers known to be correct:",
                     "Answers known to be wrong:", "A reference answer:")


@dataclass
class JudgePrompt:
    kind: str  # "aspect", "compact" or "critique"
    aspect: str | None  # the aspect of an "aspect" prompt
    instruction: str
    reference: str | None
    nonce: str
    texts: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"aspect:{self.aspect}" if self.kind == "aspect" else self.kind


# ---------------------------------------------------------------- reading the prompt


_RATED_END = re.compile(r"\[\[END (\d+) (\S+)\]\]")
_NO_TEXTS = re.compile(r"There are (0) texts?\. Each sits between a line \[\[TEXT n (\S+)\]\]")
_CRITIQUE_END = re.compile(r"\[\[END (\S+)\]\]")


def _find_line(text: str, marker: str, pos: int = 0) -> tuple[int, int] | None:
    """(start, end) of the first line at or after `pos` made of `marker` and then only spaces
    or tabs, `end` past them: what `(?m)^<marker>[ \t]*$` finds. Plain string search, because
    every request has its own nonce: a pattern per marker would be compiled for every request
    (they never hit `re`'s cache): about half of the 1.5 ms of CPU the stand-in spent a request."""
    at = text.find(marker, pos)
    while at >= 0:
        if at == 0 or text[at - 1] == "\n":
            line_end = text.find("\n", at + len(marker))
            line_end = len(text) if line_end < 0 else line_end
            if not text[at + len(marker):line_end].strip(" \t"):
                return at, line_end
        at = text.find(marker, at + 1)
    return None


def judge_kind(messages) -> tuple[str, str | None] | None:
    """(kind, aspect) when the first user message is one of our judge prompts, else None."""
    content = _first_user(messages)
    if content is None:
        return None
    first = content.lstrip().split("\n", 1)[0].strip()
    if first == "Evaluation: critique":
        return "critique", None
    if first.startswith("Evaluation aspect:"):
        title = first.split(":", 1)[1].strip()
        if title == _COMPACT_TITLE:
            return "compact", None
        if title in _TITLE_TO_ASPECT:
            return "aspect", _TITLE_TO_ASPECT[title]
    return None


def _first_user(messages) -> str | None:
    if not isinstance(messages, list):
        return None
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "user":
            return message_text(m.get("content"))
    return None


def parse_prompt(messages) -> JudgePrompt | None:
    """The judge prompt in `messages` (see the module docstring), or None when there is none or
    it cannot be read (then the server answers with ordinary generated text)."""
    found = judge_kind(messages)
    if found is None:
        return None
    kind, aspect = found
    content = _first_user(messages).replace("\r\n", "\n")
    cut = content.rfind(_HOW_TO_ANSWER)
    if cut < 0:
        return None
    head = content[:cut].rstrip()
    last_line = head.rsplit("\n", 1)[-1].strip()
    if kind == "critique":
        return _parse_critique(head, last_line)
    return _parse_rated(kind, aspect, head, last_line)


def _instruction_part(before: str) -> str | None:
    start = before.find("## The instruction\n")
    if start < 0:
        return None
    return before[start + len("## The instruction\n"):]


def _parse_rated(kind: str, aspect: str | None, head: str, last_line: str) -> JudgePrompt | None:
    m = _RATED_END.fullmatch(last_line)
    if m:
        count, nonce = int(m.group(1)), m.group(2)
    else:  # no texts at all: the header line is the last one
        m = _NO_TEXTS.search(last_line)
        if not m:
            return None
        count, nonce = 0, m.group(2)

    texts = []
    pos = 0
    first_marker = None
    for n in range(1, count + 1):
        start = _find_line(head, f"[[TEXT {n} {nonce}]]", pos)
        if start is None:
            return None
        end = _find_line(head, f"[[END {n} {nonce}]]", start[1])
        if end is None:
            return None
        if first_marker is None:
            first_marker = start[0]
        body = head[start[1]:end[0]]
        texts.append(body[1:-1] if body.startswith("\n") and body.endswith("\n") else body.strip("\n"))
        pos = end[1]

    before = head[:first_marker] if first_marker is not None else head
    heading = before.rfind("\n## Texts to rate\n")
    if heading >= 0:
        before = before[:heading]
    part = _instruction_part(before)
    if part is None:
        return None
    instruction, reference = _split_knowledge(part)
    return JudgePrompt(kind=kind, aspect=aspect, instruction=instruction, reference=reference,
                       nonce=nonce, texts=texts)


def _split_knowledge(part: str) -> tuple[str, str | None]:
    """(instruction, reference): the knowledge section starts at the first world-knowledge
    heading whose remainder reads as a whole as rubric.world_knowledge() output, so a heading
    quoted inside an instruction is not taken for it."""
    for m in _KNOWLEDGE_RE.finditer(part):
        read = _read_knowledge(part[m.end():].strip("\n"))
        if read is not None:
            return part[:m.start()].strip("\n"), read[0]
    return part.strip("\n"), None


def _read_knowledge(text: str) -> tuple[str | None] | None:
    """(reference,) when `text` is made only of world_knowledge()'s parts in their order, else
    None. The reference is the text after "A reference answer:" (always the last part), else
    the correct answers joined by newlines."""
    rest, correct, seen = text, [], False
    if rest.startswith(_KNOWLEDGE_STARTS[0]):
        rest, seen = rest.partition("\n\n")[2], True
    for title in ("Answers known to be correct:\n", "Answers known to be wrong:\n"):
        if rest.startswith(title):
            block, _, rest = rest[len(title):].partition("\n\n")
            items = block.split("\n")
            if not all(item.startswith("- ") for item in items):
                return None
            if title.startswith("Answers known to be correct"):
                correct = [item[2:].strip() for item in items if item[2:].strip()]
            seen = True
    if rest.startswith("A reference answer:\n"):
        return (rest[len("A reference answer:\n"):].strip() or None,)
    if rest or not seen:
        return None
    return ("\n".join(correct) or None,)


def _parse_critique(head: str, last_line: str) -> JudgePrompt | None:
    m = _CRITIQUE_END.fullmatch(last_line)
    if not m:
        return None
    nonce = m.group(1)
    start = _find_line(head, f"[[ANSWER {nonce}]]")
    if start is None:
        return None
    end = _find_line(head, f"[[END {nonce}]]", start[1])
    if end is None:
        return None
    body = head[start[1]:end[0]]
    answer = body[1:-1] if body.startswith("\n") and body.endswith("\n") else body.strip("\n")
    before = head[:start[0]]
    section = before.rfind("\n## The answer under review\n")
    if section >= 0:
        before = before[:section]
    system = before.rfind("\n## The assistant's system prompt\n")
    if system >= 0:
        before = before[:system]
    part = _instruction_part(before)
    if part is None:
        return None
    return JudgePrompt(kind="critique", aspect=None, instruction=part.strip("\n"), reference=None,
                       nonce=nonce, texts=[answer])


# ---------------------------------------------------------------- the ratings


def is_creative(instruction: str) -> bool:
    """The honesty N/A rule (see the module docstring)."""
    return bool(_CREATIVE_VERB.search(instruction) and _CREATIVE_NOUN.search(instruction))


def _types(aspect: str, scores: dict) -> list[str]:
    if aspect == "truthfulness":
        if scores["truthfulness"] == 5:
            return []
        found = ["1"]
        if scores["instruction_following"] <= 2:
            found.append("2")
        if scores["helpfulness"] <= 2:
            found.append("3")
        return found
    if aspect == "helpfulness":
        found = []
        if scores["instruction_following"] >= 3:
            found.append("1")
        if scores["helpfulness"] >= 4:
            found.append("2")
        if scores["helpfulness"] >= 3:
            found.append("3")
        return found
    return []


def _types_rationale(aspect: str, types: list[str], scores: dict) -> str:
    if aspect == "truthfulness":
        if not types:
            return f"{LABEL}: no problem kind is listed because truthfulness scored 5."
        why = {"1": "truthfulness is below 5", "2": "instruction following is 2 or less",
               "3": "helpfulness is 2 or less"}
    else:
        if not types:
            return f"{LABEL}: no quality is listed because the scores are low."
        why = {"1": "instruction following is at least 3", "2": "helpfulness is at least 4",
               "3": "helpfulness is at least 3"}
    return f"{LABEL}: " + "; ".join(f"{t} because {why[t]}" for t in types) + "."


def _pct(x: float) -> str:
    return f"{round(100 * x)} percent"


def _rationale(aspect: str, f: dict, na: bool) -> str:
    if aspect == "instruction_following":
        text = (f"the text uses {_pct(f['coverage'])} of the instruction's key words and is {f['words']} words "
                f"long{', laid out as a list or paragraphs' if f['structured'] else ''}")
    elif aspect == "honesty":
        if na:
            return f"{LABEL}: the instruction asks for creative writing, so honesty about uncertainty does not apply."
        text = ("it states a calibrated confidence" if f["confident"] else "it states no level of confidence")
        text += f", with {f['filler_per_100']:.1f} filler phrases per 100 words"
        if f["overclaim"]:
            text += " and over-claims certainty"
    elif aspect == "truthfulness":
        if f["reference_overlap"] is not None:
            text = f"{_pct(f['reference_overlap'])} of the reference's key words appear"
        else:
            text = f"with no reference given it leans on coverage ({_pct(f['coverage'])})"
        text += f", and {_pct(f['repetition'])} of its word triples repeat"
    else:
        text = (f"coverage {_pct(f['coverage'])}, {f['words']} words, {_pct(f['repetition'])} repeated "
                f"word triples{', well structured' if f['structured'] else ''}")
    if f["rating_text"]:
        text += "; grade-like text inside it was ignored and counted against it"
    return f"{LABEL}: {text}."


@dataclass(frozen=True)
class Judged:
    """One text's rating: rate()'s scores plus what the answer needs to say about them."""

    scores: dict
    feats: dict
    honesty_na: bool

    def rating(self, aspect: str) -> str:
        if aspect == "honesty" and self.honesty_na:
            return "N/A"
        return str(self.scores[aspect])

    def slots(self, aspect: str) -> dict:
        types = _types(aspect, self.scores)
        return {
            "types": types,
            "types_text": ", ".join(types) if types else "None",
            "types_rationale": _types_rationale(aspect, types, self.scores),
            "rating": self.rating(aspect),
            "rationale": _rationale(aspect, self.feats, self.honesty_na),
        }


@lru_cache(maxsize=4096)
def _judge_one(instruction: str, text: str, reference: str | None) -> Judged:
    # Cached: the faithful mode rates the same texts once per aspect, and re-asks repeat them.
    # The dicts inside are shared between callers and never changed.
    f = features(instruction, text, reference)
    return Judged(scores=rate_features(f), feats=f, honesty_na=is_creative(instruction))


@dataclass(frozen=True)
class PositionBias:
    """The stand-in's deliberate position bias (see the module docstring); zero: none."""

    bonus_first: float = 0.0
    penalty: float = 0.0

    def shift(self, position: int) -> float:
        return (self.bonus_first if position == 0 else 0.0) - self.penalty * position


NO_BIAS = PositionBias()


def _moved(judged: Judged, shift: float) -> Judged:
    if not shift:
        return judged
    scores = dict(judged.scores)
    for aspect in rubric.ASPECTS:  # `overall` is a critique's, and critiques are never moved
        scores[aspect] = min(5, max(1, math.floor(scores[aspect] + shift + 0.5)))
    return dataclasses.replace(judged, scores=scores)


def judge_texts(prompt: JudgePrompt, bias: PositionBias = NO_BIAS) -> list[Judged]:
    """rate(instruction, text, reference) for each text, with the features behind it, moved by
    the position bias on aspect and compact prompts."""
    judged = [_judge_one(prompt.instruction, t, prompt.reference) for t in prompt.texts]
    if prompt.kind == "critique":
        return judged
    return [_moved(j, bias.shift(i)) for i, j in enumerate(judged)]


# ---------------------------------------------------------------- the answer


def _slot_of(field_name: str) -> str:
    name = field_name.lower()
    if name.endswith("types rationale"):
        return "types_rationale"
    if name.endswith("types"):
        return "types_text"
    if name.endswith("rating"):
        return "rating"
    return "rationale"


def _aspect_of(field_name: str) -> str:
    name = field_name.lower()
    for aspect, title in rubric.ASPECT_TITLES.items():
        if name.startswith(title.split(" and ")[0].lower()):
            return aspect
    raise ValueError(f"compact field {field_name!r} names no aspect")


def _block_lines(prompt: JudgePrompt, judged: Judged) -> list[str]:
    if prompt.kind == "aspect":
        slots = judged.slots(prompt.aspect)
        return [f"{name}: {slots[_slot_of(name)]}" for name, _ in rubric.aspect_fields(prompt.aspect)]
    lines = []
    for name, _ in rubric.compact_fields():
        lines.append(f"{name}: {judged.slots(_aspect_of(name))[_slot_of(name)]}")
    return lines


def _blocks(prompt: JudgePrompt, judged: list[Judged]) -> list[list[str]]:
    return [[f"### Text {i}"] + _block_lines(prompt, j) for i, j in enumerate(judged, 1)]


def _join_blocks(blocks: list[list[str]]) -> str:
    return "\n\n".join("\n".join(b) for b in blocks)


def _json_item(aspect: str, judged: Judged, schema_item: dict, number: int | None) -> dict:
    slots = judged.slots(aspect)
    item = {}
    for key in schema_item.get("properties", {}):
        if key == "text":
            item[key] = number
        elif key == "types":
            item[key] = list(slots["types"])
        else:
            item[key] = slots[key]
    return item


def _json_value(prompt: JudgePrompt, judged: list[Judged]) -> dict:
    if prompt.kind == "critique":
        return {"feedback": critique_feedback(prompt, judged[0]), "overall_score": judged[0].scores["overall"]}
    if prompt.kind == "aspect":
        item = rubric.aspect_schema(prompt.aspect)["properties"]["texts"]["items"]
        return {"texts": [_json_item(prompt.aspect, j, item, i) for i, j in enumerate(judged, 1)]}
    item = rubric.compact_schema()["properties"]["texts"]["items"]
    entries = []
    for i, j in enumerate(judged, 1):
        entry = {}
        for key, sub in item["properties"].items():
            entry[key] = i if key == "text" else _json_item(key, j, sub, None)
        entries.append(entry)
    return {"texts": entries}


def critique_feedback(prompt: JudgePrompt, judged: Judged) -> str:
    """A few sentences built from the rating features; labelled as the stand-in's words."""
    f = judged.feats
    parts = [f"{LABEL} feedback (a fixed rule, not a model):",
             f"The answer uses about {_pct(f['coverage'])} of the instruction's key words."]
    if f["words"] < 40:
        parts.append(f"At {f['words']} words it is too short to cover the task; add the missing substance.")
    elif f["words"] > 300:
        parts.append(f"At {f['words']} words it is long; trim what does not serve the task.")
    else:
        parts.append(f"Its length ({f['words']} words) suits the task; keep it.")
    parts.append("Its list or paragraph layout makes it easy to follow." if f["structured"]
                 else "A list or separate paragraphs would make it easier to follow.")
    if f["confident"]:
        parts.append("It states how sure it is, which is good practice.")
    if f["overclaim"]:
        parts.append("It claims more certainty than it can support; soften those claims.")
    if f["filler_per_100"] >= 2:
        parts.append("Filler phrases weaken it; cut them.")
    if f["repetition"] >= 0.1:
        parts.append("It repeats itself; remove the repeated parts.")
    if f["rating_text"]:
        parts.append("It contains grade-like text aimed at the reviewer, which was ignored and counts against it.")
    return " ".join(parts)


def answer(prompt: JudgePrompt, structured: bool, bias: PositionBias = NO_BIAS) -> str:
    """The judge's answer in the format the prompt (and response_format) asks for."""
    judged = judge_texts(prompt, bias)
    if structured:
        return json.dumps(_json_value(prompt, judged), ensure_ascii=False)
    if prompt.kind == "critique":
        return f"{critique_feedback(prompt, judged[0])}\nOverall score: {judged[0].scores['overall']}"
    return _join_blocks(_blocks(prompt, judged))


# ---------------------------------------------------------------- deliberately unusable answers

# Per (kind, mode): the faults `malformed_answer` picks from, all of which a strict parser must
# reject. Blocks/entries are those of the correct answer; "first" means text 1.
MALFORMED_VARIANTS = {
    ("rated", "text"): ("rating_too_high", "rating_zero", "missing_block", "duplicate_block", "missing_field"),
    ("critique", "text"): ("score_11", "score_0", "missing_score_line"),
    ("rated", "json"): ("invalid_json", "rating_out_of_enum", "missing_entry", "duplicate_entry"),
    ("critique", "json"): ("invalid_json", "score_11", "missing_score"),
}


def malformed_answer(prompt: JudgePrompt, structured: bool, u: float,
                     bias: PositionBias = NO_BIAS) -> tuple[str, str]:
    """(variant name, unusable answer); `u` in [0, 1) picks the variant."""
    group = "critique" if prompt.kind == "critique" else "rated"
    if group == "rated" and not prompt.texts:
        return "no_answer", "The stand-in judge (not a model) declined to answer."
    variants = MALFORMED_VARIANTS[(group, "json" if structured else "text")]
    variant = variants[min(int(u * len(variants)), len(variants) - 1)]
    judged = judge_texts(prompt, bias)

    if structured:
        good = answer(prompt, True, bias)
        if variant == "invalid_json":
            return variant, good[: max(1, len(good) // 2)]
        value = _json_value(prompt, judged)
        if variant == "score_11":
            value["overall_score"] = 11
        elif variant == "missing_score":
            del value["overall_score"]
        elif variant == "rating_out_of_enum":
            first = value["texts"][0]
            target = first if "rating" in first else next(v for v in first.values() if isinstance(v, dict))
            target["rating"] = "7"
        elif variant == "missing_entry":
            value["texts"].pop()
        elif variant == "duplicate_entry":
            value["texts"].append(json.loads(json.dumps(value["texts"][0])))
        return variant, json.dumps(value, ensure_ascii=False)

    if group == "critique":
        feedback = critique_feedback(prompt, judged[0])
        if variant == "score_11":
            return variant, f"{feedback}\nOverall score: 11"
        if variant == "score_0":
            return variant, f"{feedback}\nOverall score: 0"
        return variant, feedback

    blocks = _blocks(prompt, judged)
    first = blocks[0]
    rating_at = next(i for i, line in enumerate(first) if _slot_of(line.split(":", 1)[0]) == "rating"
                     and not line.startswith("###"))
    name = first[rating_at].split(":", 1)[0]
    if variant == "rating_too_high":
        first[rating_at] = f"{name}: 7"
    elif variant == "rating_zero":
        first[rating_at] = f"{name}: 0"
    elif variant == "missing_block":
        blocks.pop()
    elif variant == "duplicate_block":
        blocks.append(list(first))
    elif variant == "missing_field":
        del first[rating_at]
    return variant, _join_blocks(blocks)
