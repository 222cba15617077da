"""SGLangEngine against a protocol stand-in server (tests/engines/sglang_standin.py), launched as a real process.

Generation is checked against an in-process EmbeddedEngine on the same checkpoint (the stand-in serves each
request row with sampling_seed = seed + row), so plumbing errors (order, log-probs, finish reasons) show.
"""

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from engine_fixtures import char_tokenizer, teacher_forced_logprobs, tiny_qwen2

from fapo_megatron.engine_protocol import EngineError, SamplingParams
from fapo_megatron.engines.embedded import EmbeddedEngine
from fapo_megatron.engines.sglang import SGLangEngine, SGLangServerArgs, checkpoint_parameter_names, require_sglang
from fapo_megatron.engines.weight_sync import (
    bucket_named_tensors,
    flatten_bucket,
    serialize_flattened_bucket,
    tensor_bytes,
    unflatten_bucket,
)

STANDIN = [sys.executable, str(Path(__file__).with_name("sglang_standin.py"))]
PROMPTS = ["abc", "hello world", "1+1="]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def calls(url):
    return requests.get(f"{url}/standin/calls", timeout=10).json()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tok = char_tokenizer()
    paths = {}
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"tiny{seed}")
        tiny_qwen2(seed=seed).save_pretrained(path)
        tok.save_pretrained(path)
        paths[seed] = str(path)
    return paths


def reference(path):
    # Our char tokenizer: transformers 5 reloads a saved one as Qwen2Tokenizer (from model_type), which drops spaces.
    eng = EmbeddedEngine(path, tokenizer=char_tokenizer())
    eng.start()
    return eng


def launch(path, **kwargs):
    args = SGLangServerArgs(model_path=path, port=free_port(), launch_command=STANDIN, tp_size=2)
    engine = SGLangEngine(server=args, tokenizer=char_tokenizer(), startup_timeout_s=120, **kwargs)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine(checkpoints):
    eng = launch(checkpoints[0], bucket_mb=16 / 1024)  # 16 KiB buckets: the tiny model needs several
    yield eng
    eng.shutdown()


def test_generate_matches_in_process_reference(engine, checkpoints):
    ref = reference(checkpoints[0])
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95, n=2, seed=5)
    before = len(calls(engine.url))
    gens = engine.generate(PROMPTS, params)
    assert [g.prompt_index for g in gens] == [0, 0, 1, 1, 2, 2]
    for row, g in enumerate(gens):
        expected = ref.generate([PROMPTS[g.prompt_index]], SamplingParams(**{**vars(params), "n": 1, "seed": 5 + row}))
        assert (g.token_ids, g.text, g.finish_reason) == (
            expected[0].token_ids,
            expected[0].text,
            expected[0].finish_reason,
        )
        assert g.logprobs == pytest.approx(expected[0].logprobs, abs=1e-9)
        tf = teacher_forced_logprobs(ref.model, g.prompt_token_ids, g.token_ids, 0.9)
        assert max(abs(a - b) for a, b in zip(tf, g.logprobs)) <= 1e-5
    new_calls = [c for c in calls(engine.url)[before:] if c["path"] == "/generate"]
    assert [(c["num_rows"], c["return_logprob"]) for c in new_calls] == [(6, True)]  # one batched request


def test_stop_string_kept_in_text(engine):
    free = engine.generate(["hello"], SamplingParams(max_new_tokens=30, temperature=1.0, seed=4))[0]
    stop = free.text[6:9]
    got = engine.generate(["hello"], SamplingParams(max_new_tokens=30, temperature=1.0, seed=4, stop=[stop]))[0]
    assert got.finish_reason == "stop" and got.text == free.text[: free.text.find(stop) + len(stop)]


def test_update_weights_call_sequence_and_buckets(engine, checkpoints):
    new = tiny_qwen2(seed=1)
    named = list(new.state_dict().items())
    start = len(calls(engine.url))
    engine.update_weights([named[:3], named[3:]])  # the engine re-buckets to bucket_mb
    log = calls(engine.url)[start:]
    paths = [c["path"] for c in log]
    num_updates = paths.count("/update_weights_from_tensor")
    assert paths == ["/pause_generation", "/flush_cache"] + ["/update_weights_from_tensor"] * num_updates + [
        "/continue_generation"
    ]
    assert engine.server_version == "0.5.23" and log[0]["body"] == {"mode": "retract"}  # keeps in-flight requests
    updates = [c for c in log if c["path"] == "/update_weights_from_tensor"]
    expected_sizes = [sum(tensor_bytes(t) for _, t in b) for b in bucket_named_tensors(named, 16 * 1024)]
    assert [u["bytes"] for u in updates] == expected_sizes and len(updates) > 2
    assert [n for u in updates for n in u["names"]] == [n for n, _ in named]
    assert all(u["paused"] and u["weight_version"] == "1" and u["tp_entries"] == 2 for u in updates)
    assert all(u["load_format"] == "flattened_bucket" for u in updates)
    assert engine.weight_version == 1 and engine.transport.stats.bucket_bytes == expected_sizes
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
    ref = reference(checkpoints[1]).generate(["hello world"], params)[0]
    assert engine.generate(["hello world"], params)[0].token_ids == ref.token_ids


