"""A pool: one reserved Ray placement group, its bundles ordered by hardware (node, GPU).

Shared by the session (pools.py), which reserves the pools a layout asks for, and the worker groups
(workers.py), which pin one rank to each bundle.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fapo_megatron.cluster.placement import PoolSpec, order_bundles

logger = logging.getLogger(__name__)


class PoolTimeoutError(RuntimeError):
    """A placement group could not be reserved in time; the message compares what was asked and what exists."""


@dataclass(kw_only=True)
class Pool:
    """A reserved placement group and the hardware order of its bundles."""

    spec: PoolSpec
    placement_group: PlacementGroup
    bundle_order: list[int]
    """`bundle_order[logical] = physical` Ray bundle index (see placement.order_bundles)."""
    bundle_nodes: list[tuple[str, int | None]]
    """(node IP, GPU id or None) per logical bundle."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_bundles(self) -> int:
        return self.spec.num_bundles

    @property
    def device(self) -> str:
        return "cuda" if self.spec.bundle.get("GPU", 0) > 0 else "cpu"

    def scheduling(self, logical_bundle: int) -> PlacementGroupSchedulingStrategy:
        """Ray scheduling strategy that pins a task or actor to logical bundle `logical_bundle`."""
        if not 0 <= logical_bundle < self.num_bundles:
            raise IndexError(f"pool {self.name!r} has {self.num_bundles} bundles; bundle {logical_bundle} asked")
        return PlacementGroupSchedulingStrategy(
            placement_group=self.placement_group,
            placement_group_bundle_index=self.bundle_order[logical_bundle],
            placement_group_capture_child_tasks=True,
        )

    def worker_resources(self, share: float) -> dict[str, float]:
        """Ray actor options asking for `share` of one bundle's resources."""
        options: dict[str, Any] = {"num_cpus": self.spec.bundle.get("CPU", 0.0) * share}
        if self.device == "cuda":
            options["num_gpus"] = self.spec.bundle["GPU"] * share
        return options


@ray.remote
def _bundle_node() -> tuple[str, int | None]:
    gpu_ids = ray.get_gpu_ids()
    return ray.util.get_node_ip_address(), (int(gpu_ids[0]) if gpu_ids else None)


def create_pool(spec: PoolSpec, timeout_s: float = 120.0) -> Pool:
    """Reserve `spec` as a placement group and learn each bundle's node and GPU to order them."""
    bundles = [dict(spec.bundle) for _ in range(spec.num_bundles)]
    group = placement_group(bundles, strategy=spec.strategy, name=f"fapo-{spec.name}-{os.getpid()}")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise PoolTimeoutError(_unplaceable_message(spec, timeout_s))
    # A tiny probe in each bundle reports where Ray put it (a sliver of the bundle, so the probe never waits).
    probe = {"num_cpus": 0.001 * spec.bundle.get("CPU", 0.0), "num_gpus": 0.001 * spec.bundle.get("GPU", 0.0)}
    refs = [
        _bundle_node.options(**probe, scheduling_strategy=PlacementGroupSchedulingStrategy(group, index)).remote()
        for index in range(spec.num_bundles)
    ]
    physical_nodes = ray.get(refs)
    order = order_bundles(physical_nodes)
    pool = Pool(spec=spec, placement_group=group, bundle_order=order, bundle_nodes=[physical_nodes[i] for i in order])
    for logical, (node, gpu) in enumerate(pool.bundle_nodes):
        logger.info("pool %s bundle %d -> ray bundle %d on %s gpu %s", spec.name, logical, order[logical], node, gpu)
    return pool


def _unplaceable_message(spec: PoolSpec, timeout_s: float) -> str:
    asked = {key: value * spec.num_bundles for key, value in spec.bundle.items()}
    total = {key: ray.cluster_resources().get(key, 0.0) for key in spec.bundle}
    free = {key: ray.available_resources().get(key, 0.0) for key in spec.bundle}
    nodes = [
        {key: node["Resources"].get(key, 0.0) for key in spec.bundle} for node in ray.nodes() if node.get("Alive")
    ]
    return (
        f"pool {spec.name!r} could not be placed within {timeout_s:g} s: asked {spec.num_bundles} bundles of "
        f"{spec.bundle} ({spec.strategy}, {spec.bundles_per_node} per node), in all {asked}; the cluster has "
        f"{total} ({free} free) on {len(nodes)} node(s) {nodes}. Lower cluster.num_nodes / devices_per_node / "
        f"genrm_devices or add resources."
    )
