"""Ray orchestration: pool layout (placement.py, pure), a reserved placement group (bundles.py), the Ray
session that reserves them (pools.py) and worker groups of Ray actors (workers.py), which hand each rank its
torch.distributed environment (`fapo_megatron/dist_env.py`).

Import the submodules directly; this package does not import Ray on its own.
"""
