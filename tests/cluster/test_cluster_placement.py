"""Pool layouts and bundle ordering: pure functions, no Ray cluster."""

import pytest

from fapo_megatron.cluster.placement import compute_layout, order_bundles
from fapo_megatron.cluster.workers import rank_environments
from fapo_megatron.config import ConfigError, load_config


def _layout(*overrides, cpus_per_gpu=1.0):
    return compute_layout(load_config(None, list(overrides)), cpus_per_gpu)


def test_default_cpu_colocated_program_genrm_is_one_pool_without_genrm_workers():
    layout = _layout("cluster.devices_per_node=2")
    assert list(layout.pools) == ["actor"]
    pool = layout.pools["actor"]
    assert (pool.num_bundles, pool.bundle, pool.strategy, pool.num_nodes) == (2, {"CPU": 1.0}, "STRICT_PACK", 1)
    assert pool.roles == ("actor", "rollout") and pool.share == 0.5
    assert sorted(layout.placements) == ["actor", "rollout"]
    assert [(p.rank, p.pool, p.bundle) for p in layout.placements["actor"]] == [(0, "actor", 0), (1, "actor", 1)]


def test_cuda_colocated_model_genrm_shares_every_bundle_across_nodes():
    layout = _layout(
        "cluster.device=cuda",
        "cluster.num_nodes=2",
        "cluster.devices_per_node=4",
        "genrm.backend=embedded",
        cpus_per_gpu=4,
    )
    assert list(layout.pools) == ["actor"]
    pool = layout.pools["actor"]
    assert pool.bundle == {"GPU": 1.0, "CPU": 4.0}
    assert (pool.num_bundles, pool.bundles_per_node, pool.num_nodes, pool.strategy) == (8, 4, 2, "PACK")
    assert pool.roles == ("actor", "rollout", "genrm")
    assert pool.share == 0.3333 and 3 * pool.share <= 1.0
    for role in ("actor", "rollout", "genrm"):
        assert [(p.pool, p.bundle) for p in layout.placements[role]] == [("actor", r) for r in range(8)]
    assert layout.pool_of("genrm") is pool


def test_cuda_separate_genrm_gets_its_own_pool():
    layout = _layout(
        "cluster.device=cuda",
        "cluster.devices_per_node=4",
        "cluster.genrm_devices=2",
        "genrm.backend=sglang",
        "genrm.placement=separate",
        "genrm.tp=2",
    )
    assert sorted(layout.pools) == ["actor", "genrm"]
    actor, genrm = layout.pools["actor"], layout.pools["genrm"]
    assert (actor.num_bundles, actor.roles, actor.strategy) == (4, ("actor", "rollout"), "STRICT_PACK")
    assert (genrm.num_bundles, genrm.roles, genrm.share) == (2, ("genrm",), 1.0)
    assert genrm.bundle == {"GPU": 1.0, "CPU": 1.0}
    assert [(p.rank, p.pool, p.bundle) for p in layout.placements["genrm"]] == [(0, "genrm", 0)]  # one tp=2 replica
    assert layout.num_workers("actor") == 4 and layout.num_workers("genrm") == 1


def test_separate_genrm_pool_larger_than_a_node_spans_nodes():
    layout = _layout(
        "cluster.device=cuda",
        "cluster.devices_per_node=2",
        "cluster.genrm_devices=6",
        "genrm.backend=embedded",
        "genrm.placement=separate",
    )
    genrm = layout.pools["genrm"]
    assert (genrm.num_bundles, genrm.bundles_per_node, genrm.num_nodes, genrm.strategy) == (6, 2, 3, "PACK")


@pytest.mark.parametrize("placement", ["colocated", "separate"])
def test_external_genrm_needs_no_pool_or_workers(placement):
    layout = _layout(
        "cluster.device=cuda",
        "cluster.devices_per_node=2",
        "genrm.backend=external",
        "genrm.url=http://judge:8000",
        f"genrm.placement={placement}",
    )
    assert list(layout.pools) == ["actor"] and "genrm" not in layout.placements
    with pytest.raises(KeyError, match="role 'genrm' has no workers"):
        layout.pool_of("genrm")


def test_sizes_that_do_not_divide_are_named():
    with pytest.raises(ConfigError, match=r"rollout.tp=3 does not divide the 4 actor devices"):
        _layout("cluster.devices_per_node=4", "rollout.tp=3")
    with pytest.raises(ConfigError, match=r"genrm.tp=2 does not divide the 3 cluster.genrm_devices"):
        _layout("cluster.genrm_devices=3", "genrm.backend=embedded", "genrm.placement=separate", "genrm.tp=2")


