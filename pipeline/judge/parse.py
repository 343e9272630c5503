"""Strict parsing of the judge's answers into openbmb/UltraFeedback annotations.

The functions here read the judge's answer and nothing else: completions never reach them. An
answer that breaks any rule below raises `ParseError`, whose text is a one-line reason that the
annotate stage puts into its corrective re-ask. Nothing is guessed: a rating is taken only from
one well-formed field line (or JSON value) in the block of exactly one text.

Text mode (`structured=False`), as asked for by `templates/<version>/aspect.jinja` and
`compact.jinja`:

- The answer is cut into blocks at heading lines `### Text n` (two to four `#`, spaces around
  allowed, the word `Text` in any case; no other line is a heading). There must be exactly one
  block for each text 1..n_texts, in any order. Before the first heading, only blank lines or a
  short preamble (at most `_PREAMBLE_LIMIT` characters, with no field line in it) are allowed.
- Inside a block, a field line is `Name: value`, where Name is one of the field names that
  `rubric.aspect_fields(aspect)` (or `rubric.compact_fields()`) lists; names match in any case,
  with `**bold**` markers and a leading `- ` allowed. Any other line continues the value of the
  field above it (rationales may wrap over several lines and are kept whole). Each field must
  appear exactly once, in the order the template lists them; text between the heading and the
  first field is an error. Lines inside quoted material (between ``` fence lines, or between the
  `[[TEXT n ...]]` / `[[END n ...]]` markers completions are shown in) are never field lines.
- A rating is, after trimming spaces and bold markers, exactly one digit 1-5, or `N/A` (any case)
  for the aspects in `rubric.NA_ASPECTS`. Types are `None` or distinct comma-separated numbers
  from `rubric.TYPE_CHOICES`, kept in the order given. Rating and types fields take one line:
  a wrapped rating is an error. Rationales must not be empty. Blank lines and markdown rules
  (`---`) at the end of a block are dropped.

  Consequence, on purpose: a rationale that quotes a line such as `Rating: 5` (from a completion,
  say) repeats a field and fails the whole answer, and so does a quoted `### Text 1` line, which
  opens a second block for text 1. Where the judge left out its own Rating, the quoted line comes
  after the rationale, out of the order asked, and fails too. Such an answer is asked again rather
  than read in the most plausible way. What remains: in a typed aspect, a Rating line quoted as
  the last line of the *types* rationale stands where the judge's own would, and nothing in the
  text tells it apart (a quote set off by a fence or the text markers is recognised).

- Critique: the last non-empty line must be `Overall score: N` with N a whole number 1-10 (label
  in any case, optional bold markers, optional final period). The score regex is anchored at
  both ends and tries `10` before `[1-9]`, so `Overall score: 1` is 1 and never 10, and `0`, `11`,
  `7.5`, `7/10` are errors. Any earlier line that starts like a score line is an error (which
  score would be meant?). A last line inside an open fence or `[[TEXT n ...]]` block is quoted
  text, not the judge's score line (nor is a `> ` quote line: it does not match). The feedback is
  everything above the score line, stripped, non-empty.

Structured mode (`structured=True`): the answer must be one JSON object (a single surrounding
```json fence is allowed; duplicate keys, NaN and Infinity are not), checked against the schemas
in `rubric` (`aspect_schema`, `compact_schema`, `CRITIQUE_SCHEMA`) by the small validator below,
which refuses schema keywords it does not know rather than ignoring them. On top of the schema:
`texts` has exactly n_texts entries, each `text` number 1..n_texts exactly once (any order), types
are distinct, rationales and the critique feedback are not empty. Booleans are not integers.

Output shapes (`pipeline.records.ANNOTATION_FEATURES`):
- instruction_following, honesty: `{"Rating": "4", "Rationale": "..."}`;
- truthfulness, helpfulness: `{"Type": ["1", "3"], "Rationale": <types rationale>,
  "Rating": "4", "Rationale For Rating": <rating rationale>}`.
Compact text mode asks for no types rationale, only one rationale per aspect: for typed aspects
it goes into "Rationale For Rating" (it explains the rating) and "Rationale" is "" (there is
nothing to put there, and copying the same sentence into both would pretend otherwise).
Compact JSON mode does carry `types_rationale`, which fills "Rationale".
"""

