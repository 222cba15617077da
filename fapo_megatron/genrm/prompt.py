"""The GenRM prompt: a solution split into paragraphs, tagged ProcessBench-style, with the problem and its answer.

`split_steps` is the one step split used both when the GenRM is trained (FAPO-Critic / ProcessBench-format
items) and when it is queried about rollouts, so an index means the same step in both places.
The prompt text follows the FAPO authors' ProcessBench-with-ground-truth critique prompt (FAPO / verl
FAPO recipe, Apache-2.0), which FAPO-GenRM-4B was trained and evaluated with: paragraphs are tagged
`<paragraph_i>` from 0 and the model answers in `\\boxed{}` with the earliest wrong index or -1.

The solution is the policy's text, and RL finds any way to steer its judge: before it enters the prompt it is
neutralised (`neutralise`), so it can neither forge the step structure (`</paragraph_1>`) nor a chat turn
(`<|im_end|><|im_start|>assistant`, or any special token of the judge's tokenizer, escaped again at rendering).
Where the judge's tokenizer is at hand the prompt goes out as token ids (`encode_chat`): the layout is tokenised
with its special tokens, the messages' text with `split_special_tokens`, so no text of theirs becomes one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

GENRM_TEMPLATE = (
    "The following is a math problem with its ground truth answer, along with an AI solution "
    "(split into paragraphs, enclosed with tags and indexed from 0):\n\n"
    "[Math Problem]\n\n"
    "{problem}\n\n"
    "[Ground Truth]\n\n"
    "{ground_truth}\n\n"
    "[AI Solution]\n\n"
    "{tagged_response}\n\n"
    "Your task is to review and critique the solution paragraph by paragraph. Once you identify an error in a "
    "paragraph, return the index of the paragraph where the earliest error occurs. Otherwise, return the index "
    "of -1 (which typically denotes 'not found').\n\n"
    "Please reason step by step, put your final answer (i.e., the index) in \\boxed{{}}."
)

_STEP_TAG = re.compile(r"<\s*/?\s*paragraph_\s*\d+\s*>", re.IGNORECASE)
_CONTROL_TOKEN = re.compile(r"<\|[^<>|\n]{0,64}\|>|<\uff5c[^<>\uff5c\n]{0,64}\uff5c>")
"""ChatML / Llama-3 `<|...|>` and DeepSeek `<｜...｜>` control strings."""
CHAT_CONTROL_STRINGS = ("<think>", "</think>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
"""Other strings chat templates of common judge models give a meaning (the tokenizer's own are added at render)."""


def _escape_angles(match: re.Match) -> str:
    return match.group(0).replace("<", "&lt;").replace(">", "&gt;")


def _defuse(token: str) -> str:
    """`token` as text no tokenizer reads as the token: `<` as `&lt;`, else a zero-width space after the first
    character."""
    return "&lt;" + token[1:] if token.startswith("<") else token[0] + "\u200b" + token[1:]


def neutralise(text: str) -> str:
    """Untrusted text (a policy's solution) made inert inside a judge prompt: step tags and chat control strings
    escaped, everything else unchanged."""
    return escape_control_strings(_STEP_TAG.sub(_escape_angles, text))


def escape_control_strings(text: str, reserved: Sequence[str] = ()) -> str:
    """Chat control strings, and `reserved` (a tokenizer's special tokens), escaped in a message's text."""
    text = _CONTROL_TOKEN.sub(_escape_angles, text)
    for token in sorted({*CHAT_CONTROL_STRINGS, *reserved}, key=len, reverse=True):
        if token and token in text:
            text = text.replace(token, _defuse(token))
    return text


_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
STEP_JOINER = "\n\n"
"""Paragraphs merged into one step are joined by a blank line, so re-splitting a step gives them back."""


def split_steps(solution: str, max_steps: int = 32) -> list[str]:
    """Split a solution into steps: paragraphs separated by blank lines, stripped, empty ones dropped.

    With more than `max_steps` paragraphs, adjacent paragraphs are merged into exactly `max_steps` steps whose
    sizes (in paragraphs) differ by at most one, earlier steps taking the extra ones; nothing is lost.
    A long paragraph without blank lines stays one step.
    """
    paragraphs = split_paragraphs(solution)
    if max_steps < 1:
        raise ValueError(f"max_steps={max_steps} must be >= 1")
    if len(paragraphs) <= max_steps:
        return paragraphs
    steps, start = [], 0
    for size in _merge_sizes(len(paragraphs), max_steps):
        steps.append(STEP_JOINER.join(paragraphs[start : start + size]))
        start += size
    return steps


def split_paragraphs(solution: str) -> list[str]:
    """The paragraphs of `solution` before any merging: cut at blank lines, stripped, empty ones dropped."""
    paragraphs = [p.strip() for p in _BLANK_LINE.split(solution.replace("\r\n", "\n"))]
    return [p for p in paragraphs if p]


def step_of_paragraph(paragraph_index: int, num_paragraphs: int, max_steps: int) -> int:
    """Index of the step of `split_steps(..., max_steps)` that holds paragraph `paragraph_index`."""
    if not 0 <= paragraph_index < num_paragraphs:
        raise ValueError(f"paragraph_index={paragraph_index} outside 0..{num_paragraphs - 1}")
    if num_paragraphs <= max_steps:
        return paragraph_index
    end = 0
    for step, size in enumerate(_merge_sizes(num_paragraphs, max_steps)):
        end += size
        if paragraph_index < end:
            return step
    raise AssertionError("unreachable: merge sizes add up to num_paragraphs")


def _merge_sizes(num_paragraphs: int, max_steps: int) -> list[int]:
    """Paragraphs per merged step: sizes differ by at most one, earlier steps take the extra ones."""
    base, extra = divmod(num_paragraphs, max_steps)
    return [base + (1 if index < extra else 0) for index in range(max_steps)]


def tag_steps(steps: Sequence[str]) -> str:
    """`<paragraph_0>\\n...\\n</paragraph_0>` blocks separated by blank lines (ProcessBench's layout)."""
    return "\n\n".join(f"<paragraph_{index}>\n{step}\n</paragraph_{index}>" for index, step in enumerate(steps))


def build_genrm_prompt(problem: str, steps: Sequence[str], ground_truth: str) -> str:
    """The user message asking for the earliest wrong paragraph of `steps` (or -1); the steps are neutralised."""
    if not steps:
        raise ValueError("build_genrm_prompt: the solution has no steps (empty or blank text)")
    return GENRM_TEMPLATE.format(
        problem=problem.strip(),
        ground_truth=str(ground_truth).strip(),
        tagged_response=tag_steps([neutralise(step) for step in steps]),
    )


def build_genrm_messages(problem: str, steps: Sequence[str], ground_truth: str) -> list[dict[str, str]]:
    """The same prompt as a one-turn chat (the FAPO GenRM has no system prompt)."""
    return [{"role": "user", "content": build_genrm_prompt(problem, steps, ground_truth)}]


def render_chatml(messages: Sequence[dict[str, str]]) -> str:
    """Qwen's ChatML layout with the assistant turn opened, for engines fed raw text without a tokenizer template.

    FAPO-GenRM-4B is a Qwen3 model; prefer the tokenizer's own `apply_chat_template` when it is at hand.
    Control strings inside a message are escaped: only the layout's own delimit turns.
    """
    turns = "".join(f"<|im_start|>{m['role']}\n{escape_control_strings(m['content'])}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def render_with_tokenizer(tokenizer, messages: Sequence[dict[str, str]]) -> str:
    """The tokenizer's chat template with the assistant turn opened; the tokenizer's special and added tokens are
    escaped inside the messages first, so only the template's own become special tokens."""
    safe = [{**m, "content": escape_control_strings(m["content"], _reserved(tokenizer))} for m in messages]
    return tokenizer.apply_chat_template(safe, tokenize=False, add_generation_prompt=True)


def _reserved(tokenizer) -> list[str]:
    return [*tokenizer.all_special_tokens, *(t.content for t in tokenizer.added_tokens_decoder.values())]


def encode_chat(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template (Qwen ChatML when it has none), assistant turn
    opened: the layout's text is tokenised with its special tokens, each message's text (escaped as when rendered)
    with `split_special_tokens=True`, so a control string in it stays plain text whatever the escaping missed.

    The layout is found by rendering placeholders in place of the contents; a template that does not embed a
    message's content as given is refused.
    """
    placeholders = [f"\ue000{index}\ue001" for index in range(len(messages))]
    stand_ins = [{**m, "content": placeholder} for m, placeholder in zip(messages, placeholders)]
    has_template = getattr(tokenizer, "chat_template", None)
    layout = render_with_tokenizer(tokenizer, stand_ins) if has_template else render_chatml(stand_ins)
    reserved = _reserved(tokenizer)
    ids: list[int] = []
    for index, (message, placeholder) in enumerate(zip(messages, placeholders)):
        if layout.count(placeholder) != 1:
            raise ValueError(f"the chat template does not embed message {index}'s content once, as given")
        head, _, layout = layout.partition(placeholder)
        ids += tokenizer(head, add_special_tokens=False)["input_ids"]
        text = escape_control_strings(message["content"], reserved)
        ids += tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids + tokenizer(layout, add_special_tokens=False)["input_ids"]
