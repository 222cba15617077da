"""`fapo-megatron config CONFIG [key=value ...]`: validate a config and print the resolved tree."""

from fapo_megatron.config import dump_yaml, load_config


def register(subparsers) -> None:
    parser = subparsers.add_parser("config", help="validate a config file (+ overrides) and print it resolved")
    parser.add_argument("config", help="YAML config file, e.g. configs/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.lam=0.5")
    parser.set_defaults(func=run)


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(dump_yaml(cfg), end="")
    return 0
