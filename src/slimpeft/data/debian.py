"""Readers for the real text that Debian ships: dictd dictionaries and WordNet.

The task suite of the project is built from files installed by Debian packages, so that it needs no download:

- dictd dictionaries (``/usr/share/dictd/NAME.index`` + ``NAME.dict.dz``): FOLDOC (``dict-foldoc``), the Jargon
  File (``dict-jargon``), the periodic table (``dict-elements``) and 1913 Webster (``dict-gcide``);
- WordNet 3.0 (``/usr/share/wordnet/data.noun`` and ``index.noun``, package ``wordnet-base``).

Every reader raises :class:`FileNotFoundError` naming the Debian package to install when its file is missing.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

DICTD_DIR = Path(os.environ.get("SLIM_DICTD_DIR", "/usr/share/dictd"))
WORDNET_DIR = Path(os.environ.get("SLIM_WORDNET_DIR", "/usr/share/wordnet"))

#: Debian package that ships each dictd dictionary / WordNet.
DEBIAN_PACKAGES: dict[str, str] = {
    "foldoc": "dict-foldoc",
    "jargon": "dict-jargon",
    "elements": "dict-elements",
    "gcide": "dict-gcide",
    "wordnet": "wordnet-base",
}

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(_B64)}


def _require(path: Path, package: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: install the Debian package {package} (apt-get install {package})"
        )
    return path


def decode_dictd_number(text: str) -> int:
    """Decode a dictd index number: base64 digits ``A-Za-z0-9+/``, most significant first (``"BA"`` = 64)."""
    if not text:
        raise ValueError("dictd number is empty")
    value = 0
    for char in text:
        if char not in _B64_VALUE:
            raise ValueError(f"dictd number {text!r} contains {char!r}, which is not a dictd base64 digit")
        value = value * 64 + _B64_VALUE[char]
    return value


@dataclass(frozen=True)
class DictEntry:
    """One dictd entry: the index headword and the raw text of its definition block."""

    headword: str = field(metadata={"help": "headword as written in NAME.index (dictd lower-cases most)"})
    text: str = field(metadata={"help": "raw definition text, including the title line(s)"})


def read_dictd(name: str, directory: Path | str | None = None) -> list[DictEntry]:
    """Read every entry of dictd dictionary ``name`` (e.g. ``"foldoc"``), skipping ``00`` metadata headwords.

    Several headwords may point at the same block (synonyms); each block is returned once, under its first
    headword in index order.
    """
    directory = Path(directory) if directory is not None else DICTD_DIR
    package = DEBIAN_PACKAGES.get(name, f"dict-{name}")
    index_path = _require(directory / f"{name}.index", package)
    dict_path = _require(directory / f"{name}.dict.dz", package)
    with gzip.open(dict_path, "rb") as handle:
        data = handle.read()
    entries: list[DictEntry] = []
    seen: set[tuple[int, int]] = set()
    with open(index_path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) < 3:
                raise ValueError(f"{index_path}:{line_no}: expected 'headword<TAB>offset<TAB>length', got {line!r}")
            headword, offset_s, length_s = parts[0], parts[1], parts[2]
            if headword.startswith("00"):
                continue
            offset, length = decode_dictd_number(offset_s), decode_dictd_number(length_s)
            if offset + length > len(data):
                raise ValueError(f"{index_path}:{line_no}: entry {headword!r} points past the end of {dict_path}")
            if (offset, length) in seen:
                continue
            seen.add((offset, length))
            entries.append(DictEntry(headword, data[offset : offset + length].decode("utf-8", errors="replace")))
    return entries


_WS = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[A-Za-z0-9\)\]\"'])\.(?=\s+[A-Z(\"'0-9]|\s*$)")
_ABBREVIATIONS = {"ca", "esp", "etc", "e.g", "i.e", "inc", "vs", "cf", "approx", "dept", "univ", "corp", "ltd", "co",
                  "no", "st", "dr", "mr", "prof", "jr", "sr", "al", "eg", "ie", "viz", "fig", "vol", "ed"}


def clean_markup(text: str) -> str:
    """Drop dictd markup: ``{cross ref}`` -> ``cross ref``, ``<category>`` tags, ``[notes]``, URLs; squash spaces."""
    text = re.sub(r"\{\(?(https?|ftp)://[^}]*\}", "", text)
    text = re.sub(r"\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"<[^<>]*>", "", text)
    text = re.sub(r"\[[^\[\]]*\]", "", text)
    text = text.replace("‘", "'").replace("’", "'").replace("“", '"').replace("”", '"')
    return _WS.sub(" ", text).strip()


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` (up to the first full stop that ends a sentence), without the stop."""
    for match in _SENTENCE_END.finditer(text):
        words = text[: match.start()].split()
        last = words[-1].lower() if words else ""
        if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
            continue  # "ca. 1972", "esp. when", "J. Smith"
        return text[: match.start()].strip()
    return text.strip().rstrip(".").strip()


