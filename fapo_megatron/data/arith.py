"""The synthetic arithmetic-chain task of the CPU demo: problems, solutions (clean, flawed, wrong), step checker.

A problem reads `Start with 7. Add 5. Multiply by 3. Subtract 4.`; its canonical solution is one step per
paragraph and the answer in a box:

    7 + 5 = 12

    12 * 3 = 36

    36 - 4 = 32

    \\boxed{32}

Running values stay in 1..999 so a tiny character-level model can learn the task. Because every step can be
checked by a program (`first_wrong_step`), the task has exact flaw labels: a response can reach the right
boxed answer through a wrong or missing step, which is what FAPO's flaw detector looks for.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from fapo_megatron.data.items import PromptItem

MAX_VALUE = 999
"""Largest running value a generated chain reaches."""
FLAWS_WITH_CORRECT_ANSWER = ("fixed_slip", "skipped_step", "guessed")
"""Flawed solutions that still box the right answer: a wrong intermediate result the next step silently
ignores, a step left out, a bare answer with no steps."""
WRONG_ANSWER = "wrong_answer"
"""A slip carried through to a wrong boxed answer."""
FLAWS = (*FLAWS_WITH_CORRECT_ANSWER, WRONG_ANSWER)

_OP_WORDS = {"+": "Add", "-": "Subtract", "*": "Multiply by"}
_WORD_OPS = {word: op for op, word in _OP_WORDS.items()}
_PROBLEM_RE = re.compile(r"^\s*Start with (\d{1,6})\.((?:\s*(?:Add|Subtract|Multiply by) \d{1,6}\.)+)\s*$")
_OP_RE = re.compile(r"(Add|Subtract|Multiply by) (\d{1,6})\.")
_STEP_RE = re.compile(r"^\s*(-?\d{1,18})\s*([+*-])\s*(-?\d{1,18})\s*=\s*(-?\d{1,18})\s*\.?\s*$")
_VAL_BUCKETS = 8
"""One in this many distinct problems belongs to the validation split (by a hash of its text)."""


@dataclass(frozen=True)
class ArithProblem:
    """A parsed chain: the start value and (operator, operand) pairs."""

    start: int
    ops: tuple[tuple[str, int], ...]

    @property
    def values(self) -> list[int]:
        """Running values after each operation."""
        values, value = [], self.start
        for op, operand in self.ops:
            value = _apply(value, op, operand)
            values.append(value)
        return values

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def text(self) -> str:
        return " ".join([f"Start with {self.start}."] + [f"{_OP_WORDS[op]} {operand}." for op, operand in self.ops])


def parse_problem(problem_text: str) -> ArithProblem:
    """Parse `Start with 7. Add 5. ...`; ValueError naming the text when it is not an arithmetic chain."""
    match = _PROBLEM_RE.match(problem_text)
    if not match:
        raise ValueError(f"not an arithmetic-chain problem: {problem_text[:120]!r}")
    ops = tuple((_WORD_OPS[word], int(number)) for word, number in _OP_RE.findall(match.group(2)))
    return ArithProblem(start=int(match.group(1)), ops=ops)


def make_arith_items(
    n: int,
    seed: int,
    min_steps: int = 2,
    max_steps: int = 4,
    split: str = "train",
    *,
    max_value: int = MAX_VALUE,
    max_operand: int = 20,
) -> list[PromptItem]:
    """`n` distinct problems, deterministic in (seed, split); train and val never share a problem text.

    max_value bounds every running value, max_operand every added/subtracted number (multipliers stay 2..5):
    small bounds make a task a tiny model can learn in minutes.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: must be 'train' or 'val'")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    if max_value < 4 or max_operand < 1:
        raise ValueError(f"need max_value >= 4 and max_operand >= 1, got {max_value}, {max_operand}")
    rng = random.Random(f"arith:{seed}:{split}")
    items, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(items) == n:
            break
        problem = _random_problem(rng, rng.randint(min_steps, max_steps), max_value, max_operand)
        text = problem.text
        if text in seen or _split_of(text) != split:
            continue
        seen.add(text)
        meta = {"start": problem.start, "ops": [list(op) for op in problem.ops], "split": split}
        items.append(
            PromptItem(prompt=text, ground_truth=str(problem.answer), source="arith", index=len(items), meta=meta)
        )
    if len(items) < n:
        raise ValueError(f"could only make {len(items)} distinct {split} problems with {min_steps}-{max_steps} steps")
    return items