from __future__ import annotations

import json
import re

from pipeline.judge import rubric

__all__ = ["PARSER_VERSION", "ParseError", "parse_aspect", "parse_compact", "parse_critique"]

# Bump on any change to what these functions accept or return: the annotate stage keeps the
# parsed answers of each run (pipeline.judge.parsecache) under this version, and a rebuild re-parses
# the raw answers of the ledger whenever it differs.
PARSER_VERSION = 1


class ParseError(ValueError):
    """One-line reason an answer is unusable; the text goes into the corrective re-ask."""


# ------------------------------------------------------------------------------ shared helpers

_PREAMBLE_LIMIT = 300  # characters of chatter tolerated before the first heading
_QUOTE_LIMIT = 40  # characters of a bad value quoted back in a reason

_HEADING = re.compile(r"^[ \t]*#{2,4}[ \t]*text[ \t]+(\d+)[ \t]*$", re.IGNORECASE)
# `Name: value`, `**Name:** value`, `**Name**: value`, `- Name: value`, `**Name: value**`.
_FIELD = re.compile(
    r"^[ \t]*(?:-[ \t]+)?(?P<open>\*\*)?[ \t]*(?P<name>[^:*\n]+?)[ \t]*(?P<close>\*\*)?[ \t]*:"
    r"[ \t]*(?P<after>\*\*)?(?P<value>.*)$"
)
_RULE = re.compile(r"[ \t]*([-*_])(?:[ \t]*\1){2,}[ \t]*")  # a markdown rule such as `---`
_RATING = re.compile(r"[1-5]")
_NA = re.compile(r"n/a", re.IGNORECASE)
_FENCE = re.compile(r"^```[ \t]*(?:json|text|markdown|md)?[ \t]*\n(?P<body>.*)\n[ \t]*```$", re.DOTALL | re.IGNORECASE)
# The score line, once bold markers are gone. `10` is tried before `[1-9]` and the match is
# anchored at both ends: "Overall score: 1" can only mean 1.
_SCORE_LINE = re.compile(r"overall[ \t]+score[ \t]*:[ \t]*(10|[1-9])[ \t]*\.?", re.IGNORECASE)
_SCORE_LABEL = re.compile(r"^(?:-[ \t]+)?overall[ \t]+score\b", re.IGNORECASE)
# Quoted material inside an answer: a fence line, and the markers completions are shown between
_FENCE_LINE = re.compile(r"^[ \t]*```")
_TEXT_OPEN = re.compile(r"^[ \t]*\[\[TEXT[ \t]+\d+\b")
_TEXT_CLOSE = re.compile(r"^[ \t]*\[\[END[ \t]+\d+\b")


def _quote(value: str) -> str:
    """A value for a reason: one line, short, in single quotes."""
    flat = " ".join(str(value).split())
    if len(flat) > _QUOTE_LIMIT:
        flat = flat[: _QUOTE_LIMIT - 3] + "..."
    return "'" + flat.replace("'", "\u2019") + "'"


def _norm_name(name: str) -> str:
    return " ".join(name.split()).casefold()


def _answer_text(answer) -> str:
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise ParseError("the answer is empty")
    if not isinstance(answer, str):
        raise ParseError("the answer is not text")
    text = answer.strip()
    fenced = _FENCE.fullmatch(text)
    if fenced and "```" not in fenced.group("body"):
        text = fenced.group("body").strip()
    return text


def _check_n_texts(n_texts: int) -> None:
    if isinstance(n_texts, bool) or not isinstance(n_texts, int) or n_texts < 1:
        raise ValueError(f"n_texts must be a positive int, got {n_texts!r}")


