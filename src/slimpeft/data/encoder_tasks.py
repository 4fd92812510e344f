"""Real-text tasks for the sentence-encoder track: WordNet general probes and FOLDOC subject classification.

General ability (zero-shot, fixed sample, the same for every method):

- :func:`gloss_retrieval` -- WordNet definition -> word: embed the gloss of a word's most frequent sense and rank a
  fixed sample of candidate lemmas (the sampled words themselves) by cosine similarity.
- :func:`synonym_pairs` -- WordNet synonyms (two lemmas whose most frequent sense is the same synset) against
  unrelated pairs (the same lemmas shuffled across pairs): cosine similarity should rank synonyms first.

Downstream task (a task the encoder was not tuned for):

- :func:`foldoc_classification` -- FOLDOC definitions labelled with their subject tag (``<language>``,
  ``<networking>``, ...), the most frequent subject tags, a seeded, class-stratified train/test split.

Every builder is deterministic in its arguments and reads only Debian-shipped files (``wordnet-base``,
``dict-foldoc``); see :mod:`slimpeft.data.debian`.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass, field

from .debian import foldoc_definitions, wordnet_primary_senses, wordnet_synsets

# FOLDOC tags that name a subject (``jargon`` is a register, not a subject: left out).
FOLDOC_SUBJECTS: tuple[str, ...] = ("language", "networking", "programming", "operating system", "hardware",
                                    "communications", "company", "mathematics")


@dataclass(frozen=True)
class GlossRetrieval:
    """Definition -> word retrieval: ``queries[i]`` is the definition of ``candidates[i]``."""

    queries: list[str] = field(metadata={"help": "glosses (definitions without examples) of the sampled senses"})
    candidates: list[str] = field(metadata={"help": "the sampled lemmas; query i's answer is candidate i"})


@dataclass(frozen=True)
class SynonymPairs:
    """Word pairs labelled synonym (1) or unrelated (0)."""

    pairs: list[tuple[str, str]] = field(metadata={"help": "(word, word) pairs"})
    labels: list[int] = field(metadata={"help": "1: the two words share their most frequent sense; 0: unrelated"})


@dataclass(frozen=True)
class Classification:
    """Texts with integer labels, split into train and test."""

    labels: list[str] = field(metadata={"help": "class names; label i is labels[i]"})
    train_texts: list[str] = field(metadata={"help": "training inputs"})
    train_labels: list[int] = field(metadata={"help": "training labels"})
    test_texts: list[str] = field(metadata={"help": "held-out inputs"})
    test_labels: list[int] = field(metadata={"help": "held-out labels"})


def _check_count(name: str, value: int, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"`{name}`={value!r} must be an integer >= {lo}")


def _common_lemmas(pos: str, min_tagged: int) -> dict[str, int]:
    """Single-word alphabetic lemmas with at least ``min_tagged`` SemCor-tagged senses -> primary synset offset."""
    return {lemma: off for lemma, (off, tagged) in wordnet_primary_senses(pos).items()
            if tagged >= min_tagged and re.fullmatch(r"[a-z]{3,}", lemma)}


def gloss_retrieval(n: int = 500, seed: int = 0, pos: str = "n", min_tagged: int = 1) -> GlossRetrieval:
    """``n`` common lemmas of one part of speech, each with the definition of its most frequent sense.

    Lemmas are single lower-case words with at least ``min_tagged`` senses tagged in the SemCor corpus (WordNet
    index ``tagsense_cnt``: the word occurs in real text); each synset is used
    once, and a definition that contains its own lemma is skipped (the answer would be in the question).
    """
    _check_count("n", n, 2)
    synsets = wordnet_synsets(pos)
    lemmas = _common_lemmas(pos, min_tagged)
    by_synset: dict[int, str] = {}
    for lemma in sorted(lemmas):
        off = lemmas[lemma]
        definition = synsets[off].definition
        if off not in by_synset and definition and not re.search(rf"\b{lemma}", definition.lower()):
            by_synset[off] = lemma
    pool = sorted(by_synset.items())
    if len(pool) < n:
        raise ValueError(f"`n`={n} exceeds the {len(pool)} usable WordNet lemmas (pos={pos!r}, "
                         f"min_tagged={min_tagged})")
    chosen = random.Random(seed).sample(pool, n)
    return GlossRetrieval([synsets[off].definition for off, _ in chosen], [lemma for _, lemma in chosen])


def synonym_pairs(n: int = 500, seed: int = 0, pos: str = "n", min_tagged: int = 1) -> SynonymPairs:
    """``n`` synonym pairs and ``n`` unrelated pairs built from the same words.

    A synonym pair is two lemmas whose most frequent sense is the same synset (``car``/``auto``); an unrelated pair
    joins the first word of one synonym pair to the second word of another (a random derangement), so both
    classes hold the same words.
    """
    _check_count("n", n, 2)
    by_synset: dict[int, list[str]] = defaultdict(list)
    for lemma, off in sorted(_common_lemmas(pos, min_tagged).items()):
        by_synset[off].append(lemma)
    pool = [tuple(ws[:2]) for _, ws in sorted(by_synset.items())
            if len(ws) >= 2 and not (ws[0] in ws[1] or ws[1] in ws[0])]
    if len(pool) < n:
        raise ValueError(f"`n`={n} exceeds the {len(pool)} WordNet synonym pairs (pos={pos!r}, "
                         f"min_tagged={min_tagged})")
    rng = random.Random(seed)
    pos_pairs = rng.sample(pool, n)
    shift = rng.randrange(1, n)  # a cyclic shift is a derangement: no pair meets its own partner
    neg_pairs = [(pos_pairs[i][0], pos_pairs[(i + shift) % n][1]) for i in range(n)]
    return SynonymPairs(list(pos_pairs) + neg_pairs, [1] * n + [0] * n)


def foldoc_classification(n_train: int = 100, n_test: int = 50, seed: int = 0,
                          subjects: tuple[str, ...] = FOLDOC_SUBJECTS) -> Classification:
    """FOLDOC definitions (first sentence) labelled by subject tag; per class ``n_train`` train and ``n_test`` test.

    The split is stratified and seeded: the same ``seed`` gives the same split. Entries whose definition text occurs
    under two subjects are dropped (no label noise, no leak between splits).
    """
    _check_count("n_train", n_train, 1)
    _check_count("n_test", n_test, 1)
    if len(set(subjects)) < 2:
        raise ValueError(f"`subjects`={subjects!r} must name at least two distinct FOLDOC subject tags")
    by_subject: dict[str, list[str]] = {s: [] for s in subjects}
    labels_of: dict[str, set[str]] = defaultdict(set)
    for d in foldoc_definitions():
        if d.category in by_subject:
            by_subject[d.category].append(d.definition)
            labels_of[d.definition].add(d.category)
    rng = random.Random(seed)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for label, subject in enumerate(subjects):
        texts = sorted({t for t in by_subject[subject] if len(labels_of[t]) == 1})
        if len(texts) < n_train + n_test:
            raise ValueError(f"FOLDOC subject {subject!r} has {len(texts)} entries, fewer than n_train + n_test = "
                             f"{n_train + n_test}")
        rng.shuffle(texts)
        train += [(t, label) for t in texts[:n_train]]
        test += [(t, label) for t in texts[n_train:n_train + n_test]]
    rng.shuffle(train)
    return Classification(list(subjects), [t for t, _ in train], [y for _, y in train],
                          [t for t, _ in test], [y for _, y in test])


__all__ = ["FOLDOC_SUBJECTS", "Classification", "GlossRetrieval", "SynonymPairs", "foldoc_classification",
           "gloss_retrieval", "synonym_pairs"]
