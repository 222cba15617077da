"""GenRM replicas on a pool of their own (`genrm.placement=separate`) fed while the rollout runs: real local Ray,
two real GenRMWorkers, each an embedded engine over a tiny random model judging greedily."""

import dataclasses
import os

import pytest
import torch

from fapo_megatron.cluster.pools import ray_session
from fapo_megatron.cluster.role_groups import GenRMGroup, ReplicaVerdictStream
from fapo_megatron.config import load_config, to_dict
from fapo_megatron.data.arith_tokenizer import arith_tokenizer
from fapo_megatron.genrm.types import JudgeRequest, VerdictStatus
from fapo_megatron.roles.genrm import GenRMWorker

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def genrm_model(tmp_path_factory):
    """A random tiny Llama with the character tokenizer and a chat template: it writes a few arbitrary characters
    per prompt, different for different prompts, so a verdict given to the wrong request shows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = arith_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}]\n{{ m.content }}\n{% endfor %}[assistant]\n"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("genrm")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def replicas(genrm_model):
    os.environ["RAY_AUTH_MODE"] = "disabled"  # local test cluster only
    overrides = [
        "genrm.backend=embedded",
        f"genrm.model_path={genrm_model}",
        "genrm.placement=separate",
        "cluster.genrm_devices=2",
        "genrm.temperature=0",
        "genrm.max_new_tokens=6",
        "genrm.concurrency=1",  # one request per engine call: no padding, so both paths compute alike
    ]
    cfg = load_config(None, overrides)
    with ray_session(cfg, pool_timeout_s=60) as session:
        group = session.worker_group("genrm", GenRMWorker, init_args=(to_dict(cfg),), engine_role="genrm")
        yield GenRMGroup(group, cfg.genrm)


def _requests(num: int) -> list[JudgeRequest]:
    return [
        JudgeRequest(
            f"What is {a} + {a + 3}?", f"{a} + {a + 3} = {2 * a + 3}\n\nSo \\boxed{{{2 * a + 3}}}.", str(2 * a + 3)
        )
        for a in range(num)
    ]


def test_streamed_verdicts_are_the_synchronous_ones_each_under_its_key(replicas):
    requests = _requests(7)
    expected = replicas.judge(requests)  # split over the replicas in order, as a colocated step would
    assert len({v.raw_text for v in expected}) > 1  # the answers tell requests apart
    stream = replicas.open_stream()
    assert isinstance(stream, ReplicaVerdictStream)
    order = [3, 0, 6, 1, 5, 2, 4]  # rollouts finish in any order; keys are their positions
    for i in order:
        stream.submit(i, requests[i])
    with pytest.raises(ValueError, match="submitted twice"):
        stream.submit(3, requests[3])
    verdicts = stream.collect()
    assert sorted(verdicts) == list(range(7))  # one verdict per key, none missing, none extra
    for i, verdict in verdicts.items():
        assert (verdict.status, verdict.raw_text, verdict.num_steps) == (
            expected[i].status,
            expected[i].raw_text,
            expected[i].num_steps,
        ), i
    assert all(v.status == VerdictStatus.UNPARSEABLE for v in verdicts.values())  # a random model writes no box
    assert stream.busy_seconds > 0
    with pytest.raises(RuntimeError, match="after collect"):
        stream.submit(7, requests[0])


def test_requests_leave_on_submit_not_at_collect(replicas):
    """With a deadline that passes the moment collect starts, only requests already judged get real verdicts: all
    of them do, so each left when it was submitted."""
    stream = ReplicaVerdictStream(replicas.group, dataclasses.replace(replicas.genrm, deadline_s=1e-3))
    requests = _requests(2)  # one per replica: both leave at once (more would wait for a free replica)
    for i, request in enumerate(requests):
        stream.submit(i, request)
    replicas.group.call("enter", "genrm")  # a no-op on awake engines; a Ray actor runs its calls in order, so this
    # returns only once every replica has answered what it was sent
    verdicts = stream.collect()
    assert [verdicts[i].status for i in range(2)] == [VerdictStatus.UNPARSEABLE] * 2
    assert all(v.raw_text for v in verdicts.values())


def test_a_request_not_back_by_the_deadline_is_a_timeout_verdict(replicas):
    stream = ReplicaVerdictStream(replicas.group, dataclasses.replace(replicas.genrm, deadline_s=1e-3))
    busy = ReplicaVerdictStream(replicas.group, replicas.genrm)
    long = JudgeRequest("What is 1 + 1?", "1 + 1 = 2\n\n" * 40 + "\\boxed{2}", "2")
    for i in range(4):
        busy.submit(i, long)
    stream.submit("late", _requests(1)[0])  # queued on a replica behind the busy stream's calls
    verdict = stream.collect()["late"]
    assert verdict.status == VerdictStatus.TIMEOUT and verdict.detail == "batch deadline of 0.0s passed"
    assert verdict.num_steps == 2
    assert [v.status for v in busy.collect().values()] == [VerdictStatus.UNPARSEABLE] * 4


def test_colocated_replicas_judge_after_the_rollout_only(replicas):
    """Colocated, the engines share the actor's devices: no stream, and awake only while they judge."""
    requests = _requests(3)
    expected = [v.raw_text for v in replicas.judge(requests)]
    colocated = GenRMGroup(replicas.group, dataclasses.replace(replicas.genrm, placement="colocated"))
    try:
        assert colocated.open_stream() is None
        assert [v.raw_text for v in colocated.judge(requests)] == expected
        released = replicas.judge(requests)  # released again after judging: asked now, each one is an error
        assert all(v.status == VerdictStatus.ERROR and "memory is released" in v.detail for v in released)
    finally:
        replicas.group.call("enter", "genrm")
