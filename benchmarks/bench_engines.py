"""Engine benchmarks: embedded generation throughput, weight-update time vs a raw copy, memory release/resume.

  python benchmarks/bench_engines.py                    # CPU, small shapes (a few minutes on 2 cores)
  python benchmarks/bench_engines.py --device cuda      # a GPU machine: bigger model, free memory around release

Weight update rows push the same bytes three ways in one run: a raw tensor copy (the floor), the embedded
engine's update_weights over buckets of 64/256/512 MB, and the flattened-bucket path the SGLang tensor
transport takes (flatten on the trainer side, then the engine loads the views: two copies in all).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fapo_megatron.engine_protocol import SamplingParams  # noqa: E402
from fapo_megatron.engines.embedded import EmbeddedEngine  # noqa: E402
from fapo_megatron.engines.weight_sync import MB, bucket_named_tensors, flatten_bucket, unflatten_bucket  # noqa: E402


def build_model(hidden: int, layers: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_generation(args, dtype) -> list[tuple[str, str]]:
    model = build_model(args.gen_hidden, args.gen_layers, args.vocab, dtype, args.device)
    engine = EmbeddedEngine(model=model, device=args.device, dtype=dtype)
    engine.start()
    prompts = torch.randint(0, args.vocab, (args.prompts, args.prompt_len)).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, n=args.n, seed=0)
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=2))  # warm-up
    sync(args.device)
    start = time.perf_counter()
    gens = engine.generate(prompts, params)
    sync(args.device)
    seconds = time.perf_counter() - start
    tokens = sum(len(g.token_ids) for g in gens)
    shape = f"hidden {args.gen_hidden}, {args.gen_layers} layers, {args.prompts}x{args.n} rows, {args.new_tokens} new"
    return [("embedded generate", f"{tokens / seconds:,.0f} output tokens/s ({shape}; {seconds:.2f} s)")]


def bench_weight_update(args, dtype) -> list[tuple[str, str]]:
    model = build_model(args.wu_hidden, args.wu_layers, args.vocab, dtype, args.device)
    engine = EmbeddedEngine(model=model, device=args.device, dtype=dtype)
    engine.start()
    source = [(n, torch.randn_like(p)) for n, p in model.named_parameters()]
    total = sum(t.numel() * t.element_size() for _, t in source)
    targets = dict(model.named_parameters())

    def raw_copy():
        with torch.no_grad():
            for name, tensor in source:
                targets[name].copy_(tensor)

    def flattened(bucket_mb):
        for bucket in bucket_named_tensors(source, bucket_mb * MB):
            flat, metadata = flatten_bucket(bucket)
            engine.update_weights([unflatten_bucket(flat, metadata)])

    variants = {"raw tensor copy": raw_copy}
    for bucket_mb in args.bucket_mb:
        variants[f"embedded update_weights, {bucket_mb} MB buckets"] = lambda mb=bucket_mb: engine.update_weights(
            bucket_named_tensors(source, mb * MB)
        )
    for bucket_mb in args.bucket_mb:
        variants[f"flattened bucket (SGLang tensor path), {bucket_mb} MB"] = lambda mb=bucket_mb: flattened(mb)
    best = {name: float("inf") for name in variants}
    for _ in range(args.repeats):  # interleaved, best of N: a shared machine's noise hits every variant alike
        for name, fn in variants.items():
            sync(args.device)
            start = time.perf_counter()
            fn()
            sync(args.device)
            best[name] = min(best[name], time.perf_counter() - start)
    raw = best["raw tensor copy"]
    rows = [("raw tensor copy", f"{total / MB:,.0f} MB in {raw * 1e3:.1f} ms = {total / raw / 1e9:.2f} GB/s")]
    for name, seconds in list(best.items())[1:]:
        rate = f"{total / seconds / 1e9:.2f} GB/s"
        rows.append((name, f"{seconds * 1e3:.1f} ms = {rate}, {seconds / raw:.2f}x raw copy"))
    if args.device.startswith("cuda"):
        rows.extend(bench_release(engine, args.device))
    return rows


def bench_release(engine: EmbeddedEngine, device: str) -> list[tuple[str, str]]:
    def free_gb() -> float:
        torch.cuda.synchronize()
        return torch.cuda.mem_get_info(torch.device(device))[0] / 1e9

    before = free_gb()
    start = time.perf_counter()
    engine.release_memory()
    released_s, after_release = time.perf_counter() - start, free_gb()
    start = time.perf_counter()
    engine.resume_memory()
    resumed_s, after_resume = time.perf_counter() - start, free_gb()
    return [
        ("release_memory (weights to host)", f"{released_s:.3f} s; free {before:.2f} -> {after_release:.2f} GB"),
        ("resume_memory (weights -> device)", f"{resumed_s:.3f} s, free {after_release:.2f} -> {after_resume:.2f} GB"),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--gen-hidden", type=int, default=None)
    p.add_argument("--gen-layers", type=int, default=None)
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--wu-hidden", type=int, default=None, help="weight-update model width")
    p.add_argument("--wu-layers", type=int, default=None)
    p.add_argument("--bucket-mb", type=int, nargs="+", default=[64, 256, 512])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    defaults = dict(
        vocab=32000 if cuda else 4096,
        gen_hidden=1024 if cuda else 128,
        gen_layers=8 if cuda else 4,
        prompts=64 if cuda else 8,
        new_tokens=128 if cuda else 32,
        wu_hidden=2048 if cuda else 1024,
        wu_layers=16 if cuda else 6,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    rows = bench_generation(args, dtype) + bench_weight_update(args, dtype)
    print(f"\nengines benchmark on {device_name}, {dtype}, torch {torch.__version__}\n")
    width = max(len(name) for name, _ in rows)
    print(f"| {'what'.ljust(width)} | result |\n|{'-' * (width + 2)}|--------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
