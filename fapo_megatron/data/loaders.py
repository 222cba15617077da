"""Prompt files to PromptItems: DAPO-Math-17K, GSM8K and MATH jsonl layouts.

Layouts (one JSON object per line; blank lines are skipped):
  dapo   {"data_source": ..., "prompt": [{"role": "user", "content": ...}, ...],
          "reward_model": {"ground_truth": ..., "style": ...}, "extra_info": {...}}   (verl's DAPO-Math-17K)
  gsm8k  {"question": ..., "answer": "... #### 72"}
  math   {"problem": ..., "solution": "... \\boxed{...} ..."}  or with an "answer" field, which wins
Any malformed row (bad JSON, a missing key, a wrong type, a MATH solution without a box) raises DataError naming
the file and line, so a bad file fails before training starts. A well-formed row whose gold answer is empty
(MATH train has two `\\boxed{}` solutions) cannot be graded: it is skipped with a warning naming its lines.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fapo_megatron.data.items import DataError, PromptItem
from fapo_megatron.verify.extract import extract_boxed, gsm8k_gold

FORMATS = ("dapo", "gsm8k", "math")
logger = logging.getLogger(__name__)


def load_prompts(path: str | Path, format: str) -> list[PromptItem]:  # noqa: A002 - matches data.format
    """The rows of the jsonl file at `path`, read with the layout `format` (one of FORMATS).

    `PromptItem.index` is the row's 0-based position among the file's non-blank lines, skipped rows included.
    """
    if format not in FORMATS:
        raise DataError(f"unknown data format {format!r} for {path}; expected one of {FORMATS}")
    row_parser = {"dapo": _dapo_item, "gsm8k": _gsm8k_item, "math": _math_item}[format]
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    items, skipped_lines, row_index = [], [], 0
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                byte = raw[error.start]
                raise DataError(f"{where}: not UTF-8 (byte 0x{byte:02x} at column {error.start + 1})") from None
            if not line.strip():
                continue
            row_index += 1
            try:
                row = json.loads(line, parse_constant=_reject_constant, parse_float=_finite_float)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            except ValueError as error:
                raise DataError(f"{where}: not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            item = row_parser(row, where, row_index - 1)
            if item.ground_truth.strip():
                items.append(item)
            else:
                skipped_lines.append(line_number)
    if skipped_lines:
        message = "%s: skipped %d rows with an empty gold answer, lines %s"
        logger.warning(message, path, len(skipped_lines), skipped_lines)
    if not items:
        raise DataError(f"{path}: no usable rows")
    return items


def _dapo_item(row: dict[str, Any], where: str, index: int) -> PromptItem:
    messages = _field(row, "prompt", list, where)
    for position, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)):
            raise DataError(f"{where}: prompt[{position}] must be an object with a string 'role'")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: prompt[{position}] must have a string 'content'")
    user_turns = [message["content"] for message in messages if message["role"] == "user"]
    if not user_turns:
        raise DataError(f"{where}: prompt has no user message")
    reward_model = _field(row, "reward_model", dict, where)
    ground_truth = _field(reward_model, "ground_truth", (str, int, float), where, "reward_model.ground_truth")
    source = row.get("data_source", "dapo")
    extra = {key: value for key, value in row.items() if key not in ("prompt", "reward_model", "data_source")}
    return PromptItem(
        prompt=user_turns[-1],
        messages=[{"role": m["role"], "content": m["content"]} for m in messages],
        ground_truth=str(ground_truth),
        source=str(source),
        index=index,
        meta=extra,
    )


def _gsm8k_item(row: dict[str, Any], where: str, index: int) -> PromptItem:
    question = _field(row, "question", str, where)
    answer = _field(row, "answer", str, where)
    if "####" not in answer:
        raise DataError(f"{where}: 'answer' has no '#### <final answer>' line")
    return PromptItem(
        prompt=question, ground_truth=gsm8k_gold(answer), source="gsm8k", index=index, meta={"solution": answer}
    )


def _math_item(row: dict[str, Any], where: str, index: int) -> PromptItem:
    problem = _field(row, "problem", str, where)
    meta = {key: row[key] for key in ("solution", "level", "type", "subject", "unique_id") if key in row}
    if "answer" in row:
        ground_truth = str(_field(row, "answer", (str, int, float), where))
    else:
        solution = _field(row, "solution", str, where, "solution (or answer)")
        ground_truth = extract_boxed(solution)
        if ground_truth is None:
            raise DataError(f"{where}: 'solution' has no complete \\boxed{{...}} answer and there is no 'answer'")
    return PromptItem(prompt=problem, ground_truth=ground_truth, source="math", index=index, meta=meta)


def _reject_constant(name: str):
    """JSON's non-standard NaN / Infinity (Python's json reads them as floats): never a gold answer or a value."""
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows to {value}")
    return value


def _field(row: dict[str, Any], key: str, kind, where: str, name: str | None = None):
    """row[key], checked to be of type `kind`; DataError naming the file:line and the key otherwise."""
    name = name or key
    if key not in row:
        raise DataError(f"{where}: missing key '{name}'")
    value = row[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: '{name}' must be {expected}, got {type(value).__name__}")
    return value
