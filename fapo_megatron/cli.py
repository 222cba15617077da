"""The `fapo-megatron` command. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

from fapo_megatron.config import ConfigError

# module path -> it defines `register(subparsers)`; the parser it adds sets `func(args) -> int`.
COMMAND_MODULES = [
    "fapo_megatron.commands.config_cmd",
    "fapo_megatron.commands.convert",
    "fapo_megatron.commands.train",
    "fapo_megatron.commands.demo",
    "fapo_megatron.commands.slurm",
    "fapo_megatron.commands.eval_genrm",
    "fapo_megatron.commands.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fapo-megatron", description="FAPO reinforcement learning on Megatron-core (see README.md)."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"fapo-megatron: config error: {err}", file=sys.stderr)
        return 2
