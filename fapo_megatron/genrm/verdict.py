"""Read a GenRM answer: the integer in the last `\\boxed{}`, checked against the number of steps.

Model output is untrusted text: it is only searched and matched, never evaluated. Cost is bounded on any input:
one reverse substring search, then at most `MAX_BOX_CHARS` characters of brace matching.
"""

from __future__ import annotations

import re

from fapo_megatron.genrm.types import Verdict, VerdictStatus

BOX_COMMAND = "\\boxed"
MAX_BOX_CHARS = 256
"""A box whose content runs longer than this is not an index (keeps parsing O(1) after the search)."""

_WRAPPERS = re.compile(r"^\\(?:text|textbf|mathrm|mathbf|mbox)\{(.*)\}$", re.DOTALL)
_INTEGER = re.compile(r"[+-]?[0-9]+")


def last_boxed_content(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces matched), or None when the last box is missing or broken.

    The last occurrence of `\\boxed` decides: when that box is unclosed, bare or too long, earlier boxes are not
    consulted (the model's final answer is the broken one). A `\\boxed` inside another box is itself the last.
    """
    start = text.rfind(BOX_COMMAND)
    if start < 0:
        return None
    open_at = start + len(BOX_COMMAND)
    while open_at < len(text) and open_at - start < 16 and text[open_at] in " \t":
        open_at += 1
    if not text.startswith("{", open_at):
        return None
    depth = 0
    for offset, char in enumerate(text[open_at : open_at + MAX_BOX_CHARS + 2]):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : open_at + offset]
    return None


def parse_index(content: str) -> int | None:
    """An integer written plainly, allowing surrounding spaces/`$` and one `\\text{}`-like wrapper; else None."""
    content = content.strip().strip("$").strip()
    wrapped = _WRAPPERS.match(content)
    if wrapped:
        content = wrapped.group(1).strip()
    if not _INTEGER.fullmatch(content):
        return None
    return int(content)


def parse_verdict(text: str, num_steps: int, *, output_tokens: int = 0) -> Verdict:
    """Verdict from a GenRM answer: ok with the index when it is -1 or in 0..num_steps-1, else unparseable."""
    if num_steps < 0:
        raise ValueError(f"num_steps={num_steps} must be >= 0")

    def unparseable(detail: str) -> Verdict:
        return Verdict(
            VerdictStatus.UNPARSEABLE, num_steps=num_steps, raw_text=text, output_tokens=output_tokens, detail=detail
        )

    content = last_boxed_content(text)
    if content is None:
        return unparseable("no complete \\boxed{} at the end of the answer")
    index = parse_index(content)
    if index is None:
        return unparseable(f"boxed content is not an integer: {content[:64]!r}")
    if index != -1 and not 0 <= index < num_steps:
        return unparseable(f"index {index} outside -1..{num_steps - 1}")
    return Verdict(
        VerdictStatus.OK, first_error_step=index, num_steps=num_steps, raw_text=text, output_tokens=output_tokens
    )
