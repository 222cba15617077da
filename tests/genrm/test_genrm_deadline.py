"""Whole-request deadlines: an endpoint that trickles bytes (a read timeout between bytes never fires) is abandoned
at the deadline with its connection closed; `judge` returns on time and leaves no thread behind."""

import socketserver
import threading
import time

import pytest

from fapo_megatron import http_deadline
from fapo_megatron.genrm.client import GenRMClient
from fapo_megatron.genrm.transports import SGLangGenerateTransport
from fapo_megatron.genrm.types import JudgeRequest, VerdictStatus


class _Trickle(socketserver.BaseRequestHandler):
    """Reads the request, then sends a response one byte every 50 ms, in the headers or in the body, until the
    client hangs up (recorded in `server.closed`)."""

    def handle(self):
        self.request.recv(65536)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n"
        try:
            if self.server.in_headers:
                head += b"X-Slow: " + b"a" * 100000
            else:
                self.request.sendall(head + b"\r\n")
                head = b'{"text": "' + b"x" * 100000
            for byte in head:
                self.request.sendall(bytes([byte]))
                time.sleep(0.05)
        except OSError:
            self.server.closed.set()


@pytest.fixture(params=[False, True], ids=["trickled-body", "trickled-headers"])
def trickle_url(request):
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    server.in_headers = request.param
    server.closed = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()


def test_request_is_bounded_as_a_whole_and_its_connection_closed(trickle_url):
    url, server = trickle_url
    start = time.monotonic()
    with pytest.raises(http_deadline.DeadlineExceeded):
        http_deadline.request("POST", url + "/generate", {"text": "hi"}, timeout_s=0.6)
    assert time.monotonic() - start < 1.5
    assert server.closed.wait(2.0), "the server still gets to send: the connection was not closed"


def test_judge_returns_by_its_deadline_without_leaving_threads(trickle_url):
    url, _ = trickle_url
    before = set(threading.enumerate())
    client = GenRMClient(
        SGLangGenerateTransport(url, max_new_tokens=8, temperature=0.0),
        concurrency=4,
        request_timeout_s=30.0,
        deadline_s=1.0,
        retries=0,
    )
    requests = [
        JudgeRequest(problem="1+1?", solution=f"step {i}\n\nso \\boxed{{2}}", ground_truth="2") for i in range(6)
    ]
    start = time.monotonic()
    verdicts = client.judge(requests)
    assert time.monotonic() - start < 2.0
    assert [v.status for v in verdicts] == [VerdictStatus.TIMEOUT] * 6
    left = [t for t in set(threading.enumerate()) - before if t.is_alive() and "process_request" not in t.name]
    assert not left, left
