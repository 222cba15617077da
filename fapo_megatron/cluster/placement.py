"""Pool layout: which Ray placement groups a run needs and which bundle hosts each worker rank.

Terms. A *bundle* is one device's worth of reserved resources ({"GPU": 1, "CPU": k} on cuda, {"CPU": 1} on
cpu). A *pool* is one placement group of bundles. A *role* is a kind of worker (actor, rollout, genrm); a
role's *rank* r is pinned to one bundle of its pool, by *logical* bundle index: the position of the bundle
after ordering all bundles by node IP, then GPU id (`order_bundles`), so rank order follows the hardware.

An *engine replica* (a rollout engine or a GenRM server of `tp` devices) is hosted by the worker on the first
bundle of its `tp` consecutive bundles; `EnginePlacement` names its node, the node-local GPU indices it uses
(indices into the pool's GPUs on that node, which is what the worker sees as CUDA_VISIBLE_DEVICES) and its
server port, unique on the node. Workers get theirs passed in; nothing re-derives it from ranks.

Pure functions only (no Ray import): the layout can be computed and tested without a cluster.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fapo_megatron.config import Config, ConfigError

ACTOR = "actor"
ROLLOUT = "rollout"
GENRM = "genrm"

ACTOR_POOL = "actor"
ROLLOUT_POOL = "rollout"
GENRM_POOL = "genrm"
GENRM_PORT_OFFSET = 1000
"""GenRM servers listen at rollout.sglang_port + GENRM_PORT_OFFSET + their first GPU's index, above the rollout
servers' rollout.sglang_port + index."""

# GenRM backends that run a model on the run's own devices (the others need no pool: the program checker runs
# in the trainer process, an external GenRM is a URL).
_GENRM_DEVICE_BACKENDS = ("embedded", "sglang")


