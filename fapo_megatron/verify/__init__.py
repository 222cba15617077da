"""Final-answer checking: extraction of the last box, normalisation, math equivalence, a timed batch checker."""

from fapo_megatron.verify.checker import AnswerChecker
from fapo_megatron.verify.equivalence import answers_match
from fapo_megatron.verify.extract import extract_boxed, gsm8k_gold
from fapo_megatron.verify.normalize import normalize_answer

__all__ = ["AnswerChecker", "answers_match", "extract_boxed", "gsm8k_gold", "normalize_answer"]
