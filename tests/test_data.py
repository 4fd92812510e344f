"""Tests of the Debian readers, the task suite and the JSONL reader (need the Debian data packages installed)."""

from __future__ import annotations

import json
import re

import pytest

from slimpeft.data import debian
from slimpeft.data.jsonl import read_jsonl, write_jsonl
from slimpeft.data.tasks import (
    GenExample,
    MCExample,
    build_task,
    foldoc_pool,
    format_generative,
    format_mc,
    format_training_text,
    general_statements,
    jargon_pool,
    list_tasks,
    wordnet_pool,
)

EXPECTED_SIZES = {
    "general/wordnet-def": (2800, 200, 4),
    "general/wordnet-hypernym": (2800, 200, 4),
    "general/elements": (248, 100, 4),
    "general/arithmetic": (9800, 200, 4),
    "downstream/foldoc-def": (100, 50, 4),
    "downstream/jargon-def": (100, 50, 4),
    "downstream/foldoc-yesno": (100, 50, 2),
}


# ------------------------------------------------------------------------------------------------- debian.py
def test_dictd_base64_numbers():
    assert debian.decode_dictd_number("A") == 0
    assert debian.decode_dictd_number("/") == 63
    assert debian.decode_dictd_number("BA") == 64
    assert debian.decode_dictd_number("Gb9L") == 6 * 64**3 + 27 * 64**2 + 61 * 64 + 11 == 1687371
    with pytest.raises(ValueError, match="'Gb-L' contains '-'"):
        debian.decode_dictd_number("Gb-L")


def test_read_dictd_elements_skips_metadata():
    entries = debian.read_dictd("elements")
    assert not any(e.headword.startswith("00") for e in entries)
    assert entries[0].headword == "hydrogen" or any(e.headword == "hydrogen" for e in entries)
    table = debian.elements()
    assert len(table) == 116  # 106 and 107 have no symbol in dict-elements
    by_name = {e.name: e for e in table}
    assert (by_name["oxygen"].symbol, by_name["oxygen"].number) == ("O", 8)
    assert (by_name["gold"].symbol, by_name["gold"].number) == ("Au", 79)
    assert [e.number for e in table] == [n for n in range(1, 119) if n not in (106, 107)]


def test_foldoc_and_jargon_definitions():
    foldoc = {d.term: d for d in debian.foldoc_definitions()}
    assert len(foldoc) > 11000
    compiler = foldoc["compiler"]
    assert compiler.category == "programming"
    assert compiler.definition == (
        "A program that converts another program from some source language (or programming language) to machine "
        "language (object code)"
    )
    jargon = {d.term: d for d in debian.jargon_definitions()}
    assert len(jargon) > 2100
    assert jargon["angry fruit salad"].definition == "A bad visual-interface design that uses too many colors"


def test_clean_markup_and_first_sentence():
    assert debian.clean_markup("<hardware> A {card punch} which cut   {punched\n cards}. [Details?]") == (
        "A card punch which cut punched cards."
    )
    assert debian.first_sentence("Developed ca. 1972 by J. Smith. Then more.") == "Developed ca. 1972 by J. Smith"
    assert debian.first_sentence("No full stop") == "No full stop"


def test_wordnet_known_synset():
    dog = debian.wordnet_synsets("n")[2084071]
    assert dog.words == ("dog", "domestic dog", "Canis familiaris")
    assert dog.hypernyms == (2083346, 1317541)
    assert dog.definition == (
        "a member of the genus Canis (probably descended from the common wolf) that has been domesticated by man "
        "since prehistoric times; occurs in many breeds"
    )
    assert dog.gloss.endswith('"the dog barked all night"')
    assert debian.wordnet_synsets("n")[2083346].words[0] == "canine"
    assert len(debian.wordnet_synsets("n")) == 82115
    assert debian.wordnet_primary_senses("n")["dog"] == (2084071, 1)


def test_missing_files_name_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(debian, "DICTD_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"foldoc.index not found: install the Debian package dict-foldoc "
                                                r"\(apt-get install dict-foldoc\)"):
        debian.read_dictd("foldoc")
    with pytest.raises(FileNotFoundError, match="install the Debian package wordnet-base"):
        next(debian.iter_wordnet("n", directory=tmp_path))


# -------------------------------------------------------------------------------------------------- tasks.py
def test_registry_names_kinds_and_sizes():
    assert list_tasks() == list(EXPECTED_SIZES)
    assert list_tasks("general") == [n for n in EXPECTED_SIZES if n.startswith("general/")]
    assert len(list_tasks("general")) == 4 and len(list_tasks("downstream")) == 3
    for name, (n_train, n_test, n_choices) in EXPECTED_SIZES.items():
        task = build_task(name)
        assert task.sizes == {"train": n_train, "test": n_test}, name
        assert task.n_choices == n_choices and task.chance == pytest.approx(1 / n_choices)
        assert task.kind == name.split("/")[0]
        for ex in task.train + task.test:
            assert isinstance(ex, MCExample) and len(ex.choices) == n_choices
            assert len(set(c.lower() for c in ex.choices)) == n_choices, ex
    with pytest.raises(ValueError, match="unknown task 'general/nope'"):
        build_task("general/nope")


def test_splits_are_deterministic_and_disjoint():
    for name in list_tasks():
        a, b, other = build_task(name, seed=0), build_task(name, seed=0), build_task(name, seed=1)
        assert a.train == b.train and a.test == b.test
        assert a.test != other.test
        train_q = {ex.question for ex in a.train}
        assert not train_q & {ex.question for ex in a.test}, name


