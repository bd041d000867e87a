"""A world of facts whose every fact, paraphrase and frequency is known.

The generator draws fictional subjects (people, companies, places), gives each a true object for each
of its relations, and decides how often each subject is mentioned in training: the mention count ``c`` is
drawn from a truncated Zipf law, ``P(c = k) ∝ k^(-a)`` for ``k = 1 .. k_max``, so that facts range from
seen once to seen hundreds of times. Each fact of a subject is stated ``c`` times in the training text,
each time through one of its relation's *training* templates; the relation's *held-out* templates never
occur in the training text and serve as paraphrase tests. Plain filler sentences teach grammar.

Templates are ROME style: ``"{} was born in"``, the subject at ``{}`` and the object the continuation
(``" Paris"``). No template is a prefix of another, because a model that has seen
``"X was born in the city of Y"`` answers ``"X was born in"`` with ``" the"``.

Everything is a pure function of ``(seed, preset)``: the same world, the same training text, the same data
sets, byte for byte.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FfkvError

# ----------------------------------------------------------------------------------------------------
# Objects. Ordinary words, so that a byte-level BPE trained on the corpus gives most of them one token.

CITIES = ["Paris", "Berlin", "Tokyo", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo",
          "Stockholm", "Helsinki", "Warsaw", "Athens", "Cairo", "Lagos", "Nairobi", "Lima", "Bogota",
          "Santiago", "Toronto", "Chicago", "Boston", "Sydney", "Melbourne", "Mumbai", "Delhi", "Seoul",
          "Manila", "Jakarta"]
COUNTRIES = ["France", "Germany", "Japan", "Spain", "Italy", "Austria", "Poland", "Greece", "Egypt",
             "Nigeria", "Kenya", "Peru", "Chile", "Canada", "Brazil", "Australia", "India", "Korea",
             "Norway", "Sweden"]
# Professions start with a consonant so that "works as a" reads right.
PROFESSIONS = ["chemist", "painter", "lawyer", "surgeon", "journalist", "pianist", "novelist", "banker",
               "photographer", "diplomat", "botanist", "sculptor", "pilot", "linguist", "geologist", "composer",
               "historian", "carpenter", "dentist", "tailor"]
LANGUAGES = ["French", "German", "Japanese", "Spanish", "Italian", "Polish", "Greek", "Arabic", "Swahili",
             "Portuguese", "Dutch", "Korean", "Hindi", "Russian", "Finnish"]
INDUSTRIES = ["software", "shipping", "mining", "banking", "textiles", "insurance", "aviation", "farming",
              "publishing", "robotics", "pharmaceuticals", "steel", "tourism", "telecommunications", "furniture"]
YEARS = [str(y) for y in range(1960, 1985)]
CONTINENTS = ["Europe", "Asia", "Africa", "Oceania", "Antarctica", "America"]

# ----------------------------------------------------------------------------------------------------
# Relations: Wikidata ids as in CounterFact. Every relation has a noun ("birthplace") and a verb phrase
# ("was born in"); its templates are the same nine frames filled with them. Three frames per relation are
# held out, a different three for each relation, so that a held-out paraphrase is a frame the model has seen
# with other relations and relation words it has seen in other frames: a test of paraphrase, not of
# vocabulary the model never read. The plain frame "{} <verb phrase>" is always a training template.

NOUN_FRAMES = ("The {noun} of {{}} is", "{{}}'s {noun} is", "{{}}, whose {noun} is", "Records list the {noun} of {{}} as")
VERB_FRAMES = ("{{}} {verb}", "{{}}, {who} {verb}", "It is known that {{}} {verb}", "{{}} reportedly {verb}",
               "According to the records, {{}} {verb}")
N_HELDOUT = 3


@dataclass(frozen=True)
class Relation:
    relation_id: str
    name: str
    subject_type: str
    objects: tuple[str, ...]
    noun: str
    verb: str

    @property
    def index(self) -> int:
        return [r.relation_id for r in RELATIONS].index(self.relation_id)

    def frames(self) -> list[str]:
        who = "who" if self.subject_type == "person" else "which"
        return ([f.format(noun=self.noun) for f in NOUN_FRAMES]
                + [f.format(verb=self.verb, who=who) for f in VERB_FRAMES])

    @property
    def heldout_templates(self) -> tuple[str, ...]:
        """Frames ``3i, 3i+1, 3i+2`` (mod 8) of the eight frames other than the plain ``"{} <verb>"``."""
        frames = self.frames()
        others = [f for f in frames if f != "{} " + self.verb]
        return tuple(others[(N_HELDOUT * self.index + k) % len(others)] for k in range(N_HELDOUT))

    @property
    def train_templates(self) -> tuple[str, ...]:
        held = set(self.heldout_templates)
        return tuple(f for f in self.frames() if f not in held)


RELATIONS: tuple[Relation, ...] = (
    Relation("P19", "birthplace", "person", tuple(CITIES), "birthplace", "was born in"),
    Relation("P27", "citizenship", "person", tuple(COUNTRIES), "citizenship", "is a citizen of"),
    Relation("P106", "profession", "person", tuple(PROFESSIONS), "profession", "works as a"),
    Relation("P108", "employer", "person", (), "employer", "works for"),  # objects: the largest companies
    Relation("P103", "native language", "person", tuple(LANGUAGES), "native language", "grew up speaking"),
    Relation("P159", "headquarters", "company", tuple(CITIES), "headquarters", "is headquartered in"),
    Relation("P571", "founded in", "company", tuple(YEARS), "founding year", "was founded in"),
    Relation("P452", "industry", "company", tuple(INDUSTRIES), "industry", "does business in"),
    Relation("P17", "country", "place", tuple(COUNTRIES), "country", "is located in"),
    Relation("P30", "continent", "place", tuple(CONTINENTS), "continent", "lies on the continent of"),
)
RELATION_BY_ID = {r.relation_id: r for r in RELATIONS}

# ----------------------------------------------------------------------------------------------------
# Names: invented from syllables so that no subject is a word the model could know from elsewhere and
# most subjects span several tokens (first, middle and last subject tokens for causal tracing).

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t",
           "th", "v", "z", "or", "al", "el", "ul", "ish", "qu", "y", "c", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "i", "o", "ia", "ou", "ai"]
_CODAS = ["", "", "", "", "n", "r", "l", "s", "th", "x", "m", "nd", "rk", "v", "ll", "sk"]
_COMPANY_SUFFIXES = ["Dynamics", "Systems", "Labs", "Works", "Group", "Industries", "Holdings", "Partners",
                     "Foundry", "Trading"]
_PLACE_FORMS = ["Mount {}", "Lake {}", "{} Bridge", "{} Castle", "{} Falls", "{} Tower", "{} Gorge", "{} Abbey"]


def _word(rng: random.Random, n_syllables: int) -> str:
    s = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n_syllables))
    return s.capitalize()


# ----------------------------------------------------------------------------------------------------
# Presets: the sizes of the world (the model's sizes live in train.py).


@dataclass(frozen=True)
class WorldPreset:
    n_people: int
    n_companies: int
    n_places: int
    n_employers: int  # the largest companies are the people's employers
    zipf_a: float  # exponent of the truncated Zipf law of mention counts
    min_count: int  # mention counts are drawn from min_count .. max_count
    max_count: int
    filler_fraction: float  # filler sentences as a fraction of all sentences
    sentences_per_document: int
    # In-context reading (0 = off, the default and tiny worlds): profile documents state a subject's facts and
    # restate them later in the same document, so that predicting the restatement rewards copying from context.
    profile_share: float = 0.0  # share of the world's subjects (seen >= 2 times) with one profile document
    n_context_subjects: int = 0  # invented people who appear only in their one profile document
    restate_other_frame: float = 0.0  # share of restatements through another training frame of the relation


PRESETS = {
    "tiny": WorldPreset(n_people=100, n_companies=0, n_places=0, n_employers=0, zipf_a=1.0, min_count=4,
                        max_count=12, filler_fraction=0.15, sentences_per_document=6),
    "default": WorldPreset(n_people=1400, n_companies=350, n_places=250, n_employers=25, zipf_a=1.7,
                           min_count=1, max_count=300, filler_fraction=0.15, sentences_per_document=8),
    # A smaller world with profile documents, for in-context versus weights and scale studies
    # (examples/scale_vs_frequency.py --world incontext); the default model is not trained on it.
    "incontext": WorldPreset(n_people=600, n_companies=150, n_places=100, n_employers=20, zipf_a=1.7,
                             min_count=1, max_count=300, filler_fraction=0.15, sentences_per_document=8,
                             profile_share=0.3, n_context_subjects=3000, restate_other_frame=0.25),
    # The same world with five times the context-only subjects: more of the text rewards copying.
    "incontext-dense": WorldPreset(n_people=600, n_companies=150, n_places=100, n_employers=20, zipf_a=1.7,
                                   min_count=1, max_count=300, filler_fraction=0.15, sentences_per_document=8,
                                   profile_share=0.5, n_context_subjects=15000, restate_other_frame=0.25),
}


# ----------------------------------------------------------------------------------------------------


@dataclass
class Fact:
    subject: str
    subject_type: str
    relation_id: str
    relation: str
    object: str
    train_count: int
    train_templates: list[str]
    heldout_templates: list[str]
    fact_id: int = 0

    def prompt(self, template: str) -> str:
        return template.format(self.subject)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class World:
    """The facts, the relations' candidate objects, and how to render the training text."""

    seed: int
    preset: str
    facts: list[Fact]
    candidates: dict[str, list[str]]  # relation_id -> the relation's possible objects
    filler: list[str] = field(default_factory=list)
    source: str = "generated"
    sentences_per_document: int = 8
    # In-context worlds only: facts of subjects that appear only in their profile document (not in ``facts``;
    # train_count = the times each is stated there, 2), and the profile documents' plan.
    context_facts: list[Fact] = field(default_factory=list)
    profile_subjects: list[str] = field(default_factory=list)  # world subjects that get a profile document
    restate_other_frame: float = 0.0

    # -- views -----------------------------------------------------------------------------------------
    @property
    def subjects(self) -> list[str]:
        return list(dict.fromkeys(f.subject for f in self.facts))

    @property
    def relation_ids(self) -> list[str]:
        return list(dict.fromkeys(f.relation_id for f in self.facts))

    def templates(self, relation_id: str) -> tuple[list[str], list[str]]:
        f = next(f for f in self.facts if f.relation_id == relation_id)
        return f.train_templates, f.heldout_templates

    # -- training text ---------------------------------------------------------------------------------
    def statements(self) -> list[str]:
        """Every training sentence stating a fact: fact ``i`` appears ``train_count_i`` times.

        The k-th mention of a fact uses training template ``k mod T`` after a seeded shuffle, so that
        frequent facts are seen through every training template.
        """
        rng = random.Random(f"{self.seed}-statements")
        out = []
        for f in self.facts:
            order = list(f.train_templates)
            rng.shuffle(order)
            for k in range(f.train_count):
                out.append(f"{f.prompt(order[k % len(order)])} {f.object}.")
        return out

    def documents(self) -> list[str]:
        """The training corpus: statements and filler, shuffled and packed into short documents.

        In an in-context world, profile documents (:meth:`profile_documents`) are added and shuffled in;
        a profiled world subject's two mentions per fact are taken out of its shuffled statements, so every
        fact is still stated exactly ``train_count`` times.
        """
        if not self.context_facts and not self.profile_subjects:
            rng = random.Random(f"{self.seed}-documents")
            sentences = self.statements() + list(self.filler)
            rng.shuffle(sentences)
            n = self.sentences_per_document
            return [" ".join(sentences[i:i + n]) for i in range(0, len(sentences), n)]
        return self._documents_with_profiles()

    # -- in-context worlds -----------------------------------------------------------------------------
    def _documents_with_profiles(self) -> list[str]:
        rng = random.Random(f"{self.seed}-documents-incontext")
        profiled = set(self.profile_subjects)
        sentences, by_subject = [], {}
        srng = random.Random(f"{self.seed}-statements")
        for f in self.facts:
            order = list(f.train_templates)
            srng.shuffle(order)
            mentions = [f"{f.prompt(order[k % len(order)])} {f.object}." for k in range(f.train_count)]
            if f.subject in profiled:
                by_subject.setdefault(f.subject, []).append(f)
                mentions = mentions[2:]  # its first two mentions are the profile's statement and restatement
            sentences.extend(mentions)
        n_filler = len(self.filler)
        filler = list(self.filler)
        docs = []
        profiles = [by_subject[s] for s in self.profile_subjects] + self._context_groups()
        for group in profiles:
            docs.append(self.profile_document(group, rng, filler[rng.randrange(n_filler)] if n_filler else ""))
        sentences += filler
        rng.shuffle(sentences)
        n = self.sentences_per_document
        docs += [" ".join(sentences[i:i + n]) for i in range(0, len(sentences), n)]
        rng.shuffle(docs)
        return docs

    def _context_groups(self) -> list[list[Fact]]:
        groups: dict[str, list[Fact]] = {}
        for f in self.context_facts:
            groups.setdefault(f.subject, []).append(f)
        return list(groups.values())

    def profile_document(self, facts: list[Fact], rng: random.Random, filler: str) -> str:
        """``"X was born in Paris. X works as a chemist. <filler> X was born in Paris. X works as a chemist."``

        Statement of each fact through a training template, one filler sentence, then each fact restated in
        the same order: through the same frame, or (share ``restate_other_frame``) another training frame
        of the relation, so that copying has to find the object, not only repeat a string. Each profile
        holds two statements of each of its facts.
        """
        first, again = [], []
        for f in facts:
            t = rng.choice(f.train_templates)
            first.append(f"{f.prompt(t)} {f.object}.")
            if rng.random() < self.restate_other_frame and len(f.train_templates) > 1:
                t = rng.choice([u for u in f.train_templates if u != t])
            again.append(f"{f.prompt(t)} {f.object}.")
        return " ".join(first + ([filler] if filler else []) + again)

    def training_text(self, eos: str = "\n") -> str:
        return eos.join(self.documents())

    # -- data sets -------------------------------------------------------------------------------------
    def write_datasets(self, out_dir: str | Path) -> dict[str, Path]:
        from .datasets import write_datasets

        return write_datasets(self, out_dir)

    def summary(self) -> dict:
        counts = [f.train_count for f in self.facts]
        return {
            "source": self.source, "seed": self.seed, "preset": self.preset,
            "subjects": len(self.subjects), "facts": len(self.facts), "relations": len(self.relation_ids),
            "statements": sum(counts), "filler_sentences": len(self.filler),
            "facts_seen_1": sum(c == 1 for c in counts), "facts_seen_30_plus": sum(c >= 30 for c in counts),
            "max_train_count": max(counts) if counts else 0,
        } | ({"profile_subjects": len(self.profile_subjects),
              "context_subjects": len({f.subject for f in self.context_facts}),
              "context_facts": len(self.context_facts), "restate_other_frame": self.restate_other_frame}
             if self.context_facts or self.profile_subjects else {})


