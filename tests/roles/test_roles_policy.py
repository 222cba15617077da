"""The colocated phase order of a real PolicyWorker (MegatronActor over gloo, EmbeddedEngine), read from a log of
every move of the actor's kinds and the engine's memory parts (policy_order_worker.py, one process)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fapo_megatron.phases import RESIDENCY

WORKER = Path(__file__).with_name("policy_order_worker.py")
ALL_KINDS = ["grads", "optimizer", "params"]
ALL_PARTS = ["cuda_graph", "kv_cache", "weights"]
SETTINGS = [
    "data.batch_size=2",
    "rollout.n=2",
    "algorithm.mini_batch_size=1",
    "parallel.micro_batch_size=2",
    "parallel.use_distributed_optimizer=false",
]


def run_worker(tmp_path: Path, *overrides: str) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(
        os.environ,
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        FAPO_DIST_BACKEND="gloo",
        OMP_NUM_THREADS="1",
    )
    out = tmp_path / "log.json"
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out), str(tmp_path / "ckpt"), *SETTINGS, *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def moves(events: list[dict]) -> list[tuple[str, list[str], list[str]]]:
    """(event, parts, what the actor held then), generation calls left out."""
    return [(e["event"], e["parts"], e["actor"]) for e in events if e["event"] != "engine.generate"]


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("offload"), "parallel.offload_actor=true")


def test_engine_starts_after_the_actor_left_the_device(offloaded):
    assert moves(offloaded["init"]) == [("actor.offload", ALL_KINDS, ALL_KINDS), ("engine.start", [], [])]


def test_a_step_moves_memory_in_the_table_order(offloaded):
    calls = {}
    for name, events, phase in offloaded["calls"]:
        calls.setdefault(name, []).append((moves(events), phase))
    first_push, push = calls["sync_weights"]
    # Before the loop the engine is resident: the push's phase frees its KV cache and graphs, the actor brings
    # its parameters, then (after the push) the reverse.
    assert first_push == (
        [
            ("engine.release", ["cuda_graph", "kv_cache"], []),
            ("actor.onload", ["params"], []),
            ("engine.update_weights", [], ["params"]),
            ("actor.offload", ["params"], ["params"]),
            ("engine.resume", ["cuda_graph", "kv_cache"], []),
        ],
        "rollout",
    )
    assert calls["generate"] == [([], "rollout")]  # already in its phase: nothing moves
    assert calls["enter_genrm"] == [([("engine.release", ALL_PARTS, [])], "genrm")]
    assert calls["compute_logprobs"] == [([("actor.onload", ["params"], [])], "logprobs")]  # parameters only
    assert calls["train_step"] == [([("actor.onload", ["grads", "optimizer"], ["params"])], "update")]
    # After the update: gradients and optimizer state leave (the offload empties the allocator cache) before the
    # engine takes its weights back; the actor's parameters leave only once pushed; KV cache and graphs come last.
    assert push == (
        [
            ("actor.offload", ["grads", "optimizer"], ALL_KINDS),
            ("engine.resume", ["weights"], ["params"]),
            ("engine.update_weights", [], ["params"]),
            ("actor.offload", ["params"], ["params"]),
            ("engine.resume", ["cuda_graph", "kv_cache"], []),
        ],
        "rollout",
    )
    # A checkpoint never brings gradients back beside the engine, which keeps only its weights meanwhile.
    assert calls["save"] == [
        (
            [
                ("engine.release", ["cuda_graph", "kv_cache"], []),
                ("actor.onload", ["optimizer", "params"], []),
                ("actor.offload", ["optimizer", "params"], ["optimizer", "params"]),
                ("engine.resume", ["cuda_graph", "kv_cache"], []),
            ],
            "rollout",
        )
    ]


def test_ledger_matches_the_table(offloaded):
    """The ledger's actor bytes per phase are the table's kinds, priced from the step's own update (fp32 Adam
    without the distributed optimizer: gradients 4 B and two moments 8 B per 4-byte parameter)."""
    ledger = offloaded["ledger"]
    params = ledger["memory/logprobs/actor_bytes"]
    price = {"params": params, "grads": params, "optimizer": 2 * params}
    for phase in ("rollout", "genrm", "logprobs", "update", "weight_sync"):
        expected = sum(price[kind] for kind in RESIDENCY[phase].actor)
        assert ledger[f"memory/{phase}/actor_bytes"] == expected, phase
    assert params > 0 and ledger["memory/weight_sync/actor_grads_optimizer_bytes"] == 0


def test_without_offload_only_the_engine_moves(tmp_path):
    log = run_worker(tmp_path, "parallel.offload_actor=false")
    assert moves(log["init"]) == [("engine.start", [], ALL_KINDS)]
    for name, events, _ in log["calls"]:
        assert all(not e["event"].startswith("actor.") for e in events), name
    push = [moves(events) for name, events, _ in log["calls"] if name == "sync_weights"][-1]
    assert [e[:2] for e in push] == [
        ("engine.resume", ["weights"]),
        ("engine.update_weights", []),
        ("engine.resume", ["cuda_graph", "kv_cache"]),
    ]
