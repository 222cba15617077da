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
LINE_STYLES = ("-", "--", ":", "-.")


def plot_runs(seeds: list[dict[str, str | Path]], out_png: str | Path, smooth: int = 3) -> Path:
    """`seeds` holds per seed a map of label (FAPO, GRPO) to a run's output_dir (holding metrics.jsonl)."""
    import matplotlib.pyplot as plt

    fig = draw_runs(seeds, smooth)
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def draw_runs(seeds: list[dict[str, str | Path]], smooth: int = 3):
    """The figure: one panel per PANELS entry, one colour per label, one line style per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.2))
    axes = axes.ravel()
    colours = {}
    for offset, runs in enumerate(seeds):
        for label, run_dir in runs.items():
            colour = colours.setdefault(label, f"C{len(colours)}")
            name = label if len(seeds) == 1 else f"{label} seed {offset}"
            records = run_records(run_dir)
            for ax, (key, _, _) in zip(axes, PANELS):
                points = series(records, key)
                if points:
                    steps, values = zip(*points)
                    window = 1 if key.startswith("val/") else smooth
                    style = LINE_STYLES[offset % len(LINE_STYLES)]
                    ax.plot(steps, moving_average(values, window), label=name, color=colour, ls=style, lw=2)
    for ax, (_, title, reference) in zip(axes, PANELS):
        if reference is not None:
            ax.axhline(reference, color="grey", ls="--", lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"train curves: moving average over {smooth} steps")
    fig.tight_layout()
    return fig
