"""The arithmetic-chain task: generation, the program step checker, and clean / flawed / wrong solutions."""

import operator
import random

import pytest

from fapo_megatron.data import (
    FLAWS_WITH_CORRECT_ANSWER,
    SHORTCUT_FLAWS,
    TRIVIAL_SLIP,
    WRONG_ANSWER,
    arith_solution,
    first_wrong_step,
    make_arith_items,
    parse_problem,
)
from fapo_megatron.data.arith import IDENTITY_OPS
from fapo_megatron.genrm.prompt import split_steps
from fapo_megatron.verify import answers_match, extract_boxed

PROBLEM = "Start with 7. Add 5. Multiply by 3. Subtract 4."
BOX = r"\boxed{32}"

# (steps as the GenRM step split gives them, expected earliest wrong index)
CHECKER_CASES = [
    (["7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 32", BOX], -1),
    (["7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 32"], -1),
    (["  7+5=12. ", "12*3 = 36", "36 -4= 32", "So the answer is " + BOX], -1),
    # fixed slip: a wrong intermediate result the next step ignores
    (["7 + 5 = 12", "12 * 3 = 35", "36 - 4 = 32", BOX], 1),
    (["7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 31", BOX], 2),
    # slip carried through (wrong answer)
    (["7 + 5 = 13", "13 * 3 = 39", "39 - 4 = 35", r"\boxed{35}"], 0),
    # skipped steps
    (["7 + 5 = 12", "36 - 4 = 32", BOX], 1),
    (["12 * 3 = 36", "36 - 4 = 32", BOX], 0),
    (["7 + 5 = 12", "12 * 3 = 36", BOX], 2),
    # guessed: a bare answer, or nothing at all
    ([BOX], 0),
    ([], 0),
    # wrong operation, operand, running value, or order
    (["7 - 5 = 2", "2 * 3 = 6", "6 - 4 = 2", r"\boxed{2}"], 0),
    (["7 + 6 = 13", "13 * 3 = 39", "39 - 4 = 35", r"\boxed{35}"], 0),
    (["7 + 5 = 12", "13 * 3 = 39", "39 - 4 = 35", r"\boxed{35}"], 1),
    (["5 + 7 = 12", "12 * 3 = 36", "36 - 4 = 32", BOX], 0),
    # an extra step after the chain, a box in the middle, a step glued to the box
    (["7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 32", "32 + 0 = 32", BOX], 3),
    (["7 + 5 = 12", r"\boxed{12}", "12 * 3 = 36", "36 - 4 = 32", BOX], 1),
    (["7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 32 " + BOX], 2),
    # garbage
    (["asdf qwer"], 0),
    (["7 + 5 = 12", "12 * 3 = 36 wait, no", "36 - 4 = 32", BOX], 1),
    (["7 + 5 = " + "9" * 5000, BOX], 0),
    (["7 + 5 = 12", "12 * 3 = 36", "36 - 4 = 32", "\x00\x01}{\\boxed", BOX], 3),
    (["7 + 5 = 12", "12 ** 3 = 36", "36 - 4 = 32", BOX], 1),
]


@pytest.mark.parametrize("steps,expected", CHECKER_CASES, ids=[f"case{i}" for i in range(len(CHECKER_CASES))])
def test_first_wrong_step_hand_written(steps, expected):
    assert first_wrong_step(PROBLEM, steps) == expected


def test_first_wrong_step_rejects_a_non_problem():
    with pytest.raises(ValueError, match="not an arithmetic-chain problem"):
        first_wrong_step("What is 2 + 2?", ["2 + 2 = 4"])


def _evaluate(start, ops):
    functions = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    value = start
    for op, operand in ops:
        value = functions[op](value, operand)
    return value


def test_items_are_deterministic_well_formed_and_disjoint():
    train = make_arith_items(300, seed=3, min_steps=2, max_steps=4, split="train")
    assert [item.prompt for item in train] == [item.prompt for item in make_arith_items(300, 3, 2, 4, "train")]
    assert [item.prompt for item in train] != [item.prompt for item in make_arith_items(300, 4, 2, 4, "train")]
    val = make_arith_items(100, seed=3, min_steps=2, max_steps=4, split="val")
    val_other_seed = make_arith_items(100, seed=99, min_steps=2, max_steps=4, split="val")
    train_texts = {item.prompt for item in train}
    assert len(train_texts) == 300
    assert train_texts.isdisjoint(item.prompt for item in val + val_other_seed)
    for item in train + val:
        ops = [tuple(op) for op in item.meta["ops"]]
        assert 2 <= len(ops) <= 4
        assert item.ground_truth == str(_evaluate(item.meta["start"], ops))
        assert parse_problem(item.prompt).text == item.prompt
        assert item.source == "arith"
    assert [item.index for item in train] == list(range(300))
    with pytest.raises(ValueError, match="split"):
        make_arith_items(1, 0, split="test")


def test_canonical_solution_format():
    assert arith_solution(PROBLEM) == "7 + 5 = 12\n\n12 * 3 = 36\n\n36 - 4 = 32\n\n\\boxed{32}"
    assert first_wrong_step(PROBLEM, split_steps(arith_solution(PROBLEM))) == -1


