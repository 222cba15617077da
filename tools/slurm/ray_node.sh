#!/bin/bash
# One Ray node of a Slurm job, run by fapo.sbatch as `srun -w NODE ... ray_node.sh ROLE`.
#   ip      print the address other nodes reach this node at (FAPO_SOCKET_IFNAME's, else the first of hostname -I)
#   head    start the Ray head (GCS on FAPO_RAY_PORT) and stay in the foreground
#   worker  wait for the head at FAPO_RAY_ADDRESS, join it, and stay in the foreground
# Foreground (`--block`) keeps every Ray process inside the srun step: SIGTERM to the step stops this node's Ray.
# Each node advertises a custom resource "fapo_node:<slurm node name>" so a missing node can be named.
# Environment: FAPO_RAY_PORT, FAPO_RAY_ADDRESS (worker), FAPO_RAY_CPUS / FAPO_RAY_GPUS (empty: autodetect),
# FAPO_RAY_JOIN_TIMEOUT_S, TMPDIR (Ray's temp folder goes under it on the head).
set -euo pipefail

role=${1:?usage: ray_node.sh ip|head|worker}
node=${SLURMD_NODENAME:?ray_node.sh must run inside a Slurm step}

node_ip() {
    if [ -n "${FAPO_SOCKET_IFNAME:-}" ]; then
        ip -4 -o addr show "$FAPO_SOCKET_IFNAME" | awk '{split($4, a, "/"); print a[1]; exit}'
    else
        hostname -I | awk '{print $1}'
    fi
}

resources=(--resources "{\"fapo_node:$node\": 1}")
[ -n "${FAPO_RAY_CPUS:-}" ] && resources+=(--num-cpus "$FAPO_RAY_CPUS")
[ -n "${FAPO_RAY_GPUS:-}" ] && resources+=(--num-gpus "$FAPO_RAY_GPUS")
common=(--block --disable-usage-stats --node-ip-address "$(node_ip)" "${resources[@]}")

case $role in
ip)
    node_ip
    ;;
head)
    temp=()
    [ -n "${TMPDIR:-}" ] && temp=(--temp-dir "$TMPDIR/ray")
    exec ray start --head --port "${FAPO_RAY_PORT:?}" --include-dashboard=false "${temp[@]}" "${common[@]}"
    ;;
worker)
    deadline=$((SECONDS + ${FAPO_RAY_JOIN_TIMEOUT_S:-600}))
    until ray health-check --address "${FAPO_RAY_ADDRESS:?}" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "ray_node.sh: $node: no Ray head answered at $FAPO_RAY_ADDRESS" >&2
            exit 1
        fi
        sleep 2
    done
    exec ray start --address "$FAPO_RAY_ADDRESS" "${common[@]}"
    ;;
*)
    echo "ray_node.sh: unknown role $role (ip, head or worker)" >&2
    exit 2
    ;;
esac
