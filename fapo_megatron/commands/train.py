"""`fapo-megatron train CONFIG [key=value ...]`: FAPO (or GRPO) RL training."""

from fapo_megatron.config import load_config


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="run FAPO / GRPO training from a config")
    parser.add_argument("config", help="YAML config file, e.g. configs/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=10 algorithm.name=grpo")
    parser.set_defaults(func=run)


def run(args) -> int:
    from fapo_megatron.trainer import Trainer, print_summary

    cfg = load_config(args.config, args.overrides)
    summary = Trainer(cfg).fit()
    print_summary(summary, cfg.trainer.output_dir)
    return 0