def _check_aspect(aspect: str) -> None:
    if aspect not in rubric.ASPECTS:
        raise ValueError(f"unknown aspect {aspect!r}; expected one of {', '.join(rubric.ASPECTS)}")


def _rating(value: str, aspect: str, where: str) -> str:
    """A rating string "1".."5" (or "N/A" where the aspect allows it)."""
    raw = value.strip().replace("**", "").strip()
    if _RATING.fullmatch(raw):
        return raw
    if aspect in rubric.NA_ASPECTS:
        if _NA.fullmatch(raw):
            return "N/A"
        raise ParseError(f"{where} {_quote(value.strip())} is not a whole number from 1 to 5 or N/A")
    if _NA.fullmatch(raw):
        raise ParseError(f"{where} {_quote(value.strip())} is not allowed for {aspect}: "
                         "give a whole number from 1 to 5")
    raise ParseError(f"{where} {_quote(value.strip())} is not a whole number from 1 to 5")


def _types_text(value: str, where: str) -> list[str]:
    """`None` -> []; `1, 3` -> ["1", "3"]; anything else is an error."""
    raw = value.strip().replace("**", "").strip()
    if raw.casefold() == "none":
        return []
    parts = [p.strip() for p in raw.split(",")]
    choices = ", ".join(rubric.TYPE_CHOICES)
    for part in parts:
        if part not in rubric.TYPE_CHOICES:
            raise ParseError(f"{where} {_quote(value.strip())} is not None or a comma-separated list of {choices}")
    return _distinct(parts, value, where)


def _distinct(types: list[str], shown, where: str) -> list[str]:
    seen = set()
    for t in types:
        if t in seen:
            raise ParseError(f"{where} {_quote(str(shown))} names type {t} twice")
        seen.add(t)
    return list(types)


def _rationale(value: str, where: str) -> str:
    text = value.strip()
    if not text:
        raise ParseError(f"{where} is empty")
    return text


def _annotation(aspect: str, types, types_rationale: str, rating: str, rationale: str) -> dict:
    if aspect in rubric.TYPED_ASPECTS:
        return {"Type": types, "Rationale": types_rationale, "Rating": rating, "Rationale For Rating": rationale}
    return {"Rating": rating, "Rationale": rationale}


# ------------------------------------------------------------------------------ text mode

# What each field of a block means: (aspect, role), role in types / types_rationale / rating /
# rationale. Built from the rubric, so the parser follows the templates.
_ASPECT_ROLES = {"types": "types", "types rationale": "types_rationale", "rating": "rating",
                 "rating rationale": "rationale", "rationale": "rationale"}


def _aspect_spec(aspect: str) -> dict[str, tuple[str, str, str]]:
    """Normalised field name -> (display name, aspect, role) for one aspect's block."""
    spec = {}
    for name, _hint in rubric.aspect_fields(aspect):
        role = _ASPECT_ROLES.get(_norm_name(name))
        if role is None:  # the rubric grew a field this parser does not know
            raise RuntimeError(f"parse.py does not know the rubric field {name!r} of {aspect}")
        spec[_norm_name(name)] = (name, aspect, role)
    return spec


def _compact_spec() -> dict[str, tuple[str, str, str]]:
    """The compact block's fields, grouped by aspect in rubric order (types?, rating, rationale)."""
    fields = [name for name, _hint in rubric.compact_fields()]
    spec, at = {}, 0
    for aspect in rubric.ASPECTS:
        roles = (["types"] if aspect in rubric.TYPED_ASPECTS else []) + ["rating", "rationale"]
        for role in roles:
            name = fields[at] if at < len(fields) else ""
            if not _norm_name(name).endswith(" " + ("types" if role == "types" else role)):
                raise RuntimeError(f"parse.py does not understand rubric.compact_fields() at {name!r}")
            spec[_norm_name(name)] = (name, aspect, role)
            at += 1
    if at != len(fields):
        raise RuntimeError("parse.py does not understand rubric.compact_fields(): extra fields")
    return spec


