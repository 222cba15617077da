"""End to end on CPU with the rollout engines on a pool of their own (`rollout.placement=separate`): the golden
tiny_cpu run, on-policy and one step off-policy (`trainer.off_policy_steps=1`), including resume."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fapo_megatron.config import load_config
from fapo_megatron.data import PromptSampler
from fapo_megatron.metrics import read_metrics
from fapo_megatron.run_setup import load_run_data

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny_cpu.yaml"
GOLDEN = Path(__file__).with_name("golden_tiny_cpu.jsonl")
GOLDEN_OVERRIDES = [  # those of test_golden_metrics.py
    "trainer.steps=3",
    "trainer.val_interval=3",
    "data.batch_size=4",
    "algorithm.mini_batch_size=2",
    "trainer.progress=false",
]
WALL_CLOCK = ("time/", "perf/step_seconds", "perf/tokens_per_second")
OFF_POLICY = ["rollout.placement=separate", "cluster.rollout_devices=1", "trainer.off_policy_steps=1"]
pytestmark = pytest.mark.timeout(1200)


def _train(out: Path, *overrides: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "fapo_megatron", "train", str(CONFIG), f"trainer.output_dir={out}", *overrides],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return read_metrics(out / "metrics.jsonl")


def _saved_sampler(out: Path, step: int) -> dict:
    return torch.load(out / "checkpoints" / f"step_{step:08d}" / "extra.pt", weights_only=False)["sampler"]


def _sampler_after(batches: int, *overrides: str) -> dict:
    """Where a fresh sampler over the run's prompts stands after `batches` batches (independent of the trainer)."""
    cfg = load_config(CONFIG, list(overrides))
    sampler = PromptSampler(load_run_data(cfg).train, cfg.data.batch_size, cfg.data.seed)
    for _ in range(batches):
        sampler.next_batch()
    return sampler.state_dict()


def test_a_separate_pool_of_two_engines_reproduces_the_colocated_golden_run(tmp_path):
    """Two rollout workers take the prompt shards the two colocated engine ranks take, with the same seeds: the run
    equals the golden colocated one bit for bit, so every push (after every update) reached the engines exact."""
    rows = _train(tmp_path, *GOLDEN_OVERRIDES, "rollout.placement=separate", "cluster.rollout_devices=2")
    golden = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row, expected in zip(rows, golden, strict=True):
        row = {k: v for k, v in row.items() if not k.startswith(WALL_CLOCK)}
        # The actor ranks never generate, so they have no rollout phase in the ledger; nothing else is missing.
        assert set(expected) - set(row) == {"memory/rollout/actor_bytes"} and set(row) <= set(expected)
        for key, value in row.items():
            assert value == expected[key] or (math.isnan(value) and math.isnan(expected[key])), key


@pytest.fixture(scope="module")
def off_policy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("off_policy")
    rows = _train(out, *GOLDEN_OVERRIDES, *OFF_POLICY, "trainer.checkpoint_interval=1", "trainer.keep_checkpoints=3")
    return out, rows


def test_off_policy_rollouts_are_one_version_behind_after_the_first_step(off_policy_run):
    _, rows = off_policy_run
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["perf/staleness"] for r in rows] == [0.0, 1.0, 1.0]
    for r in rows:
        for key in ("actor/pg_loss", "actor/grad_norm", "actor/ppo_kl", "reward/mean", "actor/entropy"):
            assert math.isfinite(r[key]), key
    # Step 1 samples with the actor's own weights; later steps with the weights one update behind.
    assert rows[0]["actor/rollout_logprob_abs_diff"] < 1e-4
    assert all(r["actor/rollout_logprob_abs_diff"] > 1e-4 for r in rows[1:])


def test_off_policy_checkpoints_save_the_trained_batch_position_not_the_prefetched_one(off_policy_run):
    out, _ = off_policy_run
    for step in (1, 2, 3):
        assert _saved_sampler(out, step) == _sampler_after(step, *GOLDEN_OVERRIDES)


def test_off_policy_resume_draws_the_prefetched_batch_again(off_policy_run, tmp_path):
    """Stopped after step 2, the run resumes at the batch the uninterrupted run trained at step 3 (it was only
    prefetched when step 2's checkpoint was written), samples it with the current weights, and saves the same
    position after it."""
    straight, _ = off_policy_run
    out = tmp_path / "resumed"
    common = [*GOLDEN_OVERRIDES[1:], *OFF_POLICY, "trainer.checkpoint_interval=2"]
    _train(out, "trainer.steps=2", *common)
    rows = _train(out, "trainer.steps=3", *common, "trainer.resume=auto")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["perf/staleness"] == 0.0  # its rollouts were drawn after the resume, by the resumed weights
    assert _saved_sampler(out, 3) == _saved_sampler(straight, 3) == _sampler_after(3, *GOLDEN_OVERRIDES)
