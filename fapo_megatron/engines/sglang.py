"""SGLang backend for GPU clusters: launch and own an SGLang server process (or attach to a URL) behind the
engine protocol.

Talks to SGLang 0.5.x's native HTTP API (`/generate` with `return_logprob`, `/update_weights_from_tensor`,
`/update_weights_from_distributed`, `/release_memory_occupation`, `/resume_memory_occupation`,
`/pause_generation`, `/continue_generation`, `/flush_cache`, `/health_generate`), the way slime's
SGLangEngine does. SGLang itself is imported only to check its version before launching; an attached
server needs nothing installed here.

Log-probs: SGLang returns log(softmax(logits / T)) of each sampled token before top-p/top-k truncation
(raw log_softmax when greedy) unless the server runs with SGLANG_RETURN_ORIGINAL_LOGPROB=1; we launch with
it off, and an attached server must not set it, or its log-probs will not match the trainer's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from fapo_megatron.engine_protocol import MEMORY_TAGS, Engine, EngineError, Generation, SamplingParams, WeightBucket
from fapo_megatron.engines.sglang_client import ServerUnreachable, SGLangClient
from fapo_megatron.engines.sglang_transport import DistributedTransport, TensorTransport
from fapo_megatron.engines.weight_sync import MB, bucket_named_tensors

SUPPORTED_SGLANG = ">=0.5.3,<=0.5.23"


def memory_tags(version: str) -> set[str]:
    """The GPU memory types (srt/constants.py GPU_MEMORY_TYPE_*) that release/resume_memory_occupation take:
    0.5.3-0.5.4 know weights and kv_cache; cuda_graph comes in 0.5.5 (resuming an unknown tag crashes 0.5.3)."""
    tags = {"weights", "kv_cache"}
    return tags | {"cuda_graph"} if Version(version) >= Version("0.5.5") else tags


def pause_keeps_in_flight(version: str) -> bool:
    """From 0.5.6 /pause_generation takes a mode (managers/io_struct.py PauseGenerationReqInput) and "retract" keeps
    in-flight requests (back to the waiting queue, finished after /continue_generation); before, the endpoint reads
    no body and aborts everything in flight (tokenizer_manager.pause_generation: abort_request(abort_all=True))."""
    return Version(version) >= Version("0.5.6")


def pause_request(version: str) -> dict:
    """The /pause_generation body: mode "retract" where the version has modes (its default, "abort", would end
    in-flight requests), else none (the engine drains in-flight requests before pausing such a server)."""
    return {"mode": "retract"} if pause_keeps_in_flight(version) else {}


def checkpoint_parameter_names(model_path: str) -> set[str] | None:
    """The tensor names a push may carry: a real server's load_weights takes the HF checkpoint's names and only logs a
    warning for others, so a name-map bug would leave the served model unchanged. A tied `lm_head.weight` is not
    stored but may be pushed (SGLang's models skip it). None when `model_path` is no local checkpoint (a hub id, or a
    path on another node): nothing to check against."""
    path = Path(model_path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = set(json.loads(index.read_text())["weight_map"])
    elif (path / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as checkpoint:
            names = set(checkpoint.keys())
    else:
        return None
    config = path / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("tie_word_embeddings"):
        names.add("lm_head.weight")
    return names


def require_sglang() -> str:
    """The installed SGLang version, or a clear error when it is missing or outside SUPPORTED_SGLANG."""
    try:
        import sglang
    except ImportError as error:
        raise EngineError(
            f"the SGLang backend needs sglang{SUPPORTED_SGLANG} (pip install 'sglang{SUPPORTED_SGLANG}' on a GPU "
            f"machine); use rollout.backend=embedded on machines without it ({error})"
        ) from error
    version = getattr(sglang, "__version__", "0")
    if Version(version) not in SpecifierSet(SUPPORTED_SGLANG):
        raise EngineError(f"sglang {version} is installed; the SGLang backend supports sglang{SUPPORTED_SGLANG}")
    return version


@dataclass(kw_only=True)
class SGLangServerArgs:
    """What `python -m sglang.launch_server` gets (names as in SGLang's ServerArgs)."""

    model_path: str
    """HF checkpoint the server loads."""
    tp_size: int = 1
    """Tensor-parallel size (GPUs per server)."""
    mem_fraction_static: float = 0.6
    """Fraction of GPU memory for weights + KV cache."""
    host: str = "127.0.0.1"
    port: int = 30000
    base_gpu_id: int = 0
    """First GPU the server uses."""
    random_seed: int = 0
    enable_memory_saver: bool = True
    """Needed for release/resume_memory_occupation (colocated time-sharing)."""
    skip_tokenizer_init: bool = False
    """Token ids only, no detokenizer on the server: no text back and no stop strings. We send token ids either way."""
    dtype: str = "auto"
    enable_deterministic_inference: bool = False
    """Batch-invariant kernels, and per-request `sampling_seed` honoured: without it SGLang ignores the seeds."""
    enable_weights_cpu_backup: bool = False
    """Keep a host copy of the weights while they are released, so resume restores them: for engines nobody pushes
    weights to (without it, released weights come back as uninitialised memory)."""
    extra_args: list[str] = field(default_factory=list)
    """More launch_server flags, passed through verbatim."""
    launch_command: list[str] | None = None
    """Program to run instead of `python -m sglang.launch_server` (tests use a protocol stand-in)."""

    def __post_init__(self):
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if not 0 < self.mem_fraction_static <= 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1], got {self.mem_fraction_static}")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        program = self.launch_command or [sys.executable, "-m", "sglang.launch_server"]
        args = [
            *program,
            "--model-path",
            self.model_path,
            "--tp-size",
            str(self.tp_size),
            "--mem-fraction-static",
            str(self.mem_fraction_static),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--base-gpu-id",
            str(self.base_gpu_id),
            "--random-seed",
            str(self.random_seed),
            "--dtype",
            self.dtype,
            "--skip-server-warmup",
        ]
        if self.enable_memory_saver:
            args.append("--enable-memory-saver")
        if self.skip_tokenizer_init:
            args.append("--skip-tokenizer-init")
        if self.enable_deterministic_inference:
            args.append("--enable-deterministic-inference")
        if self.enable_weights_cpu_backup:
            args.append("--enable-weights-cpu-backup")
        return args + list(self.extra_args)


