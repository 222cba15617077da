"""Training prompts: the PromptItem record, jsonl loaders, a resumable sampler and the synthetic arithmetic task."""

from fapo_megatron.data.arith import (
    FLAWS,
    FLAWS_WITH_CORRECT_ANSWER,
    SHORTCUT_FLAWS,
    TRIVIAL_SLIP,
    WRONG_ANSWER,
    arith_solution,
    first_wrong_step,
    make_arith_items,
    parse_problem,
)
from fapo_megatron.data.arith_tokenizer import arith_tokenizer
from fapo_megatron.data.items import DataError, PromptItem
from fapo_megatron.data.loaders import FORMATS, load_prompts
from fapo_megatron.data.sampler import PromptSampler

__all__ = [
    "FLAWS",
    "FLAWS_WITH_CORRECT_ANSWER",
    "SHORTCUT_FLAWS",
    "TRIVIAL_SLIP",
    "FORMATS",
    "WRONG_ANSWER",
    "DataError",
    "PromptItem",
    "PromptSampler",
    "arith_solution",
    "arith_tokenizer",
    "first_wrong_step",
    "load_prompts",
    "make_arith_items",
    "parse_problem",
]