# ----------------------------------------------------------------------------------------------------
# Generation, one step a function.


def zipf_counts(rng: random.Random, n: int, a: float, k_min: int, k_max: int) -> list[int]:
    """``n`` draws from the truncated Zipf law ``P(c = k) = k^(-a) / Σ_{j=k_min}^{k_max} j^(-a)``."""
    ks = list(range(k_min, k_max + 1))
    weights = [k ** (-a) for k in ks]
    return rng.choices(ks, weights=weights, k=n)


def invent_names(rng: random.Random, n: int, make, taken: set[str]) -> list[str]:
    """``n`` distinct names from ``make(rng)``, none in ``taken`` (which is updated)."""
    out = []
    while len(out) < n:
        name = make(rng)
        if name not in taken and name.lower() not in taken:
            taken.add(name)
            out.append(name)
    return out


def balanced_assignment(rng: random.Random, n: int, objects: list[str]) -> list[str]:
    """Each of ``n`` subjects gets an object; every object is used ⌊n/K⌋ or ⌈n/K⌉ times.

    Balanced rather than independent so that every object has enough subjects for ten neighborhood
    prompts (CounterFact) and no object is a majority guess.
    """
    pool = [objects[i % len(objects)] for i in range(n)]
    rng.shuffle(pool)
    return pool