def _field_line(line: str, spec: dict) -> tuple[str, str] | None:
    """(normalised name, value) when `line` is a field line of `spec`, else None."""
    m = _FIELD.match(line)
    if not m:
        return None
    key = _norm_name(m.group("name"))
    if key not in spec:
        return None
    value = m.group("value")
    # `**Name: value**`: the bold opened before the name closes at the end of the value.
    if m.group("open") and not m.group("close") and not m.group("after"):
        stripped = value.rstrip()
        if stripped.endswith("**"):
            value = stripped[:-2]
    return key, value


def _split_blocks(text: str, n_texts: int, spec: dict) -> dict[int, list[str]]:
    """Text number -> the lines of its block (heading excluded); checks the set of headings."""
    blocks: dict[int, list[str]] = {}
    preamble: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        m = _HEADING.match(line)
        if m:
            number = int(m.group(1))
            if not 1 <= number <= n_texts:
                raise ParseError(f"text {number} is out of range: there are {n_texts} texts"
                                 if n_texts > 1 else f"text {number} is out of range: there is 1 text")
            if number in blocks:
                raise ParseError(f"text {number} appears twice")
            current = blocks[number] = []
        elif current is None:
            preamble.append(line)
        else:
            current.append(line)
    if not blocks:
        raise ParseError("no '### Text n' heading found")
    for lines in blocks.values():  # a `---` rule or blank lines between blocks belong to none
        while lines and (not lines[-1].strip() or _RULE.fullmatch(lines[-1])):
            lines.pop()
    before = "\n".join(preamble).strip()
    if before:
        if any(_field_line(line, spec) for line in preamble):
            raise ParseError("a field line comes before the first '### Text n' heading")
        if len(before) > _PREAMBLE_LIMIT:
            raise ParseError("unexpected text before the first '### Text n' heading")
    for number in range(1, n_texts + 1):
        if number not in blocks:
            raise ParseError(f"text {number} is missing")
    return blocks


def _quote_toggles(line: str, quoted: bool) -> bool:
    """Whether the lines after `line` are quoted material: a ``` fence, or the [[TEXT n ...]] ..
    [[END n ...]] markers the template wraps completions in, opens or closes a quote."""
    if _FENCE_LINE.match(line):
        return not quoted
    if _TEXT_OPEN.match(line):
        return True
    if _TEXT_CLOSE.match(line):
        return False
    return quoted


def _read_block(number: int, lines: list[str], spec: dict) -> dict[str, str]:
    """Normalised field name -> raw value (continuation lines joined with newlines). Fields come
    in the order asked; a line inside quoted material is never a field line."""
    values: dict[str, list[str]] = {}
    current: str | None = None
    order = list(spec)
    quoted = False
    for line in lines:
        hit = None if quoted else _field_line(line, spec)
        quoted = _quote_toggles(line, quoted)
        if hit:
            key, value = hit
            if key in values:
                raise ParseError(f"text {number}: {spec[key][0]} appears twice")
            if current is not None and order.index(key) < order.index(current):
                # a rating line after the rationale may be a line the rationale quotes (the judge
                # having left out its own); only the order asked for tells them apart
                raise ParseError(f"text {number}: {spec[key][0]} comes after {spec[current][0]}; "
                                 f"give the fields in the order asked ({', '.join(v[0] for v in spec.values())})")
            values[key] = [value]
            current = key
        elif current is None:
            if line.strip():
                raise ParseError(f"text {number}: unexpected text {_quote(line)} before the first field")
        else:
            values[current].append(line)
    for key, (name, _aspect, _role) in spec.items():
        if key not in values:
            raise ParseError(f"text {number}: {name} is missing")
    out = {}
    for key, parts in values.items():
        name, _aspect, role = spec[key]
        if role in ("rating", "types"):
            extra = [p for p in parts[1:] if p.strip()]
            if extra:
                raise ParseError(f"text {number}: {name} runs over more than one line "
                                 f"(next line {_quote(extra[0])})")
            out[key] = parts[0]
        else:
            out[key] = "\n".join(p.rstrip() for p in parts).strip()
    return out


