"""Throughput of the megatron actor's train_step.

    python benchmarks/bench_actor.py                  # CPU: tiny Qwen2, tokens/s at TP1 (1 rank) vs TP2 (2 ranks)
    python benchmarks/bench_actor.py --device cuda    # GPU: Qwen2.5-1.5B shape, bf16, seq 4096, local spec + SDPA,
                                                      # tokens/s and MFU next to an HF transformers training step
    python benchmarks/bench_actor.py --long-tail      # CPU: lognormal response lengths, padded micro-batches vs
                                                      # packed ones (parallel.max_tokens_per_micro_batch)
Both modes print a markdown table. Timed steps include forward, backward and the optimizer step; the GPU model
has random weights (no checkpoint needed), and the HF baseline runs the same loss with torch AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN25_15B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "use_sliding_window": False,
}


def make_batch(rows: int, seq: int, vocab: int, seed: int = 0):
    from fapo_megatron.algo.batch import TrainBatch

    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, seq)
    mask[:, seq // 8 :] = 1.0
    return TrainBatch(
        tokens=torch.randint(0, vocab, (rows, seq), generator=gen),
        lengths=torch.full((rows,), seq),
        response_mask=mask,
        advantages=torch.randn(rows, generator=gen),
        group_ids=torch.arange(rows),
        old_logprobs=-torch.rand(rows, seq, generator=gen) * mask,
    )


def make_long_tail_batch(rows: int, prompt: int, median: int, cap: int, vocab: int, seed: int = 0):
    """Prompt of `prompt` tokens + a lognormal(log median, 1) response capped at `cap`: a long-tailed RL batch."""
    from fapo_megatron.algo.batch import TrainBatch

    gen = torch.Generator().manual_seed(seed)
    responses = (torch.randn(rows, generator=gen) + torch.log(torch.tensor(float(median)))).exp()
    lengths = prompt + responses.round().long().clamp(1, cap)
    seq = int(lengths.max())
    columns = torch.arange(seq)[None, :]
    mask = ((columns >= prompt) & (columns < lengths[:, None])).float()
    return TrainBatch(
        tokens=torch.randint(0, vocab, (rows, seq), generator=gen),
        lengths=lengths,
        response_mask=mask,
        advantages=torch.randn(rows, generator=gen),
        group_ids=torch.arange(rows),
        old_logprobs=-torch.rand(rows, seq, generator=gen) * mask,
    )


def train_flops_per_token(cfg: dict, seq: int) -> float:
    """6 x matmul parameters (incl. the output projection) + causal attention scores and values, fwd + bwd."""
    h, layers, ffn = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * ffn
    matmul_params = layers * per_layer + h * cfg["vocab_size"]
    attention = layers * 6 * seq * h  # QK^T and AV, causal half, x3 for backward
    return 6 * matmul_params + attention


def _actor_config(rows: int, tp: int, world: int, device: str, dtype: str, extra: tuple[str, ...] = ()):
    from fapo_megatron.config import load_config

    return load_config(
        None,
        [
            f"cluster.device={device}",
            f"cluster.devices_per_node={world}",
            f"parallel.tp={tp}",
            f"model.dtype={dtype}",
            "rollout.n=1",
            f"algorithm.mini_batch_size={rows}",
            f"data.batch_size={rows}",
            "optim.warmup_steps=0",
            "optim.lr=0.00001",
            *extra,
        ],
    )


def measure_actor(
    hf_cfg: dict, rows: int, seq: int, tp: int, world: int, device: str, dtype: str, steps: int, batch=None, extra=()
):
    """Timed train_step; tokens/s counts the batch's real (unpadded) tokens, peak_rss_gb this process's peak."""
    import resource

    from fapo_megatron.megatron import platform
    from fapo_megatron.megatron.actor import MegatronActor

    actor = MegatronActor(_actor_config(rows, tp, world, device, dtype, extra), hf_config=hf_cfg)
    batch = batch if batch is not None else make_batch(rows, seq, hf_cfg["vocab_size"])
    actor.train_step(batch)  # warm-up
    platform.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        actor.train_step(batch)
    platform.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    real = int(batch.lengths.sum())
    return {"tokens_per_s": real / elapsed, "step_s": elapsed, "peak_gb": peak, "peak_rss_gb": rss}


def measure_hf(hf_cfg: dict, rows: int, seq: int, steps: int) -> dict:
    import transformers

    from fapo_megatron.algo import ppo_loss

    cfg = transformers.Qwen2Config(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")})
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    model = model.cuda().train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = make_batch(rows, seq, hf_cfg["vocab_size"]).to("cuda")

    def step():
        optim.zero_grad(set_to_none=True)
        for row in range(rows):
            tokens = batch.tokens[row : row + 1]
            logits = model(tokens).logits.float()
            picked = torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
            logprobs = torch.nn.functional.pad(picked, (1, 0))
            loss, _ = ppo_loss(
                logprobs,
                batch.old_logprobs[row : row + 1],
                batch.advantages[row : row + 1],
                batch.response_mask[row : row + 1],
                num_tokens=batch.num_response_tokens,
            )
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()

    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"tokens_per_s": rows * seq / elapsed, "step_s": elapsed, "peak_gb": peak}


_TRANSFORMER_CONFIG = None


def _without_jit_fusions(undo: bool = False) -> None:
    """Ablation: the actor with megatron's SwiGLU / bias-dropout-add fusions switched off."""
    import functools

    from fapo_megatron.models import registry

    global _TRANSFORMER_CONFIG
    torch.cuda.empty_cache()
    if undo:
        registry.transformer_config = _TRANSFORMER_CONFIG
        return
    _TRANSFORMER_CONFIG = registry.transformer_config

    def unfused(*args, **kwargs):
        kwargs.update(bias_activation_fusion=False, bias_dropout_fusion=False)
        return _TRANSFORMER_CONFIG(*args, **kwargs)

    registry.transformer_config = functools.wraps(_TRANSFORMER_CONFIG)(unfused)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_cpu(tp: int, world: int, args, extra: tuple[str, ...] = ()) -> dict:
    out = Path(tempfile.mkdtemp()) / "result.json"
    port, procs = _free_port(), []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // world)),
            PYTHONWARNINGS="ignore",
        )
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--tp",
            str(tp),
            "--world",
            str(world),
            "--rows",
            str(args.rows),
            "--seq",
            str(args.seq),
            "--steps",
            str(args.steps),
            "--out",
            str(out),
            *(["--long-tail"] if args.long_tail else []),
            *[arg for override in extra for arg in ("--override", override)],
        ]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL))
    if any(p.wait() for p in procs):
        raise RuntimeError(f"benchmark ranks failed for tp={tp} (rerun a rank by hand to see its error)")
    return json.loads(out.read_text())


