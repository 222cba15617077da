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

Shortcuts that work. For a real model a flaw is often a shortcut that still lands on the right answer, so the
outcome reward alone never removes it. A tiny model learns every context it rarely sees less well, so a flaw in
the middle of a chain (a real step skipped, a guess) costs it accuracy, and outcome-only RL removes those flaws
by itself: FAPO would have nothing to add. Chains may therefore end in trivial steps (`identity_steps`:
`Multiply by 1.` or `Add 0.`), and SHORTCUT_FLAWS put the flaw at the first of them: the step left out, stated
as a bare number, or written with a wrong result that the boxed answer ignores. Every real step comes before the
flaw, in the same context whatever the solution does at the end, so a flawed solution needs no arithmetic a clean
one does not. Wrong answers slip at a real step (WRONG_ANSWER) or at the written-out trivial step (TRIVIAL_SLIP),
a slip the shortcut cannot make: with enough of those in its training mix (`demo.warmup`), a policy finds the
shortcut the safer path, as a real model does, and the outcome reward favours it. The program checker still marks
the exact step, so FAPO's flaw penalty can tell the two apart.
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
"""A slip at a real step carried through to a wrong boxed answer."""
FLAWS = (*FLAWS_WITH_CORRECT_ANSWER, WRONG_ANSWER)
SHORTCUT_FLAWS = ("skipped_trivial", "bare_trivial", "fixed_trivial_slip")
"""Flaws at a chain's first trivial step (x 1 or + 0) that cost the answer nothing: its line left out, its line
a bare number with no operation, its result written wrong and ignored by what follows."""
TRIVIAL_SLIP = "trivial_slip"
"""A slip at a chain's first trivial step carried through to a wrong boxed answer: the one wrong answer that only
a solution writing the trivial step out can make."""
IDENTITY_OPS = (("*", 1), ("+", 0))
"""The trivial operations `identity_steps` inserts; the generator never makes them otherwise."""

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
    identity_steps: int = 0,
) -> list[PromptItem]:
    """`n` distinct problems, deterministic in (seed, split); train and val never share a problem text.

    max_value bounds every running value, max_operand every added/subtracted number (multipliers stay 2..5):
    small bounds make a task a tiny model can learn in minutes. identity_steps trivial operations (IDENTITY_OPS)
    close each chain, after its min_steps..max_steps real ones.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}: must be 'train' or 'val'")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    if max_value < 4 or max_operand < 1:
        raise ValueError(f"need max_value >= 4 and max_operand >= 1, got {max_value}, {max_operand}")
    if identity_steps < 0:
        raise ValueError(f"identity_steps={identity_steps} must be >= 0")
    rng = random.Random(f"arith:{seed}:{split}")
    items, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(items) == n:
            break
        problem = _random_problem(rng, rng.randint(min_steps, max_steps), max_value, max_operand)
        base_text = problem.text  # split and de-duplication by the real chain: trivial steps change neither
        if base_text in seen or _split_of(base_text) != split:
            continue
        seen.add(base_text)
        problem = _with_identity_steps(problem, identity_steps, random.Random(f"identity:{base_text}"))
        text = problem.text
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
    """The canonical solution, or one with `flaw` (see FLAWS, SHORTCUT_FLAWS); `rng` picks where the flaw goes.

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
    elif flaw in SHORTCUT_FLAWS:
        k = _first_trivial_step(problem)
        if flaw == "skipped_trivial":
            del lines[k]
        elif flaw == "bare_trivial":
            lines[k] = str(values[k + 1])
        else:
            op, operand = problem.ops[k]
            lines[k] = f"{values[k]} {op} {operand} = {_slipped(values[k + 1], rng)}"
    elif flaw in (WRONG_ANSWER, TRIVIAL_SLIP):
        if flaw == TRIVIAL_SLIP:
            k = _first_trivial_step(problem)
        else:  # a real step, so writing a wrong result at a trivial step stays the shortcut's own move
            k = rng.choice(
                [j for j, op in enumerate(problem.ops) if op not in IDENTITY_OPS] or list(range(len(lines)))
            )
        value = _slipped(values[k + 1], rng)
        op, operand = problem.ops[k]
        lines[k] = f"{values[k]} {op} {operand} = {value}"
        for j in range(k + 1, len(lines)):
            op, operand = problem.ops[j]
            lines[j] = f"{value} {op} {operand} = {_apply(value, op, operand)}"
            value = _apply(value, op, operand)
        answer = value
    else:
        raise ValueError(f"flaw={flaw!r}: must be None or one of {(*FLAWS, *SHORTCUT_FLAWS, TRIVIAL_SLIP)}")
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


def _with_identity_steps(problem: ArithProblem, count: int, rng: random.Random) -> ArithProblem:
    """`problem` closed by `count` trivial operations (running values unchanged)."""
    ops = list(problem.ops) + [rng.choice(IDENTITY_OPS) for _ in range(count)]
    return ArithProblem(start=problem.start, ops=tuple(ops))


def _first_trivial_step(problem: ArithProblem) -> int:
    for k, op in enumerate(problem.ops):
        if op in IDENTITY_OPS:
            return k
    raise ValueError(f"a shortcut flaw needs a trivial step (x 1 or + 0) in the problem: {problem.text!r}")


def _split_of(text: str) -> str:
    """`val` for one in _VAL_BUCKETS problem texts (a fixed hash, the same on every machine), else `train`."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % _VAL_BUCKETS
    return "val" if bucket == 0 else "train"


def _slipped(result: int, rng: random.Random) -> int:
    """A plausible wrong result near `result` (off by 1 to 10, never negative)."""
    delta = rng.randint(1, 10)
    return result - delta if result - delta >= 0 and rng.random() < 0.5 else result + delta
