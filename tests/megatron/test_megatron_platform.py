"""The megatron platform joins torch.distributed through dist_env: the default group and megatron-core's TP/PP/DP
groups all take the one timeout (set to an odd value in a fresh process, so neither torch's nor megatron's
30-minute default can pass for it; the built groups are read back)."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from fapo_megatron import dist_env

    dist_env.PROCESS_GROUP_TIMEOUT_MINUTES = 7
    from fapo_megatron.megatron import model as mcore
    from fapo_megatron.megatron import platform

    env = platform.setup("cpu")
    again = platform.setup("cpu")
    mcore.init_model_parallel(1, 1, seed=0)
    groups = {
        "world": dist.group.WORLD,
        "tp": parallel_state.get_tensor_model_parallel_group(),
        "dp": parallel_state.get_data_parallel_group(),
    }
    timeouts = {k: g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for k, g in groups.items()}
    print(json.dumps({"timeouts": timeouts, "same": env == again, "rank": env.rank, "local": env.local_rank}))
    """
)


def test_platform_groups_share_the_one_timeout(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for key in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "FAPO_DIST_BACKEND"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = 7 * 60
    assert result["timeouts"] == {"world": expected, "tp": expected, "dp": expected}
    assert result["same"] and (result["rank"], result["local"]) == (0, 0)
