"""Step time on-policy vs one step off-policy, with the rollout engines on a pool of their own.

  python benchmarks/bench_off_policy.py                      # CPU: tiny_cpu, 4 steps per mode
  python benchmarks/bench_off_policy.py --steps 6 --batch-size 8 --device cuda   # needs a CUDA build and GPUs

Three modes train tiny_cpu (random tiny policy, program GenRM) from the same seed, one after the other, each in its
own `fapo-megatron train` process: the engines on the actor's devices (`rollout.placement=colocated`, today's
default), on a pool of their own (`separate`, `cluster.rollout_devices=1`) on-policy, and the same pool with
`trainer.off_policy_steps=1` (step k+1's rollouts sampled while step k trains). Reported per mode, averaged over the
steps after the first: step time, the wait for rollouts (`time/rollout`), log-probs + update, the weight push, and
the staleness of the rollouts trained on. The overlap only pays when the rollout pool has devices of its own: on a
machine with fewer cores than processes the pools share the same cores and the run shows what it costs, not gains.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tiny_runs import mean_after_first, train_tiny

MODES = {
    "colocated, on-policy": [],
    "separate pool, on-policy": ["rollout.placement=separate", "cluster.rollout_devices=1"],
    "separate pool, off_policy_steps=1": [
        "rollout.placement=separate",
        "cluster.rollout_devices=1",
        "trainer.off_policy_steps=1",
    ],
}


def summarize(records: list[dict]) -> dict[str, float]:
    def mean(key: str) -> float:
        return mean_after_first(records, key, missing=0.0)  # colocated runs push no weights and are never stale

    return {
        "step": mean("perf/step_seconds"),
        "rollout": mean("time/rollout"),
        "train": mean("time/logprobs") + mean("time/update"),
        "weight_sync": mean("time/weight_sync"),
        "staleness": mean("perf/staleness"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps per mode (the first is not averaged)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step (x rollout.n=8 rollouts)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cluster.device")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bench_off_policy"))
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is not averaged)")
    rows = {}
    for name, mode in MODES.items():
        out = Path(args.work) / name.replace(" ", "_").replace(",", "")
        shutil.rmtree(out, ignore_errors=True)
        overrides = [f"cluster.device={args.device}", *mode]
        rows[name] = summarize(train_tiny(out, args.steps, args.batch_size, overrides, name))
    print(f"tiny_cpu on {args.device} ({os.cpu_count()} CPUs), data.batch_size={args.batch_size} x 8 rollouts,")
    print(f"means over steps 2..{args.steps}\n")
    print("| mode | step s | rollout wait s | log-probs + update s | weight push s | staleness |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['step']:.2f} | {r['rollout']:.2f} | {r['train']:.2f} | {r['weight_sync']:.2f} "
            f"| {r['staleness']:.2f} |"
        )
    on, off = rows["separate pool, on-policy"], rows["separate pool, off_policy_steps=1"]
    print(f"\nstep time off-policy / on-policy (separate pool): {off['step'] / on['step']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
