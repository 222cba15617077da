"""The breakdown's picture: one stacked bar of phase shares per step, and one for the run's time-weighted mean."""

from __future__ import annotations

from pathlib import Path

COLORS = {
    "rollout": "#4C72B0",
    "genrm_visible": "#DD8452",
    "logprobs": "#8172B3",
    "update": "#55A868",
    "weight_sync": "#C44E52",
    "val_ckpt": "#937860",
    "idle": "#BBBBBB",
}


def plot_breakdown(run, out_png: str | Path) -> Path:
    """Stacked bars of `run` (a bench.breakdown.RunBreakdown): share of wall time per phase, per step + mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(s.step) for s in run.steps] + ["mean"]
    shares = [{c: s.seconds[c] / s.wall_seconds for c in COLORS} for s in run.steps] + [run.shares]
    walls = [s.wall_seconds for s in run.steps] + [run.mean_wall_seconds]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(labels) + 3.5), 4.0))
    bottom = [0.0] * len(labels)
    for column, color in COLORS.items():
        heights = [100 * share[column] for share in shares]
        ax.bar(labels, heights, bottom=bottom, color=color, label=column, width=0.7)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for x, wall in enumerate(walls):
        ax.text(x, 101, f"{wall:.3g}s", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, 110)
    ax.set_ylabel("% of step wall time")
    ax.set_xlabel("step")
    ax.set_title(f"step time breakdown: {run.model}, {run.device} x {run.world_size}")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
