"""A rollout pool apart from the actor (`rollout.placement=separate`): real local Ray, two gloo actor ranks (TP=2),
two RolloutWorkers each hosting an embedded engine. The probes below read what each side holds; they subclass the
real workers (sent to Ray by value) and add nothing but the reading."""

import os
import sys

import pytest
import ray.cloudpickle
import torch

from fapo_megatron.cluster.pools import ray_session
from fapo_megatron.cluster.role_groups import PolicyGroup, RolloutGroup
from fapo_megatron.config import load_config, to_dict
from fapo_megatron.engine_protocol import SamplingParams
from fapo_megatron.roles.policy import PolicyWorker
from fapo_megatron.roles.rollout import RolloutWorker

pytestmark = pytest.mark.timeout(900)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ProbePolicy(PolicyWorker):
    def exported(self) -> dict[str, torch.Tensor]:
        """The actor's HF-named weights as a push sends them (every rank gathers; rank 0's answer is the whole)."""
        before = self.phase
        self._enter("weight_sync")
        weights = {name: t.clone() for bucket in self.actor.export_hf_weights(1 << 30) for name, t in bucket}
        self._enter(before)
        return weights


class ProbeRollout(RolloutWorker):
    def engine_weights(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.engine.model.state_dict().items()}


@pytest.fixture(scope="module")
def pools():
    os.environ["RAY_AUTH_MODE"] = "disabled"  # local test cluster only
    overrides = [
        "model.dtype=float32",
        "parallel.tp=2",
        "parallel.use_distributed_optimizer=false",
        "cluster.devices_per_node=2",
        "rollout.placement=separate",
        "cluster.rollout_devices=2",
        "rollout.max_response_tokens=8",
        "data.batch_size=4",
        "algorithm.mini_batch_size=2",
        "rollout.n=2",
        "parallel.micro_batch_size=2",
        "algorithm.overlong.buffer=4",
    ]
    cfg = load_config(None, overrides)
    with ray_session(cfg, pool_timeout_s=60) as session:
        policy = PolicyGroup(
            session.worker_group("actor", ProbePolicy, init_args=(to_dict(cfg),), engine_role="rollout")
        )
        rollout = RolloutGroup(
            session.worker_group("rollout", ProbeRollout, init_args=(to_dict(cfg),), engine_role="rollout")
        )
        yield policy, rollout


def test_every_engine_holds_the_actors_exact_weights_after_a_push(pools):
    policy, rollout = pools
    actor = policy.group.call("exported")[0]
    before = rollout.group.call("engine_weights")
    # Both sides start from their own random init (norm weights are ones on both): the matrices differ.
    matrices = [name for name, t in actor.items() if t.dim() == 2]
    assert matrices and all(not torch.equal(replica[n], actor[n]) for replica in before for n in matrices)
    rollout.connect(policy)
    sync = policy.sync_weights()
    assert sync[0]["bytes"] == sum(t.numel() * t.element_size() for t in actor.values())
    for replica in rollout.group.call("engine_weights"):
        for name, tensor in actor.items():
            assert torch.equal(replica[name], tensor), name


def test_the_actor_ranks_host_no_engine_and_the_pool_generates_every_prompt(pools):
    policy, rollout = pools
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]]
    params = SamplingParams(max_new_tokens=4, n=2, seed=5)
    assert policy.generate(prompts, params) == []
    generations = rollout.generate(prompts, params)
    assert [g.prompt_index for g in generations] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [g.prompt_token_ids for g in generations[::2]] == prompts


def test_a_push_asked_during_a_generation_lands_after_it(pools):
    """What trainer.off_policy_steps=1 relies on: the samples under way keep the weights they started with."""
    policy, rollout = pools
    prompts = [[3, 4, 5], [6, 7]]
    params = SamplingParams(max_new_tokens=4, n=2, seed=5)
    version = rollout.generate(prompts, params)[0].weight_version
    pending = rollout.generate_async(prompts, params)
    policy.sync_weights()
    assert {g.weight_version for g in pending.result()} == {version}
    assert {g.weight_version for g in rollout.generate(prompts, params)} == {version + 1}
