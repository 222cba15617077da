"""`fapo-megatron slurm submit|preflight|size|wait-ray`: run a config as Slurm batch jobs.

Flags of `submit` are shorthands for config overrides (`--nodes 4` is `cluster.num_nodes=4`), so the job,
its preflight and its trainer all see one config.
"""

from __future__ import annotations

import sys

from fapo_megatron.config import load_config

# flag -> (config key, type, help)
SUBMIT_FLAGS = {
    "nodes": ("cluster.num_nodes", int, "actor nodes (a separate GenRM pool adds its own)"),
    "gpus_per_node": ("cluster.devices_per_node", int, "GPUs per node (actor processes per node on cpu)"),
    "partition": ("slurm.partition", str, "Slurm partition"),
    "account": ("slurm.account", str, "Slurm account"),
    "qos": ("slurm.qos", str, "Slurm QOS"),
    "time": ("slurm.time_limit", str, "time limit of each job, e.g. 04:00:00"),
    "container_image": ("slurm.container_image", str, "pyxis/enroot image for every step"),
    "container_mounts": ("slurm.container_mounts", str, "pyxis mounts src:dst[,src:dst]"),
    "venv": ("slurm.venv", str, "virtualenv every step activates"),
    "log_dir": ("slurm.log_dir", str, "folder of the script and job logs"),
    "signal_lead": ("slurm.signal_lead_s", int, "seconds before the limit to checkpoint and requeue"),
    "chain": ("slurm.chain", int, "jobs to chain for one long run"),
    "chain_mode": ("slurm.chain_mode", str, "dependency (afterany jobs) or array (one element at a time)"),
    "socket_ifname": ("slurm.socket_ifname", str, "network interface for NCCL/GLOO and Ray"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser("slurm", help="submit a config as Slurm jobs, check nodes, size memory")
    commands = parser.add_subparsers(dest="slurm_command", required=True, metavar="SLURM_COMMAND")

    submit = commands.add_parser("submit", help="render the sbatch script from a config and submit it")
    _config_args(submit)
    for flag, (key, kind, text) in SUBMIT_FLAGS.items():
        submit.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, help=f"{text} ({key})")
    submit.add_argument("--no-requeue", action="store_true", help="do not requeue after a pre-emption checkpoint")
    submit.add_argument("--preflight-only", action="store_true", help="bring the cluster up, check it, no training")
    submit.add_argument("--dry-run", action="store_true", help="print the script and sbatch commands, submit nothing")
    submit.set_defaults(func=run_submit)

    preflight = commands.add_parser("preflight", help="check GPUs, network, disk, paths and the parallel plan")
    _config_args(preflight)
    preflight.add_argument("--master-addr", default="127.0.0.1", help="rendezvous host of the all-reduce")
    preflight.add_argument("--master-port", type=int, default=0, help="rendezvous port (0: slurm.preflight_port)")
    preflight.set_defaults(func=run_preflight)

    size = commands.add_parser("size", help="print the per-GPU memory estimate of a config's plan")
    _config_args(size)
    size.set_defaults(func=run_size)

    wait = commands.add_parser("wait-ray", help="wait until every node of a job has joined Ray (used by the script)")
    wait.add_argument("--address", required=True, help="Ray head host:port")
    wait.add_argument("--nodes", nargs="+", required=True, help="Slurm node names")
    wait.add_argument("--resource", choices=("GPU", "CPU"), required=True, help="what each node must bring")
    wait.add_argument("--per-node", type=int, required=True, help="how much of it per node")
    wait.add_argument("--timeout", type=float, required=True, help="seconds to wait")
    wait.set_defaults(func=run_wait_ray)


def _config_args(parser) -> None:
    parser.add_argument("config", help="YAML config file, e.g. configs/qwen2.5-math-7b_fapo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.steps=100")


def submit_overrides(args) -> list[str]:
    """The config overrides `args` stands for: its positional overrides, then one per flag given."""
    overrides = list(args.overrides)
    for flag, (key, _, _) in SUBMIT_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.no_requeue:
        overrides.append("slurm.requeue=false")
    return overrides


def run_submit(args) -> int:
    from fapo_megatron.cluster import slurm

    overrides = submit_overrides(args)
    cfg = load_config(args.config, overrides)
    script = slurm.render_script(cfg, args.config, overrides, preflight_only=args.preflight_only)
    if args.dry_run:
        print(script, end="")
        print("# submit with:")
        for command in slurm.sbatch_commands(cfg, slurm.script_path(cfg)):
            print("#   " + " ".join(command))
        return 0
    for job_id in slurm.submit(cfg, script):
        print(job_id)
    return 0


def run_preflight(args) -> int:
    from fapo_megatron.cluster.preflight import run_preflight as preflight

    cfg = load_config(args.config, args.overrides)
    return preflight(cfg, args.master_addr, args.master_port or cfg.slurm.preflight_port)


def run_size(args) -> int:
    from fapo_megatron.cluster.sizing import estimate_for_config, format_report

    report = estimate_for_config(load_config(args.config, args.overrides))
    print(format_report(report))
    return 0 if report.fits else 1


def run_wait_ray(args) -> int:
    from fapo_megatron.cluster.slurm import wait_for_ray

    try:
        joined = wait_for_ray(args.address, args.nodes, args.resource, args.per_node, args.timeout)
    except TimeoutError as err:
        print(f"fapo-megatron: {err}", file=sys.stderr)
        return 1
    print(
        f"Ray at {args.address}: "
        + ", ".join(f"{node} {amount:g} {args.resource}" for node, amount in sorted(joined.items()))
    )
    return 0
