"""Pools and worker groups on a GPU: bundles probe their GPU, NCCL init from the group's env, colocated roles.

NUM_GPUS = 1. Skipped without CUDA.
"""

import os
import sys

import pytest
import ray
import torch
import torch.distributed as dist

from fapo_megatron.cluster.pools import ray_session
from fapo_megatron.config import load_config
from fapo_megatron.dist_env import init_distributed_from_env

NUM_GPUS = 1

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < NUM_GPUS, reason=f"needs {NUM_GPUS} CUDA GPU(s)"
)

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class NcclWorker:
    def __init__(self):
        self.dist_env = init_distributed_from_env()

    def report(self, value: float) -> dict:
        tensor = torch.full((4,), value, device="cuda")
        dist.all_reduce(tensor)
        return {
            "sum": float(tensor[0].item()),
            "backend": dist.get_backend(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "local_rank": os.environ["LOCAL_RANK"],
            "device": torch.cuda.current_device(),
            "num_devices": torch.cuda.device_count(),
        }


def test_colocated_roles_share_one_gpu_bundle_and_init_nccl():
    os.environ["RAY_AUTH_MODE"] = "disabled"  # local test cluster only
    cfg = load_config(None, ["cluster.device=cuda", "genrm.backend=embedded"])
    with ray_session(cfg, pool_timeout_s=60) as session:
        pool = session.pools["actor"]
        assert pool.spec.bundle == {"GPU": 1.0, "CPU": 1.0} and pool.spec.roles == ("actor", "rollout", "genrm")
        assert [gpu for _, gpu in pool.bundle_nodes] == [0]
        actor = session.worker_group("actor", NcclWorker)
        rollout = session.worker_group("rollout", NcclWorker)
        for group in (actor, rollout):
            (report,) = group.call("report", 2.5)
            assert report == {
                "sum": 2.5,
                "backend": "nccl",
                "visible": "0",
                "local_rank": "0",
                "device": 0,
                "num_devices": 1,
            }
        assert actor.master_port != rollout.master_port
