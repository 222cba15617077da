"""Visible GenRM share of step time, synchronous vs streamed verdicts, against a latency-controlled judge.

  python benchmarks/bench_genrm_overlap.py                       # CPU: tiny_cpu, 3 steps per mode
  python benchmarks/bench_genrm_overlap.py --steps 5 --delay-s 0.5 --slots 2

The judge is the stand-in GenRM server (tests/genrm/genrm_standin_server.py, SGLang `/generate`) in its own process
on 127.0.0.1: every request is answered after --delay-s, at most --slots at once (a judge with a fixed number of
decoding slots), its verdict fixed by the solution it reads. Both modes train the same warmed-up tiny policy from
the same seed against that judge, one after the other, each in its own `fapo-megatron train` process:
`genrm.stream=false` (judge after the rollout, then the log-prob pass) and `genrm.stream=true` (each correct
rollout's request leaves when its generation is done; the log-prob pass runs while verdicts are out). Reported per
mode, averaged over the steps after the first: step time, rollout time, judge busy time (`time/genrm`), the wait for
verdicts (`time/genrm_visible`) and its share of the step, and the requests sent before the rollout ended.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from tiny_runs import REPO, mean_after_first, train_tiny

from fapo_megatron.demo.warmup import WarmupConfig, warm_up

STANDIN = REPO / "tests" / "genrm" / "genrm_standin_server.py"
MODES = {"synchronous": "false", "streamed": "true"}


def judged_overrides(policy: Path, url: str, stream: str, args: argparse.Namespace) -> list[str]:
    return [
        f"model.path={policy}",
        "parallel.micro_batch_size=4",
        "genrm.backend=external",
        "genrm.api=sglang",
        f"genrm.url={url}",
        f"genrm.concurrency={args.concurrency}",
        f"genrm.stream={stream}",
        "genrm.max_unavailable_fraction=1.0",
    ]


def summarize(records: list[dict]) -> dict[str, float]:
    keys = ("perf/step_seconds", "time/rollout", "time/genrm", "time/genrm_visible", "time/logprobs")
    row = {key: mean_after_first(records, key) for key in keys}
    row["visible_share"] = row["time/genrm_visible"] / row["perf/step_seconds"]
    row["busy_over_rollout"] = row["time/genrm"] / row["time/rollout"]
    row["asked"] = sum(r["genrm/asked"] for r in records[1:])
    row["sent_during_rollout"] = sum(r["genrm/sent_during_rollout"] for r in records[1:])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps per mode (the first is not averaged)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step (x rollout.n=8 rollouts)")
    parser.add_argument("--delay-s", type=float, default=0.3, help="the judge's answer time per request")
    parser.add_argument("--slots", type=int, default=2, help="requests the judge answers at once")
    parser.add_argument("--concurrency", type=int, default=8, help="genrm.concurrency (requests in flight)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bench_genrm_overlap"))
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is not averaged)")
    work = Path(args.work)
    policy = warm_up(
        work / "policy",
        WarmupConfig(steps=250, num_items=1500, clean_share=0.5, trivial_slip_share=0.0),
        progress=False,
    )
    judge = subprocess.Popen(
        [sys.executable, str(STANDIN), "sglang", str(args.delay_s), str(args.slots), "by-content"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{int(judge.stdout.readline())}"
        rows = {}
        for mode, stream in MODES.items():
            out = work / mode
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            overrides = judged_overrides(policy, url, stream, args)
            rows[mode] = summarize(train_tiny(out, args.steps, args.batch_size, overrides, f"stream={stream}"))
    finally:
        judge.kill()
        judge.wait()

    print(f"judge: {args.delay_s:g} s per request, {args.slots} at once; genrm.concurrency={args.concurrency}")
    print(f"tiny_cpu, data.batch_size={args.batch_size} x 8 rollouts, means over steps 2..{args.steps}\n")
    print(
        "| mode | step s | rollout s | judge busy s | busy / rollout | log-probs s | GenRM visible s | visible share "
        "| sent during rollout |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(
            f"| {mode} | {r['perf/step_seconds']:.2f} | {r['time/rollout']:.2f} | {r['time/genrm']:.2f} "
            f"| {r['busy_over_rollout']:.2f} | {r['time/logprobs']:.2f} | {r['time/genrm_visible']:.2f} "
            f"| {100 * r['visible_share']:.1f} % | {int(r['sent_during_rollout'])} of {int(r['asked'])} |"
        )
    sync, streamed = rows["synchronous"], rows["streamed"]
    print(f"\nstep time streamed / synchronous: {streamed['perf/step_seconds'] / sync['perf/step_seconds']:.2f}")
    if streamed["busy_over_rollout"] > 1.0:
        verdict = "not applicable (judge busy longer than the rollout: lower --delay-s or raise --slots)"
    else:
        verdict = "met" if streamed["visible_share"] <= 0.05 else "missed"
    print(f"goal (streamed: visible <= 5 % of the step when judge busy <= rollout): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
