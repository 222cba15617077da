"""SGLangEngine against a protocol stand-in server (tests/engines/sglang_standin.py), launched as a real process.

Generation is checked against an in-process EmbeddedEngine on the same checkpoint (the stand-in serves each
request row with sampling_seed = seed + row), so plumbing errors (order, log-probs, finish reasons) show.
"""

import os
import signal
import socket
import sys
import threading
import time
import warnings
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


def launch(path, *, deterministic=True, cpu_backup=False, attempts=3, **kwargs):
    """A stand-in server on a free port. The port is free when picked, but another test process (Ray, gloo) can take
    it before the server binds it, seconds later: a server that exits on "Address already in use" gets a new port."""
    for attempt in range(attempts):
        args = SGLangServerArgs(
            model_path=path,
            port=free_port(),
            launch_command=STANDIN,
            tp_size=2,
            enable_deterministic_inference=deterministic,
            enable_weights_cpu_backup=cpu_backup,
        )
        engine = SGLangEngine(server=args, tokenizer=char_tokenizer(), startup_timeout_s=120, **kwargs)
        try:
            engine.start()
            return engine
        except EngineError as err:
            log = Path(str(err).rpartition("see ")[2])
            if attempt + 1 == attempts or not log.is_file() or "Address already in use" not in log.read_text():
                raise


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
    assert [c["seeds"] for c in new_calls] == [[5, 6, 7, 8, 9, 10]]  # a deterministic server gets one seed per row


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
    with pytest.raises(EngineError, match="without --enable-weights-cpu-backup.*update_weights"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))  # the server's weights are gone
    engine.update_weights([list(tiny_qwen2(seed=1).state_dict().items())])
    assert len(engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))) == 3
    engine.release_memory()
    engine.update_weights([list(tiny_qwen2(seed=1).state_dict().items())])  # colocated push: weights come back first
    engine.resume_memory()
    log = [(c["path"], c.get("tags")) for c in calls(engine.url)[start:] if not c["path"].startswith("/generate")]
    updates = [entry for entry in log if entry[0] == "/update_weights_from_tensor"]
    first_push = updates[: len(updates) // 2]
    assert log == [
        ("/flush_cache", None),
        ("/release_memory_occupation", None),
        ("/resume_memory_occupation", ["weights"]),
        ("/resume_memory_occupation", ["cuda_graph", "kv_cache"]),
        ("/pause_generation", None),
        ("/flush_cache", None),
        *first_push,
        ("/continue_generation", None),
        ("/flush_cache", None),
        ("/release_memory_occupation", None),
        ("/resume_memory_occupation", ["weights"]),
        ("/pause_generation", None),
        ("/flush_cache", None),
        *updates[len(first_push) :],
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
        log = [c for c in calls(old.url) if not c["path"].startswith("/generate")]
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
    after = attached.generate(["abc"], params)[0]
    assert after.token_ids == ref.token_ids
    assert after.weight_version == attached.weight_version == 1  # each sample names the version it was drawn with
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


def test_routed_engine_is_never_restarted(checkpoints):
    """Behind a router the engine owns nothing it could relaunch: launching is refused, and a router that does not
    answer is an error naming it, while the worker (alive) sees no generate and no restart happens."""
    dead_router = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match="router_url=.* needs an attached server"):
        SGLangEngine(server=SGLangServerArgs(model_path=checkpoints[0], port=free_port()), router_url=dead_router)
    worker = launch(checkpoints[0])
    routed = SGLangEngine(url=worker.url, router_url=dead_router, tokenizer=char_tokenizer(), retries=0)
    try:
        routed.start()
        for seed in (None, 4):  # one batched request, or one request per seeded row
            with pytest.raises(EngineError, match=f"sglang-router at {dead_router} is unreachable.*{worker.url}"):
                routed.generate(PROMPTS, SamplingParams(max_new_tokens=2, seed=seed))
        assert not [c for c in calls(worker.url) if c["path"] == "/generate"] and routed.num_restarts == 0
        assert worker.healthy()
    finally:
        routed.shutdown()
        worker.shutdown()


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


def test_frozen_engine_keeps_its_weights_without_cpu_backup(checkpoints):
    """Nobody pushes to a frozen engine (the GenRM): on a server without CPU backup it frees only what the server
    rebuilds, judges with intact weights after resume, and refuses to release its weights."""
    frozen = launch(checkpoints[0], frozen=True)
    try:
        params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=2)
        expected = reference(checkpoints[0]).generate(["abc"], params)[0].token_ids
        for _ in range(2):  # every step releases and resumes it
            frozen.release_memory()
            frozen.resume_memory()
            assert frozen.generate(["abc"], params)[0].token_ids == expected
        with pytest.raises(EngineError, match="frozen engine .* would lose them.*--enable-weights-cpu-backup"):
            frozen.release_memory(tags=["weights", "kv_cache"])
        memory = [(c["path"], c["tags"]) for c in calls(frozen.url) if "memory_occupation" in c["path"]]
        assert (
            memory
            == [
                ("/release_memory_occupation", ["cuda_graph", "kv_cache"]),
                ("/resume_memory_occupation", ["cuda_graph", "kv_cache"]),
            ]
            * 2
        )
        # What the engine guards against: released weights come back as uninitialised memory on such a server.
        frozen.client.release_memory_occupation(tags=["weights"])
        frozen.client.resume_memory_occupation(tags=["weights"])
        assert frozen.generate(["abc"], params)[0].token_ids != expected
    finally:
        frozen.shutdown()


