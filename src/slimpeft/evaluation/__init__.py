"""Evaluation: multiple-choice log-likelihood accuracy, generative exact match, and an lm-evaluation-harness bridge."""

from __future__ import annotations

from slimpeft.evaluation.multiple_choice import (
    TaskResult,
    evaluate_examples,
    evaluate_task,
    evaluate_tasks,
    exact_match,
    greedy_generate,
    loglikelihoods,
    predict_mc,
)

__all__ = [
    "TaskResult",
    "evaluate_examples",
    "evaluate_task",
    "evaluate_tasks",
    "exact_match",
    "greedy_generate",
    "loglikelihoods",
    "predict_mc",
]