@dataclass(frozen=True)
class Definition:
    """A term and the first sentence of its definition, cleaned of markup."""

    term: str = field(metadata={"help": "the term as written in the entry's title line"})
    definition: str = field(metadata={"help": "first sentence of the definition, markup removed"})
    category: str = field(default="", metadata={"help": "FOLDOC <category> of the entry ('' when none)"})


def _body_paragraphs(text: str) -> tuple[list[str], list[str]]:
    """Split an entry into its title lines (unindented, before the first blank line) and body paragraphs."""
    lines = text.split("\n")
    title: list[str] = []
    i = 0
    while i < len(lines) and lines[i].strip() and not lines[i].startswith((" ", "\t")):
        title.append(lines[i].strip())
        i += 1
    paragraphs, current = [], []
    for line in lines[i:]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return title, paragraphs


def foldoc_definitions() -> list[Definition]:
    """FOLDOC entries as (term, first definition sentence, category); entries without a usable body are dropped."""
    out = []
    for entry in read_dictd("foldoc"):
        title, paragraphs = _body_paragraphs(entry.text)
        if not title or not paragraphs:
            continue
        body = paragraphs[0]
        cat = re.match(r"\s*<([^<>]*)>", body)
        category = cat.group(1).split(",")[0].strip() if cat else ""
        body = re.sub(r"^\d+\.\s*", "", clean_markup(body))
        body = re.sub(r"^\([^()]*\)\s*", "", body)  # "(TTS) Automatic conversion ..." -> "Automatic ..."
        body = re.sub(r"^\d+\.\s*", "", body)
        body = re.sub(r"^/[^/]{1,40}/,?\s*", "", body)  # pronunciation "/fred'net/"
        sentence = first_sentence(body)
        if sentence:
            out.append(Definition(title[-1], sentence, category))
    return out


def jargon_definitions() -> list[Definition]:
    """Jargon File entries as (term, first definition sentence)."""
    out = []
    for entry in read_dictd("jargon"):
        lines = entry.text.split("\n")
        term = lines[0].strip()
        paragraphs = [p for p in _body_paragraphs("\n".join(lines[1:]))[1]]
        # Skip pronunciation / part-of-speech lines ("n.", "/I·D·P/, v.,n.") and numbering.
        body = ""
        for paragraph in paragraphs:
            cleaned = clean_markup(paragraph)
            cleaned = re.sub(r"^\d+\.\s*", "", cleaned)
            cleaned = re.sub(r"^(n|v|adj|adv|vt|vi|interj)\.\s+(?=[A-Z])", "", cleaned)
            if len(cleaned.split()) >= 4 and not re.fullmatch(r"[/\w·\s.,-]*\b(n|v|adj|adv|interj|vt|vi)\.", cleaned):
                body = cleaned
                break
        sentence = first_sentence(body)
        if term and sentence:
            out.append(Definition(term, sentence))
    return out


@dataclass(frozen=True)
class Element:
    """A chemical element from ``dict-elements``."""

    name: str = field(metadata={"help": "element name, lower case"})
    symbol: str = field(metadata={"help": "chemical symbol"})
    number: int = field(metadata={"help": "atomic number"})
    description: str = field(default="", metadata={"help": "first sentence of the description"})


