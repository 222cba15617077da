"""Program step checker on arithmetic chains with known flaws, and the paragraph -> merged-step mapping."""

import random

import pytest

from fapo_megatron.data.arith import FLAWS, arith_solution, first_wrong_step, make_arith_items
from fapo_megatron.genrm.program_judge import ProgramJudge
from fapo_megatron.genrm.prompt import split_paragraphs, split_steps, step_of_paragraph
from fapo_megatron.genrm.types import JudgeRequest, VerdictStatus

PROBLEM = "Start with 7. Add 5. Multiply by 3. Subtract 4."


@pytest.mark.parametrize(
    "solution,expected",
    [
        ("7 + 5 = 12\n\n12 * 3 = 36\n\n36 - 4 = 32\n\n\\boxed{32}", -1),
        ("7 + 5 = 12\n\n12 * 3 = 35\n\n36 - 4 = 32\n\n\\boxed{32}", 1),  # slip silently fixed
        ("7 + 5 = 12\n\n36 - 4 = 32\n\n\\boxed{32}", 1),  # step 1 skipped
        ("\\boxed{32}", 0),  # guessed: the first step is missing
        ("7 + 5 = 12\n\n12 * 3 = 36\n\n\\boxed{32}", 2),  # last step missing, charged to the answer paragraph
        ("7 + 5 = 12\n\n12 * 3 = 36", 1),  # no answer paragraph: missing step charged to the last paragraph
        ("7 + 5 = 12\n\n12 * 3 = 36\n\n36 - 4 = 32\n\nand 1 more\n\n\\boxed{32}", 3),  # extra paragraph
    ],
)
def test_hand_labelled_solutions(solution, expected):
    (verdict,) = ProgramJudge().judge([JudgeRequest(PROBLEM, solution, "32")])
    assert verdict.status == VerdictStatus.OK
    assert verdict.first_error_step == expected
    assert verdict.num_steps == len(split_steps(solution))


def test_generated_flaws_are_caught_and_clean_solutions_pass():
    items = make_arith_items(40, seed=3, min_steps=2, max_steps=4)
    rng = random.Random(0)
    requests, flawed = [], []
    for item in items:
        flaw = rng.choice((None, *FLAWS))
        requests.append(JudgeRequest(item.prompt, arith_solution(item, flaw), item.ground_truth))
        flawed.append(flaw is not None)
    judge = ProgramJudge()
    verdicts = judge.judge(requests)
    assert [v.flawed for v in verdicts] == flawed
    assert judge.last_counts.flawed == sum(flawed) and judge.last_counts.clean == 40 - sum(flawed)


def test_merged_steps_report_the_step_holding_the_wrong_paragraph():
    ops = [("Add", 1)] * 9
    problem = "Start with 1. " + " ".join(f"{word} {n}." for word, n in ops)
    lines = [f"{v} + 1 = {v + 1}" for v in range(1, 10)]
    lines[6] = "7 + 1 = 9"  # paragraph 6 is wrong
    solution = "\n\n".join([*lines, "\\boxed{10}"])  # 10 paragraphs
    assert first_wrong_step(problem, split_paragraphs(solution)) == 6
    (verdict,) = ProgramJudge(max_steps=4).judge([JudgeRequest(problem, solution, "10")])
    # merge sizes 3,3,2,2 -> paragraphs 0-2, 3-5, 6-7, 8-9: paragraph 6 sits in step 2
    assert (verdict.first_error_step, verdict.num_steps) == (2, 4)


def test_step_of_paragraph():
    assert [step_of_paragraph(p, 10, 4) for p in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert [step_of_paragraph(p, 3, 4) for p in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="paragraph_index=10"):
        step_of_paragraph(10, 10, 4)


def test_bad_requests_become_error_verdicts():
    judge = ProgramJudge()
    verdicts = judge.judge([JudgeRequest("What is 2+2?", "4\n\n\\boxed{4}", "4"), JudgeRequest(PROBLEM, " ", "32")])
    assert [v.status for v in verdicts] == [VerdictStatus.ERROR, VerdictStatus.ERROR]
    assert "not an arithmetic-chain problem" in verdicts[0].detail
    assert judge.last_counts.errors == 2 and judge.total_counts.asked == 2