def test_cuda_separate_rollout_pool_holds_the_engines_and_the_actor_pool_none():
    layout = _layout(
        "cluster.device=cuda",
        "cluster.devices_per_node=4",
        "rollout.placement=separate",
        "cluster.rollout_devices=8",
        "rollout.tp=2",
        "rollout.sglang_port=31000",
        "genrm.backend=sglang",
        "genrm.placement=separate",
        "cluster.genrm_devices=2",
    )
    assert sorted(layout.pools) == ["actor", "genrm", "rollout"]
    actor, rollout = layout.pools["actor"], layout.pools["rollout"]
    assert (actor.num_bundles, actor.roles, actor.share) == (4, ("actor",), 1.0)
    assert (rollout.num_bundles, rollout.bundles_per_node, rollout.num_nodes, rollout.strategy) == (8, 4, 2, "PACK")
    assert (rollout.roles, rollout.share, rollout.bundle) == (("rollout",), 1.0, {"GPU": 1.0, "CPU": 1.0})
    # One RolloutWorker per tp=2 replica, on the replica's first bundle of the rollout pool, never the actor's.
    assert [(p.rank, p.pool, p.bundle) for p in layout.placements["rollout"]] == [
        (r, "rollout", 2 * r) for r in range(4)
    ]
    assert layout.pool_of("rollout") is rollout and layout.pool_of("actor") is actor
    engines = layout.engines["rollout"]
    assert [(e.node, e.base_gpu_id, e.gpu_ids, e.port) for e in engines] == [
        (0, 0, (0, 1), 31000),
        (0, 2, (2, 3), 31002),
        (1, 0, (0, 1), 31000),
        (1, 2, (2, 3), 31002),
    ]
    assert [e.port for e in layout.engines["genrm"]] == [32000, 32001]  # GenRM servers stay above the rollout ones


def test_cpu_separate_rollout_pool_of_one_engine():
    layout = _layout("cluster.devices_per_node=2", "rollout.placement=separate", "cluster.rollout_devices=1")
    assert layout.pools["actor"].roles == ("actor",) and layout.pools["rollout"].num_bundles == 1
    assert [(p.rank, p.pool, p.bundle) for p in layout.placements["rollout"]] == [(0, "rollout", 0)]
    assert layout.num_workers("actor") == 2 and layout.num_workers("rollout") == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.placement=separate"], r"rollout.placement=separate needs cluster.rollout_devices > 0"),
        (
            ["rollout.placement=separate", "cluster.rollout_devices=3", "rollout.tp=2"],
            r"rollout.tp=2 does not divide the 3 cluster.rollout_devices",
        ),
        (
            ["rollout.placement=separate", "cluster.rollout_devices=2", "rollout.sglang_url=http://127.0.0.1:1"],
            r"rollout.sglang_url=http://127.0.0.1:1 attaches to a running server",
        ),
        (["cluster.rollout_devices=2"], r"cluster.rollout_devices=2 is only used with rollout.placement=separate"),
        (["trainer.off_policy_steps=1"], r"trainer.off_policy_steps=1 needs rollout.placement=separate"),
        (
            ["rollout.placement=separate", "cluster.rollout_devices=1", "trainer.off_policy_steps=2"],
            r"trainer.off_policy_steps=2 is out of range",
        ),
    ],
)
def test_rollout_placement_mistakes_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bundles_sort_by_numeric_ip_then_gpu_then_hostnames_last():
    nodes = [("10.0.0.10", 0), ("10.0.0.2", 1), ("node-b", 0), ("10.0.0.2", 0), ("10.0.0.9", 3), ("10.0.0.10", 1)]
    # As strings 10.0.0.10 < 10.0.0.2; numerically .2 < .9 < .10.
    assert order_bundles(nodes) == [3, 1, 4, 0, 5, 2]
    assert order_bundles([("127.0.0.1", None)] * 3) == [0, 1, 2]
    assert order_bundles([("10.0.0.1", 0), ("::1", 0)]) == [0, 1]


def test_rank_environments_on_cuda_widen_visible_devices_to_the_node():
    nodes = [("10.0.0.1", [2]), ("10.0.0.1", [5]), ("10.0.0.2", [0]), ("10.0.0.2", [1])]
    envs = rank_environments(nodes, 29500, "cuda")
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"] and {e["WORLD_SIZE"] for e in envs} == {"4"}
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0", "1"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2,5", "2,5", "0,1", "0,1"]
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"], e["FAPO_DIST_BACKEND"]) for e in envs} == {
        ("10.0.0.1", "29500", "nccl")
    }