def _differing_line(canonical_lines, flawed_lines):
    """Index of the first line where the flawed solution departs from the canonical one."""
    for index, (clean, flawed) in enumerate(zip(canonical_lines, flawed_lines)):
        if clean != flawed:
            return index
    return min(len(canonical_lines), len(flawed_lines))


def test_generated_solutions_have_the_expected_verdicts():
    items = make_arith_items(60, seed=7, min_steps=1, max_steps=5)
    rng = random.Random(0)
    for item in items:
        canonical = arith_solution(item)
        canonical_steps = split_steps(canonical)[:-1]
        assert answers_match(extract_boxed(canonical), item.ground_truth)
        assert first_wrong_step(item.prompt, split_steps(canonical)) == -1
        for flaw in FLAWS_WITH_CORRECT_ANSWER:
            solution = arith_solution(item, flaw=flaw, rng=rng)
            steps = split_steps(solution)
            assert answers_match(extract_boxed(solution), item.ground_truth), (flaw, solution)
            verdict = first_wrong_step(item.prompt, steps)
            assert verdict != -1, (flaw, solution)
            assert verdict == _differing_line(canonical_steps, steps[:-1]), (flaw, solution)
        wrong = arith_solution(item, flaw=WRONG_ANSWER, rng=rng)
        assert not answers_match(extract_boxed(wrong), item.ground_truth), wrong
        wrong_steps = split_steps(wrong)
        assert first_wrong_step(item.prompt, wrong_steps) == _differing_line(canonical_steps, wrong_steps)


def test_flawed_solution_is_reproducible_without_rng():
    assert arith_solution(PROBLEM, flaw="fixed_slip") == arith_solution(PROBLEM, flaw="fixed_slip")
    assert arith_solution(PROBLEM, flaw="guessed") == BOX
    with pytest.raises(ValueError, match="flaw"):
        arith_solution(PROBLEM, flaw="typo")


def test_identity_steps_close_the_chain_with_trivial_operations_without_changing_it():
    plain = make_arith_items(80, seed=5, min_steps=2, max_steps=3, max_value=20, max_operand=5)
    trivial = make_arith_items(80, seed=5, min_steps=2, max_steps=3, max_value=20, max_operand=5, identity_steps=1)
    for item in trivial:
        ops = [tuple(op) for op in item.meta["ops"]]
        assert sum(op in IDENTITY_OPS for op in ops) == 1 and ops[-1] in IDENTITY_OPS  # the trivial step closes it
        assert 3 <= len(ops) <= 4
        real = [op for op in ops if op not in IDENTITY_OPS]
        assert item.ground_truth == str(_evaluate(item.meta["start"], real))
    assert not any(tuple(op) in IDENTITY_OPS for item in plain for op in item.meta["ops"])
    with pytest.raises(ValueError, match="identity_steps"):
        make_arith_items(1, 0, identity_steps=-1)


def _trivial_index(item):
    return next(k for k, op in enumerate(item.meta["ops"]) if tuple(op) in IDENTITY_OPS)


def test_shortcut_flaws_keep_the_answer_and_are_marked_at_the_trivial_step():
    items = make_arith_items(60, seed=8, min_steps=1, max_steps=4, max_value=20, max_operand=5, identity_steps=1)
    rng = random.Random(1)
    for item in items:
        trivial = _trivial_index(item)
        canonical_steps = split_steps(arith_solution(item))
        assert first_wrong_step(item.prompt, canonical_steps) == -1
        for flaw in SHORTCUT_FLAWS:
            solution = arith_solution(item, flaw=flaw, rng=rng)
            steps = split_steps(solution)
            assert answers_match(extract_boxed(solution), item.ground_truth), (flaw, solution)
            assert first_wrong_step(item.prompt, steps) == trivial, (flaw, solution)
            assert _differing_line(canonical_steps[:-1], steps[:-1]) == trivial, (flaw, solution)
        assert len(arith_solution(item, "skipped_trivial")) < len(arith_solution(item, "bare_trivial"))
        assert len(arith_solution(item, "bare_trivial")) < len(arith_solution(item))
    with pytest.raises(ValueError, match="needs a trivial step"):
        arith_solution(PROBLEM, flaw="skipped_trivial")


def test_a_trivial_slip_is_a_wrong_answer_marked_at_the_written_out_trivial_step():
    items = make_arith_items(60, seed=9, min_steps=2, max_steps=3, max_value=20, max_operand=5, identity_steps=1)
    rng = random.Random(2)
    for item in items:
        trivial = _trivial_index(item)
        canonical_steps = split_steps(arith_solution(item))
        solution = arith_solution(item, flaw=TRIVIAL_SLIP, rng=rng)
        steps = split_steps(solution)
        assert not answers_match(extract_boxed(solution), item.ground_truth), solution
        assert first_wrong_step(item.prompt, steps) == trivial == _differing_line(canonical_steps, steps)
        assert steps[trivial].split("=")[0] == canonical_steps[trivial].split("=")[0]  # written out, result wrong
        stated = int(steps[trivial].split("=")[1])
        assert extract_boxed(solution) == str(_evaluate(stated, [tuple(op) for op in item.meta["ops"][trivial + 1 :]]))
    with pytest.raises(ValueError, match="needs a trivial step"):
        arith_solution(PROBLEM, flaw=TRIVIAL_SLIP)
