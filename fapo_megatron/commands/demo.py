"""`fapo-megatron demo [--compare]`: the CPU demo, a small real FAPO run end to end (and GRPO beside it)."""

import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="warm up a tiny policy and train it with FAPO on CPU")
    parser.add_argument("--compare", action="store_true", help="also run GRPO from the same start and plot both")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="repeat each run with this many seeds (trainer.seed, data.seed + 0, 1, ...)",
    )
    parser.add_argument("--output-dir", default="runs/demo", help="where the runs, logs and plot go")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="the run config (default configs/tiny_cpu.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for both runs, e.g. trainer.steps=10")
    parser.set_defaults(func=run)


def run(args) -> int:
    from fapo_megatron.config import load_config
    from fapo_megatron.demo.plot import plot_runs
    from fapo_megatron.demo.report import print_report
    from fapo_megatron.demo.warmup import warm_up
    from fapo_megatron.trainer import Trainer, print_summary

    out = Path(args.output_dir)
    print("fapo-megatron demo: warming up the tiny policy on arithmetic chains (cached after the first run)")
    start = time.perf_counter()
    policy = warm_up(out / "policy_init")
    seconds = {"warm-up": time.perf_counter() - start}
    if args.seeds < 1:
        raise SystemExit(f"fapo-megatron demo: --seeds={args.seeds} must be >= 1")
    names = ["fapo", "grpo"] if args.compare else ["fapo"]
    base = load_config(args.config, args.overrides)
    seeds = []
    for offset in range(args.seeds):
        runs = {}
        for name in names:
            run_dir = out / (name if offset == 0 else f"{name}_seed{offset}")
            overrides = [
                f"model.path={policy}",
                f"algorithm.name={name}",
                f"trainer.output_dir={run_dir}",
                "trainer.resume=none",
                *args.overrides,
                f"trainer.seed={base.trainer.seed + offset}",
                f"data.seed={base.data.seed + offset}",
            ]
            cfg = load_config(args.config, overrides)
            _clear(run_dir)
            print(f"\nfapo-megatron demo: {name.upper()} run, seed {offset} -> {run_dir}")
            start = time.perf_counter()
            print_summary(Trainer(cfg).fit(), cfg.trainer.output_dir)
            seconds[f"{name.upper()} seed {offset}"] = time.perf_counter() - start
            runs[name.upper()] = run_dir
        seeds.append(runs)
    print_report(seeds)
    png = plot_runs(seeds, out / ("fapo_vs_grpo.png" if args.compare else "fapo.png"))
    print(f"\nplot: {png}")
    print(f"TensorBoard: tensorboard --logdir {out}")
    print("wall time: " + ", ".join(f"{phase} {value:.0f} s" for phase, value in seconds.items()))
    return 0


def _clear(run_dir: Path) -> None:
    """A demo run starts from the warmed-up policy every time: old checkpoints and metrics are removed."""
    import shutil

    for name in ("checkpoints", "tensorboard", "metrics.jsonl"):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
