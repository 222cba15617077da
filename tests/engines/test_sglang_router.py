"""The real sglang-router (`make sglang-router` installs the PyPI wheel into .cache/sglang_router, never into .venv)
in front of two stand-in workers: the GenRM's SGLang transport and an attached rollout engine generate through it,
while weight and memory calls go to the workers themselves."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from engine_fixtures import char_tokenizer, tiny_qwen2
from test_engines_sglang import STANDIN, calls, free_port

from fapo_megatron.engine_protocol import SamplingParams
from fapo_megatron.engines.sglang import SGLangEngine
from fapo_megatron.genrm.transports import SGLangGenerateTransport

ROUTER_DIR = Path(__file__).resolve().parents[2] / ".cache" / "sglang_router"


def _wait_healthy(url: str, path: str, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up (exit code {process.poll()})")
        time.sleep(0.3)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(15)


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    if not (ROUTER_DIR / ".installed").is_file():
        pytest.fail(f"{ROUTER_DIR} is missing: run `make sglang-router` (it installs the sglang-router wheel there)")
    path = tmp_path_factory.mktemp("tiny")
    tiny_qwen2(seed=0).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    env = dict(os.environ, SGLANG_STANDIN_VERSION="0.5.23")
    processes = []
    try:
        workers = []
        for _ in range(2):
            port = free_port()
            command = [*STANDIN, "--model-path", str(path), "--port", str(port), "--enable-memory-saver"]
            command.append("--enable-deterministic-inference")
            processes.append(subprocess.Popen(command, env=env, start_new_session=True))
            workers.append(f"http://127.0.0.1:{port}")
        for url, process in zip(workers, processes):
            _wait_healthy(url, "/health_generate", process)
        router_port = free_port()
        router = subprocess.Popen(
            [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(router_port)]
            + ["--policy", "round_robin", "--worker-urls", *workers],
            env=dict(os.environ, PYTHONPATH=str(ROUTER_DIR)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        processes.append(router)
        router_url = f"http://127.0.0.1:{router_port}"
        _wait_healthy(router_url, "/health", router)
        yield router_url, workers, str(path)
    finally:
        for process in processes:  # on every exit path, failures included
            _stop(process)


def test_router_refuses_what_the_engine_must_not_send(routed):
    router_url, _, _ = routed
    body = {"input_ids": [[3, 4], [5]], "sampling_params": [{"max_new_tokens": 2}] * 2}
    assert requests.post(f"{router_url}/generate", json=body, timeout=30).status_code == 422
    assert requests.get(f"{router_url}/flush_cache", timeout=30).status_code == 405


def test_genrm_transport_generates_through_the_router(routed):
    router_url, workers, _ = routed
    transport = SGLangGenerateTransport(router_url, max_new_tokens=4, temperature=1.0)
    answers = transport.complete([[{"role": "user", "content": f"q{i}"}] for i in range(4)], timeout_s=60)
    assert len(answers) == 4 and all(a.output_tokens == 4 for a in answers)
    served = [sum(c["path"] == "/generate" for c in calls(url)) for url in workers]
    assert all(count >= 1 for count in served)  # round robin reached both workers


def test_attached_rollout_engine_through_the_router(routed):
    router_url, workers, _ = routed
    engines = [SGLangEngine(url=url, router_url=router_url, tokenizer=char_tokenizer(), tp_size=1) for url in workers]
    try:
        for engine in engines:
            engine.start()
        named = list(tiny_qwen2(seed=1).state_dict().items())
        for engine in engines:  # every worker gets the push directly; the router has no weight endpoints
            engine.release_memory()
            engine.update_weights([named])
            engine.resume_memory()
        params = SamplingParams(max_new_tokens=5, temperature=1.0, seed=3, n=2)
        first = engines[0].generate(["abc", "hello"], params)
        again = engines[1].generate(["abc", "hello"], params)  # seeded rows repeat whichever worker serves them
        assert [g.token_ids for g in first] == [g.token_ids for g in again] and len(first) == 4
        for url in workers:
            paths = [c["path"] for c in calls(url)]
            assert "/update_weights_from_tensor" in paths and "/release_memory_occupation" in paths
            seeds = [c["seeds"] for c in calls(url) if c["path"] == "/generate" and c["seeds"][0] is not None]
            assert all(len(s) == 1 for s in seeds)  # one row per request through the router
    finally:
        for engine in engines:
            engine.shutdown()
