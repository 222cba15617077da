"""The unit of training data: one prompt with its gold answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class DataError(ValueError):
    """A malformed data file or row; the message names the file and line."""


@dataclass(kw_only=True)
class PromptItem:
    """One question for the policy, with what is needed to grade its answers."""

    prompt: str
    """The question as plain text (for a chat dataset: the content of the last user message)."""
    messages: list[dict[str, str]] | None = None
    """The chat messages to render with the tokenizer's template; None: use `prompt` as raw text."""
    ground_truth: str
    """The gold final answer, compared with the response's last boxed answer."""
    source: str
    """Where it came from: `arith`, `gsm8k`, `math`, or a DAPO row's `data_source`."""
    index: int
    """Position in its file or generated list (0-based); stable across runs."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything else a row carries (reference solution, level, the arithmetic chain, ...)."""