def _text_annotations(text: str, n_texts: int, spec: dict) -> list[dict]:
    """One {aspect: annotation} per text, from a text-mode answer."""
    blocks = _split_blocks(text, n_texts, spec)
    results = []
    for number in range(1, n_texts + 1):
        raw = _read_block(number, blocks[number], spec)
        parts: dict[str, dict] = {}
        for key, (name, aspect, role) in spec.items():
            where = f"text {number}: {name}"
            value = raw[key]
            if role == "rating":
                parsed = _rating(value, aspect, where)
            elif role == "types":
                parsed = _types_text(value, where)
            else:
                parsed = _rationale(value, where)
            parts.setdefault(aspect, {})[role] = parsed
        results.append({aspect: _annotation(aspect, p.get("types", []), p.get("types_rationale", ""),
                                            p["rating"], p["rationale"])
                        for aspect, p in parts.items()})
    return results


# ------------------------------------------------------------------------------ structured mode


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ParseError(f"key {_quote(key)} appears twice in one JSON object")
        out[key] = value
    return out


def _reject_constant(name: str):
    raise ParseError(f"{name} is not allowed in the JSON answer")


def _load_json(text: str) -> dict:
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise ParseError(f"the answer is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise ParseError("the answer is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ParseError("the answer is not a JSON object")
    return data


_JSON_TYPES = {"object": "an object", "array": "an array", "string": "a string", "integer": "an integer"}
_KNOWN_KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "enum", "minimum", "maximum",
                   "minItems", "maxItems", "maxLength"}


