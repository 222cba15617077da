"""A driver to SIGKILL: a local Ray session with a worker group whose ranks each run a multiprocessing Manager
server (as megatron-core's checkpoint writer does), then it waits. Prints READY once everything is up."""

import multiprocessing
import os
import sys
import time

from fapo_megatron.cluster.pools import ray_session
from fapo_megatron.config import load_config


class ManagerOwner:
    def start_manager(self) -> int:
        self.queue = multiprocessing.get_context("spawn").Manager().Queue()
        return os.getpid()


if __name__ == "__main__":
    cfg = load_config(None, ["cluster.devices_per_node=2"])
    with ray_session(cfg, pool_timeout_s=60) as session:
        group = session.worker_group("actor", ManagerOwner)
        group.call("start_manager")
        print("TEMP", session.temp_dir, flush=True)
        print("READY", flush=True)
        time.sleep(float(sys.argv[1]))
