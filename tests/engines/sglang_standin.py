"""A CPU stand-in for an SGLang server, for tests: same launch flags, same native HTTP JSON, real generation.

Mirrors SGLang 0.5.3-0.5.23, playing the version named by $SGLANG_STANDIN_VERSION (default 0.5.23)
(`python/sglang/srt/entrypoints/http_server.py`, `managers/io_struct.py`, `managers/tokenizer_manager.py`,
`weight_sync/tensor_bucket.py`): request bodies and response shapes of /generate (batch -> list, single -> dict;
meta_info.finish_reason {"type": "stop", "matched": ...} or {"type": "length", "length": N};
meta_info.output_token_logprobs [[logprob, token_id, text|null], ...]), /update_weights_from_tensor
(serialized_named_tensors, one base64 pickle per TP rank, load_format "flattened_bucket"),
/init_weights_update_group + /update_weights_from_distributed (side process group, one broadcast per name in
order), /release_memory_occupation and /resume_memory_occupation with tags, /pause_generation,
/continue_generation, /flush_cache (400 while requests run), /health_generate, /get_model_info (weight_version;
/get_weight_version is 404 or gone from 0.5.6), /get_server_info.
Per-version behaviour a real server shows: /pause_generation aborts requests in flight (always before 0.5.6; in
its default mode "abort" after, where "retract" and "in_place" keep them); released weights come back as
uninitialised memory (zeros here) unless --enable-weights-cpu-backup; `sampling_seed` is ignored without
--enable-deterministic-inference; an unknown sampling_params key is a 400 from the request schema from 0.5.22
(sglang/api/v1/api_types.py), a 500 before (SamplingParams(**kwargs) raises TypeError); an unknown pushed name is
skipped with a warning and the push reports success; each TP rank decodes its own serialized_named_tensors entry.
Differences from SGLang: it runs an HF model on CPU through our EmbeddedEngine (one request row at a
time), decodes CPU by-value pickles (real SGLang on GPU gets CUDA IPC handles), joins the side group with
gloo (NCCL on GPU), refuses stop strings without a tokenizer, and adds GET /standin/calls, a log of every
call, for the tests.

Run: python sglang_standin.py --model-path DIR --port N [other sglang.launch_server flags we send]
"""

import argparse
import base64
import json
import os
import pickle
import sys
import threading
import time
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from packaging.version import Version

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, for EmbeddedEngine

from fapo_megatron.engine_protocol import SamplingParams  # noqa: E402
from fapo_megatron.engines.embedded import EmbeddedEngine  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_wheel import sampling_param_keys  # noqa: E402

# The SGLang version this stand-in plays (GET /get_server_info "version"); behaviour below follows that wheel.
VERSION = os.environ.get("SGLANG_STANDIN_VERSION", "0.5.23")
# srt/constants.py GPU_MEMORY_TYPE_*: 0.5.3-0.5.4 know weights and kv_cache; cuda_graph from 0.5.5.
MEMORY_TAGS = {"weights", "kv_cache"} | ({"cuda_graph"} if Version(VERSION) >= Version("0.5.5") else set())
# managers/io_struct.py PauseGenerationReqInput.mode, from 0.5.6; before, /pause_generation reads no body.
PAUSE_MODES = ("abort", "retract", "in_place") if Version(VERSION) >= Version("0.5.6") else None
# The /generate sampling_params keys this version accepts, read from the nearest unpacked wheel.
SAMPLING_KEYS = sampling_param_keys(VERSION)
# Seconds each request row takes on top of generating it, so tests can have requests in flight.
ROW_DELAY_S = float(os.environ.get("SGLANG_STANDIN_ROW_DELAY_S", "0"))


def parse_args(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--model-path", required=True)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--mem-fraction-static", type=float, default=0.9)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--base-gpu-id", type=int, default=0)
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--skip-server-warmup", action="store_true")
    p.add_argument("--enable-memory-saver", action="store_true")
    p.add_argument("--skip-tokenizer-init", action="store_true")
    p.add_argument("--enable-deterministic-inference", action="store_true")
    p.add_argument("--enable-weights-cpu-backup", action="store_true")
    return p.parse_args(argv)  # unknown flags fail, as in SGLang