def elements() -> list[Element]:
    """The periodic table from ``dict-elements``, ordered by atomic number, one record per element."""
    by_number: dict[int, Element] = {}
    for entry in read_dictd("elements"):
        symbol = re.search(r"^Symbol:[ \t]*(\S+)[ \t]*$", entry.text, re.M)
        number = re.search(r"^Atomic number:[ \t]*(\d+)[ \t]*$", entry.text, re.M)
        if not symbol or not number:
            continue
        lines = [ln for ln in entry.text.split("\n") if ln.strip()]
        name = lines[0].strip().lower()
        desc_lines = [ln for ln in lines[1:] if not re.match(r"^(Symbol|Atomic number|Atomic weight):", ln)]
        element = Element(name, symbol.group(1), int(number.group(1)), first_sentence(" ".join(desc_lines)))
        by_number.setdefault(element.number, element)
    return [by_number[n] for n in sorted(by_number)]


@dataclass(frozen=True)
class Synset:
    """A WordNet synset from ``data.POS``."""

    offset: int = field(metadata={"help": "byte offset of the synset in data.POS (its WordNet id)"})
    pos: str = field(metadata={"help": "part of speech: n, v, a, s or r"})
    words: tuple[str, ...] = field(metadata={"help": "lemmas, underscores turned into spaces, markers stripped"})
    hypernyms: tuple[int, ...] = field(metadata={"help": "offsets of '@' and '@i' hypernym synsets"})
    gloss: str = field(metadata={"help": "full gloss (definition and quoted examples)"})

    @property
    def definition(self) -> str:
        """The gloss without its quoted examples (the part before the first '; \"')."""
        return re.split(r';\s*"', self.gloss, maxsplit=1)[0].strip().rstrip(";").strip()


_POS_FILE = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}


def iter_wordnet(pos: str = "n", directory: Path | str | None = None) -> Iterator[Synset]:
    """Yield every synset of WordNet ``data.{noun,verb,adj,adv}`` (licence header lines are skipped)."""
    if pos not in _POS_FILE:
        raise ValueError(f"WordNet part of speech must be one of {sorted(_POS_FILE)}, got {pos!r}")
    directory = Path(directory) if directory is not None else WORDNET_DIR
    path = _require(directory / f"data.{_POS_FILE[pos]}", DEBIAN_PACKAGES["wordnet"])
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.startswith("  "):
                continue
            head, sep, gloss = line.partition(" | ")
            if not sep:
                raise ValueError(f"{path}:{line_no}: synset line has no ' | ' before its gloss")
            fields = head.split()
            try:
                offset, ss_type, w_cnt = int(fields[0]), fields[2], int(fields[3], 16)
                words = tuple(re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * w_cnt : 2])
                i = 4 + 2 * w_cnt
                p_cnt = int(fields[i])
                pointers = [fields[i + 1 + 4 * k : i + 5 + 4 * k] for k in range(p_cnt)]
            except (IndexError, ValueError) as exc:
                raise ValueError(f"{path}:{line_no}: malformed synset line: {exc}") from exc
            hypernyms = tuple(int(p[1]) for p in pointers if p[0] in ("@", "@i"))
            yield Synset(offset, ss_type, words, hypernyms, gloss.strip())


@lru_cache(maxsize=4)
def wordnet_synsets(pos: str = "n") -> dict[int, Synset]:
    """All synsets of one part of speech, keyed by offset (cached; ~0.6 s for nouns)."""
    return {s.offset: s for s in iter_wordnet(pos)}


@lru_cache(maxsize=4)
def wordnet_primary_senses(pos: str = "n") -> dict[str, tuple[int, int]]:
    """Map each lemma of ``index.POS`` to (offset of its most frequent sense, tagged sense count of the lemma)."""
    directory = WORDNET_DIR
    path = _require(directory / f"index.{_POS_FILE[pos]}", DEBIAN_PACKAGES["wordnet"])
    out: dict[str, tuple[int, int]] = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.startswith("  "):
                continue
            fields = line.split()
            try:
                lemma, synset_cnt, p_cnt = fields[0], int(fields[2]), int(fields[3])
                tagsense_cnt = int(fields[5 + p_cnt])
                offsets = [int(x) for x in fields[6 + p_cnt : 6 + p_cnt + synset_cnt]]
            except (IndexError, ValueError) as exc:
                raise ValueError(f"{path}:{line_no}: malformed index line: {exc}") from exc
            out[lemma.replace("_", " ")] = (offsets[0], tagsense_cnt)
    return out