def test_rank_environments_on_cpu_count_local_ranks_per_node_and_use_gloo():
    envs = rank_environments([("a", []), ("b", []), ("a", [])], 1234, "cpu")
    assert [(e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"]) for e in envs] == [("0", "2"), ("0", "1"), ("1", "2")]
    assert all("CUDA_VISIBLE_DEVICES" not in e and e["FAPO_DIST_BACKEND"] == "gloo" for e in envs)


def _check_engines(engines, per_node, tp, pool_bundles):
    """Every device of the pool in exactly one replica, replicas inside their node, ports unique per node."""
    used = [(e.node, gpu) for e in engines for gpu in e.gpu_ids]
    assert sorted(used) == [(b // per_node, b % per_node) for b in range(pool_bundles)]  # no overlap, none idle
    assert all(len(e.gpu_ids) == tp and max(e.gpu_ids) < per_node for e in engines)
    assert all((e.node, e.base_gpu_id) == divmod(e.bundle, per_node) for e in engines)
    ports = [(e.node, e.port) for e in engines]
    assert len(set(ports)) == len(ports)


def test_colocated_genrm_tp2_and_rollout_tp4_on_three_nodes_never_share_a_gpu():
    layout = _layout(
        "cluster.device=cuda",
        "cluster.num_nodes=3",
        "cluster.devices_per_node=8",
        "genrm.backend=sglang",
        "genrm.tp=2",
        "rollout.tp=4",
        "rollout.sglang_port=30000",
        "rollout.n=6",  # 32 prompts x 6 rollouts split over dp=24
    )
    rollout, genrm = layout.engines["rollout"], layout.engines["genrm"]
    _check_engines(rollout, 8, 4, 24)
    _check_engines(genrm, 8, 2, 24)
    assert [(e.node, e.gpu_ids, e.port) for e in rollout[:3]] == [
        (0, (0, 1, 2, 3), 30000),
        (0, (4, 5, 6, 7), 30004),
    ] + [(1, (0, 1, 2, 3), 30000)]
    assert [(e.node, e.gpu_ids, e.port) for e in genrm[3:5]] == [(0, (6, 7), 31006), (1, (0, 1), 31000)]
    assert {e.port for e in genrm}.isdisjoint(e.port for e in rollout)  # both servers of a GPU can listen at once
    # one GenRM worker per replica, on the replica's first bundle; the rollout engines' hosts are actor ranks
    assert [p.bundle for p in layout.placements["genrm"]] == list(range(0, 24, 2))
    assert layout.num_workers("genrm") == 12 and [e.bundle for e in rollout] == list(range(0, 24, 4))


def test_separate_genrm_tp2_pool_over_two_nodes():
    layout = _layout(
        "cluster.device=cuda",
        "cluster.num_nodes=1",
        "cluster.devices_per_node=4",
        "cluster.genrm_devices=8",
        "genrm.backend=sglang",
        "genrm.placement=separate",
        "genrm.tp=2",
    )
    genrm = layout.engines["genrm"]
    _check_engines(genrm, 4, 2, 8)
    assert [(p.pool, p.bundle) for p in layout.placements["genrm"]] == [("genrm", b) for b in (0, 2, 4, 6)]
    _check_engines(layout.engines["rollout"], 4, 1, 4)


def test_an_engine_that_would_straddle_nodes_is_refused_naming_the_key():
    # tp=8 divides the 8 devices of two 4-GPU nodes, but a replica would span both
    with pytest.raises(
        ConfigError, match=r"genrm.tp=8 does not divide the 4 devices of a node \(cluster.devices_per_node"
    ):
        _layout(
            "cluster.device=cuda",
            "cluster.num_nodes=2",
            "cluster.devices_per_node=4",
            "genrm.backend=sglang",
            "genrm.tp=8",
        )


def test_rank_environments_widen_visible_devices_to_the_pools_gpus_on_the_node():
    # GenRM replicas of tp=2 on bundles 0 and 2 of a 4-GPU node: each sees the node's pool GPUs, so its
    # EnginePlacement.gpu_ids (0, 1) and (2, 3) are valid indices
    pool = [("10.0.0.1", gpu) for gpu in range(4)]
    envs = rank_environments([("10.0.0.1", [0]), ("10.0.0.1", [2])], 29500, "cuda", pool)
    assert [(e["CUDA_VISIBLE_DEVICES"], e["LOCAL_RANK"]) for e in envs] == [("0,1,2,3", "0"), ("0,1,2,3", "2")]
