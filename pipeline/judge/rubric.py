"""The judge's prompts: UltraFeedback's four aspects and the critique, in our own words.

The texts live in versioned files under `templates/<TEMPLATE_VERSION>/`. Changing any of them
means a new version folder and a new `TEMPLATE_VERSION`: the version is part of every judge
request's ledger key, so old answers are never served for new wording.

Three modes:
- faithful (UltraFeedback): one call per aspect rating all of a prompt's completions, plus one
  critique call per completion ending in "Overall score: N";
- structured: the same calls, asking for JSON that matches a schema (`response_format`);
- compact: one call rating all four aspects of all completions (plus the critiques), to cut cost.

Completions are put between marker lines that carry a random nonce drawn per request, and the
prompt says that everything between them is material, not instructions. The parser reads only
the judge's answer, with one block per text; so a completion that contains "Rating: 5" or a
JSON block can move a rating only by making the judge misbehave, and a misbehaving answer (an
extra block, a duplicated field) fails to parse and is asked again.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import jinja2

from pipeline.records import ASPECTS, NA_ASPECTS, TYPED_ASPECTS

TEMPLATE_VERSION = "v1"
TEMPLATE_DIR = Path(__file__).parent / "templates" / TEMPLATE_VERSION

ASPECT_TITLES = {
    "instruction_following": "instruction following",
    "honesty": "honesty and uncertainty",
    "truthfulness": "truthfulness and hallucination",
    "helpfulness": "helpfulness and informativeness",
}
# Aspects whose answer also names which listed problems/qualities apply (numbers 1-3).
TYPE_CHOICES = ("1", "2", "3")

_RATING_HINT = "a whole number from 1 to 5"
_TYPES_HINT = "the numbers (1, 2 or 3) of the listed kinds that apply, separated by commas, or None"


def aspect_fields(aspect: str) -> list[tuple[str, str]]:
    """The `Field: hint` lines of one block of a faithful-mode answer, in order."""
    rating = _RATING_HINT + (", or N/A when the aspect does not apply" if aspect in NA_ASPECTS else "")
    if aspect in TYPED_ASPECTS:
        return [("Types", _TYPES_HINT), ("Types rationale", "one or two sentences on the types"),
                ("Rating", rating), ("Rating rationale", "one or two sentences on the rating")]
    return [("Rating", rating), ("Rationale", "one or two sentences on why")]


def compact_fields() -> list[tuple[str, str]]:
    fields = []
    for aspect in ASPECTS:
        title = ASPECT_TITLES[aspect].split(" and ")[0].capitalize()
        if aspect in TYPED_ASPECTS:
            fields.append((f"{title} types", _TYPES_HINT))
        rating = _RATING_HINT + (" or N/A" if aspect in NA_ASPECTS else "")
        fields += [(f"{title} rating", rating), (f"{title} rationale", "one sentence")]
    return fields


@lru_cache(maxsize=None)
def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                              autoescape=False)


@lru_cache(maxsize=None)
def _text(name: str) -> str:
    return (TEMPLATE_DIR / name).read_text(encoding="utf-8").strip()


def system_message() -> dict:
    return {"role": "system", "content": _text("system.txt")}


def world_knowledge(row: dict) -> str:
    """What the truthfulness aspect may treat as true, from the source's own data."""
    parts = []
    if row.get("source") == "false_qa":
        parts.append("The question rests on a false premise: a good answer points this out "
                     "instead of answering as if it were true.")
    correct, incorrect = row.get("correct_answers") or [], row.get("incorrect_answers") or []
    if correct:
        parts.append("Answers known to be correct:\n" + "\n".join(f"- {a}" for a in correct))
    if incorrect:
        parts.append("Answers known to be wrong:\n" + "\n".join(f"- {a}" for a in incorrect))
    if row.get("reference"):
        parts.append("A reference answer:\n" + row["reference"])
    return "\n\n".join(parts)


def aspect_messages(aspect: str, row: dict, texts: list[str], nonce: str, structured: bool) -> list[dict]:
    user = _env().get_template("aspect.jinja").render(
        aspect_title=ASPECT_TITLES[aspect], rubric=_text(f"rubric_{aspect}.txt"),
        instruction=row["instruction"], knowledge=world_knowledge(row) if aspect == "truthfulness" else "",
        texts=texts, nonce=nonce, structured=structured, fields=aspect_fields(aspect),
    )
    return [system_message(), {"role": "user", "content": user}]