def test_update_weights_unknown_name_raises_before_sending(engine, checkpoints):
    """A real server only logs a warning for an unknown name, so the engine checks against the served checkpoint."""
    start = len(calls(engine.url))
    named = list(tiny_qwen2(seed=1).state_dict().items())
    with pytest.raises(EngineError, match=r"'model\.layers\.0\.no_such\.weight' is not a parameter .*tiny0"):
        engine.update_weights([named[:1] + [("model.layers.0.no_such.weight", torch.zeros(2))]])
    paths = [c["path"] for c in calls(engine.url)[start:]]
    assert "/update_weights_from_tensor" not in paths  # named[:1] shares the bad name's bucket
    assert paths[-1] == "/continue_generation"  # generation resumes even after a failure
    # Sent anyway, the server skips the name and reports success, as SGLang's load_weights does.
    bucket = [("model.layers.0.no_such.weight", torch.zeros(2))]
    ((flat, metadata),) = flatten_bucket(bucket)
    engine.client.update_weights_from_tensor([serialize_flattened_bucket(flat, metadata)] * 2)
    # The checked names are the model's own: stored tensors plus the tied lm_head.weight the checkpoint leaves out.
    assert checkpoint_parameter_names(checkpoints[0]) == {name for name, _ in named}


def test_release_resume_order(engine):
    start = len(calls(engine.url))
    engine.release_memory()
    with pytest.raises(EngineError, match="released"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))
    engine.resume_memory(tags=["weights"])
    with pytest.raises(EngineError, match="released"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))
    engine.resume_memory(tags=["kv_cache", "cuda_graph"])
    assert len(engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))) == 3
    engine.release_memory()
    engine.update_weights([list(tiny_qwen2(seed=1).state_dict().items())])  # colocated push: weights come back first
    engine.resume_memory()
    log = [(c["path"], c.get("tags")) for c in calls(engine.url)[start:] if c["path"] != "/generate"]
    updates = [entry for entry in log if entry[0] == "/update_weights_from_tensor"]
    assert log == [
        ("/flush_cache", None),
        ("/release_memory_occupation", None),
        ("/resume_memory_occupation", ["weights"]),
        ("/resume_memory_occupation", ["cuda_graph", "kv_cache"]),
        ("/flush_cache", None),
        ("/release_memory_occupation", None),
        ("/resume_memory_occupation", ["weights"]),
        ("/pause_generation", None),
        ("/flush_cache", None),
        *updates,
        ("/continue_generation", None),
        ("/resume_memory_occupation", ["cuda_graph", "kv_cache"]),
    ]
    assert len(engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))) == 3
    # A checkpoint's phase: the weights stay (nothing would restore them), KV cache and graphs are given back.
    start = len(calls(engine.url))
    engine.release_memory(tags=["kv_cache", "cuda_graph"])
    with pytest.raises(EngineError, match="released"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))
    engine.resume_memory(tags=["weights", "kv_cache", "cuda_graph"])  # only what was released is asked for
    log = [(c["path"], c.get("tags")) for c in calls(engine.url)[start:] if c["path"] != "/generate"]
    assert log == [
        ("/flush_cache", None),
        ("/release_memory_occupation", ["cuda_graph", "kv_cache"]),
        ("/resume_memory_occupation", ["cuda_graph", "kv_cache"]),
    ]
    assert len(engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))) == 3


