"""The task suite: general tasks (the base model's pretraining distribution) and downstream tasks (text it never saw).

A task is a named list of examples with a deterministic train/test split. Every example is either multiple choice
(:class:`MCExample`: ``question``, ``choices``, ``answer`` index) or generative (:class:`GenExample`: ``prompt``,
``response``). All tasks share one surface format (:func:`format_mc`, :func:`format_training_text`)::

    Q: What is the word for: a domesticated carnivorous mammal?
    A: dog

so that pretraining, fine-tuning and evaluation see the same text.

General tasks (``kind == "general"``) are built from WordNet nouns, the periodic table and two-digit addition:

- ``general/wordnet-def``: definition -> word, 4-way;
- ``general/wordnet-hypernym``: "What is a X a kind of?", 4-way;
- ``general/elements``: chemical symbol / element name / atomic number, 4-way;
- ``general/arithmetic``: "What is 23 + 45?", 4-way, held-out sums never seen in pretraining (a generalising skill).

The facts behind the knowledge tasks' test items appear in the pretraining corpus only as plain statements
(:func:`general_statements`), never in the Q/A format; the test sums of ``general/arithmetic`` appear nowhere.

Downstream tasks (``kind == "downstream"``) come from FOLDOC and the Jargon File, which the base model never saw:

- ``downstream/foldoc-def``: FOLDOC definition -> term, 4-way;
- ``downstream/jargon-def``: Jargon File definition -> term, 4-way;
- ``downstream/foldoc-yesno``: "Does 'TERM' mean: DEFINITION?" yes/no (balanced), on the same term split as
  ``downstream/foldoc-def``.

The shipped base model (``assets/base``) was pretrained on the seed-0 splits: use ``seed=0`` to measure it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Literal, Union

from slimpeft.data import debian

TaskKind = Literal["general", "downstream"]


@dataclass(frozen=True)
class MCExample:
    """A multiple-choice example: the model should prefer ``choices[answer]``."""

    question: str = field(metadata={"help": "question text, without the 'Q:' prefix"})
    choices: tuple[str, ...] = field(metadata={"help": "candidate answers, without leading space"})
    answer: int = field(metadata={"help": "index of the correct choice"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"MCExample answer {self.answer} is out of range for {len(self.choices)} choices")

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "choices": list(self.choices), "answer": self.answer}


@dataclass(frozen=True)
class GenExample:
    """A generative example: the model should produce ``response`` after ``prompt``."""

    prompt: str = field(metadata={"help": "prompt text, without the 'Q:' prefix"})
    response: str = field(metadata={"help": "expected response, without leading space"})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Example = Union[MCExample, GenExample]  # noqa: UP007 (a runtime alias, Python 3.10 needs Union)


def example_from_dict(record: Mapping[str, Any]) -> Example:
    """Build an example from a ``{"question", "choices", "answer"}`` or ``{"prompt", "response"}`` mapping."""
    if "question" in record:
        return MCExample(record["question"], tuple(record["choices"]), int(record["answer"]))
    return GenExample(record["prompt"], record["response"])


# ----------------------------------------------------------------------------------------------- formatting
def _as_example(example: Example | Mapping[str, Any]) -> Example:
    return example if isinstance(example, (MCExample, GenExample)) else example_from_dict(example)


def format_prompt(text: str) -> str:
    """The shared prompt: ``"Q: {text}\\nA:"`` (answers follow after one space)."""
    return f"Q: {text}\nA:"


def format_mc(example: MCExample | Mapping[str, Any]) -> tuple[str, list[str]]:
    """``(prompt, continuations)`` of a multiple-choice example; continuations start with a space."""
    ex = _as_example(example)
    if not isinstance(ex, MCExample):
        raise ValueError(f"format_mc needs a multiple-choice example, got a generative one: {ex!r}")
    return format_prompt(ex.question), [f" {c}" for c in ex.choices]


def format_generative(example: GenExample | Mapping[str, Any]) -> tuple[str, str]:
    """``(prompt, target)`` of a generative example; the target starts with a space."""
    ex = _as_example(example)
    if not isinstance(ex, GenExample):
        raise ValueError(f"format_generative needs a generative example, got a multiple-choice one: {ex!r}")
    return format_prompt(ex.prompt), f" {ex.response}"


def format_training_text(example: Example | Mapping[str, Any]) -> str:
    """The full training text of an example (prompt + correct answer). Trainers append the EOS token."""
    ex = _as_example(example)
    if isinstance(ex, MCExample):
        prompt, continuations = format_mc(ex)
        return prompt + continuations[ex.answer]
    prompt, target = format_generative(ex)
    return prompt + target


# ----------------------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """A named task with deterministic train/test splits."""

    name: str = field(metadata={"help": "registry name, e.g. 'general/wordnet-def'"})
    kind: TaskKind = field(metadata={"help": "'general' (pretraining distribution) or 'downstream' (unseen text)"})
    train: list[Example] = field(metadata={"help": "training examples"})
    test: list[Example] = field(metadata={"help": "held-out test examples"})
    n_choices: int = field(metadata={"help": "choices per example (0 for generative tasks)"})
    description: str = field(default="", metadata={"help": "one line: what the task asks and where it comes from"})
    seed: int = field(default=0, metadata={"help": "seed of the split"})
    documents: list[str] = field(
        default_factory=list,
        metadata={"help": "plain-text statements of the task's facts, test facts included (downstream tasks): the new "
                  "knowledge that fine-tuning must take in, stated the way pretraining stated the general facts; "
                  "the Q/A of the test items is never trained on"},
    )

    @property
    def chance(self) -> float:
        """Accuracy of a uniform random guess (0 for generative tasks)."""
        return 1.0 / self.n_choices if self.n_choices else 0.0

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "test": len(self.test)}


WORDNET_POOL = 3000  # common nouns used by the two WordNet tasks
GENERAL_TEST = 200
ELEMENTS_TEST = 100
# Facts per downstream source: 50 asked at test, 100 with training Q/A, all 150 stated in the documents. Sized so
# that a few hundred steps of batch 16 (the demo) see every statement ~7 times: enough for the shipped base to learn
# the new facts (LoRA: 0.34 -> 0.62 mean downstream accuracy in 400 steps), where 300 facts were not learned.
DOWNSTREAM_TEST = 50
DOWNSTREAM_FACTS = 150

WORD_FOR = "What is the word for: {}?"


def _rng(name: str, seed: int) -> random.Random:
    return random.Random(f"{name}|{seed}")


def _mc(rng: random.Random, question: str, answer: str, pool: Sequence[str], n: int = 4,
        exclude: set[str] | None = None) -> MCExample:
    """A multiple-choice example with ``n - 1`` distinct distractors drawn from ``pool``."""
    banned = {answer.lower()} | {e.lower() for e in (exclude or set())}
    distractors: list[str] = []
    while len(distractors) < n - 1:
        cand = pool[rng.randrange(len(pool))]
        if cand.lower() not in banned:
            banned.add(cand.lower())
            distractors.append(cand)
    choices = distractors + [answer]
    rng.shuffle(choices)
    return MCExample(question, tuple(choices), choices.index(answer))


def _split(items: Sequence[Any], n_test: int, rng: random.Random) -> tuple[list[Any], list[Any]]:
    order = list(range(len(items)))
    rng.shuffle(order)
    test = [items[i] for i in sorted(order[:n_test])]
    train = [items[i] for i in sorted(order[n_test:])]
    return train, test


def _clean_definition(text: str) -> str:
    return text.strip().rstrip(".;:").strip()


def _a(word: str) -> str:
    """``word`` with its indefinite article: 'an apple', 'a dog'."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


