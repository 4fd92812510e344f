"""Data: Debian text readers, the task suite, the shared Q/A formatter and the JSONL reader."""

from __future__ import annotations

from slimpeft.data.jsonl import read_jsonl, write_jsonl
from slimpeft.data.tasks import (
    Example,
    GenExample,
    MCExample,
    Task,
    build_task,
    format_generative,
    format_mc,
    format_training_text,
    general_statements,
    list_tasks,
)

__all__ = [
    "Example",
    "GenExample",
    "MCExample",
    "Task",
    "build_task",
    "format_generative",
    "format_mc",
    "format_training_text",
    "general_statements",
    "list_tasks",
    "read_jsonl",
    "write_jsonl",
]
