"""The demo's picture: accuracy and flawed-positive share over training steps, one line per run."""

from __future__ import annotations

from pathlib import Path

from fapo_megatron.metrics import read_metrics

PANELS = (
    ("reward/accuracy", "train accuracy (rollouts)"),
    ("reward/flawed_positive_share", "flawed-positive share (train)"),
    ("val/clean_accuracy", "val accuracy, flawless solutions only"),
)


def plot_runs(runs: dict[str, str | Path], out_png: str | Path, smooth: int = 3) -> Path:
    """`runs` maps a label (FAPO, GRPO) to a run's output_dir (holding metrics.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for label, run_dir in runs.items():
        records = read_metrics(Path(run_dir) / "metrics.jsonl")
        for ax, (key, title) in zip(axes, PANELS):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, _moving_average(values, smooth if key.startswith("reward/") else 1), label=label, lw=2)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _moving_average(values, window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out
