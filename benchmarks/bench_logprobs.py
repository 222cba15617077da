"""Peak memory and time of the actor's log-prob pass (forward + backward) over one micro-batch's logits, chunked
along the sequence (parallel.logprob_chunk_tokens) or not.

    python benchmarks/bench_logprobs.py                      # CPU: 4096 tokens x Qwen2.5 vocab, bf16 logits
    python benchmarks/bench_logprobs.py --device cuda        # GPU: the same on the device, torch's peak allocated

Each variant runs in its own process. On CPU the memory is the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs once the logits exist) above its RSS then: what the log-prob pass adds to the logits the
output layer made, including the logits' gradient. On CUDA it is torch's peak allocated above the same point.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "log-probs, unchunked (fused)": (False, 0),
    "log-probs, chunked": (False, None),
    "log-probs + entropy gradient, unchunked (graph)": (True, 0),
    "log-probs + entropy gradient, chunked": (True, None),
}


def _kib_field(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(name)


def measure(device: str, tokens: int, vocab: int, chunk: int, entropy_grad: bool, repeats: int) -> dict:
    from fapo_megatron.megatron import model as mcore
    from fapo_megatron.megatron import platform
    from fapo_megatron.megatron.logprobs import vocab_parallel_logprobs

    platform.setup(device)
    mcore.init_model_parallel(1, 1, seed=0)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(1, tokens, vocab, generator=gen) * 2).to(torch.bfloat16).to(platform.device())
    targets = torch.randint(0, vocab, (1, tokens), generator=gen).to(platform.device())
    logits.requires_grad_(True)
    times, peaks = [], []
    for _ in range(repeats):
        logits.grad = None
        platform.synchronize()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")
            base = _kib_field("VmRSS")
        start = time.perf_counter()
        logprobs, entropy = vocab_parallel_logprobs(
            logits, targets, temperature=1.0, vocab_size=vocab, entropy_grad=entropy_grad, chunk_tokens=chunk
        )
        loss = logprobs.sum() + (entropy.sum() if entropy_grad else 0)
        loss.backward()
        platform.synchronize()
        times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else _kib_field("VmHWM")
        peaks.append(peak - base)
        del logprobs, entropy, loss
    return {"seconds": min(times), "extra_peak_gb": max(peaks) / 1e9, "logits_gb": logits.numel() * 2 / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, default=4096, help="positions of the micro-batch")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary rows (Qwen2.5: 151936)")
    parser.add_argument("--chunk", type=int, default=512, help="parallel.logprob_chunk_tokens of the chunked rows")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        entropy_grad, chunk = VARIANTS[args.worker]
        chunk = args.chunk if chunk is None else chunk
        print(json.dumps(measure(args.device, args.tokens, args.vocab, chunk, entropy_grad, args.repeats)))
        return
    print(
        f"{args.device}, {args.tokens} tokens x {args.vocab} vocab, bf16 logits, TP1; chunked: {args.chunk} tokens; "
        "forward + backward"
    )
    print("| log-prob pass | extra peak GB | s |\n|---|---|---|")
    for name in VARIANTS:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env["PYTHONWARNINGS"] = "ignore"
        cmd = [sys.executable, __file__, "--worker", name, "--device", args.device, "--tokens", str(args.tokens)]
        cmd += ["--vocab", str(args.vocab), "--chunk", str(args.chunk), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        print(f"| {name} | {res['extra_peak_gb']:.2f} | {res['seconds']:.2f} |")
    print(f"(the bf16 logits themselves: {res['logits_gb']:.2f} GB)")


if __name__ == "__main__":
    main()
