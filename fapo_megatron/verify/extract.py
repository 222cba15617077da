"""Final-answer extraction: the content of the last box in a response, and the GSM8K gold answer."""

from __future__ import annotations

import re

# A box command not followed by a letter (so `\boxedfoo` is not a box).
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BARE_STOP = re.compile(r"[\s$]")


def extract_boxed(text: str, tail_chars: int | None = None) -> str | None:
    """Content of the LAST `\\boxed{...}` / `\\boxed x` / `\\fbox{...}` in `text`, or None.

    Nested braces are matched (escaped `\\{` `\\}` do not count). A last box whose braces never close gives
    None rather than an earlier box: the answer the model ended on is the one graded. `tail_chars` restricts
    the search to the end of the text, as the reference implementation does with 300 characters.
    """
    if not text:
        return None
    if tail_chars is not None:
        text = text[-tail_chars:]
    last = None
    for last in _BOX_RE.finditer(text):  # noqa: B007 - keeps the last match without a list of all of them
        pass
    if last is None:
        return None
    pos = last.end()
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    if pos >= len(text):
        return None
    if text[pos] == "{":
        return _braced_content(text, pos)
    stop = _BARE_STOP.search(text, pos)
    content = text[pos : stop.start() if stop else len(text)]
    return content or None


def _braced_content(text: str, open_pos: int) -> str | None:
    """Text between the brace at `open_pos` and its matching close brace; None if it never closes."""
    depth = 0
    pos = open_pos
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            pos += 2  # an escaped character, `\{` or `\}` included, never changes the depth
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : pos]
        pos += 1
    return None


def gsm8k_gold(answer_text: str) -> str:
    """The GSM8K reference answer: the text after the last '####', thousands commas removed."""
    if "####" not in answer_text:
        raise ValueError(f"GSM8K answer has no '####' marker: {answer_text[-80:]!r}")
    return answer_text.rsplit("####", 1)[1].strip().replace(",", "")