class StandIn:
    def __init__(self, args):
        self.args = args
        self.engine = EmbeddedEngine(args.model_path)
        self.engine.start()
        self.lock = threading.Lock()
        self.resume_cond = threading.Condition()
        self.paused = False
        self.pause_mode: str | None = None
        self.aborts = 0  # pauses that aborted what was in flight
        self.released: set[str] = set()
        self.weights_backup: dict[str, torch.Tensor] | None = None
        self.running = 0
        self.weight_version = "default"
        self.calls: list[dict] = []
        self.groups: dict[str, object] = {}
        self.sample_counter = 0

    def record(self, path, **details):
        self.calls.append({"path": path, "time": time.time(), "paused": self.paused, **details})

    # ------------------------------------------------------------------------------------------ generate
    def generate(self, body):
        if self.released:
            return 500, {"error": {"message": f"memory released ({sorted(self.released)}); resume first"}}
        with self.resume_cond:
            self.resume_cond.wait_for(lambda: not self.paused, timeout=60)
        single = "input_ids" in body and body["input_ids"] and isinstance(body["input_ids"][0], int)
        single = single or isinstance(body.get("text"), str)
        if "input_ids" in body:
            rows = [body["input_ids"]] if single else body["input_ids"]
        else:
            if self.args.skip_tokenizer_init:
                return 400, {"error": {"message": "text input needs the tokenizer (server runs skip_tokenizer_init)"}}
            rows = [body["text"]] if single else body["text"]
        sampling = body.get("sampling_params") or {}
        per_row = sampling if isinstance(sampling, list) else [sampling] * len(rows)
        unknown = sorted({key for sp in per_row for key in sp} - SAMPLING_KEYS)
        if unknown and Version(VERSION) >= Version("0.5.22"):
            return 400, {"error": f"sampling_params: unknown field {unknown[0]!r}"}
        if unknown:
            return 500, "Internal Server Error"
        self.record(
            "/generate",
            num_rows=len(rows),
            return_logprob=body.get("return_logprob", False),
            seeds=[sp.get("sampling_seed") for sp in per_row],
        )
        aborts_at_start = self.aborts
        outs = []
        self.running += 1
        try:
            for row, sp in zip(rows, per_row):
                self._wait_while_paused()
                if self.aborts != aborts_at_start:
                    outs.append(self._aborted())
                    continue
                outs.append(self._one(row, sp, body.get("return_logprob", False)))
                time.sleep(ROW_DELAY_S)
        except ValueError as error:
            return 400, {"error": {"message": str(error)}}
        finally:
            self.running -= 1
            self.record("/generate done", num_rows=len(rows))
        return 200, outs[0] if single else outs

    def _wait_while_paused(self):
        """A retract/in_place pause holds running requests until /continue_generation."""
        if self.paused and self.pause_mode in ("retract", "in_place"):
            self.running -= 1
            with self.resume_cond:
                self.resume_cond.wait_for(lambda: not self.paused, timeout=60)
            self.running += 1

    def _aborted(self):
        finish = {"type": "abort", "message": "Abort all requests", "status_code": 200, "err_type": None}
        return {"text": "", "output_ids": [], "meta_info": {"id": uuid.uuid4().hex, "finish_reason": finish}}

    def _one(self, prompt, sp, return_logprob):
        stop = sp.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        if stop and self.args.skip_tokenizer_init:
            raise ValueError("stop strings need the tokenizer (server runs skip_tokenizer_init)")
        # SGLang builds the per-request seed tensor only under deterministic inference (sampling_batch_info.py).
        seed = sp.get("sampling_seed") if self.args.enable_deterministic_inference else None
        if seed is None:
            seed = self.args.random_seed * 1_000_003 + self.sample_counter
            self.sample_counter += 1
        params = SamplingParams(
            max_new_tokens=sp.get("max_new_tokens", 128),
            temperature=sp.get("temperature", 1.0),
            top_p=sp.get("top_p", 1.0),
            top_k=sp.get("top_k", -1),
            stop=stop,
            seed=seed,
        )
        with self.lock:
            g = self.engine.generate([prompt], params)[0]
        tok = self.engine.tokenizer
        if g.finish_reason == "length":
            finish = {"type": "length", "length": len(g.token_ids)}
        elif g.token_ids and g.token_ids[-1] in self.engine._eos_ids():
            finish = {"type": "stop", "matched": g.token_ids[-1]}
        else:
            finish = {"type": "stop", "matched": next(s for s in stop if s in g.text)}
        text = g.text
        if finish.get("matched") in stop and not sp.get("no_stop_trim", False):
            text = text[: text.find(finish["matched"])]
        meta = {
            "id": uuid.uuid4().hex,
            "finish_reason": finish,
            "prompt_tokens": len(g.prompt_token_ids),
            "weight_version": self.weight_version,
            "completion_tokens": len(g.token_ids),
            "cached_tokens": 0,
            "e2e_latency": 0.0,
        }
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(g.logprobs, g.token_ids)]
        out = {"output_ids": g.token_ids, "meta_info": meta}
        if not self.args.skip_tokenizer_init and tok is not None:
            out = {"text": text, **out}
        return out

    # ------------------------------------------------------------------------------------------ weights
    def update_weights_from_tensor(self, body):
        entries = body["serialized_named_tensors"]
        if len(entries) != self.args.tp_size:
            return 400, {"success": False, "message": f"{len(entries)} entries for tp_size {self.args.tp_size}"}
        # Each TP rank decodes its own entry (tp_worker.py: serialized_named_tensors[tp_rank]); all must agree.
        per_rank = [self._decode(entry, body.get("load_format")) for entry in entries]
        named = per_rank[0]
        for rank, other in enumerate(per_rank[1:], start=1):
            if [n for n, _ in other] != [n for n, _ in named] or not all(
                torch.equal(a, b) for (_, a), (_, b) in zip(other, named)
            ):
                return 400, {"success": False, "message": f"TP rank {rank} got other tensors than rank 0"}
        self.record(
            "/update_weights_from_tensor",
            load_format=body.get("load_format"),
            num_tensors=len(named),
            bytes=sum(t.numel() * t.element_size() for _, t in named),
            names=[n for n, _ in named],
            weight_version=body.get("weight_version"),
            tp_entries=len(entries),
        )
        return self._load(named, body.get("weight_version"))

    @staticmethod
    def _decode(entry, load_format):
        payload = pickle.loads(base64.b64decode(entry, validate=True))
        if load_format == "flattened_bucket":
            return [(m.name, _reconstruct(payload["flattened_tensor"], m)) for m in payload["metadata"]]
        return payload

    def _load(self, named, weight_version):
        # As SGLang's models' load_weights (e.g. srt/models/qwen2.py): a name the model lacks is skipped with a
        # logged warning, and the update still reports success.
        params = dict(self.engine.model.named_parameters(remove_duplicate=False))
        for name, _ in named:
            if name not in params:
                print(f"WARNING Parameter {name} not found in params_dict", file=sys.stderr)
        named = [(name, tensor) for name, tensor in named if name in params]
        try:
            with self.lock:
                self.engine.update_weights([named])
        except ValueError as error:
            return 400, {"success": False, "message": f"Failed to update weights: {error}"}
        if weight_version is not None:
            self.weight_version = weight_version
        return 200, {"success": True, "message": "Succeeded to update model weights."}

    def init_weights_update_group(self, body):
        self.record("/init_weights_update_group", **body)
        if body["backend"] != "gloo":
            return 400, {"success": False, "message": "the CPU stand-in joins side groups with gloo only"}
        from torch.distributed import distributed_c10d as c10d

        # As SGLang's init_custom_process_group: rendezvous store, PrefixStore(group_name), private group helper.
        timeout = timedelta(seconds=60)
        url = f"tcp://{body['master_address']}:{body['master_port']}"
        store, rank, world = next(c10d.rendezvous(url, body["rank_offset"], body["world_size"], timeout=timeout))
        store.set_timeout(timeout)
        store = c10d.PrefixStore(body["group_name"], store)
        group, _ = c10d._new_process_group_helper(
            world, rank, [], "gloo", store, group_name=body["group_name"], timeout=timeout
        )
        c10d._world.pg_group_ranks[group] = {i: i for i in range(world)}
        self.groups[body["group_name"]] = group
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def update_weights_from_distributed(self, body):
        group = self.groups.get(body["group_name"])
        if group is None:
            return 400, {"success": False, "message": f"no weight update group {body['group_name']!r}"}
        named = []
        for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            torch.distributed.broadcast(tensor, src=0, group=group)
            named.append((name, tensor))
        self.record(
            "/update_weights_from_distributed",
            num_tensors=len(named),
            bytes=sum(t.numel() * t.element_size() for _, t in named),
            names=body["names"],
            weight_version=body.get("weight_version"),
        )
        return self._load(named, body.get("weight_version"))

    def destroy_weights_update_group(self, body):
        self.record("/destroy_weights_update_group", **body)
        group = self.groups.pop(body["group_name"], None)
        if group is None:
            return 400, {"success": False, "message": f"no weight update group {body['group_name']!r}"}
        torch.distributed.destroy_process_group(group)
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}

    # ------------------------------------------------------------------------------------------ memory / control
    def release(self, body):
        tags = body.get("tags") or sorted(MEMORY_TAGS)
        self.record("/release_memory_occupation", tags=body.get("tags"))
        if not self.args.enable_memory_saver or set(tags) - MEMORY_TAGS or set(tags) & self.released:
            return 400, {"error": {"message": f"cannot release {tags} (released: {sorted(self.released)})"}}
        self.released |= set(tags)
        if "weights" in tags and self.args.enable_weights_cpu_backup:
            self.weights_backup = {n: p.detach().clone() for n, p in self.engine.model.named_parameters()}
        return 200, None

    def resume(self, body):
        tags = body.get("tags") or sorted(self.released)
        self.record("/resume_memory_occupation", tags=body.get("tags"))
        if set(tags) - self.released:
            return 400, {"error": {"message": f"cannot resume {tags}: not released"}}
        self.released -= set(tags)
        if "weights" in tags:  # fresh device memory: the old contents only where a CPU backup kept them
            with self.lock, torch.no_grad():
                for name, param in self.engine.model.named_parameters():
                    param.copy_(self.weights_backup[name]) if self.weights_backup else param.zero_()
            self.weights_backup = None
        return 200, None

    def pause(self, body):
        self.record("/pause_generation", body=body)
        if PAUSE_MODES is not None and body.get("mode", "abort") not in PAUSE_MODES:
            return 422, {"detail": f"mode must be one of {PAUSE_MODES}"}
        self.paused = True
        self.pause_mode = body.get("mode", "abort") if PAUSE_MODES is not None else "abort"
        if self.pause_mode == "abort":  # tokenizer_manager.pause_generation: abort_request(abort_all=True)
            self.aborts += 1
        return 200, {"message": "Generation paused successfully.", "status": "ok"}

    def resume_generation(self, _body):
        self.record("/continue_generation")
        with self.resume_cond:
            self.paused = False
            self.resume_cond.notify_all()
        return 200, {"message": "Generation continued successfully.", "status": "ok"}

    def flush_cache(self, _body):
        self.record("/flush_cache", running=self.running)
        return (200 if self.running == 0 else 400), "Cache flushed.\n"  # retracted requests wait, not run

    def server_info(self, _body):
        info = {k: v for k, v in vars(self.args).items()}
        return 200, {**info, "version": VERSION, "weight_version": self.weight_version}


