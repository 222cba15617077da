"""A DAPO/Minerva-style string normaliser for final answers.

Two answers that normalise to the same string are equal; this is the fast path in front of math-verify and
its fallback when math-verify cannot parse an answer. It strips presentation (dollars, `\\left`, spacing,
`\\text{}`, units, degrees, percent signs, a trailing period, a `x =` prefix) and writes plain numbers in one
canonical decimal form (`1,000` -> `1000`, `0.50` -> `0.5`, `1e3` -> `1000`).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_UNIT_WORDS = (
    "square units",
    "sq units",
    "units",
    "unit",
    "square",
    "ways",
    "integers",
    "dollars",
    "dollar",
    "cents",
    "mph",
    "inches",
    "inch",
    "feet",
    "foot",
    "ft",
    "hours",
    "hour",
    "minutes",
    "minute",
    "seconds",
    "second",
    "km",
    "cm",
    "mm",
    "meters",
    "meter",
    "gm",
    "kg",
    "pounds",
    "lbs",
    "points",
    "degrees",
    "degree",
    "digits",
    "students",
    "people",
    "days",
    "day",
    "years",
    "year",
    "miles",
    "mile",
    "edges",
    "meals",
    "multiples",
    "sides",
    "times",
    "percent",
)
# One-letter units are removed only inside \text{}: a bare trailing `m` or `g` may be a variable.
_TEXT_ONLY_UNITS = ("m", "g", "s", "h", "l")
_UNIT_ALTERNATION = "|".join(re.escape(word) for word in sorted(_UNIT_WORDS, key=len, reverse=True))
_TEXT_UNIT_ALTERNATION = _UNIT_ALTERNATION + "|" + "|".join(_TEXT_ONLY_UNITS)
_TEXT_UNIT_RE = re.compile(r"\\(?:text|mbox|mathrm)\{\s*(?:" + _TEXT_UNIT_ALTERNATION + r")(?:\^?\{?[23]\}?)?\s*\}")
_TRAILING_UNIT_RE = re.compile(r"(?<=[\d}])\s*(?:" + _UNIT_ALTERNATION + r")(?:\^?\{?[23]\}?)?\s*$")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|boxed|fbox|displaystyle)\s*\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\[,;:!> ]|\\q?quad|~")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\N{DEGREE SIGN}|\\degree")
_FRAC_SHORT_RE = re.compile(r"\\frac\s*(\d)\s*(\d)")
_FRAC_HALF_SHORT_RE = re.compile(r"\\frac\s*(\{[^{}]*\})\s*(\w)")
_SQRT_SHORT_RE = re.compile(r"\\sqrt\s*(\w)")
_VAR_PREFIX_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(?=[^=]+$)")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_NUMBER_RE = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_SCI_TIMES_RE = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))\s*(?:\\times|\\cdot|\*|x)\s*10\^\{?([+-]?\d+)\}?$")


def normalize_answer(answer: str) -> str:
    """Canonical string form of a final answer (empty string for an empty answer)."""
    text = answer.strip()
    text = text.replace("\\$", "").replace("$", "")
    text = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])", "", text)
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = _SPACING_RE.sub(" ", text)
    text = _DEGREE_RE.sub("", text)
    text = text.replace("\\%", "").replace("%", "")
    text = _TEXT_UNIT_RE.sub("", text)
    for _ in range(3):  # unwrap nested \text{\textbf{...}} a few levels deep
        text = _TEXT_WRAPPER_RE.sub(r"\1", text)
    text = _TRAILING_UNIT_RE.sub("", text.strip())
    text = text.strip().rstrip(".").strip()
    text = _VAR_PREFIX_RE.sub("", text)
    text = _FRAC_SHORT_RE.sub(r"\\frac{\1}{\2}", text)
    text = _FRAC_HALF_SHORT_RE.sub(r"\\frac\1{\2}", text)
    text = _SQRT_SHORT_RE.sub(r"\\sqrt{\1}", text)
    text = re.sub(r"\s+", "", text)
    if _THOUSANDS_RE.match(text):
        text = text.replace(",", "")
    return _canonical_number(text) or text


def _canonical_number(text: str) -> str | None:
    """Plain decimal form of a number written as `12`, `-0.50`, `1e3` or `1.5\\times10^{3}`; None otherwise."""
    sci = _SCI_TIMES_RE.match(text)
    if sci:
        text = f"{sci.group(1)}e{sci.group(2)}"
    if not _NUMBER_RE.match(text):
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if abs(value.adjusted()) > 100:  # keep huge exponents symbolic rather than writing out 100+ digits
        return None
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def as_number(normalized: str) -> Decimal | None:
    """The Decimal value of an already normalised plain number, or None when it is not one."""
    if not _NUMBER_RE.match(normalized):
        return None
    try:
        return Decimal(normalized)
    except InvalidOperation:
        return None
