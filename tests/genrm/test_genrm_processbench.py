"""ProcessBench-format loading, label mapping onto merged steps, and the published metric definitions."""

import json
from pathlib import Path

import pytest

from fapo_megatron.genrm.processbench import (
    StepLabelledItem,
    load_step_labelled,
    processbench_metrics,
    to_judge_example,
)
from fapo_megatron.genrm.prompt import split_steps
from fapo_megatron.genrm.types import Verdict, VerdictStatus
from fapo_megatron.genrm.verdict import parse_verdict

SAMPLE = Path(__file__).parent / "data" / "processbench_sample.json"


def test_sample_loads_with_ground_truth_from_the_solution():
    items = load_step_labelled(SAMPLE)
    assert len(items) == 12
    by_id = {item.id: item for item in items}
    assert by_id["gsm8k-201"].ground_truth == "6" and by_id["math-501"].ground_truth == "[-13,3]"
    assert by_id["gsm8k-0"].ground_truth == ""  # final answer wrong: no reference answer to show
    assert by_id["gsm8k-200"].ground_truth == ""  # correct answer but never boxed
    for item in items:
        request, label, num_steps = to_judge_example(item)
        assert split_steps(request.solution) == [s.strip() for s in item.steps]
        assert (label, num_steps) == (item.label, len(item.steps))


def test_label_moves_with_merging():
    steps = tuple(f"s{i}" for i in range(10))
    item = StepLabelledItem("x", "p", steps, label=6, final_answer_correct=True, ground_truth="1")
    request, label, num_steps = to_judge_example(item, max_steps=4)
    assert (label, num_steps) == (2, 4)  # merged as paragraphs 0-2, 3-5, 6-7, 8-9
    assert split_steps(request.solution, 4)[2] == "s6\n\ns7"


def test_multi_paragraph_steps_shift_the_label(tmp_path):
    entry = {"problem": "p", "steps": ["a\n\nb", "c", "d"], "label": 2, "final_answer_correct": False}
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps(entry) + "\n")
    (item,) = load_step_labelled(path)
    request, label, num_steps = to_judge_example(item)
    assert split_steps(request.solution) == ["a", "b", "c", "d"] and (label, num_steps) == (3, 4)


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"problem": "p", "steps": ["a"], "label": 1, "final_answer_correct": True}, r"\[0\]: label 1 outside -1..0"),
        ({"problem": "p", "steps": "a", "label": 0, "final_answer_correct": True}, "field 'steps' must be list"),
        ({"problem": "p", "steps": ["a", " "], "label": 0, "final_answer_correct": True}, "non-blank"),
        ({"steps": ["a"], "label": 0, "final_answer_correct": True}, "field 'problem'"),
    ],
)
def test_bad_items_name_file_and_position(tmp_path, entry, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match=message):
        load_step_labelled(path)


def test_metrics_by_hand():
    labels = [-1, -1, 2, 1, 0, -1]
    answer_correct = [True, True, True, True, False, False]
    texts = ["\\boxed{-1}", "\\boxed{1}", "\\boxed{2}", "\\boxed{-1}", "\\boxed{0}", "garbage"]
    verdicts = [parse_verdict(t, 4) for t in texts]
    metrics = processbench_metrics(verdicts, labels, answer_correct)
    # erroneous items (labels 2, 1, 0): exact hits 2 and 0 -> 2/3; correct items: only the first -> 1/3
    assert metrics["processbench/acc_erroneous"] == pytest.approx(2 / 3)
    assert metrics["processbench/acc_correct"] == pytest.approx(1 / 3)
    assert metrics["processbench/f1"] == pytest.approx(2 * (2 / 3) * (1 / 3) / 1.0)
    # answer-correct items: flagged = items 1, 2 ; flawed = items 2, 3 ; true positive = item 2
    assert (metrics["fpb/precision"], metrics["fpb/recall"], metrics["fpb/f1"]) == (0.5, 0.5, 0.5)
    assert metrics["fpb/items"] == 4 and metrics["missing"] == 1
    with pytest.raises(ValueError, match="2 verdicts, 1 labels"):
        processbench_metrics([Verdict(VerdictStatus.TIMEOUT)] * 2, [0], [True])