def test_frozen_engine_with_cpu_backup_releases_everything(checkpoints):
    backed = launch(checkpoints[0], frozen=True, cpu_backup=True)
    try:
        assert backed.weights_cpu_backup
        params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=2)
        expected = reference(checkpoints[0]).generate(["abc"], params)[0].token_ids
        backed.release_memory()
        backed.resume_memory()
        assert backed.generate(["abc"], params)[0].token_ids == expected
        memory = [c["tags"] for c in calls(backed.url) if "memory_occupation" in c["path"]]
        assert memory == [None, None]  # weights too: the server restores them from host memory
    finally:
        backed.shutdown()


def _generate_beside(engine, prompts, params):
    """Run engine.generate in a thread; returns (thread, results: list of Generation lists or the error)."""
    results = []

    def target():
        try:
            results.append(engine.generate(prompts, params))
        except EngineError as error:
            results.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, results


def _wait_for_call(url, path, count=1, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while sum(c["path"] == path for c in calls(url)) < count:
        assert time.monotonic() < deadline, f"no {path} within {timeout_s} s"
        time.sleep(0.05)


@pytest.mark.parametrize("version", ["0.5.3", "0.5.23"])
def test_weight_push_keeps_requests_in_flight(checkpoints, monkeypatch, version):
    """A plain pause aborts what is in flight (0.5.3 always, 0.5.23 in its default mode); the engine retracts where
    it can (0.5.23) and drains first where it cannot (0.5.3), so a generate running during a push completes."""
    monkeypatch.setenv("SGLANG_STANDIN_VERSION", version)
    monkeypatch.setenv("SGLANG_STANDIN_ROW_DELAY_S", "0.3")
    eng = launch(checkpoints[0])
    try:
        params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=1)
        thread, results = _generate_beside(eng, PROMPTS, params)
        _wait_for_call(eng.url, "/generate")
        eng.client.pause_generation({})  # what a client that does not know the version sends
        thread.join(30)
        eng.client.continue_generation()
        assert isinstance(results[0], EngineError) and "abort" in str(results[0])

        thread, results = _generate_beside(eng, PROMPTS, params)
        _wait_for_call(eng.url, "/generate", count=2)
        eng.update_weights([list(tiny_qwen2(seed=0).state_dict().items())])
        thread.join(30)
        assert [g.finish_reason in ("stop", "length") for g in results[0]] == [True] * 3
        log = [c for c in calls(eng.url) if c["path"] in ("/pause_generation", "/generate done")][2:]
        if version == "0.5.3":  # drained: the pause comes after the request has finished
            assert [c["path"] for c in log] == ["/generate done", "/pause_generation"] and log[1]["body"] == {}
        else:  # retracted: paused while the request ran, which finished after /continue_generation
            assert [c["path"] for c in log] == ["/pause_generation", "/generate done"]
            assert log[0]["body"] == {"mode": "retract"}
    finally:
        eng.shutdown()