def _reconstruct(flat, meta):
    """FlattenedTensorBucket.reconstruct_tensors of the played version (weight_sync/tensor_bucket.py)."""
    if Version(VERSION) >= Version("0.5.6"):
        return flat[meta.start_idx : meta.end_idx].view(meta.dtype).reshape(meta.shape)
    tensor = flat[meta.start_idx : meta.end_idx].reshape(meta.shape)
    return tensor if tensor.dtype == meta.dtype else tensor.to(meta.dtype)


def make_handler(state: StandIn):
    routes = {
        "/generate": state.generate,
        "/update_weights_from_tensor": state.update_weights_from_tensor,
        "/init_weights_update_group": state.init_weights_update_group,
        "/update_weights_from_distributed": state.update_weights_from_distributed,
        "/destroy_weights_update_group": state.destroy_weights_update_group,
        "/release_memory_occupation": state.release,
        "/resume_memory_occupation": state.resume,
        "/pause_generation": state.pause,
        "/continue_generation": state.resume_generation,
        "/flush_cache": state.flush_cache,
        "/get_server_info": state.server_info,
        # /get_weight_version is left out: 404 from 0.5.6, removed in 0.5.21 (entrypoints/http_server.py).
        "/get_model_info": lambda _b: (
            200,
            {"model_path": state.args.model_path, "weight_version": state.weight_version},
        ),
        "/health_generate": lambda _b: (200 if not state.released else 503, ""),
        "/health": lambda _b: (200, ""),
        "/standin/calls": lambda _b: (200, state.calls),
    }

    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            route = routes.get(self.path)
            if route is None:
                return self._send(404, {"detail": "Not Found"})
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"null") if length else {}
            status, content = route(body or {})
            self._send(status, content)

        def _send(self, status, content):
            data = content.encode() if isinstance(content, str) else json.dumps(content).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(content, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, *args):
            pass

    return Handler


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(args.random_seed)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(StandIn(args)))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