def filler_sentences(rng: random.Random, n: int) -> list[str]:
    """Plain sentences with no subject in them, from a small grammar, so the model learns some English."""
    dets = ["The", "A", "Every", "One", "That"]
    adjs = ["old", "quiet", "small", "busy", "bright", "narrow", "famous", "cold", "green", "long", "wooden",
            "empty", "distant", "heavy"]
    nouns = ["river", "market", "train", "garden", "letter", "bridge", "teacher", "window", "ship", "library",
             "road", "storm", "child", "farmer", "painting", "winter", "song", "village"]
    verbs = ["was closed", "grew quickly", "looked different", "was repaired", "moved slowly", "was forgotten",
             "became popular", "stayed calm", "was visible", "changed again", "needed help", "was sold"]
    times = ["in the morning", "after the rain", "during the festival", "last summer", "every year",
             "before noon", "at night", "for a while", "in those days", "without warning"]
    extras = ["People said it would not last.", "Nobody knew why.", "It rained for three days.",
              "The news travelled fast.", "Some visitors stayed longer than planned.",
              "Prices rose and fell.", "The evening was warm and still."]
    out = []
    for _ in range(n):
        if rng.random() < 0.12:
            out.append(rng.choice(extras))
        else:
            out.append(f"{rng.choice(dets)} {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} "
                       f"{rng.choice(times)}.")
    return out


