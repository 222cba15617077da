"""What `fapo-megatron bench predict` prints: predictions next to the paper's splits, and the GenRM frontier.

The frontier answers "under which GenRM setting is colocated GenRM at most `target` of step time?". The GenRM
phase is g = c + K / r (c: wake/sleep, prefill and the longest verdict's tail; K / r: the bulk, K = verdicts x
mean output tokens / GPUs, r = bulk decode tokens/s per GPU), the rest of the step is o, so
g / (o + g) <= t  <=>  r >= K / (t / (1 - t) x o - c), reachable only when t / (1 - t) x o > c.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fapo_megatron.bench.cost_model import (
    PAPER_SPLITS,
    PHASES,
    CostAssumptions,
    Prediction,
    decode_rate,
    predict,
)
from fapo_megatron.config import Config
from fapo_megatron.models.spec import ModelSpec


def format_prediction(pred: Prediction) -> str:
    """Seconds and share per phase, next to the paper's reported share for that model (FAPO.md)."""
    paper = PAPER_SPLITS.get(pred.name)
    note = f" (paper: {paper['nodes']} nodes)" if paper else ""
    rows = [
        f"{pred.name} on {pred.gpus} GPUs: step {pred.step_seconds:.1f} s, {pred.steps} steps = "
        f"{pred.run_hours:.1f} h",
        f"  {'phase':<12}{'seconds':>10}{'predicted':>11}   paper{note}",
    ]
    shares = pred.shares
    for phase in PHASES:
        reported = f"{100 * paper[phase]:.0f} %" if paper and phase in paper else "-"
        rows.append(f"  {phase:<12}{pred.seconds[phase]:>10.1f}{100 * shares[phase]:>9.1f} %   {reported:>4}")
    if paper:
        other = 1.0 - sum(paper[p] for p in PHASES if p in paper)
        mine = shares["logprobs"] + shares["weight_sync"]
        rows.append(f"  {'other':<12}{'':>10}{100 * mine:>9.1f} %   {100 * other:>2.0f} %   (log-probs + weight sync)")
    return "\n".join(rows)


@dataclass
class FrontierRow:
    max_new_tokens: int
    """genrm.max_new_tokens; the longest verdict is taken to run to it."""
    genrm_share: float
    """GenRM share of the step at the assumed GenRM decode rate."""
    fixed_seconds: float
    """Wake/sleep + prefill + the longest verdict's tail: GenRM time no bulk rate removes."""
    min_rate: float | None
    """Bulk GenRM decode tokens/s per GPU needed for share <= target; None: unreachable (fixed part too big)."""


def genrm_frontier(cfg: Config, a: CostAssumptions, policy: ModelSpec, genrm: ModelSpec, budgets, target: float):
    """One FrontierRow per genrm.max_new_tokens in `budgets`, the longest verdict running to the budget."""
    rows = []
    for budget in budgets:
        cfg_b = dataclasses.replace(cfg, genrm=dataclasses.replace(cfg.genrm, max_new_tokens=int(budget)))
        a_b = dataclasses.replace(a, genrm_longest_tokens=float(budget))
        pred = predict(cfg_b, a_b, policy, genrm)
        rate = decode_rate(a_b, genrm, a_b.genrm_tokens_per_s_per_gpu)
        genrm_gpus = cfg.cluster.genrm_devices if cfg.genrm.placement == "separate" else cfg.cluster.world_size
        bulk_work = pred.detail["judged"] * pred.detail["genrm_output_tokens_mean"] / genrm_gpus
        fixed = pred.seconds["genrm"] - bulk_work / rate
        other = pred.step_seconds - pred.seconds["genrm"]
        room = target / (1.0 - target) * other - fixed
        rows.append(
            FrontierRow(
                max_new_tokens=int(budget),
                genrm_share=pred.shares["genrm"],
                fixed_seconds=fixed,
                min_rate=bulk_work / room if room > 0 else None,
            )
        )
    return rows


def format_frontier(name: str, rows: list[FrontierRow], a: CostAssumptions, genrm: ModelSpec, target: float) -> str:
    rate = decode_rate(a, genrm, a.genrm_tokens_per_s_per_gpu)
    lines = [
        f"colocated GenRM ({genrm.name}) share of the {name} step vs its output budget (longest verdict = the "
        f"budget, mean {a.genrm_output_tokens_mean:g} tokens); assumed bulk rate {rate:.0f} tokens/s/GPU:",
        f"  {'max_new_tokens':>14}{'GenRM share':>13}{'fixed s':>9}  bulk tokens/s/GPU needed for <= "
        f"{100 * target:.0f} %",
    ]
    for row in rows:
        need = f"{row.min_rate:.0f}" if row.min_rate is not None else "unreachable (fixed part alone is over)"
        ok = "yes" if row.genrm_share <= target else "no"
        lines.append(
            f"  {row.max_new_tokens:>14}{100 * row.genrm_share:>11.1f} %{row.fixed_seconds:>9.1f}  {need}"
            f"   (at the assumed rate: {ok})"
        )
    return "\n".join(lines)
