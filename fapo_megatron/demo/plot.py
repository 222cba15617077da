"""The demo's picture: the FAPO-vs-GRPO story per training step, one line per run."""

from __future__ import annotations

from pathlib import Path

from fapo_megatron.demo.report import moving_average, run_records, series

PANELS = (
    ("reward/accuracy", "train accuracy (rollouts)", None),
    ("reward/flawed_positive_share", "flawed-positive share (train)", None),
    ("val/clean_accuracy", "val accuracy, flawless solutions only", None),
    ("progress/mean_rho", "mean rho = clean / wrong (per group)", 1.0),
    ("progress/flawed_positive_advantage_share", "flawed positives with advantage > 0", 0.5),
    ("response/length_mean", "response length (tokens)", None),
)
"""(metric, title, reference line): rho's turn at 1, the advantage sign's at one half."""


def plot_runs(runs: dict[str, str | Path], out_png: str | Path, smooth: int = 3) -> Path:
    """`runs` maps a label (FAPO, GRPO) to a run's output_dir (holding metrics.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.2))
    axes = axes.ravel()
    for label, run_dir in runs.items():
        records = run_records(run_dir)
        for ax, (key, _, _) in zip(axes, PANELS):
            points = series(records, key)
            if points:
                steps, values = zip(*points)
                window = 1 if key.startswith("val/") else smooth
                ax.plot(steps, moving_average(values, window), label=label, lw=2)
    for ax, (_, title, reference) in zip(axes, PANELS):
        if reference is not None:
            ax.axhline(reference, color="grey", ls="--", lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"train curves: moving average over {smooth} steps")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