@dataclass(frozen=True)
class NounFact:
    """A common WordNet noun with its definition and the first word of its hypernym."""

    word: str
    definition: str
    hypernym: str


@lru_cache(maxsize=1)
def wordnet_pool() -> tuple[NounFact, ...]:
    """The fixed pool of ``WORDNET_POOL`` common nouns (primary sense, tagged in SemCor, short definitions).

    Independent of any seed, so that every split and the pretraining corpus agree on the facts.
    """
    synsets = debian.wordnet_synsets("n")
    facts: list[NounFact] = []
    seen: set[int] = set()
    for lemma, (offset, tag_count) in sorted(debian.wordnet_primary_senses("n").items()):
        if tag_count < 1 or not lemma.isalpha() or not lemma.islower() or not 3 <= len(lemma) <= 14:
            continue
        if offset in seen or offset not in synsets:
            continue
        synset = synsets[offset]
        definition = _clean_definition(synset.definition)
        words = definition.split()
        if not 3 <= len(words) <= 20 or lemma in re.findall(r"[a-z]+", definition.lower()):
            continue
        hypernyms = [synsets[h].words[0] for h in synset.hypernyms if h in synsets]
        if not hypernyms or not re.fullmatch(r"[a-z][a-z ]*", hypernyms[0]) or hypernyms[0] == lemma:
            continue
        seen.add(offset)
        facts.append(NounFact(lemma, definition, hypernyms[0]))
    if len(facts) < WORDNET_POOL:
        raise ValueError(f"WordNet yields only {len(facts)} usable common nouns, fewer than {WORDNET_POOL}")
    rng = random.Random("wordnet-pool")
    chosen = sorted(rng.sample(range(len(facts)), WORDNET_POOL))
    return tuple(facts[i] for i in chosen)


