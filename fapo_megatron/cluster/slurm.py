"""Slurm batch jobs for a run: render tools/slurm/fapo.sbatch.in from a config, submit it, wait for Ray.

Terms: the *job* is one sbatch allocation; a *chain* is several jobs of one long run, each resuming from the
checkpoint of the one before (`--dependency=afterany` jobs, or a job array run one element at a time).
Actor nodes are `cluster.num_nodes`; a GenRM on a pool of its own adds ceil(genrm_devices / devices_per_node), rollout
engines on a pool of their own ceil(rollout_devices / devices_per_node).
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fapo_megatron.config import Config, ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = REPO_ROOT / "tools" / "slurm" / "fapo.sbatch.in"
RAY_NODE_SCRIPT = REPO_ROOT / "tools" / "slurm" / "ray_node.sh"
NODE_RESOURCE_PREFIX = "fapo_node:"
"""Custom Ray resource each node of a job advertises (tools/slurm/ray_node.sh), so a missing node has a name."""


def job_num_nodes(cfg: Config) -> int:
    """Nodes the job needs: the actor pool plus the separate GenRM and rollout pools when there are any."""
    cluster = cfg.cluster
    genrm_nodes = rollout_nodes = 0
    if cfg.genrm.placement == "separate" and cluster.genrm_devices > 0:
        genrm_nodes = math.ceil(cluster.genrm_devices / cluster.devices_per_node)
    if cfg.rollout.placement == "separate":
        rollout_nodes = math.ceil(cluster.rollout_devices / cluster.devices_per_node)
    return cluster.num_nodes + genrm_nodes + rollout_nodes


def sbatch_directives(cfg: Config) -> list[str]:
    """The `#SBATCH` lines of one job of the run."""
    slurm, cuda = cfg.slurm, cfg.cluster.device == "cuda"
    log_dir = Path(slurm.log_dir).resolve()
    log_name = "%x-%A_%a.out" if slurm.chain > 1 and slurm.chain_mode == "array" else "%x-%j.out"
    lines = [
        f"--job-name={slurm.job_name}",
        f"--nodes={job_num_nodes(cfg)}",
        "--ntasks-per-node=1",
        f"--time={slurm.time_limit}",
        f"--output={log_dir / log_name}",
        "--open-mode=append",  # a requeued job appends to its log instead of truncating it
        "--requeue" if slurm.requeue else "--no-requeue",
    ]
    if cuda:
        lines += [f"--gpus-per-node={cfg.cluster.devices_per_node}", "--exclusive"]
    if slurm.cpus_per_node:
        lines.append(f"--cpus-per-task={slurm.cpus_per_node}")
    for flag, value in (
        ("partition", slurm.partition),
        ("account", slurm.account),
        ("qos", slurm.qos),
        ("mem", slurm.mem),
    ):
        if value:
            lines.append(f"--{flag}={value}")
    if slurm.signal_lead_s:
        lines.append(f"--signal=B:USR1@{slurm.signal_lead_s}")
    return [f"#SBATCH {line}" for line in lines]


def step_exports(cfg: Config) -> list[str]:
    """`export` lines every step of the job inherits (srun passes the batch environment on)."""
    slurm, cuda = cfg.slurm, cfg.cluster.device == "cuda"
    setup = []
    if slurm.tmpdir:
        setup.append('mkdir -p "$TMPDIR"')
    if slurm.venv:
        setup.append(f"source {shlex.quote(str(Path(slurm.venv) / 'bin' / 'activate'))}")
    env = {
        "FAPO_SETUP": " && ".join(setup) or ":",
        "FAPO_RAY_PORT": str(slurm.ray_port),
        "FAPO_RAY_CPUS": str(slurm.cpus_per_node or ""),
        "FAPO_RAY_GPUS": str(cfg.cluster.devices_per_node if cuda else 0),
        "FAPO_RAY_JOIN_TIMEOUT_S": str(math.ceil(slurm.ray_join_timeout_s)),
        "FAPO_PREFLIGHT_PORT": str(slurm.preflight_port),
        "FAPO_REQUEUE": "launcher" if slurm.requeue else "off",
    }
    if slurm.socket_ifname:
        for name in ("FAPO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
            env[name] = slurm.socket_ifname
    if slurm.hf_home:
        env["HF_HOME"] = slurm.hf_home
    if slurm.tmpdir:
        env["TMPDIR"] = slurm.tmpdir
    env.update(item.split("=", 1) for item in slurm.env)
    return [f"export {name}={shlex.quote(value)}" for name, value in env.items()]


def step_args(cfg: Config, workdir: Path) -> list[str]:
    """srun options every step gets: the container, and the node's GPUs on cuda."""
    args = []
    if cfg.cluster.device == "cuda":
        args.append(f"--gres=gpu:{cfg.cluster.devices_per_node}")
    if cfg.slurm.container_image:
        args += [f"--container-image={cfg.slurm.container_image}", f"--container-workdir={workdir}"]
        if cfg.slurm.container_mounts:
            args.append(f"--container-mounts={cfg.slurm.container_mounts}")
    return args