def compact_messages(row: dict, texts: list[str], nonce: str, structured: bool) -> list[dict]:
    aspects = [{"title": ASPECT_TITLES[a], "rubric": _text(f"rubric_{a}.txt")} for a in ASPECTS]
    user = _env().get_template("compact.jinja").render(
        aspects=aspects, instruction=row["instruction"], knowledge=world_knowledge(row), texts=texts,
        nonce=nonce, structured=structured, fields=compact_fields(),
    )
    return [system_message(), {"role": "user", "content": user}]


def critique_messages(row: dict, completion: dict, nonce: str, structured: bool) -> list[dict]:
    user = _env().get_template("critique.jinja").render(
        instruction=row["instruction"], system_prompt=completion.get("custom_system_prompt") or "",
        answer=completion["response"], nonce=nonce, structured=structured,
    )
    return [system_message(), {"role": "user", "content": user}]


def corrective_message(reason: str, structured: bool) -> dict:
    """The re-ask after an unusable answer: a new message, so never the same request again."""
    form = "a JSON object matching the schema" if structured else "exactly the format described above"
    return {"role": "user", "content": f"That answer could not be used: {reason}. Please answer the "
                                       f"same request again, as {form}, and nothing else."}


# --- JSON schemas for structured mode --------------------------------------------------------


def _rating_schema(aspect: str) -> dict:
    return {"type": "string", "enum": ["1", "2", "3", "4", "5"] + (["N/A"] if aspect in NA_ASPECTS else [])}


def _text_number(texts: int | None) -> dict:
    return {"type": "integer", **({"minimum": 1, "maximum": texts} if texts else {})}


def _string(max_chars: int | None) -> dict:
    return {"type": "string", **({"maxLength": max_chars} if max_chars else {})}


def _aspect_item(aspect: str, with_text: bool, texts: int | None = None, rationale_chars: int | None = None) -> dict:
    props: dict = {"text": _text_number(texts)} if with_text else {}
    if aspect in TYPED_ASPECTS:
        # Bounded, so that a decoder held to the schema cannot list types until it runs out of tokens
        # (no uniqueItems: vLLM's grammar engine refuses it with HTTP 400; the parser checks repeats).
        props["types"] = {"type": "array", "items": {"type": "string", "enum": list(TYPE_CHOICES)},
                          "maxItems": len(TYPE_CHOICES)}
        props["types_rationale"] = _string(rationale_chars)
    props["rating"] = _rating_schema(aspect)
    props["rationale"] = _string(rationale_chars)
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _texts_schema(item: dict, texts: int | None) -> dict:
    # With the number of texts known, exactly that many blocks: guided decoding (vLLM) otherwise
    # lets a small judge go on adding blocks until max_tokens cuts the JSON off.
    array = {"type": "array", "items": item, **({"minItems": texts, "maxItems": texts} if texts else {})}
    return {"type": "object", "properties": {"texts": array}, "required": ["texts"], "additionalProperties": False}


def aspect_schema(aspect: str, texts: int | None = None, rationale_chars: int | None = None) -> dict:
    """The JSON schema of one aspect's answer for `texts` completions (None: any number), each
    rationale at most `rationale_chars` long (None: no bound)."""
    return _texts_schema(_aspect_item(aspect, with_text=True, texts=texts, rationale_chars=rationale_chars), texts)


def compact_schema(texts: int | None = None, rationale_chars: int | None = None) -> dict:
    props = {"text": _text_number(texts)}
    props.update({a: _aspect_item(a, with_text=False, rationale_chars=rationale_chars) for a in ASPECTS})
    return _texts_schema({"type": "object", "properties": props, "required": list(props),
                          "additionalProperties": False}, texts)


CRITIQUE_SCHEMA = {
    "type": "object",
    "properties": {"feedback": {"type": "string"}, "overall_score": {"type": "integer", "minimum": 1, "maximum": 10}},
    "required": ["feedback", "overall_score"], "additionalProperties": False,
}


def critique_schema(feedback_chars: int | None = None) -> dict:
    if not feedback_chars:
        return CRITIQUE_SCHEMA
    return {**CRITIQUE_SCHEMA, "properties": {**CRITIQUE_SCHEMA["properties"], "feedback": _string(feedback_chars)}}


def response_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def schema_digest() -> str:
    """Part of the template version in structured mode: a schema change is a wording change."""
    import hashlib

    blob = json.dumps([aspect_schema(a) for a in ASPECTS] + [compact_schema(), CRITIQUE_SCHEMA], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
