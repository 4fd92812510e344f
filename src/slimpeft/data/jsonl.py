"""Reader for user-supplied JSONL data.

Each non-blank line is one JSON object, either generative ``{"prompt": str, "response": str}`` or multiple choice
``{"question": str, "choices": [str, ...], "answer": int}``. Every problem (bytes that are not UTF-8, invalid or too
deeply nested JSON, a missing field, a wrong type, a record of both kinds, an empty file) raises :class:`ValueError`
naming the file, the line number and what is wrong; no record is ever skipped silently. Other fields are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from slimpeft.data.tasks import Example, GenExample, MCExample

GEN_FIELDS = ("prompt", "response")
MC_FIELDS = ("question", "choices", "answer")


def parse_record(record: Any, where: str) -> Example:
    """Validate one decoded JSON value; ``where`` (e.g. ``"data.jsonl:3"``) prefixes every error message."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    mc, gen = sorted(set(record) & set(MC_FIELDS)), sorted(set(record) & set(GEN_FIELDS))
    if mc and gen:
        raise ValueError(f"{where}: record mixes generative fields {gen} and multiple-choice fields {mc}; "
                         "use one kind per record")
    if mc:
        for key in MC_FIELDS:
            if key not in record:
                raise ValueError(f"{where}: multiple-choice record is missing the field {key!r}")
        question, choices, answer = record["question"], record["choices"], record["answer"]
        if not isinstance(question, str):
            raise ValueError(f"{where}: field 'question' must be a string, got {type(question).__name__}")
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{where}: field 'choices' must be a non-empty list of strings")
        for i, choice in enumerate(choices):
            if not isinstance(choice, str):
                raise ValueError(f"{where}: choices[{i}] must be a string, got {type(choice).__name__}")
        if len(choices) < 2:
            raise ValueError(f"{where}: field 'choices' needs at least 2 choices, got {len(choices)}")
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise ValueError(f"{where}: field 'answer' must be an integer index, got {type(answer).__name__}")
        if not 0 <= answer < len(choices):
            raise ValueError(f"{where}: answer {answer} is out of range for {len(choices)} choices")
        return MCExample(question, tuple(choices), answer)
    if gen:
        for key in GEN_FIELDS:
            if key not in record:
                raise ValueError(f"{where}: generative record is missing the field {key!r}")
            if not isinstance(record[key], str):
                raise ValueError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
        return GenExample(record["prompt"], record["response"])
    raise ValueError(
        f"{where}: record has neither 'prompt'/'response' nor 'question'/'choices'/'answer' (keys: {sorted(record)})"
    )


def read_jsonl(path: str | Path) -> list[Example]:
    """Read and validate a JSONL file of examples (blank lines are allowed and ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: JSONL data file not found")
    examples: list[Example] = []
    with open(path, "rb") as handle:  # bytes: a line that is not UTF-8 is reported with its number
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a leading BOM is allowed
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                                 f"{exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise ValueError(f"{path}:{line_no}: JSON nested too deeply") from None
            examples.append(parse_record(record, f"{path}:{line_no}"))
    if not examples:
        raise ValueError(f"{path}: file contains no records")
    return examples


def write_jsonl(examples: Iterable[Example], path: str | Path) -> Path:
    """Write examples as JSONL (the format :func:`read_jsonl` reads and lm-evaluation-harness loads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for ex in examples:
            handle.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")
    return path