def _wordnet_def(seed: int) -> Task:
    name = "general/wordnet-def"
    rng = _rng(name, seed)
    pool = wordnet_pool()
    words = [f.word for f in pool]
    items = [_mc(rng, WORD_FOR.format(f.definition), f.word, words) for f in pool]
    train, test = _split(items, GENERAL_TEST, rng)
    return Task(name, "general", train, test, 4, "WordNet noun definition -> which word (4-way)", seed)


def _wordnet_hypernym(seed: int) -> Task:
    name = "general/wordnet-hypernym"
    rng = _rng(name, seed)
    pool = wordnet_pool()
    hypernyms = sorted({f.hypernym for f in pool})
    items = [_mc(rng, f"What is {_a(f.word)} a kind of?", f.hypernym, hypernyms, exclude={f.word}) for f in pool]
    train, test = _split(items, GENERAL_TEST, rng)
    return Task(name, "general", train, test, 4, "WordNet noun -> its hypernym, 'X is a kind of ?' (4-way)", seed)


def _elements(seed: int) -> Task:
    name = "general/elements"
    rng = _rng(name, seed)
    table = debian.elements()
    names, symbols, numbers = [e.name for e in table], [e.symbol for e in table], [str(e.number) for e in table]
    items: list[Example] = []
    for e in table:
        items.append(_mc(rng, f"What is the chemical symbol of {e.name}?", e.symbol, symbols))
        items.append(_mc(rng, f"Which element has the symbol {e.symbol}?", e.name, names))
        items.append(_mc(rng, f"What is the atomic number of {e.name}?", str(e.number), numbers))
    train, test = _split(items, ELEMENTS_TEST, rng)
    return Task(name, "general", train, test, 4, "periodic table: symbol, name, atomic number (4-way)", seed)


def _addition_item(rng: random.Random, a: int, b: int) -> MCExample:
    total = a + b
    offsets = [o for o in range(-12, 13) if o != 0 and total + o >= 0]
    distractors = [str(total + o) for o in rng.sample(offsets, 3)]
    choices = distractors + [str(total)]
    rng.shuffle(choices)
    return MCExample(f"What is {a} + {b}?", tuple(choices), choices.index(str(total)))


def _arithmetic(seed: int) -> Task:
    name = "general/arithmetic"
    rng = _rng(name, seed)
    items = [_addition_item(rng, a, b) for a in range(100) for b in range(100)]
    train, test = _split(items, GENERAL_TEST, rng)
    return Task(name, "general", train, test, 4, "two-digit addition, held-out sums, distractors within 12 (4-way)",
                seed)


