"""The GenRM training task (`data.format=genrm_steps`, `algorithm.reward=genrm_step`): the policy is the GenRM.

Each item of a ProcessBench-format file (problem, solution steps, earliest-error label, final-answer flag, optional
ground truth; see `genrm.processbench`) becomes the prompt the GenRM is asked at RL time: the steps re-split with
`split_steps(.., max_steps)` and tagged by `build_genrm_messages`, with the label moved onto those steps. A response
is scored by the step-distance reward of FAPO.md (`genrm.reward.genrm_step_reward`) on its parsed `\\boxed{}`
index. `PromptItem.ground_truth` holds the label as text, so the answer checker's exact match (accuracy, avg@k
validation) reads "the exact earliest-error index".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fapo_megatron.data.items import DataError, PromptItem
from fapo_megatron.genrm.processbench import load_step_labelled, processbench_metrics, to_judge_example
from fapo_megatron.genrm.prompt import build_genrm_messages, split_steps
from fapo_megatron.genrm.reward import genrm_step_reward_from_verdicts
from fapo_megatron.genrm.types import VerdictStatus
from fapo_megatron.genrm.verdict import parse_verdict


def load_genrm_items(path: str, max_steps: int) -> list[PromptItem]:
    """GenRM prompts for the step-labelled items in `path` (ProcessBench json list or jsonl)."""
    try:
        labelled = load_step_labelled(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file (data.format=genrm_steps reads ProcessBench items)") from None
    except ValueError as err:
        raise DataError(str(err)) from None
    if not labelled:
        raise DataError(f"{path}: no items")
    items = []
    for index, item in enumerate(labelled):
        request, label, num_steps = to_judge_example(item, max_steps)
        steps = split_steps(request.solution, max_steps)
        messages = build_genrm_messages(request.problem, steps, request.ground_truth)
        items.append(
            PromptItem(
                prompt=messages[-1]["content"],
                messages=messages,
                ground_truth=str(label),
                source="genrm_steps",
                index=index,
                meta={
                    "id": item.id,
                    "label": label,
                    "num_steps": num_steps,
                    "final_answer_correct": item.final_answer_correct,
                },
            )
        )
    return items


@dataclass
class GenRMScores:
    rewards: torch.Tensor
    """[N] float: step-distance reward of each response."""
    exact: torch.Tensor
    """[N] bool: the response boxed exactly the labelled index."""
    metrics: dict[str, float]
    """Parse outcomes and ProcessBench-style accuracies of the responses."""


def score_genrm_responses(items: Sequence[PromptItem], texts: Sequence[str]) -> GenRMScores:
    """Score response i (a GenRM answer to `items[i]`) against the item's label."""
    if len(items) != len(texts):
        raise ValueError(f"{len(items)} items but {len(texts)} responses")
    for item in items:
        if "label" not in item.meta or "num_steps" not in item.meta:
            raise ValueError(f"item {item.index} ({item.source}) is not a GenRM training item: no label / num_steps")
    labels = [item.meta["label"] for item in items]
    verdicts = [parse_verdict(text, item.meta["num_steps"]) for item, text in zip(items, texts)]
    rewards = genrm_step_reward_from_verdicts(verdicts, labels)
    exact = torch.tensor([v.first_error_step == y for v, y in zip(verdicts, labels)], dtype=torch.bool)
    answer_correct = [bool(item.meta.get("final_answer_correct", True)) for item in items]
    quality = processbench_metrics(verdicts, labels, answer_correct)
    metrics = {
        "genrm_task/unparseable_share": _share(sum(v.status == VerdictStatus.UNPARSEABLE for v in verdicts), verdicts),
        "genrm_task/flagged_share": _share(sum(bool(v.flawed) for v in verdicts), verdicts),
        "genrm_task/acc_erroneous": quality["processbench/acc_erroneous"],
        "genrm_task/acc_correct": quality["processbench/acc_correct"],
        "genrm_task/processbench_f1": quality["processbench/f1"],
    }
    return GenRMScores(rewards=rewards, exact=exact, metrics=metrics)


def _share(count: int, of: Sequence) -> float:
    """count / len(of); NaN (logged as undefined, printed "n/a") for an empty batch, never 0."""
    return count / len(of) if of else math.nan
