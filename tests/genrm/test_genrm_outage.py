"""A GenRM that is down stops the step (genrm.max_unavailable_fraction) instead of training on what is left; a share
with nothing to divide by stays NaN (logged as null, printed "n/a"), never 0."""

import math

import pytest
import torch

from fapo_megatron.algo.rewards import VerdictUnavailableError
from fapo_megatron.config import load_config
from fapo_megatron.data.items import PromptItem
from fapo_megatron.engine_protocol import Generation
from fapo_megatron.experience import grade_rollouts
from fapo_megatron.genrm.build import build_judge
from fapo_megatron.metrics import MetricsLogger, read_metrics
from fapo_megatron.trainer import format_share, print_summary

ITEMS = [PromptItem(prompt="1+1?", ground_truth="2", source="math", index=0)]
GENERATIONS = [
    Generation(prompt_index=0, token_ids=[5, 6], text=f"\\boxed{{{a}}}", logprobs=[-0.1, -0.2], finish_reason="stop")
    for a in (2, 2, 3, 3)
]


def _grade(correct, *overrides):
    cfg = load_config(None, ["genrm.backend=external", "genrm.url=http://127.0.0.1:9", "genrm.retries=0", *overrides])
    judge = build_judge(cfg.genrm)  # the real HTTP client, against a port nothing listens on
    return grade_rollouts(
        ITEMS,
        GENERATIONS,
        torch.tensor(correct),
        judge,
        algorithm=cfg.algorithm,
        rollout=cfg.rollout,
        genrm=cfg.genrm,
    )


def test_genrm_down_fails_the_step_naming_the_limit():
    with pytest.raises(
        VerdictUnavailableError,
        match=r"2 of 2 verdicts missing \(.*2 unavailable\), above genrm.max_unavailable_fraction=0.5",
    ):
        _grade([True, True, False, False])


def test_outage_under_the_limit_is_counted_and_undefined_share_is_nan(tmp_path):
    graded = _grade([True, True, False, False], "genrm.max_unavailable_fraction=1.0")
    assert graded.metrics["genrm/unavailable"] == 2
    share = graded.metrics["reward/flawed_positive_share"]
    assert math.isnan(share) and format_share(share) == "n/a"
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"reward/flawed_positive_share": share})
    logger.close()
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["reward/flawed_positive_share"] is None
    assert format_share(0.0) == "0.000"


def test_genrm_flawed_share_of_nothing_judged_is_nan_and_printed_na(tmp_path, capsys):
    graded = _grade([True, True, False, False], "genrm.max_unavailable_fraction=1.0")
    assert graded.metrics["genrm/asked"] == 2 and graded.metrics["genrm/flawed"] == 0
    assert math.isnan(graded.metrics["genrm/flawed_share"])  # 0 of 0 judged, not a clean 0.0
    print_summary([graded.metrics, {**graded.metrics, "genrm/flawed_share": 0.25}], tmp_path)
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("GenRM flawed share")]
    assert row.split()[-2:] == ["n/a", "0.250"]
