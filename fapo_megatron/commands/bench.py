"""`fapo-megatron bench {breakdown,run,predict}`: where step time goes, measured on a run or predicted for a recipe.

bench breakdown RUN_DIR        table + RUN_DIR/bench/breakdown.{json,png} from the trainer's timers
bench run CONFIG [k=v ...]     a short training run (--steps, default 4), then its breakdown
bench predict --model M        cost model: step time and phase shares on --nodes N, next to the paper's splits
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fapo_megatron.config import ConfigError, load_config


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="step-time breakdown of a run, short benchmark runs, cost model")
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCH_COMMAND")

    p = sub.add_parser("breakdown", help="per-step phase breakdown, tokens/s, actor MFU of a finished run")
    p.add_argument("run_dir", help="a run's trainer.output_dir (config.yaml + metrics.jsonl)")
    _breakdown_args(p)
    p.set_defaults(func=run_breakdown)

    p = sub.add_parser("run", help="a short training run from a config, then its breakdown")
    p.add_argument("config", help="YAML config file, e.g. configs/tiny_cpu.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, right after CONFIG (before any --flag); they win over --steps / --output-dir",
    )
    p.add_argument("--steps", type=int, default=4, help="trainer.steps of the benchmark run (default 4)")
    p.add_argument("--output-dir", default="", help="run folder (default runs/bench_<config name>); started afresh")
    _breakdown_args(p)
    p.set_defaults(func=run_bench)

    p = sub.add_parser("predict", help="predicted step time and breakdown of the 7B / 32B recipes on N nodes")
    p.add_argument(
        "--model",
        action="append",
        choices=("qwen2.5-math-7b", "qwen2.5-32b"),
        help="recipe to predict (repeatable; default both)",
    )
    p.add_argument("--config", default="", help="predict this config file instead of a shipped recipe")
    p.add_argument("--nodes", type=int, default=0, help="nodes (default: the recipe's cluster.num_nodes)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. genrm.max_new_tokens=8192 (repeatable)",
    )
    p.add_argument("--assumptions", default="", help="JSON of cost assumptions, or a `bench breakdown` JSON")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=NUMBER",
        help="one cost assumption, e.g. actor_mfu=0.35 (repeatable; wins over --assumptions)",
    )
    p.add_argument("--genrm-target", type=float, default=0.10, help="GenRM share the frontier aims at (0.10)")
    p.add_argument("--budgets", default="4096,8192,16384", help="genrm.max_new_tokens values of the frontier")
    p.add_argument("--json", default="", help="also write the predictions to this JSON file")
    p.set_defaults(func=run_predict)


def _breakdown_args(p) -> None:
    p.add_argument("--skip-first", type=int, default=1, help="leave out the first N steps (warm-up; default 1)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak TFLOP/s of one device for MFU (default 989 on cuda runs; cpu runs: n/a)",
    )
    p.add_argument(
        "--prompt-tokens-mean",
        type=float,
        default=None,
        help="prompt tokens per sequence, instead of replaying the run's prompt sampler",
    )
    p.add_argument("--out", default="", help="folder for breakdown.json / .png (default RUN_DIR/bench)")


def run_breakdown(args) -> int:
    from fapo_megatron.bench.breakdown import breakdown_run, format_table, save_breakdown

    if args.skip_first < 0:
        raise ConfigError(f"--skip-first {args.skip_first}: must be >= 0")
    run = breakdown_run(
        args.run_dir,
        skip_first=args.skip_first,
        peak_tflops=args.peak_tflops,
        prompt_tokens_mean=args.prompt_tokens_mean,
    )
    print(format_table(run))
    json_path, png_path = save_breakdown(run, args.out or Path(args.run_dir) / "bench")
    print(f"saved {json_path} and {png_path}")
    return 0


def run_bench(args) -> int:
    from fapo_megatron.trainer import Trainer

    if args.steps <= args.skip_first:
        raise ConfigError(f"--steps {args.steps} leaves nothing after --skip-first {args.skip_first}")
    output_dir = args.output_dir or f"runs/bench_{Path(args.config).stem}"
    defaults = [
        f"trainer.steps={args.steps}",
        f"trainer.output_dir={output_dir}",
        "trainer.resume=none",
        "trainer.overwrite=true",
    ]
    cfg = load_config(args.config, [*defaults, *args.overrides])
    Trainer(cfg).fit()
    args.run_dir = cfg.trainer.output_dir
    return run_breakdown(args)


def run_predict(args) -> int:
    from fapo_megatron.bench import cost_model as cm
    from fapo_megatron.bench.cost_report import format_frontier, format_prediction, genrm_frontier

    assumptions = cm.CostAssumptions()
    if args.assumptions:
        assumptions = cm.assumptions_with(assumptions, cm.load_assumptions(args.assumptions))
    assumptions = cm.assumptions_with(assumptions, dict(_number_pair(item) for item in args.set))
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    out = {"assumptions": dataclasses.asdict(assumptions), "predictions": {}}
    for name, cfg in _configs(args):
        policy, genrm = cm.shapes_for(cfg)
        pred = cm.predict(cfg, assumptions, policy, genrm, name=name)
        print(format_prediction(pred))
        record = {
            "gpus": pred.gpus,
            "step_seconds": pred.step_seconds,
            "seconds": pred.seconds,
            "shares": pred.shares,
            "run_hours": pred.run_hours,
            "detail": pred.detail,
            "paper_shares": cm.PAPER_SPLITS.get(name),
        }
        if genrm is not None and cfg.genrm.placement == "colocated":
            rows = genrm_frontier(cfg, assumptions, policy, genrm, budgets, args.genrm_target)
            print(format_frontier(name, rows, assumptions, genrm, args.genrm_target))
            record["genrm_frontier"] = [dataclasses.asdict(r) for r in rows]
        print()
        out["predictions"][name] = record
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"saved {args.json}")
    return 0


def _configs(args):
    from fapo_megatron.bench.cost_model import RECIPES, recipe_config

    if args.nodes < 0:
        raise ConfigError(f"--nodes {args.nodes}: must be > 0")
    if args.config:
        sizing = [f"cluster.devices_per_node={args.gpus_per_node}"]
        sizing += [f"cluster.num_nodes={args.nodes}"] if args.nodes else []
        cfg = load_config(args.config, [*sizing, *args.override])
        yield cfg.sizing.model_shape or Path(args.config).stem, cfg
        return
    for model in args.model or list(RECIPES):
        yield model, recipe_config(model, args.nodes or None, args.gpus_per_node, args.override)


def _number_pair(item: str) -> tuple[str, float]:
    name, sep, value = item.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or number is None:
        raise ConfigError(f"--set {item!r}: expected NAME=NUMBER")
    return name.strip(), number