def test_oldest_supported_version_gets_its_tags_and_pause(checkpoints, monkeypatch):
    """SGLang 0.5.3 knows no cuda_graph tag (it is never sent) and reads no pause body; the push still lands
    (element-offset buckets)."""
    monkeypatch.setenv("SGLANG_STANDIN_VERSION", "0.5.3")
    old = launch(checkpoints[0])
    try:
        assert old.server_version == "0.5.3"
        old.release_memory()
        old.update_weights([list(tiny_qwen2(seed=1).state_dict().items())])
        old.resume_memory(tags=["cuda_graph"])  # nothing of it released on this version: nothing asked for
        with pytest.raises(ValueError, match="bogus"):
            old.resume_memory(tags=["bogus"])
        old.resume_memory(tags=["kv_cache", "cuda_graph"])
        log = [c for c in calls(old.url) if c["path"] != "/generate"]
        assert [c.get("tags") for c in log if "memory_occupation" in c["path"]] == [None, ["weights"], ["kv_cache"]]
        assert [c["body"] for c in log if c["path"] == "/pause_generation"] == [{}]
        params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
        expected = reference(checkpoints[1]).generate(["abc"], params)[0]
        assert old.generate(["abc"], params)[0].token_ids == expected.token_ids
    finally:
        old.shutdown()


def test_distributed_transport_broadcasts_weights(engine, checkpoints):
    attached = SGLangEngine(
        url=engine.url,
        tokenizer=char_tokenizer(),
        transport="distributed",
        distributed_master=("127.0.0.1", free_port()),
        distributed_backend="gloo",
        distributed_device="cpu",
        tp_size=1,
    )
    attached.start()
    named = list(tiny_qwen2(seed=0).state_dict().items())
    attached.update_weights([named])
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=8)
    ref = reference(checkpoints[0]).generate(["abc"], params)[0]
    assert attached.generate(["abc"], params)[0].token_ids == ref.token_ids
    attached.shutdown()
    paths = [c["path"] for c in calls(engine.url)]
    assert "/init_weights_update_group" in paths and paths[-1] == "/destroy_weights_update_group"
    dist_updates = [c for c in calls(engine.url) if c["path"] == "/update_weights_from_distributed"]
    assert sum(c["bytes"] for c in dist_updates) == sum(tensor_bytes(t) for _, t in named)


def test_restart_after_server_dies(engine, checkpoints):
    """Runs after the weight pushes above: the restarted server holds checkpoint weights, so we must push again."""
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=1)
    assert engine.weight_version > 0
    first_pid = engine.server_pid
    os.kill(first_pid, signal.SIGKILL)
    time.sleep(0.5)
    with pytest.raises(EngineError, match="push the current weights"):
        engine.generate(PROMPTS, params)
    assert engine.num_restarts == 1 and engine.server_pid != first_pid and engine.healthy()
    engine.update_weights([list(tiny_qwen2(seed=1).state_dict().items())])
    expected = reference(checkpoints[1]).generate(["abc"], params)[0]
    assert engine.generate(["abc"], params)[0].token_ids == expected.token_ids
    os.kill(engine.server_pid, signal.SIGKILL)  # restart budget (1) used up: a clear error, no hang
    time.sleep(0.5)
    with pytest.raises(EngineError, match="restart budget"):
        engine.generate(PROMPTS, params)
    attached = SGLangEngine(url=engine.url, retries=0)
    attached._started = True  # as if it had attached before the server went away
    with pytest.raises(EngineError, match="unreachable"):
        attached.generate([[3, 4]], SamplingParams(max_new_tokens=2))


def test_missing_sglang_is_a_clear_error(checkpoints):
    try:
        import sglang  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("sglang is installed here")
    with pytest.raises(EngineError, match=r"sglang>=0\.5\.3,<=0\.5\.23"):
        require_sglang()
    engine = SGLangEngine(server=SGLangServerArgs(model_path=checkpoints[0], port=free_port()))
    with pytest.raises(EngineError, match="rollout.backend=embedded"):
        engine.start()


def test_flattened_bucket_round_trip_mixed_dtypes():
    import base64
    import pickle

    bucket = [
        ("a.weight", torch.randn(3, 5, dtype=torch.bfloat16)),
        ("b.bias", torch.randn(7)),
        ("c.index", torch.arange(4, dtype=torch.int64).reshape(2, 2)),
    ]
    groups = flatten_bucket(bucket)
    assert [flat.dtype for flat, _ in groups] == [torch.bfloat16, torch.float32, torch.int64]  # one per dtype
    assert [(m.start_idx, m.end_idx) for _, metadata in groups for m in metadata] == [(0, 15), (0, 7), (0, 4)]
    restored = []
    for flat, metadata in groups:
        decoded = pickle.loads(base64.b64decode(serialize_flattened_bucket(flat, metadata)))
        restored += unflatten_bucket(decoded["flattened_tensor"], decoded["metadata"])
    assert [n for n, _ in restored] == [n for n, _ in bucket]
    for (_, got), (_, want) in zip(restored, bucket):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_bucketing_bounds_and_order():
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]  # float32: 4 bytes each
    buckets = list(bucket_named_tensors(named, bucket_bytes=100))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]