@dataclass(frozen=True, kw_only=True)
class PoolSpec:
    """One placement group to reserve."""

    name: str
    num_bundles: int
    bundle: dict[str, float]
    """Resources of every bundle."""
    bundles_per_node: int
    """How many bundles one node holds (the last node may hold fewer)."""
    strategy: str
    """STRICT_PACK when the pool fits on one node, else PACK."""
    roles: tuple[str, ...]
    """Roles whose workers share each bundle (they time-share the device)."""

    @property
    def num_nodes(self) -> int:
        return -(-self.num_bundles // self.bundles_per_node)

    @property
    def share(self) -> float:
        """Fraction of a bundle's resources one worker of one role takes, so all roles fit in a bundle.

        Rounded down to 4 decimals: Ray keeps fractional resources to 1e-4, and n shares must not exceed 1.
        """
        return int(10000 / len(self.roles)) / 10000


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where one worker rank runs."""

    role: str
    rank: int
    pool: str
    bundle: int
    """Logical bundle index in `pool` (see the module docstring)."""


@dataclass(frozen=True, kw_only=True)
class EnginePlacement:
    """Where one engine replica runs: its hosting worker's bundle, node, devices and server port."""

    replica: int
    bundle: int
    """Logical bundle of the hosting worker (the replica's first device)."""
    node: int
    """Node index in the pool (bundle // bundles_per_node)."""
    base_gpu_id: int
    """Node-local index of the first device (SGLang's base_gpu_id)."""
    gpu_ids: tuple[int, ...]
    """Node-local indices of the replica's tp devices."""
    port: int


@dataclass(frozen=True, kw_only=True)
class PoolLayout:
    """All pools of a run and the rank -> bundle assignment of every role."""

    device: str
    pools: dict[str, PoolSpec]
    placements: dict[str, list[Placement]]
    """Role -> one Placement per rank, in rank order."""
    engines: dict[str, list[EnginePlacement]]
    """Role (rollout, genrm) -> one EnginePlacement per engine replica, in replica order."""

    def pool_of(self, role: str) -> PoolSpec:
        return self.pools[self.placements[self._known(role)][0].pool]

    def num_workers(self, role: str) -> int:
        return len(self.placements[self._known(role)])

    def _known(self, role: str) -> str:
        if role not in self.placements:
            raise KeyError(f"role {role!r} has no workers in this layout; roles: {sorted(self.placements)}")
        return role


def bundle_resources(device: str, cpus_per_gpu: float = 1.0) -> dict[str, float]:
    """Resources of one bundle: a GPU and `cpus_per_gpu` CPUs on cuda, one CPU on cpu."""
    if device == "cuda":
        return {"GPU": 1.0, "CPU": float(cpus_per_gpu)}
    if device == "cpu":
        return {"CPU": 1.0}
    raise ConfigError(f"cluster.device={device!r} is not allowed; choose one of ['cpu', 'cuda']")


def compute_layout(cfg: Config, cpus_per_gpu: float = 1.0) -> PoolLayout:
    """The pools and rank placements a config asks for.

    colocated (default): one pool of num_nodes x devices_per_node bundles; each bundle hosts one actor rank,
    one rollout shard and (for a model GenRM) one GenRM shard. `rollout.placement=separate`: the rollout engines get
    a pool of `cluster.rollout_devices` bundles, one worker per replica, and the actor's bundles host no engine.
    `genrm.placement=separate`: the GenRM gets a pool of `cluster.genrm_devices` bundles of its own. program /
    external GenRM: no GenRM workers at all.
    """
    cluster = cfg.cluster
    bundle = bundle_resources(cluster.device, cpus_per_gpu)
    world = cluster.world_size
    genrm_on_devices = cfg.genrm.backend in _GENRM_DEVICE_BACKENDS
    genrm_colocated = genrm_on_devices and cfg.genrm.placement == "colocated"
    rollout_colocated = cfg.rollout.placement == "colocated"

    actor_roles = (ACTOR,) + ((ROLLOUT,) if rollout_colocated else ()) + ((GENRM,) if genrm_colocated else ())
    pools = {ACTOR_POOL: _pool_spec(ACTOR_POOL, world, bundle, cluster.devices_per_node, actor_roles)}
    placements = {ACTOR: _spread(ACTOR, ACTOR_POOL, world)}
    actor_devices = "actor devices (cluster.num_nodes x devices_per_node)"
    engines = {}
    if rollout_colocated:
        placements[ROLLOUT] = _spread(ROLLOUT, ACTOR_POOL, world)
        engines[ROLLOUT] = _engines(
            "rollout.tp", cfg.rollout.tp, pools[ACTOR_POOL], cfg.rollout.sglang_port, actor_devices
        )
    else:
        num = cluster.rollout_devices
        if num == 0:
            raise ConfigError("rollout.placement=separate needs cluster.rollout_devices > 0")
        pools[ROLLOUT_POOL] = _pool_spec(ROLLOUT_POOL, num, bundle, cluster.devices_per_node, (ROLLOUT,))
        engines[ROLLOUT] = _engines(
            "rollout.tp", cfg.rollout.tp, pools[ROLLOUT_POOL], cfg.rollout.sglang_port, "cluster.rollout_devices"
        )
        placements[ROLLOUT] = _replica_placements(ROLLOUT, ROLLOUT_POOL, engines[ROLLOUT])

    genrm_port = cfg.rollout.sglang_port + GENRM_PORT_OFFSET
    if genrm_on_devices and not genrm_colocated:
        num = cluster.genrm_devices
        if num == 0:
            raise ConfigError("genrm.placement=separate needs cluster.genrm_devices > 0")
        pools[GENRM_POOL] = _pool_spec(GENRM_POOL, num, bundle, cluster.devices_per_node, (GENRM,))
        engines[GENRM] = _engines("genrm.tp", cfg.genrm.tp, pools[GENRM_POOL], genrm_port, "cluster.genrm_devices")
        placements[GENRM] = _replica_placements(GENRM, GENRM_POOL, engines[GENRM])
    elif genrm_colocated:
        engines[GENRM] = _engines("genrm.tp", cfg.genrm.tp, pools[ACTOR_POOL], genrm_port, actor_devices)
        placements[GENRM] = _replica_placements(GENRM, ACTOR_POOL, engines[GENRM])
    return PoolLayout(device=cluster.device, pools=pools, placements=placements, engines=engines)


def order_bundles(bundle_nodes: list[tuple[str, int | None]]) -> list[int]:
    """Physical bundle indices in logical order: by node IP (numerically), then GPU id, then Ray's index.

    `bundle_nodes[i]` is (node IP or hostname, GPU id or None on cpu) of physical bundle i as Ray reports it.
    Returns `order` with `order[logical] = physical`.
    """

    def key(index: int) -> tuple:
        node, gpu_id = bundle_nodes[index]
        return (*_node_key(node), -1 if gpu_id is None else int(gpu_id), index)

    return sorted(range(len(bundle_nodes)), key=key)


def _node_key(node: str) -> tuple[int, int, str]:
    try:
        address = ipaddress.ip_address(node)
    except ValueError:
        return (1, 0, node)  # a hostname: after all IPs, alphabetically
    return (0, (address.version << 128) | int(address), "")


def _pool_spec(name: str, num: int, bundle: dict[str, float], per_node: int, roles: tuple[str, ...]) -> PoolSpec:
    per_node = min(per_node, num)
    return PoolSpec(
        name=name,
        num_bundles=num,
        bundle=dict(bundle),
        bundles_per_node=per_node,
        strategy="STRICT_PACK" if num <= per_node else "PACK",
        roles=roles,
    )


def _spread(role: str, pool: str, num: int) -> list[Placement]:
    return [Placement(role=role, rank=rank, pool=pool, bundle=rank) for rank in range(num)]


def _replica_placements(role: str, pool: str, engines: list[EnginePlacement]) -> list[Placement]:
    """One worker per engine replica, on the replica's first bundle."""
    return [Placement(role=role, rank=e.replica, pool=pool, bundle=e.bundle) for e in engines]


def _engines(key: str, tp: int, pool: PoolSpec, base_port: int, what: str) -> list[EnginePlacement]:
    """One replica per `tp` consecutive bundles of `pool` (`what` names its size), each within one node."""
    per_node = pool.bundles_per_node
    _check_divides(key, tp, pool.num_bundles, what)
    _check_divides(key, tp, per_node, "devices of a node (cluster.devices_per_node; a replica stays on one node)")
    out = []
    for replica, first in enumerate(range(0, pool.num_bundles, tp)):
        base = first % per_node
        out.append(
            EnginePlacement(
                replica=replica,
                bundle=first,
                node=first // per_node,
                base_gpu_id=base,
                gpu_ids=tuple(range(base, base + tp)),
                port=base_port + base,
            )
        )
    return out


def _check_divides(key: str, size: int, total: int, what: str) -> None:
    if total % size != 0:
        raise ConfigError(f"{key}={size} does not divide the {total} {what}")
