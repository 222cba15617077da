"""HTTP client for one SGLang server: one method per native endpoint, bounded timeouts, retries with backoff.

Mirrors SGLang 0.5.x `python/sglang/srt/entrypoints/http_server.py`. Only idempotent calls (generate, health,
flush, reads) are retried; weight updates, group setup and memory release/resume are sent once, since a
half-applied retry (a second release, a broadcast with no partner) would be worse than a clear error.
"""

from __future__ import annotations

import time
from typing import Any

import requests

from fapo_megatron.engine_protocol import EngineError


class ServerUnreachable(EngineError):
    """The server did not answer at all (connection refused or reset, timeout)."""


class SGLangClient:
    def __init__(self, base_url: str, *, timeout_s: float = 600.0, retries: int = 2, backoff_s: float = 0.5):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._session = requests.Session()

    def close(self) -> None:
        self._session.close()

    def _call(
        self,
        method: str,
        path: str,
        payload: dict | list | None = None,
        *,
        timeout_s: float | None = None,
        retry: bool = False,
        ok_statuses: tuple[int, ...] = (200,),
    ) -> requests.Response:
        url = f"{self.base_url}/{path}"
        attempts = 1 + (self.retries if retry else 0)
        last_error: Exception | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._session.request(method, url, json=payload, timeout=timeout_s or self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as error:
                last_error = error
                continue
            if response.status_code in ok_statuses:
                return response
            if response.status_code >= 500 and retry:
                last_error = EngineError(f"{method} {url} -> HTTP {response.status_code}: {response.text[:500]}")
                continue
            raise EngineError(f"{method} {url} -> HTTP {response.status_code}: {response.text[:500]}")
        if isinstance(last_error, EngineError):
            raise last_error
        raise ServerUnreachable(f"{method} {url} failed after {attempts} attempt(s): {last_error}")

    # ------------------------------------------------------------------------------------------ serving
    def health_generate(self, timeout_s: float = 30.0) -> bool:
        """True when the server generated a token (GET /health_generate answers 200)."""
        try:
            return self._session.get(f"{self.base_url}/health_generate", timeout=timeout_s).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    def generate(self, payload: dict) -> list[dict] | dict:
        return self._call("POST", "generate", payload, retry=True).json()

    def flush_cache(self, timeout_s: float = 60.0) -> None:
        """GET /flush_cache; SGLang answers 400 while requests are running, so poll until it succeeds."""
        deadline = time.monotonic() + timeout_s
        while True:
            response = self._call("GET", "flush_cache", retry=True, ok_statuses=(200, 400))
            if response.status_code == 200:
                return
            if time.monotonic() > deadline:
                raise EngineError(f"{self.base_url}/flush_cache: requests still running after {timeout_s} s")
            time.sleep(0.2)

    def pause_generation(self, body: dict | None = None) -> None:
        self._call("POST", "pause_generation", body or {})

    def continue_generation(self) -> None:
        self._call("POST", "continue_generation", {})

    def get_weight_version(self) -> str | None:
        """The served weight version, from GET /get_model_info: every 0.5.x carries `weight_version` there, while
        /get_weight_version answers 404 from 0.5.6 (deprecated) and is gone from 0.5.21 (http_server.py)."""
        return self.get_model_info()["weight_version"]

    def get_model_info(self) -> dict[str, Any]:
        return self._call("GET", "get_model_info", retry=True).json()

    def get_server_info(self) -> dict[str, Any]:
        return self._call("GET", "get_server_info", retry=True).json()

    # ------------------------------------------------------------------------------------------ weights
    def update_weights_from_tensor(
        self,
        serialized_named_tensors: list[str],
        *,
        load_format: str | None = "flattened_bucket",
        flush_cache: bool = False,
        weight_version: str | None = None,
    ) -> None:
        payload = {
            "serialized_named_tensors": serialized_named_tensors,
            "load_format": load_format,
            "flush_cache": flush_cache,
        }
        if weight_version is not None:
            payload["weight_version"] = weight_version
        self._check_success(self._call("POST", "update_weights_from_tensor", payload, ok_statuses=(200, 400)))

    def init_weights_update_group(
        self,
        *,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
    ) -> None:
        payload = {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": rank_offset,
            "world_size": world_size,
            "group_name": group_name,
            "backend": backend,
        }
        self._check_success(self._call("POST", "init_weights_update_group", payload, ok_statuses=(200, 400)))

    def update_weights_from_distributed(
        self,
        *,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        flush_cache: bool = False,
        weight_version: str | None = None,
    ) -> None:
        payload = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name}
        payload["flush_cache"] = flush_cache
        if weight_version is not None:
            payload["weight_version"] = weight_version
        response = self._call("POST", "update_weights_from_distributed", payload, ok_statuses=(200, 400))
        self._check_success(response)

    def destroy_weights_update_group(self, group_name: str) -> None:
        self._check_success(
            self._call("POST", "destroy_weights_update_group", {"group_name": group_name}, ok_statuses=(200, 400))
        )

    # ------------------------------------------------------------------------------------------ memory
    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Free GPU memory (all of it when tags is None; SGLang 0.5.x tags: 'weights', 'kv_cache')."""
        self._call("POST", "release_memory_occupation", {"tags": tags})

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._call("POST", "resume_memory_occupation", {"tags": tags})

    @staticmethod
    def _check_success(response: requests.Response) -> None:
        body = response.json()
        if response.status_code != 200 or not body.get("success", False):
            raise EngineError(f"{response.url} failed: {body.get('message', body)}")