def _is_type(value, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    raise RuntimeError(f"parse.py does not know the schema type {kind!r}")


def _validate(value, schema: dict, path: str) -> None:
    """Check `value` against the subset of JSON Schema the rubric uses; ParseError on the first fault."""
    unknown = set(schema) - _KNOWN_KEYWORDS
    if unknown:
        raise RuntimeError(f"parse.py does not know the schema keyword(s) {sorted(unknown)}")
    kind = schema.get("type")
    if kind is not None and not _is_type(value, kind):
        raise ParseError(f"{path} is not {_JSON_TYPES.get(kind, kind)}")
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(str(v) for v in schema["enum"])
        raise ParseError(f"{path} {_quote(json.dumps(value))} is not one of {allowed}")
    if "minimum" in schema and value < schema["minimum"] or "maximum" in schema and value > schema["maximum"]:
        raise ParseError(f"{path} {_quote(json.dumps(value))} is not from {schema.get('minimum')} "
                         f"to {schema.get('maximum')}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                raise ParseError(f"{path} is missing key {_quote(key)}")
        if schema.get("additionalProperties", True) is False:
            for key in value:
                if key not in props:
                    raise ParseError(f"{path} has unexpected key {_quote(key)}")
        for key, sub in props.items():
            if key in value:
                _validate(value[key], sub, f"{path}.{key}")
    # minItems, maxItems and maxLength bound what a guided decoder may write. The checks after this
    # one (_numbered_entries, _json_annotation) enforce the counts and name the text at fault; a
    # longer rationale from a judge that ignored maxLength is still a rationale, so it is kept.
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _validate(item, schema["items"], f"{path}[{i}]")


def _numbered_entries(data: dict, n_texts: int) -> list[dict]:
    """`texts` entries ordered by their `text` number, each number 1..n_texts exactly once."""
    entries = data["texts"]
    if len(entries) != n_texts:
        raise ParseError(f"'texts' has {len(entries)} entries, expected {n_texts}")
    by_number: dict[int, dict] = {}
    for entry in entries:
        number = entry["text"]
        if not 1 <= number <= n_texts:
            raise ParseError(f"text {number} is out of range: there are {n_texts} texts"
                             if n_texts > 1 else f"text {number} is out of range: there is 1 text")
        if number in by_number:
            raise ParseError(f"text {number} appears twice")
        by_number[number] = entry
    return [by_number[n] for n in range(1, n_texts + 1)]


def _json_annotation(aspect: str, item: dict, where: str) -> dict:
    rating = item["rating"]  # the schema's enum already holds it to "1".."5" (+ "N/A")
    rationale = _rationale(item["rationale"], f"{where}rationale")
    if aspect in rubric.TYPED_ASPECTS:
        types = _distinct(item["types"], json.dumps(item["types"]), f"{where}types")
        types_rationale = _rationale(item["types_rationale"], f"{where}types_rationale")
        return _annotation(aspect, types, types_rationale, rating, rationale)
    return _annotation(aspect, [], "", rating, rationale)


# ------------------------------------------------------------------------------ public API


def parse_aspect(aspect: str, answer: str, n_texts: int, structured: bool) -> list[dict]:
    """One annotation per text (index i = text i+1 as the judge saw it) for one aspect."""
    _check_aspect(aspect)
    _check_n_texts(n_texts)
    text = _answer_text(answer)
    if structured:
        data = _load_json(text)
        _validate(data, rubric.aspect_schema(aspect), "answer")
        return [_json_annotation(aspect, entry, f"text {entry['text']}: ")
                for entry in _numbered_entries(data, n_texts)]
    return [per_text[aspect] for per_text in _text_annotations(text, n_texts, _aspect_spec(aspect))]


def parse_compact(answer: str, n_texts: int, structured: bool) -> list[dict]:
    """One `{aspect: annotation}` per text (index i = text i+1) for all four aspects."""
    _check_n_texts(n_texts)
    text = _answer_text(answer)
    if structured:
        data = _load_json(text)
        _validate(data, rubric.compact_schema(), "answer")
        return [{aspect: _json_annotation(aspect, entry[aspect], f"text {entry['text']}: {aspect} ")
                 for aspect in rubric.ASPECTS}
                for entry in _numbered_entries(data, n_texts)]
    per_text = _text_annotations(text, n_texts, _compact_spec())
    return [{aspect: annotations[aspect] for aspect in rubric.ASPECTS} for annotations in per_text]


def parse_critique(answer: str, structured: bool) -> tuple[str, int]:
    """(feedback without the score line, overall score 1..10)."""
    text = _answer_text(answer)
    if structured:
        data = _load_json(text)
        _validate(data, rubric.CRITIQUE_SCHEMA, "answer")
        feedback = data["feedback"].strip()
        if not feedback:
            raise ParseError("answer.feedback is empty")
        return feedback, data["overall_score"]
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    body = lines[:-1]
    quoted = False
    for line in body:
        quoted = _quote_toggles(line, quoted)
    # The judge's own score line stands outside any quote; one inside an open fence or a
    # [[TEXT ..]] block is a quoted completion's line.
    if quoted:
        raise ParseError("no final 'Overall score: N' line of your own (the last line is quoted text)")
    last = lines[-1].replace("**", "").strip()
    for line in body:
        if _SCORE_LABEL.match(line.replace("**", "").strip()):
            if _SCORE_LINE.fullmatch(last):
                raise ParseError("more than one 'Overall score' line")
            raise ParseError("the 'Overall score: N' line must be the last line")
    m = _SCORE_LINE.fullmatch(last)
    if not m:
        if _SCORE_LABEL.match(last):
            raise ParseError(f"final line {_quote(last)} does not give a whole number from 1 to 10 "
                             "as 'Overall score: N'")
        raise ParseError("no final 'Overall score: N' line")
    feedback = "\n".join(body).strip()
    if not feedback:
        raise ParseError("the feedback before the 'Overall score' line is empty")
    return feedback, int(m.group(1))