def _long_tail_table(args) -> None:
    """Padded (micro_batch_size rows padded to the longest) vs packed, one rank each, in this run."""
    from fapo_megatron.models.spec import tiny_hf_config

    batch = make_long_tail_batch(args.rows, 64, 128, 1536, tiny_hf_config("qwen2")["vocab_size"])
    lengths = batch.lengths.float()
    print(
        f"CPU, tiny Qwen2 (2 layers, hidden 64), fp32, 1 rank; {args.rows} rows: prompt 64 + lognormal response "
        f"(median 128, sigma 1, cap 1536): lengths mean {lengths.mean():.0f}, max {lengths.max():.0f}"
    )
    print("| micro-batches | real tokens/s | s/step | peak RSS GB |\n|---|---|---|---|")
    variants = {
        "padded, micro_batch_size 4": ("parallel.micro_batch_size=4",),
        f"packed, max_tokens_per_micro_batch {args.budget}": (f"parallel.max_tokens_per_micro_batch={args.budget}",),
    }
    results = {}
    for name, extra in variants.items():
        results[name] = res = _launch_cpu(1, 1, args, extra)
        print(f"| {name} | {res['tokens_per_s']:.0f} | {res['step_s']:.3f} | {res['peak_rss_gb']:.2f} |")
    padded, packed = results.values()
    print(f"packed / padded real tokens/s: {packed['tokens_per_s'] / padded['tokens_per_s']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rows", type=int, default=None, help="sequences per step (cpu 16, cuda 4)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (cpu 128, cuda 4096)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak (H100 SXM: 989)")
    parser.add_argument("--without-fusions", action="store_true", help="cuda: also time the actor without jit fusions")
    parser.add_argument("--long-tail", action="store_true", help="cpu: lognormal responses, padded vs packed")
    parser.add_argument("--budget", type=int, default=2048, help="--long-tail: max_tokens_per_micro_batch")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rows = args.rows or (4 if args.device == "cuda" else 16)
    args.seq = args.seq or (4096 if args.device == "cuda" else 128)
    from fapo_megatron.models.spec import tiny_hf_config

    if args.worker:
        hf_cfg = tiny_hf_config("qwen2", max_position_embeddings=4096)
        batch = make_long_tail_batch(args.rows, 64, 128, 1536, hf_cfg["vocab_size"]) if args.long_tail else None
        result = measure_actor(
            hf_cfg, args.rows, args.seq, args.tp, args.world, "cpu", "float32", args.steps, batch, args.override
        )
        if int(os.environ["RANK"]) == 0:
            Path(args.out).write_text(json.dumps(result))
        return
    if args.long_tail:
        _long_tail_table(args)
        return
    if args.device == "cpu":
        print(f"CPU, tiny Qwen2 (2 layers, hidden 64), fp32, {args.rows} x {args.seq} tokens per train_step")
        print("| layout | ranks | tokens/s | s/step |\n|---|---|---|---|")
        for tp in (1, 2):
            res = _launch_cpu(tp, tp, args)
            print(f"| TP{tp} | {tp} | {res['tokens_per_s']:.0f} | {res['step_s']:.3f} |")
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    flops = train_flops_per_token(QWEN25_15B, args.seq)
    rows = [("HF transformers (sdpa) + AdamW", measure_hf(QWEN25_15B, args.rows, args.seq, args.steps))]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if args.without_fusions:
        _without_jit_fusions()
        rows.append(
            (
                "megatron actor without jit fusions",
                measure_actor(QWEN25_15B, args.rows, args.seq, 1, 1, "cuda", "bfloat16", args.steps),
            )
        )
        _without_jit_fusions(undo=True)
    rows.append(
        (
            "megatron actor (local spec + SDPA, jit-fused SwiGLU / bias-dropout-add)",
            measure_actor(QWEN25_15B, args.rows, args.seq, 1, 1, "cuda", "bfloat16", args.steps),
        )
    )
    print(
        f"{torch.cuda.get_device_name()}, Qwen2.5-1.5B shape, bf16, {args.rows} x {args.seq} tokens per step, "
        f"{flops / 1e9:.2f} GFLOP/token"
    )
    print("| implementation | tokens/s | model TFLOP/s | MFU | s/step | peak GB |\n|---|---|---|---|---|---|")
    for name, res in rows:
        tflops = res["tokens_per_s"] * flops / 1e12
        print(
            f"| {name} | {res['tokens_per_s']:.0f} | {tflops:.0f} | {100 * tflops / args.peak_tflops:.1f} % | "
            f"{res['step_s']:.2f} | {res['peak_gb']:.1f} |"
        )
    for name, res in rows[1:]:
        print(f"speed-up over HF ({name}): {res['tokens_per_s'] / rows[0][1]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
