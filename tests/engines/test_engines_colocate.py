"""ColocatedScheduler with embedded engines: phase order enforced, memory handed over, weights pushed, times kept."""

import time

import pytest
from engine_fixtures import char_tokenizer, tiny_qwen2

from fapo_megatron.engine_protocol import EngineError, SamplingParams
from fapo_megatron.engines.colocate import PHASES, ColocatedScheduler, PhaseOrderError
from fapo_megatron.engines.embedded import EmbeddedEngine
from fapo_megatron.engines.weight_sync import bucket_named_tensors

PROMPTS = ["abc", "1+1="]
PARAMS = SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=3)


def embedded(seed):
    engine = EmbeddedEngine(model=tiny_qwen2(seed=seed), tokenizer=char_tokenizer())
    engine.start()
    return engine


def test_full_step_hands_memory_over_and_pushes_weights():
    rollout, genrm = embedded(0), embedded(2)
    sched = ColocatedScheduler(rollout, genrm)
    assert not genrm.healthy()  # the GenRM starts released: the rollout owns the devices
    gens = sched.rollout(PROMPTS, PARAMS)
    assert len(gens) == 4
    with pytest.raises(EngineError, match="released"):
        genrm.generate(PROMPTS, PARAMS)
    sched.switch_to_genrm()
    assert genrm.healthy() and not rollout.healthy()
    verdicts = sched.genrm(lambda: genrm.generate([g.text or "x" for g in gens], SamplingParams(max_new_tokens=4)))
    assert len(verdicts) == 4
    sched.release_genrm()
    assert not genrm.healthy() and not rollout.healthy()

    def train_step():
        time.sleep(0.05)
        return list(tiny_qwen2(seed=1).state_dict().items())

    new_weights = sched.train(train_step)
    sched.push_weights(lambda: bucket_named_tensors(new_weights, bucket_bytes=16 * 1024))
    assert not rollout.healthy()  # weights pushed while released; memory comes back in the next phase
    sched.resume_rollout()
    assert rollout.healthy() and sched.steps_done == 1 and sched.next_phase == "rollout"

    seconds = sched.step_seconds()
    assert list(seconds) == list(PHASES) and all(s >= 0 for s in seconds.values())
    assert seconds["train"] >= 0.05
    assert all(r.free_bytes_before is None and r.free_bytes_after is None for r in sched.records)  # CPU run
    expected = embedded(1).generate(PROMPTS, PARAMS)
    assert [g.token_ids for g in sched.rollout(PROMPTS, PARAMS)] == [g.token_ids for g in expected]


def test_out_of_order_phase_raises_and_leaves_state():
    rollout = embedded(0)
    sched = ColocatedScheduler(rollout)
    with pytest.raises(PhaseOrderError, match="'train' called out of turn; next is 'rollout'"):
        sched.train(lambda: None)
    sched.rollout(PROMPTS, PARAMS)
    with pytest.raises(PhaseOrderError, match="'rollout' called out of turn; next is 'switch_to_genrm'"):
        sched.rollout(PROMPTS, PARAMS)
    with pytest.raises(PhaseOrderError, match="'push_weights'"):
        sched.push_weights(lambda: pytest.fail("the weight source must not be read out of turn"))
    assert rollout.healthy() and sched.next_phase == "switch_to_genrm"
    sched.switch_to_genrm()
    sched.genrm(lambda: None)  # no GenRM engine (program checker): memory phases are no-ops
    sched.release_genrm()
    sched.train(lambda: None)
    sched.push_weights([])
    sched.resume_rollout()
    assert sched.steps_done == 1 and rollout.healthy()
