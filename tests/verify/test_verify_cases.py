"""Tricky final-answer cases with hand-decided verdicts, run through the in-process path and the worker pool."""

import time

import pytest

from fapo_megatron.verify import AnswerChecker, answers_match, extract_boxed, gsm8k_gold, normalize_answer

LONG_FILLER = "We keep thinking about the problem. " * 2900  # ~100k characters

# (response, gold, expected verdict)
CASES = [
    # fractions vs decimals
    (r"So the answer is $\boxed{0.5}$.", r"\frac{1}{2}", True),
    (r"$\boxed{\frac{1}{2}}$", "0.5", True),
    (r"$\boxed{\dfrac{3}{4}}$", r"\frac{3}{4}", True),
    (r"$\boxed{\tfrac34}$", "0.75", True),
    (r"$\boxed{\frac12}$", r"\frac{1}{2}", True),
    (r"$\boxed{0.33}$", r"\frac{1}{3}", False),
    (r"$\boxed{\frac{2}{4}}$", r"\frac{1}{2}", True),
    # intervals
    (r"$\boxed{[1, 2)}$", "[1,2)", True),
    (r"$\boxed{(1, 2]}$", "[1,2)", False),
    (r"$\boxed{\left( -\infty, 3 \right)}$", r"(-\infty,3)", True),
    # units and \text{}
    (r"$\boxed{10 \text{ cm}}$", "10", True),
    (r"$\boxed{\$1,000}$", "1000", True),
    (r"$\boxed{12\text{ square units}}$", "12", True),
    (r"$\boxed{90^\circ}$", "90", True),
    (r"$\boxed{90^{\circ}}$", "90", True),
    (r"$\boxed{\text{(B)}}$", "B", True),
    (r"$\boxed{5 \text{ dollars}}$", "6", False),
    # percentages
    (r"$\boxed{50\%}$", "50", True),
    (r"$\boxed{25\%}$", "50", False),
    # several boxes: the last one wins
    (r"First $\boxed{3}$, but wait, it is $\boxed{4}$.", "4", True),
    (r"First $\boxed{4}$, but wait, it is $\boxed{3}$.", "4", False),
    (r"\fbox{7} hmm, finally \boxed{8}", "8", True),
    (r"The answer: \fbox{12}", "12", True),
    # no box / bad box
    ("The answer is 42.", "42", False),
    (r"The answer is \boxed{42", "42", False),
    (r"Earlier \boxed{42} then \boxed{4{2}", "42", False),
    (r"\boxed{}", "0", False),
    # spacing and bare box
    (r"$\boxed {17}$", "17", True),
    (r"so it is \boxed 17 apples", "17", True),
    # nested braces
    (r"$\boxed{\frac{\sqrt{3}}{2}}$", r"\frac{\sqrt{3}}{2}", True),
    (r"$\boxed{2^{2^{2}}}$", "16", True),
    (r"$\boxed{\{1, 2\}}$", r"\{2,1\}", True),
    # negative numbers
    (r"$\boxed{-3}$", "-3", True),
    (r"$\boxed{-3}$", "3", False),
    (r"$\boxed{-0.50}$", r"-\frac{1}{2}", True),
    # sets / tuples
    (r"$\boxed{(1, 2)}$", "(1,2)", True),
    (r"$\boxed{(2, 1)}$", "(1,2)", False),
    (r"$\boxed{3, 4}$", r"\{3,4\}", True),
    # sqrt and pi
    (r"$\boxed{2\sqrt{2}}$", r"\sqrt{8}", True),
    (r"$\boxed{\sqrt2}$", r"\sqrt{2}", True),
    (r"$\boxed{\sqrt{3}}$", r"\sqrt{2}", False),
    (r"$\boxed{\pi/2}$", r"\frac{\pi}{2}", True),
    (r"$\boxed{3.14}$", r"\pi", False),
    # scientific notation
    (r"$\boxed{1.5 \times 10^{3}}$", "1500", True),
    (r"$\boxed{1e3}$", "1000", True),
    (r"$\boxed{2 \times 10^{-2}}$", "0.02", True),
    # equations, prefixes, trailing period
    (r"$\boxed{x = 3}$", "3", True),
    (r"$\boxed{3.}$", "3", True),
    (r"$\boxed{x^2+2x+1}$", "(x+1)^2", True),
    # GSM8K-style numbers
    (r"$\boxed{72}$", gsm8k_gold("48+24 = 72\n#### 72"), True),
    (r"$\boxed{1,234}$", gsm8k_gold("#### 1,234"), True),
    # very long outputs
    (LONG_FILLER + r" so $\boxed{9}$.", "9", True),
    (LONG_FILLER + " no final answer", "9", False),
    (r"\boxed{" + "{" * 20000 + "1", "1", False),
]


def test_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("response,gold,expected", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_answers_match_case(response, gold, expected):
    assert answers_match(extract_boxed(response), gold) is expected


def test_checker_agrees_with_in_process_verdicts():
    responses = [case[0] for case in CASES]
    golds = [case[1] for case in CASES]
    with AnswerChecker(num_workers=2, timeout_s=10.0) as checker:
        assert checker.check(responses, golds) == [case[2] for case in CASES]
        assert checker.num_timeouts == 0
        assert checker.num_crashes == 0


def test_long_output_is_fast():
    response = LONG_FILLER + "\\boxed{\\frac{1}{2}}" + " trailing words" * 100
    extract_boxed(response)  # first call compiles nothing but keeps the timing honest
    start = time.perf_counter()
    for _ in range(20):
        assert extract_boxed(response) == r"\frac{1}{2}"
    assert (time.perf_counter() - start) / 20 < 0.05


def test_extract_boxed_details():
    assert extract_boxed(r"\boxed{a{b}c}") == "a{b}c"
    assert extract_boxed(r"\boxed{\{1\}}") == r"\{1\}"
    assert extract_boxed(r"\boxedfoo{3}") is None
    assert extract_boxed("") is None
    assert extract_boxed(r"\boxed{1} " + "x" * 400, tail_chars=300) is None
    assert extract_boxed("x" * 400 + r" \boxed{1}", tail_chars=300) == "1"


def test_normalize_answer_examples():
    assert normalize_answer(r"\$1,000.00") == "1000"
    assert normalize_answer(r"\left( 1, 2 \right]") == "(1,2]"
    assert normalize_answer(r"\dfrac12") == r"\frac{1}{2}"
    assert normalize_answer(r"y = \textbf{Yes}.") == "Yes"
    assert normalize_answer("3m") == "3m"
    assert normalize_answer("") == ""


def test_gsm8k_gold():
    assert gsm8k_gold("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert gsm8k_gold("#### 1,000") == "1000"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no marker")
