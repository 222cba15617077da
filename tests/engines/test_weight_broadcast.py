"""A weight push to a separate rollout pool: actor rank 0's `send_buckets` over a gloo side group, a rollout worker's
`receive_buckets` into its engine's update_weights. The sender is a spawned process (both ends of one group cannot
share a process: group names are unique per process). How an SGLang engine forwards such buckets to its server over
its DistributedTransport is test_engines_sglang.py's test_distributed_transport_broadcasts_weights."""

import multiprocessing
import socket

import pytest
import torch
from engine_fixtures import char_tokenizer, tiny_qwen2

from fapo_megatron.engine_protocol import SamplingParams
from fapo_megatron.engines.embedded import EmbeddedEngine
from fapo_megatron.engines.weight_sync import init_custom_process_group, receive_buckets, send_buckets

pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(port: int, rank: int, world: int = 2):
    """One side group per test (a name is taken once per process), named by its port."""
    return init_custom_process_group(
        backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank, group_name=f"push{port}"
    )


def _send(port: int, buckets) -> None:
    send_buckets(buckets, _join(port, 0), torch.device("cpu"))


def _sender(port: int, buckets):
    process = multiprocessing.get_context("spawn").Process(target=_send, args=(port, buckets))
    process.start()
    return process


def mixed_buckets():
    torch.manual_seed(0)
    return [
        [("a.weight", torch.randn(3, 5)), ("a.bias", torch.randn(5).bfloat16()), ("b.weight", torch.randn(2, 2))],
        [("steps", torch.arange(7, dtype=torch.int64).reshape(7, 1))],
        [("c.weight", torch.randn(4, 3, 2).half())],
    ]


def test_buckets_arrive_bit_exact_in_order_with_their_names_shapes_and_dtypes():
    port, sent = free_port(), mixed_buckets()
    process = _sender(port, sent)
    received = list(receive_buckets(_join(port, 1), torch.device("cpu")))
    process.join(60)
    assert process.exitcode == 0
    assert len(received) == len(sent)
    for got, want in zip(received, sent):
        # One flat tensor per dtype: a bucket comes back grouped by dtype, in order of first appearance.
        want = sorted(want, key=lambda item: [t.dtype for _, t in want].index(item[1].dtype))
        assert [name for name, _ in got] == [name for name, _ in want]
        for (_, g), (_, w) in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)


def test_embedded_engine_serves_the_pushed_weights():
    engine = EmbeddedEngine(model=tiny_qwen2(seed=1), tokenizer=char_tokenizer())
    engine.start()
    target = tiny_qwen2(seed=0)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    before = engine.generate(["abc"], params)[0]
    assert before.weight_version == 0
    port = free_port()
    process = _sender(port, [list(target.state_dict().items())])
    engine.update_weights(receive_buckets(_join(port, 1), torch.device("cpu")))
    process.join(60)
    assert process.exitcode == 0
    for name, tensor in target.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], tensor), name
    reference = EmbeddedEngine(model=target, tokenizer=char_tokenizer())
    reference.start()
    after = engine.generate(["abc"], params)[0]
    assert after.token_ids == reference.generate(["abc"], params)[0].token_ids
    assert after.weight_version == 1
