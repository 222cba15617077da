"""Is a predicted final answer equal to the gold one? A normaliser fast path, then math-verify.

math-verify's own timeouts use SIGALRM, which only works in a process's main thread, so every call here
passes `timeout_seconds=None` / `parsing_timeout=None`; bounding the time is the caller's job
(`AnswerChecker` runs these calls in worker processes it can kill).
"""

from __future__ import annotations

import logging

from fapo_megatron.verify.normalize import as_number, normalize_answer


def answers_match(pred: str | None, gold: str) -> bool:
    """True when `pred` (an extracted final answer) equals `gold`, symbolically or after normalisation."""
    verdict = quick_verdict(pred, gold)
    if verdict is not None:
        return verdict
    return _math_verify_match(pred, gold)


def quick_verdict(pred: str | None, gold: str) -> bool | None:
    """The verdict when the normaliser alone settles it (cheap, no sympy); None when math-verify is needed."""
    if pred is None:
        return False
    norm_pred, norm_gold = normalize_answer(pred), normalize_answer(gold)
    if not norm_pred or not norm_gold:
        return False
    if norm_pred == norm_gold:
        return True
    pred_number, gold_number = as_number(norm_pred), as_number(norm_gold)
    if pred_number is not None and gold_number is not None:
        return pred_number == gold_number
    return None


def _math_verify_match(pred: str, gold: str) -> bool:
    """math-verify equivalence with the gold parsed first; any parser or sympy failure counts as no match."""
    from math_verify import parse, verify

    _quiet_math_verify()
    try:
        gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None)
        if not gold_parsed:
            return False
        pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=None)
        if not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - sympy raises anything on odd input; a crash is "not equal"
        return False


def _quiet_math_verify() -> None:
    """math-verify warns on every call that its own timeout is off; that is deliberate here."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