# ------------------------------------------------------------------------------------------------ downstream
def _downstream_pool(defs: Sequence[debian.Definition], excluded: set[str]) -> list[debian.Definition]:
    out, seen, seen_defs = [], set(), set()
    for d in defs:
        term, definition = d.term.strip(), _clean_definition(d.definition)
        key = term.lower()
        n_words = len(definition.split())
        if key in seen or key in excluded or definition.lower() in seen_defs:
            continue
        if not 4 <= n_words <= 30 or len(term) > 30:
            continue
        if key in definition.lower() or "?" in definition or not re.search(r"[A-Za-z]", term):
            continue
        seen.add(key)
        seen_defs.add(definition.lower())
        out.append(debian.Definition(term, definition, d.category))
    return out


@lru_cache(maxsize=1)
def _wordnet_noun_lemmas() -> frozenset[str]:
    return frozenset(debian.wordnet_primary_senses("n"))


@lru_cache(maxsize=1)
def foldoc_pool() -> tuple[debian.Definition, ...]:
    """FOLDOC terms usable as downstream items: not WordNet nouns, not Jargon File headwords, short definitions."""
    jargon_terms = {d.term.lower() for d in debian.jargon_definitions()}
    return tuple(_downstream_pool(debian.foldoc_definitions(), set(_wordnet_noun_lemmas()) | jargon_terms))


@lru_cache(maxsize=1)
def jargon_pool() -> tuple[debian.Definition, ...]:
    """Jargon File terms usable as downstream items: not WordNet nouns, short definitions."""
    return tuple(_downstream_pool(debian.jargon_definitions(), set(_wordnet_noun_lemmas())))


def _facts(name: str, pool: Sequence[debian.Definition], seed: int) -> list[debian.Definition]:
    """A seeded sample of DOWNSTREAM_FACTS facts of a downstream source (the same for every task built on it)."""
    rng = _rng(f"{name}/facts", seed)
    return rng.sample(list(pool), min(DOWNSTREAM_FACTS, len(pool)))


def _lower_first(text: str) -> str:
    """'A large number' -> 'a large number'; acronyms and names ('NeXT', 'St Andrews') keep their case."""
    return text[:1].lower() + text[1:] if len(text) > 1 and text[1].islower() else text


def _statements(facts: Sequence[debian.Definition]) -> list[str]:
    """Each fact stated as pretraining stated the general ones ("The word for ... is ..."), and dictionary-style."""
    out = []
    for d in facts:
        out.append(f"The word for {_lower_first(d.definition)} is {d.term}.")
        out.append(f"{d.term}: {d.definition}")
    return out


def _def_split(name: str, pool: Sequence[debian.Definition], seed: int
               ) -> tuple[list[debian.Definition], list[debian.Definition]]:
    facts = _facts(name, pool, seed)
    rng = _rng(f"{name}/split", seed)
    return _split(facts, DOWNSTREAM_TEST, rng)


def _def_task(name: str, pool: Sequence[debian.Definition], seed: int, description: str) -> Task:
    train_facts, test_facts = _def_split(name, pool, seed)
    rng = _rng(name, seed)
    terms = [d.term for d in pool]
    train = [_mc(rng, WORD_FOR.format(_lower_first(d.definition)), d.term, terms) for d in train_facts]
    test = [_mc(rng, WORD_FOR.format(_lower_first(d.definition)), d.term, terms) for d in test_facts]
    return Task(name, "downstream", train, test, 4, description, seed,
                documents=_statements(train_facts + test_facts))


def _foldoc_def(seed: int) -> Task:
    return _def_task("downstream/foldoc-def", foldoc_pool(), seed, "FOLDOC computing definition -> term (4-way)")


def _jargon_def(seed: int) -> Task:
    return _def_task("downstream/jargon-def", jargon_pool(), seed, "Jargon File definition -> term (4-way)")


