"""GenRM client against stand-in servers (OpenAI chat and SGLang /generate) and a real in-process engine."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from genrm_standin_server import StandinGenRM

from fapo_megatron.engine_protocol import Engine, EngineError, Generation
from fapo_megatron.genrm.client import GenRMClient
from fapo_megatron.genrm.prompt import build_genrm_prompt, render_chatml, split_steps
from fapo_megatron.genrm.transports import EngineTransport, OpenAIChatTransport, SGLangGenerateTransport
from fapo_megatron.genrm.types import JudgeCounts, JudgeRequest, VerdictStatus, verdict_tensors

SOLUTION = "Step one: 2 + 3 = 5.\n\nStep two: 5 * 4 = 20.\n\nStep three: so the answer is \\boxed{20}."


def request(directive: str) -> JudgeRequest:
    return JudgeRequest(problem=f"Compute (2+3)*4. [[judge:{directive}]]", solution=SOLUTION, ground_truth="20")


def transport(api: str, url: str):
    if api == "openai":
        return OpenAIChatTransport(url, model="fapo-genrm", max_new_tokens=64, temperature=0.6)
    return SGLangGenerateTransport(url, max_new_tokens=64, temperature=0.6)


def client(api: str, url: str, **kwargs) -> GenRMClient:
    options = {"concurrency": 4, "request_timeout_s": 2.0, "deadline_s": 10.0, "retries": 2, "backoff_s": 0.05}
    options.update(kwargs)
    return GenRMClient(transport(api, url), **options)


@pytest.mark.parametrize("api", ["openai", "sglang"])
def test_verdicts_come_back_in_order_with_counts(api):
    with StandinGenRM(api) as server:
        judge = client(api, server.url)
        directives = ["1", "-1", "0", "2", "3", "garbage", "-2", "flaky", "400", "-1"]
        verdicts = judge.judge([request(d) for d in directives])
    assert [v.first_error_step for v in verdicts] == [1, -1, 0, 2, None, None, None, -1, None, -1]
    assert [v.status.value for v in verdicts] == ["ok"] * 4 + ["unparseable"] * 3 + ["ok", "error", "ok"]
    assert [v.flawed for v in verdicts] == [True, False, True, True, None, None, None, False, None, False]
    assert all(v.num_steps == 3 for v in verdicts)
    assert verdicts[7].attempts == 2 and verdicts[8].attempts == 1  # 503 retried, 400 not
    assert "HTTP 400" in verdicts[8].detail
    assert verdicts[0].output_tokens == len(verdicts[0].raw_text.split())
    counts = judge.last_counts
    assert (counts.asked, counts.flawed, counts.clean, counts.unparseable, counts.errors) == (10, 3, 3, 3, 1)
    assert counts.timed_out == counts.unavailable == 0 and counts.retries == 1
    flawed, available = verdict_tensors(verdicts)
    assert flawed.tolist() == [True, False, True, True] + [False] * 6
    assert available.tolist() == [v.status == VerdictStatus.OK for v in verdicts]


@pytest.mark.parametrize("api", ["openai", "sglang"])
def test_request_body_follows_the_api(api):
    with StandinGenRM(api) as server:
        client(api, server.url).judge([request("1")])
    (body,) = server.requests
    steps = split_steps(SOLUTION)
    prompt = build_genrm_prompt(request("1").problem, steps, "20")
    if api == "openai":
        assert body == {
            "model": "fapo-genrm",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 64,
            "temperature": 0.6,
        }
    else:
        assert body == {
            "text": render_chatml([{"role": "user", "content": prompt}]),
            "sampling_params": {"max_new_tokens": 64, "temperature": 0.6},
        }


def test_service_outage_is_retried_then_reported_not_clean():
    with StandinGenRM("openai") as server:
        judge = client("openai", server.url, retries=3)
        verdicts = judge.judge([request("503"), request("1")])
    assert verdicts[0].status == VerdictStatus.ERROR and verdicts[0].attempts == 4 and verdicts[0].flawed is None
    assert verdicts[1].first_error_step == 1
    assert sum(1 for body in server.requests if "503" in body["messages"][0]["content"]) == 4


def test_dropped_connections_and_dead_url_are_unavailable():
    with StandinGenRM("sglang") as server:
        verdicts = client("sglang", server.url, retries=1).judge([request("drop"), request("0")])
        url = server.url
    assert verdicts[0].status == VerdictStatus.UNAVAILABLE and verdicts[0].attempts == 2
    assert verdicts[1].first_error_step == 0
    start = time.monotonic()
    dead = client("sglang", url, retries=2).judge([request("0")] * 3)  # the server is gone now
    assert time.monotonic() - start < 3.0
    assert [v.status for v in dead] == [VerdictStatus.UNAVAILABLE] * 3


def test_slow_server_times_out_within_the_deadline():
    with StandinGenRM("openai") as server:
        judge = client("openai", server.url, request_timeout_s=0.5, deadline_s=1.5, retries=5)
        start = time.monotonic()
        verdicts = judge.judge([request("slow"), request("2"), request("slow")])
        elapsed = time.monotonic() - start
    assert elapsed < 2.0
    assert [v.status for v in verdicts] == [VerdictStatus.TIMEOUT, VerdictStatus.OK, VerdictStatus.TIMEOUT]
    assert judge.last_counts.timed_out == 2 and judge.last_counts.flawed == 1


def test_server_killed_mid_batch_returns_by_deadline_with_everything_counted():
    script = Path(__file__).parent / "genrm_standin_server.py"
    process = subprocess.Popen([sys.executable, str(script), "openai", "0.15"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(process.stdout.readline())
        judge = client("openai", f"127.0.0.1:{port}", concurrency=2, request_timeout_s=1.0, deadline_s=4.0)
        killer = threading.Timer(0.5, process.kill)
        killer.start()
        start = time.monotonic()
        verdicts = judge.judge([request(str(i % 3)) for i in range(24)])
        elapsed = time.monotonic() - start
        killer.join()
    finally:
        process.kill()
        process.wait()
    assert elapsed < 4.5
    counts = judge.last_counts
    ok = [v for v in verdicts if v.status == VerdictStatus.OK]
    assert 1 <= len(ok) < 24
    assert all(v.first_error_step == i % 3 for i, v in enumerate(verdicts) if v.status == VerdictStatus.OK)
    assert counts.asked == 24 and counts.flawed + counts.clean == len(ok)
    assert counts.unavailable + counts.timed_out + counts.errors == 24 - len(ok) and counts.clean == 0


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


def test_stream_sends_each_request_on_submit_and_matches_verdicts_to_keys():
    """Requests leave as they are submitted (before collect), each once; verdicts come back under their keys."""
    with StandinGenRM("sglang") as server:
        judge = client("sglang", server.url)
        stream = judge.open_stream()
        stream.submit(("p0", 3), request("2"))
        stream.submit(("p1", 0), request("-1"))
        _wait_for(lambda: len(server.requests) == 2)  # sent while the "rollout" still runs
        stream.submit(("p0", 1), request("0"))
        stream.submit(("p2", 5), request("garbage"))
        with pytest.raises(ValueError, match="submitted twice"):
            stream.submit(("p1", 0), request("1"))
        verdicts = stream.collect()
        assert list(server.seen.values()) == [1, 1, 1, 1]  # every request judged once
    assert list(verdicts) == [("p0", 3), ("p1", 0), ("p0", 1), ("p2", 5)]
    assert [v.first_error_step for v in verdicts.values()] == [2, -1, 0, None]
    assert judge.last_counts.asked == 4 and judge.last_counts.unparseable == 1
    assert 0 < stream.busy_seconds
    with pytest.raises(RuntimeError, match="after collect"):
        stream.submit(("p3", 0), request("1"))


def test_stream_deadline_counts_from_collect_not_from_submit():
    """A request answered while submissions go on is kept although it took longer than the deadline; one still out
    when the step waits gets at most the deadline: the step never waits longer than before."""
    with StandinGenRM("openai", delay_s=0.6) as server:
        judge = client("openai", server.url, request_timeout_s=5.0, deadline_s=0.4, retries=0)
        stream = judge.open_stream()
        stream.submit(0, request("1"))
        _wait_for(lambda: len(server.requests) == 1)
        time.sleep(0.8)  # the rollout goes on; the answer comes back meanwhile
        stream.submit(1, request("slow"))
        start = time.monotonic()
        verdicts = stream.collect()
        waited = time.monotonic() - start
    assert verdicts[0].first_error_step == 1 and verdicts[1].status == VerdictStatus.TIMEOUT
    assert waited < 1.0 and judge.last_counts.timed_out == 1


def test_empty_solution_is_an_error_not_a_call():
    with StandinGenRM("openai") as server:
        verdicts = client("openai", server.url).judge([JudgeRequest("q", " \n\n ", "1"), request("0")])
    assert verdicts[0].status == VerdictStatus.ERROR and verdicts[0].attempts == 0
    assert len(server.requests) == 1


class ScriptedEngine(Engine):
    """A deterministic engine for the client: answers the directive in each prompt, counting generate calls."""

    def __init__(self, fail_first: bool = False):
        self.calls: list[int] = []
        self.fail_first = fail_first

    def start(self):
        pass

    def healthy(self):
        return True

    def generate(self, prompts, params):
        self.calls.append(len(prompts))
        if self.fail_first and len(self.calls) == 1:
            raise EngineError("engine restarting")
        out = []
        for index, prompt in enumerate(prompts):
            directive = prompt.split("[[judge:")[1].split("]]")[0]
            text = f"\\boxed{{{directive}}}"
            out.append(
                Generation(prompt_index=index, token_ids=[1] * len(text), text=text, logprobs=[], finish_reason="stop")
            )
        return out

    def update_weights(self, buckets):
        pass

    def release_memory(self, tags=None):
        pass

    def resume_memory(self, tags=None):
        pass

    def shutdown(self):
        pass


def test_engine_transport_batches_by_concurrency_and_retries_engine_errors():
    engine = ScriptedEngine(fail_first=True)
    judge = GenRMClient(EngineTransport(engine, max_new_tokens=32, temperature=0.0), concurrency=4, backoff_s=0.01)
    verdicts = judge.judge([request(str(i % 5 - 1)) for i in range(10)])
    assert engine.calls == [4, 4, 4, 2]  # first call failed and was retried
    assert [v.first_error_step for v in verdicts] == [-1, 0, 1, 2, None] * 2
    assert verdicts[9].status == VerdictStatus.UNPARSEABLE  # index 3 with 3 steps is out of range
    assert verdicts[0].attempts == 2 and verdicts[4].attempts == 1
    assert judge.total_counts.asked == 10 and judge.total_counts.retries == 4


def test_counts_merge_and_metrics():
    counts = JudgeCounts(asked=4, flawed=1, clean=3)
    counts.merge(JudgeCounts(asked=2, timed_out=2))
    metrics = counts.as_metrics()
    assert metrics["genrm/asked"] == 6 and metrics["genrm/missing"] == 2 and metrics["genrm/flawed_share"] == 0.25


class SlowEngine(ScriptedEngine):
    """Takes `delay_s` per generate call and records how many calls ever overlapped."""

    def __init__(self, delay_s: float):
        super().__init__()
        self.delay_s, self.active, self.max_active = delay_s, 0, 0

    def generate(self, prompts, params):
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        time.sleep(self.delay_s)
        self.active -= 1
        return super().generate(prompts, params)


def test_engine_past_the_deadline_times_out_and_is_never_called_concurrently():
    engine = SlowEngine(delay_s=0.8)
    transport = EngineTransport(engine, max_new_tokens=8, temperature=0.0)
    start = time.monotonic()
    late = GenRMClient(transport, concurrency=8, deadline_s=0.3).judge([request("1")] * 3)
    assert time.monotonic() - start < 0.6
    assert [v.status for v in late] == [VerdictStatus.TIMEOUT] * 3
    verdicts = GenRMClient(transport, concurrency=8, deadline_s=5.0).judge([request("2")] * 2)
    assert [v.first_error_step for v in verdicts] == [2, 2]
    assert engine.max_active == 1 and engine.calls == [3, 2]
