"""Step-labelled data in ProcessBench's format, for training and evaluating a GenRM, and its metrics.

An item holds `problem`, `steps` (the solution's paragraphs), `label` (earliest wrong step from 0, -1 if none)
and `final_answer_correct`; FAPO-Critic-style items may add `ground_truth`. Each item becomes the same
`JudgeRequest` a rollout would (its steps joined by blank lines and re-split with `split_steps`), with its label
moved onto the merged steps when an item has more than `max_steps` paragraphs.

Metrics: ProcessBench F1 = harmonic mean of the exact-index accuracy on erroneous items and on correct items;
FlawedPositiveBench (the items whose final answer is correct) = precision / recall / F1 of "flawed".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fapo_megatron.genrm.prompt import STEP_JOINER, split_paragraphs, split_steps, step_of_paragraph
from fapo_megatron.genrm.types import JudgeRequest, Verdict
from fapo_megatron.genrm.verdict import last_boxed_content


@dataclass(frozen=True)
class StepLabelledItem:
    id: str
    problem: str
    steps: tuple[str, ...]
    label: int
    """Earliest wrong step (index into `steps`), -1 when all are right."""
    final_answer_correct: bool
    ground_truth: str
    """The item's `ground_truth`, else (final answer correct) the solution's own last boxed answer, else ''."""


def load_step_labelled(path: str | Path) -> list[StepLabelledItem]:
    """Read a ProcessBench-format json list (or jsonl); a bad item raises ValueError naming file and position."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        raw = [(f"{path}:{n}", json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        raw = [(f"{path}[{n}]", entry) for n, entry in enumerate(json.loads(text))]
    return [_item(where, entry) for where, entry in raw]


def _item(where: str, entry: dict) -> StepLabelledItem:
    for key, kind in (("problem", str), ("steps", list), ("label", int), ("final_answer_correct", bool)):
        if not isinstance(entry.get(key), kind):
            # A malformed data file is one kind of user mistake (ValueError), whatever the field's type.
            message = f"{where}: field {key!r} must be {kind.__name__}, got {entry.get(key)!r:.80}"
            raise ValueError(message)  # noqa: TRY004
    steps = tuple(entry["steps"])
    if not steps or not all(isinstance(step, str) and step.strip() for step in steps):
        raise ValueError(f"{where}: 'steps' must be a non-empty list of non-blank strings")
    if not -1 <= entry["label"] < len(steps):
        raise ValueError(f"{where}: label {entry['label']} outside -1..{len(steps) - 1}")
    ground_truth = entry.get("ground_truth")
    if ground_truth is None:
        boxed = last_boxed_content(STEP_JOINER.join(steps)) if entry["final_answer_correct"] else None
        ground_truth = boxed or ""
    return StepLabelledItem(
        id=str(entry.get("id", where)),
        problem=entry["problem"],
        steps=steps,
        label=entry["label"],
        final_answer_correct=entry["final_answer_correct"],
        ground_truth=str(ground_truth),
    )


def to_judge_example(item: StepLabelledItem, max_steps: int = 32) -> tuple[JudgeRequest, int, int]:
    """(request, label on the steps the judge sees, number of those steps)."""
    solution = STEP_JOINER.join(step.strip() for step in item.steps)
    num_steps = len(split_steps(solution, max_steps))
    if item.label == -1:
        return JudgeRequest(item.problem, solution, item.ground_truth), -1, num_steps
    paragraph = sum(len(split_paragraphs(step)) for step in item.steps[: item.label])
    label = step_of_paragraph(paragraph, len(split_paragraphs(solution)), max_steps)
    return JudgeRequest(item.problem, solution, item.ground_truth), label, num_steps


def processbench_metrics(verdicts: Sequence[Verdict], labels: Sequence[int], answer_correct: Sequence[bool]) -> dict:
    """ProcessBench accuracies / F1 over all items and FlawedPositiveBench P / R / F1 over answer-correct items.

    A verdict that is not ok counts as a wrong index and as "not flagged"; `missing` says how many there were.
    """
    if not len(verdicts) == len(labels) == len(answer_correct):
        raise ValueError(f"{len(verdicts)} verdicts, {len(labels)} labels, {len(answer_correct)} answer flags")
    erroneous = [v.first_error_step == y for v, y in zip(verdicts, labels) if y != -1]
    correct = [v.first_error_step == -1 for v, y in zip(verdicts, labels) if y == -1]
    acc_err = sum(erroneous) / len(erroneous) if erroneous else 0.0
    acc_ok = sum(correct) / len(correct) if correct else 0.0
    positives = [(bool(v.flawed), y != -1) for v, y, ok in zip(verdicts, labels, answer_correct) if ok]
    true_pos = sum(pred and gold for pred, gold in positives)
    flagged, flawed = sum(pred for pred, _ in positives), sum(gold for _, gold in positives)
    precision = true_pos / flagged if flagged else 0.0
    recall = true_pos / flawed if flawed else 0.0
    return {
        "processbench/acc_erroneous": acc_err,
        "processbench/acc_correct": acc_ok,
        "processbench/f1": _harmonic(acc_err, acc_ok),
        "fpb/precision": precision,
        "fpb/recall": recall,
        "fpb/f1": _harmonic(precision, recall),
        "fpb/items": float(len(positives)),
        "missing": float(sum(not v.available for v in verdicts)),
    }


def _harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b else 0.0