def test_seeds_left_out_with_one_warning_without_deterministic_inference(checkpoints):
    eng = launch(checkpoints[0], deterministic=False)
    try:
        assert not eng.deterministic
        params = SamplingParams(max_new_tokens=3, temperature=1.0, seed=7, n=2)
        with pytest.warns(UserWarning, match="without --enable-deterministic-inference: sampling is not reproducible"):
            eng.generate(PROMPTS, params)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # only one warning per engine
            eng.generate(PROMPTS, params)
        seeds = [c["seeds"] for c in calls(eng.url) if c["path"] == "/generate"]
        assert seeds == [[None] * 6, [None] * 6]
    finally:
        eng.shutdown()


@pytest.mark.parametrize("version, status", [("0.5.3", 500), ("0.5.23", 400)])
def test_unknown_sampling_key_rejected_as_the_version_does(checkpoints, monkeypatch, version, status):
    monkeypatch.setenv("SGLANG_STANDIN_VERSION", version)
    eng = launch(checkpoints[0])
    try:
        body = {"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 2, "no_such_key": 1}}
        assert requests.post(f"{eng.url}/generate", json=body, timeout=30).status_code == status
        assert len(eng.generate(PROMPTS, SamplingParams(max_new_tokens=2, seed=1, stop=["x"]))) == 3  # ours pass
    finally:
        eng.shutdown()


def _placement(gpu_ids=(0,), port=30000):
    from fapo_megatron.cluster.placement import EnginePlacement

    return EnginePlacement(replica=0, bundle=0, node=0, base_gpu_id=gpu_ids[0], gpu_ids=tuple(gpu_ids), port=port)


@pytest.mark.parametrize("deterministic", [False, True])
def test_launch_commands_carry_the_flags_each_role_needs(tmp_path, deterministic):
    from fapo_megatron.config import Config, from_dict
    from fapo_megatron.roles.genrm import build_genrm_engine
    from fapo_megatron.roles.rollout import build_rollout_engine

    cfg = from_dict(
        Config,
        {
            "model": {"path": str(tmp_path)},
            "rollout": {"backend": "sglang", "deterministic_inference": deterministic},
            "genrm": {"backend": "sglang", "model_path": str(tmp_path)},
        },
    )
    rollout = build_rollout_engine(cfg, {}, char_tokenizer(), rank=0, engine=_placement())
    command = rollout.server_args.command()
    assert ("--enable-deterministic-inference" in command) is deterministic
    assert "--enable-weights-cpu-backup" not in command and not rollout.frozen
    genrm = build_genrm_engine(cfg, _placement(port=31000))  # the judge sends no seeds: no deterministic kernels
    command = genrm.server_args.command()
    assert "--enable-weights-cpu-backup" in command and "--enable-deterministic-inference" not in command
    assert genrm.frozen


def test_a_colocated_tp2_server_gets_each_ranks_payload_from_that_ranks_gpu(tmp_path):
    """SGLang's TP rank r reads serialized_named_tensors[r] on its own GPU: placement's GPUs become the payload
    devices, in rank order (on CPU runs every payload stays where the bucket is)."""
    from fapo_megatron.config import Config, from_dict
    from fapo_megatron.roles.rollout import build_rollout_engine

    def build(device):
        cfg = from_dict(
            Config,
            {
                "model": {"path": str(tmp_path)},
                "rollout": {"backend": "sglang", "tp": 2},
                "cluster": {"device": device, "devices_per_node": 4},
            },
        )
        return build_rollout_engine(cfg, {}, char_tokenizer(), rank=2, engine=_placement(gpu_ids=(2, 3)))

    cuda = build("cuda")
    assert cuda.transport.rank_devices == [torch.device("cuda", 2), torch.device("cuda", 3)]
    assert (
        "--base-gpu-id" in (command := cuda.server_args.command())
        and command[command.index("--base-gpu-id") + 1] == "2"
    )
    assert build("cpu").transport.rank_devices is None
