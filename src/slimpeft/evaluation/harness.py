"""Bridge to lm-evaluation-harness: our tasks as local harness tasks, evaluated offline.

:func:`write_harness_tasks` writes each task's test split as JSONL and a task YAML (``dataset_path: json``,
``output_type: multiple_choice``) whose prompt is exactly :func:`slimpeft.data.format_mc`'s; :func:`run_harness`
evaluates an in-memory model with ``lm_eval.simple_evaluate`` and ``HFLM(pretrained=model, tokenizer=tok)``, indexing
only our folder (``include_defaults=False``), so nothing is downloaded.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimpeft.data.jsonl import write_jsonl
from slimpeft.data.tasks import MCExample, build_task, list_tasks


def harness_name(task_name: str) -> str:
    """lm-eval task name of one of our tasks: ``general/wordnet-def`` -> ``slim_general_wordnet_def``."""
    return "slim_" + task_name.replace("/", "_").replace("-", "_")


def _yaml(name: str, data_file: Path) -> str:
    # JSON is valid YAML: it avoids any quoting issue in paths and the prompt template.
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Q: {{question}}\nA:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return json.dumps(spec, indent=1) + "\n"


def write_harness_tasks(
    directory: str | Path, tasks: Sequence[str] | None = None, seed: int = 0, limit: int | None = None
) -> dict[str, str]:
    """Write JSONL data and YAML configs of ``tasks`` (test split) into ``directory``; returns ours -> harness name.

    Only multiple-choice tasks can be bridged; a generative task raises ValueError.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    for task_name in tasks if tasks is not None else list_tasks():
        task = build_task(task_name, seed=seed)
        test = task.test[:limit] if limit else task.test
        if not all(isinstance(ex, MCExample) for ex in test):
            raise ValueError(f"task {task_name!r} has generative examples: the harness bridge handles multiple choice")
        hname = harness_name(task_name)
        data_file = write_jsonl(test, directory / f"{hname}.jsonl")
        (directory / f"{hname}.yaml").write_text(_yaml(hname, data_file))
        names[task_name] = hname
    return names


def run_harness(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 32,
    directory: str | Path | None = None,
    device: str = "cpu",
) -> dict[str, float]:
    """Accuracy (``acc``) per task according to lm-evaluation-harness, for an in-memory HF model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="slim-harness-") as tmp:
        folder = Path(directory) if directory is not None else Path(tmp)
        names = write_harness_tasks(folder, tasks, seed=seed, limit=limit)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(names.values()),
            task_manager=TaskManager(include_path=str(folder), include_defaults=False),
            log_samples=False,
            verbosity="ERROR",
        )
    return {ours: float(results["results"][theirs]["acc,none"]) for ours, theirs in names.items()}
