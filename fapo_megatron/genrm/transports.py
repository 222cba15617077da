"""How GenRM prompts reach a model: an engine of the project's protocol, an OpenAI-compatible chat endpoint, or
SGLang's native `/generate` (a single server or an sglang-router in front of several; the FAPO paper's setup).

A transport turns a batch of chat conversations into answers or raises one of the `TransportError`s below, which
tell the client whether to retry and how to report the failure. Transports do not parse verdicts.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fapo_megatron import http_deadline
from fapo_megatron.engine_protocol import Engine, EngineError, SamplingParams
from fapo_megatron.genrm.prompt import render_chatml
from fapo_megatron.genrm.types import VerdictStatus

Messages = list[dict[str, str]]
RenderFn = Callable[[Messages], str | list[int]]
"""Chat messages -> the prompt for a raw endpoint: token ids (`prompt.encode_chat`, where the judge's tokenizer is
known: the solution's text cannot become special tokens) or text (escaped ChatML, the endpoint tokenises it)."""


@dataclass
class Answer:
    text: str
    """The judge model's generated text."""
    output_tokens: int
    """Generated tokens (0 when the endpoint does not say)."""


class TransportError(RuntimeError):
    """A call failed; `status` is how the verdict is reported, `retryable` whether another try may help."""

    status = VerdictStatus.ERROR
    retryable = True


class TransportTimeout(TransportError):
    status = VerdictStatus.TIMEOUT


class TransportUnavailable(TransportError):
    status = VerdictStatus.UNAVAILABLE


class TransportRejected(TransportError):
    """The endpoint refused the request itself (HTTP 4xx other than 408/429) or answered nonsense: do not retry."""

    retryable = False


class Transport(Protocol):
    parallel_calls: bool
    """True: the client may run calls concurrently, one conversation each (HTTP). False: one call at a time,
    carrying up to `concurrency` conversations (an in-process engine batches them itself)."""

    def complete(self, batch: Sequence[Messages], timeout_s: float) -> list[Answer]: ...


class EngineTransport:
    """An engine of the project's protocol (embedded HF or SGLang) used as the judge model.

    An in-process engine cannot be interrupted: `timeout_s` is not enforced per call here, but the client's
    deadline still bounds how long `judge` waits. Calls are serialised by a lock, so a call left running past one
    batch's deadline finishes before the next batch uses the engine.
    """

    parallel_calls = False

    def __init__(self, engine: Engine, *, max_new_tokens: int, temperature: float, render: RenderFn = render_chatml):
        self.engine = engine
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
        self.render = render
        self._lock = threading.Lock()

    def complete(self, batch: Sequence[Messages], timeout_s: float) -> list[Answer]:
        prompts = [self.render(messages) for messages in batch]
        if not self._lock.acquire(timeout=timeout_s):
            raise TransportTimeout(f"engine still busy with an earlier batch after {timeout_s:.1f}s")
        try:
            generations = self.engine.generate(prompts, self.params)
        except EngineError as err:
            raise TransportError(f"engine failed: {err}") from err
        finally:
            self._lock.release()
        by_index = {generation.prompt_index: generation for generation in generations}
        if len(generations) != len(batch) or sorted(by_index) != list(range(len(batch))):
            raise TransportRejected(
                f"engine answered prompts {sorted(by_index)} with {len(generations)} generations, "
                f"expected one each for 0..{len(batch) - 1}"
            )
        return [Answer(by_index[i].text, len(by_index[i].token_ids)) for i in range(len(batch))]


def _post_json(url: str, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """POST and decode JSON within `timeout_s` for the whole request, mapping every failure onto a TransportError."""
    try:
        response = http_deadline.request("POST", url, payload, timeout_s=timeout_s)
    except http_deadline.DeadlineExceeded as err:
        raise TransportTimeout(f"{url}: no complete answer within {timeout_s:.1f}s") from err
    except (OSError, http.client.HTTPException) as err:
        raise TransportUnavailable(f"{url}: {type(err).__name__}: {err}") from err
    if response.status != 200:
        body = response.text[:200]
        if response.status in (408, 429) or response.status >= 500:
            raise TransportError(f"{url}: HTTP {response.status}: {body}")
        raise TransportRejected(f"{url}: HTTP {response.status}: {body}")
    try:
        data = json.loads(response.body)
    except ValueError as err:
        raise TransportRejected(f"{url}: response is not JSON: {response.text[:200]!r}") from err
    if not isinstance(data, dict):
        raise TransportRejected(f"{url}: expected a JSON object, got {type(data).__name__}")
    return data


def _endpoint(base_url: str, path: str) -> str:
    base_url = base_url.rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        base_url = "http://" + base_url
    return base_url if base_url.endswith(path) else base_url + path


class OpenAIChatTransport:
    """`POST {url}/v1/chat/completions` (vLLM, SGLang's OpenAI server, any compatible service)."""

    parallel_calls = True

    def __init__(self, url: str, *, model: str, max_new_tokens: int, temperature: float):
        self.url = _endpoint(url, "/v1/chat/completions")
        self.model, self.max_new_tokens, self.temperature = model, max_new_tokens, temperature

    def complete(self, batch: Sequence[Messages], timeout_s: float) -> list[Answer]:
        return [self._one(messages, timeout_s) for messages in batch]

    def _one(self, messages: Messages, timeout_s: float) -> Answer:
        payload = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
        }
        data = _post_json(self.url, payload, timeout_s)
        try:
            text = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise TransportRejected(f"{self.url}: no choices[0].message.content in {str(data)[:200]}") from err
        if not isinstance(text, str):
            raise TransportRejected(f"{self.url}: message content is {type(text).__name__}, not text")
        usage = data.get("usage") or {}
        return Answer(text, int(usage.get("completion_tokens") or 0))


class SGLangGenerateTransport:
    """`POST {url}/generate` with SGLang's native body (`input_ids` or `text`, `sampling_params`) -> `text`,
    `meta_info`."""

    parallel_calls = True

    def __init__(self, url: str, *, max_new_tokens: int, temperature: float, render: RenderFn = render_chatml):
        self.url = _endpoint(url, "/generate")
        self.sampling_params = {"max_new_tokens": max_new_tokens, "temperature": temperature}
        self.render = render

    def complete(self, batch: Sequence[Messages], timeout_s: float) -> list[Answer]:
        return [self._one(messages, timeout_s) for messages in batch]

    def _one(self, messages: Messages, timeout_s: float) -> Answer:
        prompt = self.render(messages)
        body = {"text": prompt} if isinstance(prompt, str) else {"input_ids": list(prompt)}
        data = _post_json(self.url, {**body, "sampling_params": self.sampling_params}, timeout_s)
        text = data.get("text")
        if not isinstance(text, str):
            raise TransportRejected(f"{self.url}: no 'text' string in {str(data)[:200]}")
        meta = data.get("meta_info") or {}
        return Answer(text, int(meta.get("completion_tokens") or 0))
