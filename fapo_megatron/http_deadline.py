"""One HTTP request bounded as a whole: connect, send, headers and body must all be done by its deadline.

`requests` (and urllib3) time out between bytes only, so an endpoint that trickles a byte now and then keeps a call
alive for ever. Here a timer shuts the socket down at the deadline, which ends any blocked read, and the body is read
in chunks with the clock checked after each; the connection is closed whatever happens, and the timer thread ends
with the call, so nothing outlives it. Stdlib only, usable by every HTTP caller (GenRM transports, engine clients).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

_CHUNK = 64 * 1024


class DeadlineExceeded(TimeoutError):
    """The request was not complete by its deadline; its connection was closed."""


@dataclass
class Response:
    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def request(method: str, url: str, payload: Any = None, *, timeout_s: float) -> Response:
    """Send `payload` as JSON (None: no body) and return status and body, all within `timeout_s` seconds.

    Raises DeadlineExceeded when the deadline passes first, OSError (ConnectionError, ...) or
    http.client.HTTPException when the endpoint cannot be reached or speaks no HTTP."""
    if timeout_s <= 0:
        raise DeadlineExceeded(f"{url}: no time left for the request")
    deadline = time.monotonic() + timeout_s
    parts = urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=timeout_s)
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        sock = connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(timeout_s, cut)
    timer.daemon = True
    timer.start()
    try:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        chunks = []
        while chunk := response.read1(_CHUNK):
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"{url}: response not complete within {timeout_s:.1f}s")
        if expired.is_set():
            raise DeadlineExceeded(f"{url}: response not complete within {timeout_s:.1f}s")
        return Response(response.status, b"".join(chunks))
    except (OSError, http.client.HTTPException) as err:
        if expired.is_set() or isinstance(err, TimeoutError):
            raise DeadlineExceeded(f"{url}: response not complete within {timeout_s:.1f}s") from err
        raise
    finally:
        timer.cancel()
        connection.close()
        timer.join()