def arith_solution(
    item_or_problem: PromptItem | str, flaw: str | None = None, rng: random.Random | None = None
) -> str:
    """The canonical solution, or one with `flaw` (see FLAWS); `rng` picks where the flaw goes.

    Without `rng` the choice is seeded by the problem text, so a given (problem, flaw) is reproducible.
    """
    text = item_or_problem.prompt if isinstance(item_or_problem, PromptItem) else item_or_problem
    problem = parse_problem(text)
    rng = rng if rng is not None else random.Random(f"flaw:{text}:{flaw}")
    values = [problem.start, *problem.values]
    lines = [f"{values[k]} {op} {operand} = {values[k + 1]}" for k, (op, operand) in enumerate(problem.ops)]
    answer = problem.answer
    if flaw is None:
        pass
    elif flaw == "guessed":
        lines = []
    elif flaw == "skipped_step":
        del lines[rng.randrange(len(lines))]
    elif flaw == "fixed_slip":
        k = rng.randrange(len(lines))
        op, operand = problem.ops[k]
        lines[k] = f"{values[k]} {op} {operand} = {_slipped(values[k + 1], rng)}"
    elif flaw == WRONG_ANSWER:
        k = rng.randrange(len(lines))
        value = _slipped(values[k + 1], rng)
        op, operand = problem.ops[k]
        lines[k] = f"{values[k]} {op} {operand} = {value}"
        for j in range(k + 1, len(lines)):
            op, operand = problem.ops[j]
            lines[j] = f"{value} {op} {operand} = {_apply(value, op, operand)}"
            value = _apply(value, op, operand)
        answer = value
    else:
        raise ValueError(f"flaw={flaw!r}: must be None or one of {FLAWS}")
    return "\n\n".join([*lines, f"\\boxed{{{answer}}}"])


def first_wrong_step(problem_text: str, steps: list[str]) -> int:
    """Index (0-based) of the earliest wrong or missing step of a solution to `problem_text`; -1 if none.

    `steps` are the solution's paragraphs (as `genrm.prompt.split_steps` gives them). A last paragraph
    holding `\\boxed` is the answer, not a step. Step k must read `a op b = c` with `a` the running value,
    `op b` the k-th operation and `c` its result; a missing step is an error at its position and an extra
    paragraph is an error too. Only parsing and integer arithmetic, whatever the text holds.
    """
    problem = parse_problem(problem_text)
    body = list(steps)
    if body and "\\boxed" in body[-1]:
        body.pop()
    value = problem.start
    for k, (op, operand) in enumerate(problem.ops):
        if k >= len(body):
            return k
        match = _STEP_RE.match(body[k])
        if not match:
            return k
        expected = _apply(value, op, operand)
        stated = (int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4)))
        if stated != (value, op, operand, expected):
            return k
        value = expected
    return len(problem.ops) if len(body) > len(problem.ops) else -1


def _apply(value: int, op: str, operand: int) -> int:
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    return value * operand


def _random_problem(rng: random.Random, num_steps: int, max_value: int, max_operand: int) -> ArithProblem:
    """A chain whose running values stay in 1..max_value."""
    value = rng.randint(1, min(20, max_value))
    start, ops = value, []
    for _ in range(num_steps):
        choices = (["+"] if value < max_value else []) + (["-"] if value >= 2 else [])
        choices += ["*"] if 2 * value <= max_value else []
        op = rng.choice(choices)
        if op == "+":
            operand = rng.randint(1, min(max_operand, max_value - value))
        elif op == "-":
            operand = rng.randint(1, min(max_operand, value - 1))
        else:
            operand = rng.randint(2, min(5, max_value // value))
        ops.append((op, operand))
        value = _apply(value, op, operand)
    return ArithProblem(start=start, ops=tuple(ops))


def _split_of(text: str) -> str:
    """`val` for one in _VAL_BUCKETS problem texts (a fixed hash, the same on every machine), else `train`."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % _VAL_BUCKETS
    return "val" if bucket == 0 else "train"


def _slipped(result: int, rng: random.Random) -> int:
    """A plausible wrong result near `result` (off by 1 to 10, never negative)."""
    delta = rng.randint(1, 10)
    return result - delta if result - delta >= 0 and rng.random() < 0.5 else result + delta