def render_script(
    cfg: Config,
    config_path: str | Path,
    overrides: list[str],
    *,
    preflight_only: bool = False,
    template: Path = TEMPLATE,
) -> str:
    """The sbatch script of one job: `cfg` is `config_path` + `overrides` already loaded and checked."""
    if not template.is_file() or not RAY_NODE_SCRIPT.is_file():
        raise ConfigError(
            f"{template} or {RAY_NODE_SCRIPT} is missing: install fapo-megatron from its repository "
            f"(pip install -e .) so tools/slurm/ is there"
        )
    workdir = Path(cfg.slurm.workdir).resolve() if cfg.slurm.workdir else Path.cwd()
    cuda = cfg.cluster.device == "cuda"
    values = {
        "directives": "\n".join(sbatch_directives(cfg)),
        "config_path": str(config_path),
        "exports": "\n".join(step_exports(cfg)),
        "workdir": shlex.quote(str(workdir)),
        "ray_node_script": shlex.quote(str(RAY_NODE_SCRIPT)),
        "step_args": " ".join(shlex.quote(arg) for arg in step_args(cfg, workdir)),
        "train_args": " ".join(shlex.quote(arg) for arg in [str(Path(config_path).resolve()), *overrides]),
        "preflight": "1" if cfg.slurm.preflight or preflight_only else "0",
        "preflight_ranks_per_node": str(cfg.cluster.devices_per_node if cuda else 1),
        "ray_resource": "GPU" if cuda else "CPU",
        "ray_per_node": str(cfg.cluster.devices_per_node),
        "run_training": "0" if preflight_only else "1",
    }
    return fill_template(template.read_text(), values, str(template))


def fill_template(text: str, values: dict[str, str], name: str) -> str:
    """Replace every `{{key}}`; a key the template uses but `values` lacks (or the reverse) is an error."""
    used = set(re.findall(r"\{\{(\w+)\}\}", text))
    if used != set(values):
        raise ValueError(f"{name}: placeholders {sorted(used)} do not match the values {sorted(values)}")
    return re.sub(r"\{\{(\w+)\}\}", lambda match: values[match.group(1)], text)


def sbatch_commands(cfg: Config, script: Path) -> list[list[str]]:
    """The sbatch command line(s) of the run; `{prev}` in one stands for the job id the one before printed."""
    chain, mode = cfg.slurm.chain, cfg.slurm.chain_mode
    if chain > 1 and mode == "array":
        return [["sbatch", "--parsable", f"--array=0-{chain - 1}%1", str(script)]]
    commands = [["sbatch", "--parsable", str(script)]]
    commands += [["sbatch", "--parsable", "--dependency=afterany:{prev}", str(script)] for _ in range(chain - 1)]
    return commands


def script_path(cfg: Config) -> Path:
    """Where `submit` keeps the script it submits (next to the job logs, stamped with the time)."""
    return Path(cfg.slurm.log_dir).resolve() / f"{cfg.slurm.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"


def submit(cfg: Config, script_text: str, sbatch: str = "sbatch") -> list[str]:
    """Write the script under slurm.log_dir and submit the run's job(s); returns the job ids in order."""
    script = script_path(cfg)
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(script_text)
    job_ids: list[str] = []
    for command in sbatch_commands(cfg, script):
        command = [sbatch, *command[1:]]
        command = [arg.replace("{prev}", job_ids[-1]) if job_ids else arg for arg in command]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
        job_ids.append(proc.stdout.strip().split(";")[0])
    return job_ids


@dataclass
class NodeJoin:
    """How much of `resource` one Slurm node has brought into the Ray cluster."""

    node: str
    amount: float


def joined_resources(ray_nodes: list[dict], resource: str) -> dict[str, float]:
    """Slurm node name -> amount of `resource` on its live Ray node(s), from `ray.nodes()`."""
    joined: dict[str, float] = {}
    for entry in ray_nodes:
        if not entry.get("Alive"):
            continue
        resources = entry.get("Resources", {})
        for key in resources:
            if key.startswith(NODE_RESOURCE_PREFIX):
                name = key[len(NODE_RESOURCE_PREFIX) :]
                joined[name] = joined.get(name, 0.0) + resources.get(resource, 0.0)
    return joined


def wait_for_ray(
    address: str, nodes: list[str], resource: str, per_node: int, timeout_s: float, poll_s: float = 2.0
) -> dict[str, float]:
    """Block until every Slurm node in `nodes` has `per_node` of `resource` in the Ray cluster at `address`.

    Raises TimeoutError naming each missing node and how much of it joined.
    """
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            joined = joined_resources(ray.nodes(), resource)
            missing = [NodeJoin(node, joined.get(node, 0.0)) for node in nodes if joined.get(node, 0.0) < per_node]
            if not missing:
                return joined
            if time.monotonic() >= deadline:
                detail = ", ".join(f"{m.node} ({m.amount:g} of {per_node} {resource})" for m in missing)
                raise TimeoutError(
                    f"Ray at {address}: after {timeout_s:g} s, {len(missing)} of {len(nodes)} nodes have not joined "
                    f"with their {resource}s: {detail}; see that node's ray_node.sh output in the job log"
                )
            time.sleep(poll_s)
    finally:
        ray.shutdown()
