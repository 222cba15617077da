"""The demo's verdict on hand-written runs: the goals' numbers are the closed-form means of the rows given."""

import json
from pathlib import Path

import pytest

from fapo_megatron.demo.plot import PANELS, draw_runs, plot_runs
from fapo_megatron.demo.report import goals, pooled_advantage_share, print_report, rho_crossing


def _write_run(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s + 1, **row}) + "\n" for s, row in enumerate(rows))
    )
    return path


def _fapo_rows() -> list[dict]:
    """20 steps: flawed share 0.4 then 0.1; rho 0.5 for 8 steps then 2.0; flawed positives with advantage > 0: 3 of 4
    before the crossing, 1 of 4 after."""
    rows = []
    for step in range(20):
        before = step < 8
        rows.append(
            {
                "reward/flawed_positive_share": 0.4 if step < 10 else 0.1,
                "progress/mean_rho": 0.5 if before else 2.0,
                "progress/flawed_positive_advantage_share": 0.75 if before else 0.25,
                "genrm/flawed": 4.0,
                "val/clean_accuracy": 0.3 + 0.02 * step,
                "reward/accuracy": 0.4 + 0.01 * step,
                "response/length_mean": 40.0,
            }
        )
    return rows


def _grpo_rows(last_share: float) -> list[dict]:
    return [
        {
            "reward/flawed_positive_share": 0.3 if step < 10 else last_share,
            "progress/mean_rho": 1.5,
            "progress/flawed_positive_advantage_share": 1.0,
            "genrm/flawed": 4.0,
            "val/clean_accuracy": 0.3 + 0.01 * step,
            "reward/accuracy": 0.4,
            "response/length_mean": 41.0,
        }
        for step in range(20)
    ]


def test_goals_are_the_window_means_and_the_pooled_turn(tmp_path):
    fapo = _write_run(tmp_path / "fapo", _fapo_rows())
    grpo = _write_run(tmp_path / "grpo", _grpo_rows(last_share=0.2))
    results = {
        g.text.split(",")[0].split(" ")[0] + str(i): g for i, g in enumerate(goals({"FAPO": fapo, "GRPO": grpo}))
    }
    grpo_goal, fapo_goal, val_goal, turn_goal = results.values()
    assert grpo_goal.measured == "0.200 / 0.300 = 0.67" and grpo_goal.passed
    assert fapo_goal.measured == "0.100 / 0.400 = 0.25" and fapo_goal.passed
    assert val_goal.measured == f"{0.3 + 0.02 * 19:.3f} vs {0.3 + 0.01 * 19:.3f}" and val_goal.passed
    # 3-step moving average of rho: steps 1-8 at 0.5, step 9 averages (0.5, 0.5, 2.0) = 1.0 -> the crossing.
    assert rho_crossing([json.loads(line) for line in (fapo / "metrics.jsonl").read_text().splitlines()]) == 9
    assert turn_goal.measured == "crossing at step 9: 0.75 before, 0.25 after" and turn_goal.passed


def test_grpo_losing_its_flaws_fails_the_goal_and_the_report_says_which_seed(tmp_path, capsys):
    kept = {"FAPO": _write_run(tmp_path / "f0", _fapo_rows()), "GRPO": _write_run(tmp_path / "g0", _grpo_rows(0.2))}
    lost = {"FAPO": _write_run(tmp_path / "f1", _fapo_rows()), "GRPO": _write_run(tmp_path / "g1", _grpo_rows(0.1))}
    assert print_report([kept]) is True
    assert print_report([kept, lost]) is False
    out = capsys.readouterr().out
    seed1 = out[out.index("goals, seed 1") :]
    assert "[FAIL] GRPO flawed share" in seed1 and "0.100 / 0.300 = 0.33" in seed1
    assert "FAPO seed 1" in out and "GRPO seed 0" in out


def test_pooled_share_weights_steps_by_their_flawed_count():
    rows = [
        {"progress/flawed_positive_advantage_share": 1.0, "genrm/flawed": 1.0},
        {"progress/flawed_positive_advantage_share": 0.0, "genrm/flawed": 3.0},
        {"progress/flawed_positive_advantage_share": float("nan"), "genrm/flawed": 0.0},
    ]
    assert pooled_advantage_share(rows) == pytest.approx(0.25)


def test_plot_has_one_line_per_run_and_seed(tmp_path):
    seeds = [
        {"FAPO": _write_run(tmp_path / f"f{s}", _fapo_rows()), "GRPO": _write_run(tmp_path / f"g{s}", _grpo_rows(0.2))}
        for s in range(2)
    ]
    fig = draw_runs(seeds)
    for ax in fig.axes[: len(PANELS)]:
        drawn = [line for line in ax.get_lines() if not line.get_label().startswith("_")]  # not the reference line
        lines = {line.get_label(): (line.get_color(), line.get_linestyle()) for line in drawn}
        assert set(lines) == {"FAPO seed 0", "GRPO seed 0", "FAPO seed 1", "GRPO seed 1"}
        assert lines["FAPO seed 0"][0] == lines["FAPO seed 1"][0] != lines["GRPO seed 0"][0]
        assert lines["FAPO seed 0"][1] != lines["FAPO seed 1"][1]
    png = plot_runs(seeds, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
