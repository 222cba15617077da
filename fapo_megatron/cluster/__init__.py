"""Ray orchestration: pool layout (placement.py, pure), a reserved placement group (bundles.py), the Ray
session that reserves them (pools.py), worker groups of Ray actors (workers.py) and the torch.distributed
environment they hand out (dist_env.py).

Import the submodules directly; this package does not import Ray on its own.
"""