def test_answers_are_balanced_enough():
    for name in list_tasks():
        task = build_task(name)
        counts = [sum(ex.answer == k for ex in task.test) for k in range(task.n_choices)]
        assert min(counts) >= 0.6 * len(task.test) / task.n_choices, (name, counts)
    yesno = build_task("downstream/foldoc-yesno")
    assert sum(ex.answer == 0 for ex in yesno.test) == len(yesno.test) // 2 == 25  # exactly balanced


def test_downstream_is_disjoint_from_general():
    pool_words = {f.word for f in wordnet_pool()}
    assert len(pool_words) == 3000
    assert not pool_words & {d.term.lower() for d in foldoc_pool()}
    assert not pool_words & {d.term.lower() for d in jargon_pool()}
    assert not {d.term.lower() for d in foldoc_pool()} & {d.term.lower() for d in jargon_pool()}
    # The yes/no task uses the term split of foldoc-def: its test terms are foldoc-def's test terms.
    def_test = {ex.choices[ex.answer] for ex in build_task("downstream/foldoc-def").test}
    yesno_test = {re.match(r"Does '(.*)' mean: ", ex.question).group(1) for ex in build_task(
        "downstream/foldoc-yesno").test}
    assert yesno_test == def_test


def test_arithmetic_test_sums_are_held_out_and_correct():
    task = build_task("general/arithmetic")
    seen = {ex.question for ex in task.train}
    for ex in task.test:
        a, b = map(int, re.match(r"What is (\d+) \+ (\d+)\?", ex.question).groups())
        assert ex.choices[ex.answer] == str(a + b)
        assert all(abs(int(c) - (a + b)) <= 12 for c in ex.choices)
        assert ex.question not in seen
    assert len(seen) + len(task.test) == 100 * 100


def test_statements_hold_test_facts_but_not_qa():
    statements = general_statements()
    assert len(statements) == 4 * 3000 + 2 * 116 + 2000
    text = "\n".join(statements)
    task = build_task("general/wordnet-def")
    for ex in task.test[:20]:
        definition = ex.question.removeprefix("What is the word for: ").removesuffix("?")
        assert f"The word for {definition} is {ex.choices[ex.answer]}." in text
    assert "Q:" not in text and "What is" not in text


def test_formatter():
    ex = MCExample("What is 2 + 3?", ("5", "6"), 0)
    assert format_mc(ex) == ("Q: What is 2 + 3?\nA:", [" 5", " 6"])
    assert format_mc(ex.to_dict()) == format_mc(ex)
    assert format_training_text(ex) == "Q: What is 2 + 3?\nA: 5"
    gen = GenExample("Say hi", "hi")
    assert format_generative(gen) == ("Q: Say hi\nA:", " hi")
    assert format_training_text({"prompt": "Say hi", "response": "hi"}) == "Q: Say hi\nA: hi"
    with pytest.raises(ValueError, match="needs a multiple-choice example"):
        format_mc(gen)
    with pytest.raises(ValueError, match="answer 2 is out of range for 2 choices"):
        MCExample("q", ("a", "b"), 2)


# -------------------------------------------------------------------------------------------------- jsonl.py
def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_round_trip(tmp_path):
    examples = [MCExample("q1", ("a", "b", "c"), 2), GenExample("p", "r")]
    path = write_jsonl(examples, tmp_path / "x.jsonl")
    assert read_jsonl(path) == examples
    path.write_text(path.read_text() + "\n\n")  # trailing blank lines are fine
    assert len(read_jsonl(path)) == 2


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "a", "response": "b"}', "{not json"], r"data.jsonl:2: invalid JSON"),
        (['{"prompt": "a"}'], r"data.jsonl:1: generative record is missing the field 'response'"),
        (['{"prompt": "a", "response": 3}'], r"data.jsonl:1: field 'response' must be a string, got int"),
        (['{"question": "q", "choices": ["a", "b"]}'], r"data.jsonl:1: .* missing the field 'answer'"),
        (['{"prompt": "a", "response": "b"}', "", '{"question": "q", "choices": ["a", "b"], "answer": 2}'],
         r"data.jsonl:3: answer 2 is out of range for 2 choices"),
        (['{"question": "q", "choices": ["a", "b"], "answer": -1}'], r"data.jsonl:1: answer -1 is out of range"),
        (['{"question": "q", "choices": ["a", "b"], "answer": "0"}'], r"data.jsonl:1: field 'answer' must be an int"),
        (['{"question": "q", "choices": ["a", "b"], "answer": true}'], r"data.jsonl:1: field 'answer' must be an int"),
        (['{"question": "q", "choices": ["a", 1], "answer": 0}'], r"data.jsonl:1: choices\[1\] must be a string"),
        (['{"question": "q", "choices": "ab", "answer": 0}'], r"data.jsonl:1: field 'choices' must be a non-empty"),
        (['{"question": "q", "choices": ["a"], "answer": 0}'], r"data.jsonl:1: field 'choices' needs at least 2"),
        (['[1, 2]'], r"data.jsonl:1: expected a JSON object, got list"),
        (['{"text": "hello"}'], r"data.jsonl:1: record has neither 'prompt'/'response' nor"),
        (["", "  "], r"data.jsonl: file contains no records"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, lines, message):
    path = _write(tmp_path, lines)
    with pytest.raises(ValueError, match=message):
        read_jsonl(path)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: JSONL data file not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_jsonl_never_skips(tmp_path):
    records = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(50)]
    path = _write(tmp_path, [json.dumps(r) for r in records])
    assert [ex.prompt for ex in read_jsonl(path)] == [f"p{i}" for i in range(50)]
