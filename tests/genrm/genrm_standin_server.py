"""A stand-in GenRM server for tests: OpenAI `/v1/chat/completions` or SGLang `/generate`, stdlib only.

Request and response JSON follow the OpenAI chat-completions schema and SGLang's native `/generate`
(SGLang 0.5.x: body `text` or `input_ids` + `sampling_params`; reply `text` + `meta_info` with `completion_tokens`).
What it answers is steered by a directive in the problem text, `[[judge:X]]`:
  an integer N -> "...\\boxed{N}";  garbage -> prose without a box;  slow -> sleeps 30 s first;
  503 -> HTTP 503 every time;  flaky -> HTTP 503 on the first try of that prompt, then -1;  drop -> closes the
  connection without answering;  400 -> HTTP 400.  No directive -> "\\boxed{-1}", or with `by_content` a verdict
  fixed by the prompt itself (flawed at step 0 when its SHA-256 starts with an odd byte, else clean), so the same
  solution always gets the same verdict and a verdict given to the wrong rollout shows.
`delay_s` is added to every answer; `concurrency` > 0 lets only that many requests be answered at once (the others
queue, like a judge with a fixed number of decoding slots).
Run as a script (`python genrm_standin_server.py openai|sglang [delay_s [concurrency [by-content]]]`) it prints its
port and serves until killed.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DIRECTIVE = re.compile(r"\[\[judge:([^\]]+)\]\]")


class StandinGenRM(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, api: str, delay_s: float = 0.0, concurrency: int = 0, by_content: bool = False):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.api, self.delay_s, self.by_content = api, delay_s, by_content
        self.slots = threading.Semaphore(concurrency) if concurrency > 0 else None
        self.requests: list[dict] = []
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


def content_verdict(prompt: str) -> int:
    """The `by_content` verdict of a prompt: 0 (flawed at the first step) or -1 (clean)."""
    return 0 if hashlib.sha256(prompt.encode()).digest()[0] % 2 else -1


class _Handler(BaseHTTPRequestHandler):
    server: StandinGenRM

    def log_message(self, *args):
        pass

    def do_POST(self):
        path = {"openai": "/v1/chat/completions", "sglang": "/generate"}[self.server.api]
        if self.path != path:
            return self._send(404, {"error": f"no route {self.path}"})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.server.api == "openai":
            prompt = body["messages"][-1]["content"]
        else:  # token ids carry no readable directive: they get the default answer
            prompt = body["text"] if "text" in body else json.dumps(body["input_ids"])
        with self.server.lock:
            self.server.requests.append(body)
            tries = self.server.seen[prompt] = self.server.seen.get(prompt, 0) + 1
        if self.server.slots is None:
            time.sleep(self.server.delay_s)
        else:
            with self.server.slots:
                time.sleep(self.server.delay_s)
        match = DIRECTIVE.search(prompt)
        directive = match.group(1) if match else "-1"
        if not match and self.server.by_content:
            directive = str(content_verdict(prompt))
        if directive == "slow":
            time.sleep(30)
        if directive == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if directive in ("503", "400") or (directive == "flaky" and tries == 1):
            code = 400 if directive == "400" else 503
            return self._send(code, {"error": {"message": "overloaded" if code == 503 else "bad request"}})
        if directive == "garbage":
            text = "I think paragraph two looks off, but I cannot decide."
        else:
            index = -1 if directive == "flaky" else directive
            text = f"Let me check each paragraph.\n\nThe earliest error index is \\boxed{{{index}}}."
        self._send(200, self._reply(text, body))

    def _reply(self, text: str, body: dict) -> dict:
        tokens = len(text.split())
        if self.server.api == "openai":
            return {
                "id": "chatcmpl-standin",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": 10 + tokens},
            }
        return {
            "text": text,
            "meta_info": {
                "id": "standin",
                "finish_reason": {"type": "stop", "matched": 151645},
                "prompt_tokens": 10,
                "completion_tokens": tokens,
                "cached_tokens": 0,
            },
        }

    def _send(self, code: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    slots = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    server = StandinGenRM(sys.argv[1], delay, slots, by_content=sys.argv[4:5] == ["by-content"])
    print(server.server_address[1], flush=True)
    server.serve_forever()
