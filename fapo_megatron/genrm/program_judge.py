"""A program flaw detector for the synthetic arithmetic-chain task: exact verdicts, same interface as the GenRM.

On CPU runs there is no trained GenRM; for arithmetic chains every step can be checked by a program
(`data.arith.first_wrong_step`), so FAPO's flaw penalty still has exact labels. Indices refer to the steps of
`genrm.prompt.split_steps(solution, max_steps)`, exactly as a GenRM would see them: the checker runs on the
unmerged paragraphs and a wrong paragraph is reported as the merged step that holds it.
"""

from __future__ import annotations

from collections.abc import Sequence

from fapo_megatron.data.arith import first_wrong_step
from fapo_megatron.genrm.prompt import split_paragraphs, split_steps, step_of_paragraph
from fapo_megatron.genrm.types import JudgeCounts, JudgeRequest, Verdict, VerdictStatus


class ProgramJudge:
    """Judge arithmetic-chain solutions by recomputing each step."""

    def __init__(self, max_steps: int = 32):
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps} must be >= 1")
        self.max_steps = max_steps
        self.total_counts = JudgeCounts()
        """Counts over every `judge` call."""
        self.last_counts = JudgeCounts()
        """Counts of the latest `judge` call."""

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        """One verdict per request, in order; a problem that is not an arithmetic chain is an error verdict."""
        verdicts = [self._judge_one(request) for request in requests]
        self.last_counts = JudgeCounts.from_verdicts(verdicts)
        self.total_counts.merge(self.last_counts)
        return verdicts

    def _judge_one(self, request: JudgeRequest) -> Verdict:
        paragraphs = split_paragraphs(request.solution)
        num_steps = len(split_steps(request.solution, self.max_steps))
        if not paragraphs:
            return Verdict(VerdictStatus.ERROR, detail="empty solution: no steps to judge")
        try:
            wrong = first_wrong_step(request.problem, paragraphs)
        except ValueError as err:
            return Verdict(VerdictStatus.ERROR, num_steps=num_steps, detail=str(err))
        if wrong == -1:
            return Verdict(VerdictStatus.OK, first_error_step=-1, num_steps=num_steps, raw_text="all steps right")
        # A missing step after the last paragraph (no answer paragraph follows) is charged to the last paragraph.
        paragraph = min(wrong, len(paragraphs) - 1)
        step = step_of_paragraph(paragraph, len(paragraphs), self.max_steps)
        note = f"paragraph {wrong} of {len(paragraphs)} wrong or missing"
        return Verdict(VerdictStatus.OK, first_error_step=step, num_steps=num_steps, raw_text=note)
