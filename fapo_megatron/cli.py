"""The `fapo-megatron` command. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from fapo_megatron.algo.rewards import VerdictUnavailableError
from fapo_megatron.config import ConfigError
from fapo_megatron.data.items import DataError
from fapo_megatron.megatron.checkpoint_files import CheckpointError

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
    except DataError as err:
        print(f"fapo-megatron: data error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"fapo-megatron: checkpoint error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(f"fapo-megatron: {err.strerror}" + (f": {err.filename}" if err.filename else ""), file=sys.stderr)
        return 1
    except VerdictUnavailableError as err:
        print(f"fapo-megatron: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        workers = sys.modules.get("fapo_megatron.cluster.workers")  # loaded only by runs that start workers
        if workers is None or not isinstance(err, workers.WorkerError):
            raise
        print(f"fapo-megatron: {err}", file=sys.stderr)  # Ray has printed the worker's traceback already
        return 1