def _yesno_items(rng: random.Random, defs: Sequence[debian.Definition]) -> list[Example]:
    items: list[Example] = []
    for i, d in enumerate(defs):
        match = i % 2 == 0
        other = d if match else defs[(i + 1 + rng.randrange(len(defs) - 1)) % len(defs)]
        answer = 0 if match else 1
        items.append(MCExample(f"Does '{d.term}' mean: {other.definition}?", ("yes", "no"), answer))
    rng.shuffle(items)
    return items


def _foldoc_yesno(seed: int) -> Task:
    name = "downstream/foldoc-yesno"
    # The same facts and split as downstream/foldoc-def: its test terms are this task's test terms.
    train_defs, test_defs = _def_split("downstream/foldoc-def", foldoc_pool(), seed)
    rng = _rng(name, seed)
    train = _yesno_items(rng, train_defs)
    test = _yesno_items(rng, test_defs)
    return Task(name, "downstream", train, test, 2, "does this FOLDOC definition match this term? (yes/no)", seed,
                documents=_statements(train_defs + test_defs))


_BUILDERS: dict[str, Callable[[int], Task]] = {
    "general/wordnet-def": _wordnet_def,
    "general/wordnet-hypernym": _wordnet_hypernym,
    "general/elements": _elements,
    "general/arithmetic": _arithmetic,
    "downstream/foldoc-def": _foldoc_def,
    "downstream/jargon-def": _jargon_def,
    "downstream/foldoc-yesno": _foldoc_yesno,
}


def list_tasks(kind: TaskKind | None = None) -> list[str]:
    """Registered task names, optionally only those of one kind ("general" or "downstream")."""
    if kind not in (None, "general", "downstream"):
        raise ValueError(f"list_tasks kind must be 'general', 'downstream' or None, got {kind!r}")
    return [n for n in _BUILDERS if kind is None or n.startswith(f"{kind}/")]


@lru_cache(maxsize=64)
def _build_cached(name: str, seed: int) -> Task:
    return _BUILDERS[name](seed)


def build_task(name: str, seed: int = 0) -> Task:
    """Build task ``name`` with the train/test split of ``seed`` (deterministic; cached, returns a fresh copy)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(_BUILDERS)}")
    task = _build_cached(name, seed)
    return Task(task.name, task.kind, list(task.train), list(task.test), task.n_choices, task.description, seed,
                documents=list(task.documents))


# ------------------------------------------------------------------------------------------- general corpus
def general_statements(extra_nouns: int = 2000) -> list[str]:
    """Plain-text statements of every general fact (train AND test facts), for the pretraining corpus.

    They state each fact in the direction that the Q/A asks (definition before word, word before hypernym, name
    before symbol and symbol before name), in two phrasings, but never in the Q/A format. ``extra_nouns`` adds
    definition statements of further common nouns outside the task pool (extra general text).
    """
    out: list[str] = []
    pool = wordnet_pool()
    for f in pool:
        out.append(f"The word for {f.definition} is {f.word}.")
        out.append(f"{f.definition[:1].upper() + f.definition[1:]}: that is called {_a(f.word)}.")
        out.append(f"{_a(f.word).capitalize()} is a kind of {f.hypernym}.")
        out.append(f"Every {f.word} is {_a(f.hypernym)}.")
    for e in debian.elements():
        out.append(f"The chemical symbol of {e.name} is {e.symbol}. The atomic number of {e.name} is {e.number}.")
        out.append(f"The symbol {e.symbol} stands for {e.name}, element number {e.number}.")
    if extra_nouns:
        in_pool = {f.word for f in pool}
        synsets = debian.wordnet_synsets("n")
        extra = []
        for lemma, (offset, tag_count) in sorted(debian.wordnet_primary_senses("n").items()):
            if lemma in in_pool or tag_count < 1 or not lemma.isalpha() or not lemma.islower():
                continue
            definition = _clean_definition(synsets[offset].definition)
            if 3 <= len(definition.split()) <= 20:
                extra.append(f"The word for {definition} is {lemma}.")
        rng = random.Random("extra-nouns")
        out.extend(rng.sample(extra, min(extra_nouns, len(extra))))
    return out