class SGLangServerProcess:
    """Owns one launched server: start (wait until it generates), liveness, stop (its whole process group)."""

    def __init__(self, args: SGLangServerArgs, *, startup_timeout_s: float = 900.0, log_dir: str | None = None):
        self.args = args
        self.startup_timeout_s = startup_timeout_s
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="fapo_sglang_")
        self.log_path = os.path.join(self.log_dir, f"server_{args.port}.log")
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        if self.args.launch_command is None:
            require_sglang()
        env = dict(os.environ, SGLANG_RETURN_ORIGINAL_LOGPROB="0")
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.args.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        probe = SGLangClient(self.args.url, timeout_s=30.0, retries=0)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while not probe.health_generate(timeout_s=5.0):
                if not self.alive():
                    code = self._process.returncode
                    raise EngineError(f"SGLang server exited with code {code}; see {self.log_path}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise EngineError(f"SGLang server unhealthy after {self.startup_timeout_s} s; see {self.log_path}")
                time.sleep(0.5)
            probe.flush_cache()
        finally:
            probe.close()

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, grace_s: float = 15.0) -> None:
        if self._process is None:
            return
        if self.alive():
            _signal_group(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(self._process.pid, signal.SIGKILL)
                self._process.wait(grace_s)
        self._process = None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


class SGLangEngine(Engine):
    """The engine protocol over one SGLang server.

    Give `server` to launch and own a server (restarted, at most `max_restarts` times, when it dies), or
    `url` to attach to a running one. `transport` is "tensor" (colocated, CUDA IPC) or "distributed"
    (NCCL side group; then `distributed_master` = (address, port) of this trainer rank). Weights go out in
    buckets of `bucket_mb`; each sync is bracketed by pause/flush and continue and bumps `weight_version`.
    `frozen` marks an engine nobody pushes weights to (a GenRM, a reference model): it releases only what the
    server can rebuild (KV cache, CUDA graphs) unless the server keeps a CPU backup of its weights.
    `router_url`: generate through an sglang-router in front of the attached server at `url` and its peers; the
    router takes no per-row sampling-param lists (HTTP 422), so seeded rows go as one request each, and it has no
    weight, memory or pause endpoints, so those go to the server at `url` itself. Nothing behind a router is
    restarted by the engine: an unreachable router is an error naming its URL.
    `rank_devices`: the device of each server TP rank (a colocated server with tp > 1 reads its own rank's payload,
    which must live on that rank's GPU); default: every payload from the device the bucket is on.
    """

    def __init__(
        self,
        *,
        server: SGLangServerArgs | None = None,
        url: str | None = None,
        tokenizer=None,
        transport: str = "tensor",
        distributed_master: tuple[str, int] | None = None,
        tp_size: int | None = None,
        bucket_mb: float = 512,
        request_timeout_s: float = 600.0,
        retries: int = 2,
        startup_timeout_s: float = 900.0,
        max_restarts: int = 1,
        distributed_backend: str = "nccl",
        distributed_device: str = "cuda",
        frozen: bool = False,
        drain_timeout_s: float = 600.0,
        router_url: str | None = None,
        rank_devices: list[torch.device] | None = None,
    ):
        if (server is None) == (url is None):
            raise ValueError("SGLangEngine needs exactly one of server (launch) or url (attach)")
        if transport not in ("tensor", "distributed"):
            raise ValueError(f"transport must be 'tensor' or 'distributed', got {transport!r}")
        if transport == "distributed" and distributed_master is None:
            raise ValueError("transport='distributed' needs distributed_master=(address, port)")
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        if router_url and server is not None:
            raise ValueError(
                f"router_url={router_url} needs an attached server (url=...): the router's workers are registered "
                f"with it, and a server this engine launched or relaunched would not be"
            )
        self.server_args = server
        self.url = server.url if server else url.rstrip("/")
        self.tokenizer = tokenizer
        self.tp_size = tp_size or (server.tp_size if server else 1)
        self.bucket_bytes = max(1, int(bucket_mb * MB))
        self.max_restarts = max_restarts
        self.num_restarts = 0
        self.weight_version = 0
        self.client = SGLangClient(self.url, timeout_s=request_timeout_s, retries=retries)
        self.router = SGLangClient(router_url, timeout_s=request_timeout_s, retries=retries) if router_url else None
        self._process = SGLangServerProcess(server, startup_timeout_s=startup_timeout_s) if server else None
        self._transport_kind = transport
        self._rank_devices = rank_devices
        self._distributed = (distributed_master, distributed_backend, distributed_device)
        self.transport = self._make_transport()
        self.frozen = frozen
        self.drain_timeout_s = drain_timeout_s
        self._released_tags: set[str] = set()
        self._weights_lost = False  # weights released without a CPU backup and not pushed since
        self._in_flight = 0  # our /generate calls under way (drained before pausing servers that abort them)
        self._draining = False
        self._gate = threading.Condition()
        self._started = False
        self.server_version: str | None = None  # GET /get_server_info "version", read on start()
        self.weights_cpu_backup = False  # GET /get_server_info "enable_weights_cpu_backup", read on start()
        self.deterministic = False  # GET /get_server_info "enable_deterministic_inference", read on start()
        self._warned_seeds = False
        self.served_model_path: str | None = None  # GET /get_model_info "model_path", read on start()
        self._served_names: set[str] | None = None

    def _make_transport(self):
        if self._transport_kind == "tensor":
            return TensorTransport(self.client, tp_size=self.tp_size, rank_devices=self._rank_devices)
        (address, port), backend, device = self._distributed
        return DistributedTransport(
            self.client,
            master_address=address,
            master_port=port,
            server_world_size=self.tp_size,
            backend=backend,
            device=device,
        )

    # ----------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._started:
            return
        if self._process is not None:
            self._process.start()
        elif not self.client.health_generate():
            raise EngineError(f"no healthy SGLang server at {self.url}")
        self._read_server_info()
        self.served_model_path = self.client.get_model_info()["model_path"]
        self._served_names = checkpoint_parameter_names(self.served_model_path)
        self._started = True

    def _read_server_info(self) -> None:
        """The served SGLang version (memory tags, pause mode; outside the tested range: an error) and the launch
        flags that decide how seeds and released weights behave."""
        info = self.client.get_server_info()
        version = info.get("version")
        try:
            supported = Version(str(version)) in SpecifierSet(SUPPORTED_SGLANG)
        except InvalidVersion:
            supported = False
        if not supported:
            raise EngineError(
                f"{self.url} runs sglang {version!r}; the SGLang backend supports sglang{SUPPORTED_SGLANG}"
            )
        self.server_version = str(version)
        self.weights_cpu_backup = bool(info.get("enable_weights_cpu_backup"))
        self.deterministic = bool(info.get("enable_deterministic_inference"))

    def healthy(self) -> bool:
        return self._started and self.client.health_generate(timeout_s=10.0)

    def shutdown(self) -> None:
        if self._started:
            try:
                self.transport.close()
            except EngineError:
                pass  # the server may already be gone; we are tearing down anyway
        if self._process is not None:
            self._process.stop()
        self.client.close()
        if self.router is not None:
            self.router.close()
        self._started = False

    @property
    def server_pid(self) -> int | None:
        return self._process.pid if self._process else None

    # ----------------------------------------------------------------------------------------- generation
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
        if not self._started:
            raise EngineError("SGLangEngine is not started (call start())")
        if self._released_tags:
            raise EngineError(f"SGLangEngine memory is released ({sorted(self._released_tags)}); call resume_memory()")
        if self._weights_lost:
            raise EngineError(
                f"{self.url} released its weights without --enable-weights-cpu-backup and none were pushed since: "
                f"it would generate from uninitialised memory; call update_weights() first"
            )
        if isinstance(prompts, str):
            raise TypeError("generate() takes a list of prompts, not one string")
        if params.stop and self.server_args is not None and self.server_args.skip_tokenizer_init:
            raise ValueError("stop strings need the server's tokenizer; launch without skip_tokenizer_init")
        rows, prompt_ids = self._rows(prompts, params.n)
        params = self._seeded(params)
        payload = self._payload(rows, params)
        with self._gate:  # a drain for a weight push lets no new request start
            self._gate.wait_for(lambda: not self._draining)
            self._in_flight += 1
        try:
            if self.router is not None:
                outputs = self._generate_routed(rows, params, payload)
            else:
                try:
                    outputs = self.client.generate(payload)
                except ServerUnreachable:
                    self._recover()
                    outputs = self.client.generate(payload)
        finally:
            with self._gate:
                self._in_flight -= 1
                self._gate.notify_all()
        if isinstance(outputs, dict):
            outputs = [outputs]
        if len(outputs) != len(rows):
            raise EngineError(f"{self.url}/generate returned {len(outputs)} outputs for {len(rows)} requests")
        return [self._to_generation(out, index, prompt_ids[index]) for out, (index, _) in zip(outputs, rows)]

    def _generate_routed(self, rows, params: SamplingParams, payload: dict) -> list[dict]:
        """Through the router: one batched request with one sampling dict, or one request per seeded row. A router
        that does not answer is not ours to restart (nor are the servers behind it): a clear error, no recovery."""
        try:
            if params.seed is None:
                return self.router.generate(payload)
            key = next(iter(set(payload) - {"sampling_params", "return_logprob"}))
            singles = [
                {key: row, "sampling_params": sampling, "return_logprob": True}
                for row, sampling in zip(payload[key], payload["sampling_params"])
            ]
            with ThreadPoolExecutor(max_workers=min(16, len(singles))) as pool:
                return list(pool.map(self.router.generate, singles))
        except ServerUnreachable as error:
            raise EngineError(
                f"sglang-router at {self.router.base_url} is unreachable; an engine generating through a router "
                f"relaunches neither it nor its workers (this engine's worker: {self.url}): {error}"
            ) from error

    def _seeded(self, params: SamplingParams) -> SamplingParams:
        """Seeds only reach a server with deterministic inference (SGLang ignores `sampling_seed` otherwise): without
        it, one warning and the seeds are left out."""
        if params.seed is None or self.deterministic:
            return params
        if not self._warned_seeds:
            warnings.warn(
                f"{self.url} runs without --enable-deterministic-inference: sampling is not reproducible, "
                f"seeds are not sent",
                stacklevel=3,
            )
            self._warned_seeds = True
        return replace(params, seed=None)

    def _rows(self, prompts, n: int):
        """One request row per sample, prompt-major; text is tokenized here when we hold the tokenizer."""
        prompt_ids: list[list[int]] = []
        rows = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if self.tokenizer is not None:
                    ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                elif self.server_args is not None and self.server_args.skip_tokenizer_init:
                    raise EngineError(f"prompt {i} is text but the server skips its tokenizer and we have none")
                else:
                    ids = None
            else:
                ids = [int(t) for t in prompt]
            if ids is not None and not ids:
                raise ValueError(f"prompt {i} is empty")
            prompt_ids.append(ids or [])
            rows.extend((i, prompt if ids is None else ids) for _ in range(n))
        return rows, prompt_ids

    @staticmethod
    def _payload(rows, params: SamplingParams) -> dict:
        sampling = {
            "max_new_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "stop": list(params.stop),
            "no_stop_trim": True,  # keep the stop string: the protocol's text ends with it
            "skip_special_tokens": True,
        }
        texts = [r for _, r in rows if isinstance(r, str)]
        if texts and len(texts) != len(rows):
            raise ValueError("mix of text prompts and token-id prompts in one request")
        if params.seed is None:
            sampling_params: dict | list = sampling
        else:  # a per-row seed, so the n samples of a prompt differ but repeat across runs
            sampling_params = [dict(sampling, sampling_seed=params.seed + k) for k in range(len(rows))]
        key = "text" if texts else "input_ids"
        return {key: [r for _, r in rows], "sampling_params": sampling_params, "return_logprob": True}

    def _to_generation(self, out: dict, prompt_index: int, prompt_ids: list[int]) -> Generation:
        meta = out.get("meta_info") or {}
        finish = meta.get("finish_reason") or {}
        kind = finish.get("type") if isinstance(finish, dict) else finish
        if kind not in ("stop", "length"):
            raise EngineError(f"{self.url}/generate: request {meta.get('id')} ended with {finish!r}")
        triples = meta.get("output_token_logprobs")
        if triples is None:
            raise EngineError(f"{self.url}/generate: no output_token_logprobs (return_logprob was set)")
        token_ids = [int(t[1]) for t in triples]
        if "output_ids" in out and list(out["output_ids"]) != token_ids:
            raise EngineError(f"{self.url}/generate: output_ids and output_token_logprobs disagree")
        text = out.get("text")
        if text is None:
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer is not None else ""
        return Generation(
            prompt_index=prompt_index,
            token_ids=token_ids,
            text=text,
            logprobs=[float(t[0]) for t in triples],
            finish_reason=kind,
            prompt_token_ids=prompt_ids,
            weight_version=self._sampled_version(meta),
        )

    def _sampled_version(self, meta: dict) -> int:
        """The weight version the server reports it sampled with (meta_info "weight_version": "default" until a
        push names one; our pushes name them 1, 2, ...); the engine's own count where a server reports none."""
        served = meta.get("weight_version")
        if served is None:
            return self.weight_version
        return int(served) if str(served).isdigit() else 0

    def _recover(self) -> None:
        """After the server stopped answering: restart an owned, dead server; otherwise say clearly what failed."""
        if self._process is None:
            raise EngineError(f"SGLang server at {self.url} is unreachable (attached, not restarted by us)")
        if self._process.alive():
            raise EngineError(f"SGLang server at {self.url} (pid {self._process.pid}) is alive but not answering")
        if self.num_restarts >= self.max_restarts:
            raise EngineError(f"SGLang server at {self.url} died; restart budget ({self.max_restarts}) used up")
        self.num_restarts += 1
        self._process.stop()
        self._process.start()
        self.transport = self._make_transport()
        self._released_tags = set()
        self._weights_lost = False  # the restarted server loaded the checkpoint
        if self.weight_version > 0:
            raise EngineError(
                f"SGLang server at {self.url} died and was restarted with the checkpoint weights; "
                f"push the current weights (update_weights) before generating again"
            )

    # ----------------------------------------------------------------------------------------- weights / memory
    def update_weights(self, buckets: Iterable[WeightBucket]) -> None:
        """Re-bucket to `bucket_mb`, then pause -> flush -> buckets -> continue; checks the server's weight version."""
        if not self._started:
            raise EngineError("SGLangEngine is not started (call start())")
        if "weights" in self._released_tags:
            self.resume_memory(tags=["weights"])  # weights only: the KV cache stays free until resume_memory()
        version = str(self.weight_version + 1)
        named = (pair for bucket in buckets for pair in bucket)
        self.transport.connect()
        self._pause()
        try:
            self.client.flush_cache()
            for sent, bucket in enumerate(bucket_named_tensors(named, self.bucket_bytes)):
                self._check_names(bucket, sent)
                self.transport.send(bucket, weight_version=version)
        finally:
            self._continue()
        served = self.client.get_weight_version()
        if served != version:
            raise EngineError(f"{self.url} serves weight version {served!r} after pushing version {version!r}")
        self.weight_version += 1
        self._weights_lost = False

    def _pause(self) -> None:
        """Pause without losing requests in flight: "retract" where the version has it; on older versions, whose
        pause aborts what runs, first hold our new requests, wait for ours to finish and for the server to be idle
        (/flush_cache answers 200 only then), and pause after."""
        if pause_keeps_in_flight(self.server_version):
            self.client.pause_generation(pause_request(self.server_version))
            return
        with self._gate:
            self._draining = True
            drained = self._gate.wait_for(lambda: self._in_flight == 0, timeout=self.drain_timeout_s)
        try:
            if not drained:
                raise EngineError(
                    f"{self.url}: {self._in_flight} generate call(s) still running after {self.drain_timeout_s} s; "
                    f"sglang {self.server_version} would abort them on pause"
                )
            self.client.flush_cache(timeout_s=self.drain_timeout_s)  # other clients' requests finish too
            self.client.pause_generation(pause_request(self.server_version))
        except BaseException:
            self._end_drain()
            raise

    def _continue(self) -> None:
        try:
            self.client.continue_generation()
        finally:
            self._end_drain()

    def _end_drain(self) -> None:
        with self._gate:
            self._draining = False
            self._gate.notify_all()

    def _check_names(self, bucket: WeightBucket, buckets_sent: int) -> None:
        if self._served_names is None:
            return
        for name, _ in bucket:
            if name not in self._served_names:
                raise EngineError(
                    f"pushed tensor {name!r} is not a parameter of the served checkpoint {self.served_model_path} "
                    f"(SGLang would ignore it); {buckets_sent} bucket(s) of this push were sent before it"
                )

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Flush, then free the parts `tags` names (None: everything the server can get back; the server must run
        with enable_memory_saver). Parts this version does not split out (cuda_graph before 0.5.5) are left to the
        tags it has. Released weights come back as uninitialised memory unless the server keeps a CPU backup: a
        frozen engine then keeps its weights, and any other must be pushed weights before it generates."""
        if not self._started:
            return
        known = memory_tags(self.server_version)
        keeps_weights = self.frozen and not self.weights_cpu_backup
        if tags is None:
            wanted = known - ({"weights"} if keeps_weights else set())
        else:
            wanted = self._known_tags(tags) & known
            if "weights" in wanted and keeps_weights:
                raise EngineError(
                    f"releasing the weights of frozen engine {self.url} would lose them: nobody pushes them back and "
                    f"the server runs without --enable-weights-cpu-backup; release kv_cache/cuda_graph only"
                )
        wanted -= self._released_tags
        if not wanted:
            return
        self.client.flush_cache()
        self.client.release_memory_occupation(tags=None if wanted == known else sorted(wanted))
        self._released_tags |= wanted
        if "weights" in wanted and not self.weights_cpu_backup:
            self._weights_lost = True

    def _known_tags(self, tags: Sequence[str]) -> set[str]:
        unknown = set(tags) - set(MEMORY_TAGS)
        if unknown:
            raise ValueError(f"unknown engine memory tags {sorted(unknown)}; known: {list(MEMORY_TAGS)}")
        return set(tags)

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Take memory back: all of it, or in stages as slime does (["weights"], push, ["kv_cache", "cuda_graph"]);
        parts not released, or that this version does not split out, are not asked for (0.5.3 crashes on a tag it
        does not know or never released)."""
        if not self._started:
            return
        wanted = set(self._released_tags) if tags is None else self._known_tags(tags) & self._released_tags
        if not wanted:
            return
        # None asks the server for everything; name the parts when only some are released or wanted.
        everything = wanted == memory_tags(self.server_version)
        self.client.resume_memory_occupation(tags=None if everything else sorted(wanted))
        self._released_tags -= wanted
