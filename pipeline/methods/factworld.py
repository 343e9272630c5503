"""A synthetic fact world: invented people with invented facts, for testing calibration methods.

Why: R-Tuning needs a model whose knowledge is known exactly. A tiny model taught the facts of
the "known" people (and nothing about the "unknown" ones) should answer the first correctly and
the second not; questions about people who do not exist at all are unanswerable (UnknownBench's
non-existent entities). All names and values are made up from syllables, so no pretrained model
knows them either.

API (everything is deterministic for a seed; only `random.Random(seed)` is used, never `hash`):
- `make_world(seed, entities, known_fraction, nonexistent) -> FactWorld`
- `world.known`, `world.unknown` -> lists of Entity; `world.nonexistent` -> names in no fact
- `questions(world, kinds, attributes)` -> QA items (open or choice) about the real entities
- `unanswerable_questions(world, attributes)` -> QA items (kind "unanswerable") about the
  non-existent names, from the same templates
- `teaching_chats(world)` -> [{"messages": [user question, assistant answer]}] for known facts;
  `teaching_statements(world)` -> one sentence per known fact
- `world_splits(world, ...)` -> {"train", "test_id", "test_ood", "unanswerable": [items]}
- `fact_index(world, kinds)` -> {qid: {"entity", "attribute", "answer", "known", "exists"}}
  (QA items carry no "known" flag; this says which questions the model was taught)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pipeline.records import qa_item

OPEN_DATASET = "factworld"
CHOICE_DATASET = "factworld_mc"  # a separate label: an open and a choice item share the question text

# attribute -> (question template, statement template, value pool). Cities and instruments are
# invented too; professions and colours are ordinary words, so answers stay short and checkable.
ATTRIBUTES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "birth_city": ("In which city was {name} born?", "{name} was born in {value}.",
                   ("Quellmarsh", "Bravonne", "Ostrelby", "Tamsk Varo", "Lindequay", "Mirrowfield",
                    "Casparine", "Hollenvik")),
    "profession": ("What is {name}'s profession?", "{name} works as a {value}.",
                   ("baker", "surveyor", "glassblower", "beekeeper", "cartographer", "ferry pilot",
                    "violin maker", "archivist")),
    "favourite_colour": ("What is {name}'s favourite colour?", "{name}'s favourite colour is {value}.",
                         ("teal", "crimson", "amber", "lilac", "olive", "indigo", "coral", "slate grey")),
    "instrument": ("Which instrument does {name} play?", "{name} plays the {value}.",
                   ("zarrow pipe", "lute", "hammered drum", "glass harp", "marimba", "bandolin",
                    "reed horn", "cello")),
    "birth_year": ("In what year was {name} born?", "{name} was born in {value}.",
                   tuple(str(y) for y in range(1931, 1999, 9))),
}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
           "kl", "tr", "sh", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "io", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "x", "nd")


@dataclass(frozen=True)
class Entity:
    name: str
    facts: dict[str, str]
    known: bool


@dataclass
class FactWorld:
    seed: int
    entities: list[Entity]
    nonexistent: list[str]
    attributes: tuple[str, ...] = field(default_factory=lambda: tuple(ATTRIBUTES))

    @property
    def known(self) -> list[Entity]:
        return [e for e in self.entities if e.known]

    @property
    def unknown(self) -> list[Entity]:
        return [e for e in self.entities if not e.known]

    def to_dict(self) -> dict:
        return {"seed": self.seed, "attributes": list(self.attributes),
                "entities": [{"name": e.name, "known": e.known, "facts": e.facts} for e in self.entities],
                "nonexistent": list(self.nonexistent)}


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def _names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """`count` new two-word names; none equals, contains or is contained in a taken name, and no
    word is shared with one, so a question about one name never mentions another."""
    words = {w for name in taken for w in name.split()}
    out: list[str] = []
    while len(out) < count:
        name = f"{_word(rng, rng.randint(1, 2))} {_word(rng, rng.randint(2, 3))}"
        first, last = name.split()
        if first in words or last in words or first == last:
            continue
        if any(name in other or other in name for other in taken):
            continue
        out.append(name)
        taken.add(name)
        words.update((first, last))
    return out


def make_world(seed: int = 0, entities: int = 40, known_fraction: float = 0.5, nonexistent: int = 10) -> FactWorld:
    """Invented people with one value per attribute. round(entities * known_fraction) of them are
    "known" (chosen at random); `nonexistent` further names appear in no fact."""
    if entities < 1 or nonexistent < 0 or not 0.0 <= known_fraction <= 1.0:
        raise ValueError("need entities >= 1, nonexistent >= 0 and 0 <= known_fraction <= 1")
    rng = random.Random(seed)
    taken: set[str] = set()
    names = _names(rng, entities, taken)
    fake = _names(rng, nonexistent, taken)
    known = set(rng.sample(range(entities), round(entities * known_fraction)))
    people = [Entity(name, {a: rng.choice(spec[2]) for a, spec in ATTRIBUTES.items()}, i in known)
              for i, name in enumerate(names)]
    return FactWorld(seed, people, fake)


def _check_attributes(attributes) -> tuple[str, ...]:
    attributes = tuple(ATTRIBUTES) if attributes is None else tuple(attributes)
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown attribute(s) {', '.join(unknown)} (one of {', '.join(ATTRIBUTES)})")
    return attributes


def _question(entity_name: str, attribute: str) -> str:
    return ATTRIBUTES[attribute][0].format(name=entity_name)


def _choice_item(world: FactWorld, entity: Entity, attribute: str, n_choices: int) -> dict:
    # Distractors and order depend only on (seed, entity, attribute), not on which items are asked.
    rng = random.Random(f"{world.seed}|{entity.name}|{attribute}")
    pool = [v for v in ATTRIBUTES[attribute][2] if v != entity.facts[attribute]]
    choices = rng.sample(pool, min(n_choices - 1, len(pool))) + [entity.facts[attribute]]
    rng.shuffle(choices)
    return qa_item(CHOICE_DATASET, _question(entity.name, attribute), "choice", choices=choices,
                   answer_index=choices.index(entity.facts[attribute]), domain=attribute)


def _items(world: FactWorld, entities, kinds, attributes, n_choices: int) -> list[dict]:
    out = []
    for entity in entities:
        for attribute in attributes:
            for kind in kinds:
                if kind == "open":
                    out.append(qa_item(OPEN_DATASET, _question(entity.name, attribute), "open",
                                       answers=[entity.facts[attribute]], domain=attribute))
                elif kind == "choice":
                    out.append(_choice_item(world, entity, attribute, n_choices))
                else:
                    raise ValueError(f"kind must be open or choice, got {kind!r}")
    return out


def questions(world: FactWorld, kinds=("open",), attributes=None, entities=None, n_choices: int = 4) -> list[dict]:
    """QA items about real entities (all, or `entities`), one per entity x attribute x kind."""
    return _items(world, world.entities if entities is None else entities, tuple(kinds),
                  _check_attributes(attributes), n_choices)


def unanswerable_questions(world: FactWorld, attributes=None) -> list[dict]:
    """The same question templates about names that exist nowhere in the world."""
    return [qa_item(OPEN_DATASET, _question(name, attribute), "unanswerable", domain=attribute)
            for name in world.nonexistent for attribute in _check_attributes(attributes)]


def teaching_statements(world: FactWorld, attributes=None) -> list[str]:
    return [ATTRIBUTES[a][1].format(name=e.name, value=e.facts[a])
            for e in world.known for a in _check_attributes(attributes)]


def teaching_chats(world: FactWorld, attributes=None) -> list[dict]:
    """One chat per known fact: the open question, and the bare answer ("Casparine"), the form
    the R-Tuning data uses for gold answers too, so tuning on it later does not also have to
    change the answer format (which makes a tiny model forget the facts it was taught)."""
    return [{"messages": [{"role": "user", "content": _question(e.name, a)},
                          {"role": "assistant", "content": e.facts[a]}]}
            for e in world.known for a in _check_attributes(attributes)]


def world_splits(world: FactWorld, *, kinds=("open",), ood_attributes=(), test_fraction: float = 0.25,
                 n_choices: int = 4, holdout: str = "entities") -> dict[str, list[dict]]:
    """R-Tuning-style splits. test_ood: questions on the `ood_attributes` (every entity); the
    other attributes are in-domain. `holdout` says what test_id holds out of train:
    - "entities": the entities are divided (seeded) into train and test_id, stratified so both
      sides hold known and unknown entities in about the world's proportion;
    - "questions": every entity is in both, and round(test_fraction x in-domain attributes) of
      each entity's questions (seeded per entity, at least one) go to test_id: new questions
      about people whose knowledge state the tuning saw.
    Either way no question is in both. unanswerable: the non-existent names, on all attributes."""
    ood = _check_attributes(ood_attributes)
    in_domain = tuple(a for a in world.attributes if a not in ood)
    rng = random.Random(f"{world.seed}|split")
    if holdout == "questions":
        if len(in_domain) < 2:
            raise ValueError("holdout 'questions' needs at least two in-domain attributes")
        train, test_id = [], []
        for entity in world.entities:
            attrs = list(in_domain)
            random.Random(f"{world.seed}|split|{entity.name}").shuffle(attrs)
            k = min(len(attrs) - 1, max(1, round(len(attrs) * test_fraction)))
            test_id += _items(world, [entity], kinds, tuple(sorted(attrs[:k], key=in_domain.index)), n_choices)
            train += _items(world, [entity], kinds, tuple(sorted(attrs[k:], key=in_domain.index)), n_choices)
    elif holdout == "entities":
        test: set[str] = set()
        for group in (world.known, world.unknown):  # stratified, so both sides have both kinds
            names = [e.name for e in group]
            test.update(rng.sample(names, round(len(names) * test_fraction)))
        train = _items(world, [e for e in world.entities if e.name not in test], kinds, in_domain, n_choices)
        test_id = _items(world, [e for e in world.entities if e.name in test], kinds, in_domain, n_choices)
    else:
        raise ValueError(f"holdout must be 'entities' or 'questions', got {holdout!r}")
    return {"train": train, "test_id": test_id, "test_ood": _items(world, world.entities, kinds, ood, n_choices),
            "unanswerable": unanswerable_questions(world)}


def fact_index(world: FactWorld, kinds=("open", "choice"), n_choices: int = 4) -> dict[str, dict]:
    """qid -> what the question asks: entity, attribute, gold answer, whether the entity's facts
    were taught (`known`) and whether it exists at all."""
    index = {}
    for entity in world.entities:
        for attribute in world.attributes:
            for item in _items(world, [entity], kinds, (attribute,), n_choices):
                index[item["qid"]] = {"entity": entity.name, "attribute": attribute,
                                      "answer": entity.facts[attribute], "known": entity.known, "exists": True}
    for name in world.nonexistent:
        for attribute in world.attributes:
            item = qa_item(OPEN_DATASET, _question(name, attribute), "unanswerable", domain=attribute)
            index[item["qid"]] = {"entity": name, "attribute": attribute, "answer": "", "known": False,
                                  "exists": False}
    return index
