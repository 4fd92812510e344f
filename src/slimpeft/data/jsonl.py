"""Reader for user-supplied JSONL data.

Each non-blank line is one JSON object, either generative ``{"prompt": str, "response": str}`` or multiple choice
``{"question": str, "choices": [str, ...], "answer": int}``. Every problem raises :class:`ValueError` naming the file,
the line number and what is wrong; no record is ever skipped silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from slimpeft.data.tasks import Example, GenExample, MCExample


def parse_record(record: Any, where: str) -> Example:
    """Validate one decoded JSON value; ``where`` (e.g. ``"data.jsonl:3"``) prefixes every error message."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "question" in record or "choices" in record or "answer" in record:
        for key in ("question", "choices", "answer"):
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
    if "prompt" in record or "response" in record:
        for key in ("prompt", "response"):
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
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
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