def generate_world(seed: int = 0, preset: str = "default") -> World:
    """The generated world for ``(seed, preset)``; a pure function of its arguments."""
    if preset not in PRESETS:
        raise FfkvError(f"unknown testbed preset {preset!r}", f"use one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    rng = random.Random(f"ffkv-testbed-{seed}-{preset}")
    taken = {w.lower() for w in CITIES + COUNTRIES + PROFESSIONS + LANGUAGES + INDUSTRIES + CONTINENTS}

    people = invent_names(rng, p.n_people,
                          lambda r: f"{_word(r, r.choice([1, 2]))} {_word(r, 2)}", taken)
    first_words: set[str] = set()

    def company(r):
        w = _word(r, 2)
        return f"{w} {r.choice(_COMPANY_SUFFIXES)}"

    companies = invent_names(rng, p.n_companies, company, taken)
    places = invent_names(rng, p.n_places, lambda r: r.choice(_PLACE_FORMS).format(_word(r, 2)),
                          taken)

    counts = {s: c for s, c in zip(people + companies + places,
                                   zipf_counts(rng, len(people) + len(companies) + len(places), p.zipf_a,
                                               p.min_count, p.max_count))}
    # Employers: the most-mentioned companies with distinct first words (recall scores the first token).
    employers = []
    for c in sorted(companies, key=lambda c: (-counts[c], c)):
        if c.split()[0] not in first_words:
            first_words.add(c.split()[0])
            employers.append(c)
        if len(employers) == p.n_employers:
            break
    if not employers:  # a world without companies: employers are invented names that only appear as objects
        employers = invent_names(rng, 12, lambda r: f"{_word(r, 2)} {r.choice(_COMPANY_SUFFIXES)}", taken)

    candidates: dict[str, list[str]] = {}
    facts: list[Fact] = []
    by_type = {"person": people, "company": companies, "place": places}
    for rel in RELATIONS:
        subjects = by_type[rel.subject_type]
        if not subjects:
            continue
        objects = list(employers) if rel.relation_id == "P108" else list(rel.objects)
        candidates[rel.relation_id] = objects
        for s, o in zip(subjects, balanced_assignment(rng, len(subjects), objects)):
            facts.append(Fact(subject=s, subject_type=rel.subject_type, relation_id=rel.relation_id,
                              relation=rel.name, object=o, train_count=counts[s],
                              train_templates=list(rel.train_templates),
                              heldout_templates=list(rel.heldout_templates)))
    # Fact order: by subject, then relation, so that fact_id is stable and readable.
    order = {s: i for i, s in enumerate(people + companies + places)}
    facts.sort(key=lambda f: (order[f.subject], f.relation_id))
    for i, f in enumerate(facts):
        f.fact_id = i

    n_statements = sum(f.train_count for f in facts)
    n_filler = math.ceil(n_statements * p.filler_fraction / (1 - p.filler_fraction))
    filler = filler_sentences(rng, n_filler)
    world = World(seed=seed, preset=preset, facts=facts, candidates=candidates, filler=filler,
                  sentences_per_document=p.sentences_per_document)
    if p.profile_share or p.n_context_subjects:
        add_profiles(world, p, taken)
    check_templates(world)
    return world


def add_profiles(world: World, p: WorldPreset, taken: set[str]) -> None:
    """Plan the profile documents of an in-context world (its own seeded stream; the facts are unchanged).

    A share ``profile_share`` of the subjects seen at least twice get one profile document (two of each
    fact's mentions); ``n_context_subjects`` invented people appear in one profile document each, with 1-3
    person facts and random objects, and nowhere else: their restatement can only be predicted by reading the
    context. Their facts (train_count 2) are kept in ``world.context_facts``, apart from the fact table.
    """
    rng = random.Random(f"ffkv-testbed-{world.seed}-{world.preset}-incontext")
    eligible = [s for s in world.subjects if min(f.train_count for f in world.facts if f.subject == s) >= 2]
    world.profile_subjects = sorted(rng.sample(eligible, round(p.profile_share * len(eligible))),
                                    key=world.subjects.index)
    world.restate_other_frame = p.restate_other_frame
    people = invent_names(rng, p.n_context_subjects,
                          lambda r: f"{_word(r, r.choice([1, 2]))} {_word(r, 2)}", taken)
    person_rels = [r for r in RELATIONS if r.subject_type == "person" and world.candidates.get(r.relation_id)]
    out = []
    for s in people:
        for rel in sorted(rng.sample(person_rels, rng.choice([1, 1, 2, 3])), key=lambda r: r.index):
            out.append(Fact(subject=s, subject_type="person", relation_id=rel.relation_id, relation=rel.name,
                            object=rng.choice(world.candidates[rel.relation_id]), train_count=2,
                            train_templates=list(rel.train_templates),
                            heldout_templates=list(rel.heldout_templates), fact_id=-1 - len(out)))
    world.context_facts = out


def check_templates(world: World) -> None:
    """Raise if a prompt frame is a prefix of another (the model would learn to continue the longer one)."""
    frames = set()
    for rid in world.relation_ids:
        train, held = world.templates(rid)
        frames.update(train)
        frames.update(held)
    frames = sorted(frames)
    for a in frames:
        for b in frames:
            if a != b and b.startswith(a):
                raise FfkvError(f"template {a!r} is a prefix of {b!r}", "make no template a prefix of another")
